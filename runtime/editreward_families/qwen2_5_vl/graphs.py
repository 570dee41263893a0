"""The exported graphs of a Qwen2.5-VL EditReward model: their I/O (names, dtypes, named
dynamic axes), the torch wrappers the exporter traces and the dummy inputs it traces them with.

- ``vision``: one image's window-ordered patches + host-computed rotary tables and padded window rows -> embeddings
- ``decoder``: token ids + image-embedding rows (+ key/value cache) -> hidden states at the rows to
  keep (the last layer computes nothing else; none kept: an empty ``keep``) + new cache
- ``heads``: hidden states at each <|Reward|> -> per-head (mu, log_sigma), float32
"""

from __future__ import annotations

from editreward_rt.families import CacheLayout, GraphSpec

from .vision import max_windows, vision_inputs, window_len


def cache_layout(spec, kv_dtype: str) -> CacheLayout:
    """[layers, key/value, batch, kv heads, positions, head dim]: the decoder's cache in and out."""
    t = spec.text
    return CacheLayout(kv_dtype, (t.num_layers, 2, "batch", t.num_kv_heads, "past", t.head_dim), 2, 4)


def graph_specs(spec, kv_dtype: str) -> dict[str, GraphSpec]:
    """The three graphs' I/O, in the roles the fast path feeds them."""
    t, v = spec.text, spec.vision
    cache = cache_layout(spec, kv_dtype).axes
    patch = v.in_channels * v.temporal_patch_size * v.patch_size**2
    return {
        "vision": GraphSpec("vision", (
            ("patches", "float32", ("patches", patch)), ("cos", "float32", ("patches", v.head_dim)),
            ("sin", "float32", ("patches", v.head_dim)),
            ("window_rows", "int64", ("windows", window_len(v.window_size, v.spatial_merge_size, v.patch_size))),
            ("window_slots", "int64", ("patches",)),
        ), (("image_embeds", "float32", ("tokens", v.out_hidden_size)),)),
        "decoder": GraphSpec("decoder", (
            ("input_ids", "int64", ("batch", "seq")), ("image_embeds", "float32", ("rows", t.hidden_size)),
            ("image_index", "int64", ("batch", "seq")), ("position_ids", "int64", ("batch", "seq")),
            ("attention_mask", "int64", ("batch", "total")), ("keep", "int64", ("kept", "kept_per", 2)),
            ("past", kv_dtype, cache),
        ), (("hidden", "float32", ("kept", "kept_per", t.hidden_size)),
            ("present", kv_dtype, tuple("total" if a == "past" else a for a in cache)))),
        "heads": GraphSpec("heads", (("hidden", "float32", ("batch", spec.heads.num_heads, t.hidden_size)),),
                           (("rewards", "float32", ("batch", spec.heads.num_heads, 2)),)),
    }


def export_wrappers(graphs, kv_dtype: str) -> dict:
    """Graph I/O stays float32 (the cache in ``kv_dtype``); compute runs in the graphs' dtype."""
    import torch
    from torch import nn

    dtype, kv = graphs.dtype, getattr(torch, kv_dtype)

    class Vision(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = graphs.vision_module

        def forward(self, patches, cos, sin, window_rows, window_slots):
            return self.inner(patches.to(dtype), cos, sin, window_rows, window_slots).float()

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = graphs.decoder

        def forward(self, input_ids, image_embeds, image_index, position_ids, attention_mask, keep, past):
            hidden, present = self.inner(input_ids, image_embeds, image_index, position_ids, attention_mask, past.to(dtype),
                                         keep)
            return hidden.float(), present.to(kv)

    return {"vision": Vision(), "decoder": Decoder(), "heads": graphs.head_module}


def dummy_inputs(spec, kv_dtype: str) -> dict:
    """Example inputs to trace each graph with (torch tensors, in input order)."""
    import torch

    t, v = spec.text, spec.vision
    m = v.spatial_merge_size
    prep = vision_inputs((1, 2 * m, 2 * m), v.head_dim, m, v.window_size, v.patch_size)
    n = len(prep.window_slots)
    patch = v.in_channels * v.temporal_patch_size * v.patch_size**2
    b, s, p = 2, 5, 3
    return {
        "vision": (torch.zeros(n, patch), torch.ones(n, v.head_dim), torch.zeros(n, v.head_dim),
                   torch.as_tensor(prep.window_rows), torch.as_tensor(prep.window_slots)),
        "decoder": (torch.zeros(b, s, dtype=torch.long), torch.zeros(3, t.hidden_size), torch.full((b, s), -1),
                    torch.arange(s).repeat(b, 1) + p, torch.ones(b, p + s, dtype=torch.long),
                    torch.tensor([[[0, s - 1]], [[1, s - 2]]]),
                    torch.zeros(cache_layout(spec, kv_dtype).shape(b, p), dtype=getattr(torch, kv_dtype))),
        "heads": (torch.zeros(b, spec.heads.num_heads, t.hidden_size),),
    }


def trt_profile_axes(spec, limits) -> dict[str, list[tuple[str, dict]]]:
    """TensorRT optimisation profiles per graph: named profiles, each a (min, opt, max) range for every
    dynamic axis of ``graph_specs``. ``limits``: ``editreward_trt.build.Limits``. Two decoder profiles:
    ``prefix`` (long sequences, small batch) and ``suffix`` (short sequences, every rubric pass); the
    TensorRT backend keeps at least one row per chunk of the batch, as [kept, 1, 2]."""
    v = spec.vision
    per_image = v.spatial_merge_size ** 2
    usual = spec.image.max_pixels // (spec.image.patch_size * spec.image.merge_size) ** 2  # most images: 256 tokens
    typical = max(1, min(limits.max_image_tokens, usual))
    window = v.window_size // v.spatial_merge_size // v.patch_size  # a window's side in merged tokens
    windows = lambda tokens: max_windows(tokens, window)
    b, k, seq, rows = limits.max_batch, limits.heads, limits.max_seq, limits.max_rows
    seg = min(seq, 2 * typical + 64)  # a per-triple prefix: two images and the instruction
    pb = limits.prefix_batch
    clamp = lambda lo, opt, hi: (lo, max(lo, min(opt, hi)), hi)
    return {
        "vision": [("image", {"patches": clamp(per_image, per_image * typical, per_image * limits.max_image_tokens),
                              "windows": clamp(1, -(-typical // window**2), windows(limits.max_image_tokens))})],
        "decoder": [
            ("prefix", {"batch": clamp(1, pb, pb), "seq": clamp(1, seg, seq), "rows": clamp(1, 2 * pb * typical, rows),
                        "past": clamp(0, 64, seq), "total": clamp(1, seg + 64, seq), "kept": clamp(1, 1, pb),
                        "kept_per": (1, 1, 1)}),
            ("suffix", {"batch": clamp(1, k * b, k * b), "seq": clamp(1, limits.max_suffix // 2, limits.max_suffix),
                        "rows": clamp(1, 1, rows), "past": clamp(0, seg + 64, seq),
                        "total": clamp(1, seg + 64 + limits.max_suffix // 2, seq), "kept": clamp(1, k * b, k * b),
                        "kept_per": (1, 1, 1)}),
        ],
        "heads": [("heads", {"batch": clamp(1, b, b)})],
    }


def fp16_fp32_pins(spec) -> dict[str, tuple[tuple[str, ...], int]]:
    """Graph -> (node-name patterns, how many blocks they must match) kept in fp32 in a TensorRT fp16
    build: the vision MLP down projections, whose activations overflow fp16. The exporter names
    nodes after module paths; each pattern's group is the block index."""
    return {"vision": ((r"/blocks\.(\d+)/mlp/down_proj/",), spec.vision.depth)}
