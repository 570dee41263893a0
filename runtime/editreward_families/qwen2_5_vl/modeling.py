"""Qwen2.5-VL EditReward's networks as small torch modules, written for the fast path and for export.

Three pieces, each exportable on its own:
- ``VisionEncoder``: one image's patches -> merged image embeddings. Everything that depends
  on the image grid (rotary tables, window permutation, padded attention windows) is computed on
  the host by ``vision_inputs`` (numpy) and fed in, so the graph has no data-dependent control flow.
- ``Decoder``: the Qwen2 decoder with plain 1-D RoPE positions (the reference feeds
  ``attention_mask.cumsum(-1) - 1`` to all three M-RoPE sections, which is ordinary RoPE),
  taking token ids plus image embeddings and an optional key/value cache.
- ``RewardHeads``: the two float32 MLP heads.

Parameter names match the checkpoint (after stripping ``model.visual.``,
``model.language_model.`` and ``rm_heads.``), so ``load_state_dict`` is strict.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .spec import HeadSpec, ModelSpec, TextSpec, VisionSpec
from .vision import window_counts
from .weights import split_state_dict


def _run(block: nn.Module, checkpointing: bool, *args):
    """``block(*args)``, recomputed in the backward pass instead of kept when ``checkpointing`` is on
    and gradients are being recorded (gradient checkpointing)."""
    if checkpointing and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(_at_least_float32(dtype))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 (the reference's upcast); float64 stays float64 (gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def neg_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive mask. The most negative finite value keeps fully masked rows NaN-free."""
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype))


def tracing() -> bool:
    """True while the ONNX exporter traces the modules. The eager fast paths below read tensor values
    on the host (window sizes, whether a batch is padded), which a trace would freeze into constants
    of one input; traced, the modules take forms that hold for every input (padded windows, masks)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Attention inside each run of ``counts`` consecutive rows (a window, or an image: patches come
    in window order). q, k, v [N, heads, d] -> [N, heads, d]. Runs of one length go through one
    batched SDPA call without a mask: the work of the windows alone, not of all N x N pairs."""
    if len(set(counts)) == 1:  # every window the same size (the usual image): a view, no gather
        split = lambda t: t.reshape(len(counts), counts[0], *t.shape[1:]).transpose(1, 2)  # [W, heads, n, d]
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(q.shape)
    out = torch.empty_like(q)
    starts_by_size, start = {}, 0
    for n in counts:
        starts_by_size.setdefault(n, []).append(start)
        start += n
    for n, starts in starts_by_size.items():
        rows = (torch.as_tensor(starts, device=q.device)[:, None] + torch.arange(n, device=q.device)).reshape(-1)
        gather = lambda t: t[rows].reshape(len(starts), n, *t.shape[1:]).transpose(1, 2)  # [W_n, heads, n, d]
        out[rows] = F.scaled_dot_product_attention(gather(q), gather(k), gather(v)).transpose(1, 2).reshape(-1, *q.shape[1:])
    return out


class PaddedWindows(NamedTuple):
    """The windows as a traced graph computes them: each window's rows padded to one length."""

    rows: torch.Tensor  # [windows, W] patch rows, padding pointing at row 0
    mask: torch.Tensor  # [windows, 1, 1, W] additive: padded keys masked out
    slots: torch.Tensor  # [N] each patch's row of the flattened [windows * W] output


def padded_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: PaddedWindows) -> torch.Tensor:
    """Attention inside each window, all windows in one batched SDPA call over [windows, heads, W, d]:
    the work of windows x W^2 pairs, not N^2. Padded queries read their window's keys (finite) and are
    dropped by ``slots``; padded keys get exactly zero weight. q, k, v [N, heads, d] -> [N, heads, d]."""
    gather = lambda t: t[windows.rows].transpose(1, 2)  # [windows, W, heads, d] -> [windows, heads, W, d]
    out = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), attn_mask=windows.mask)
    return out.transpose(1, 2).reshape(-1, *q.shape[1:])[windows.slots]


SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA's enable_gqa


def gqa_attention(q, k, v, native: bool, **kwargs) -> torch.Tensor:
    """Grouped-query SDPA: query head h reads key/value head h // groups. ``native``: torch's
    ``enable_gqa``, which reads each K/V head for its group without copying it; else K/V repeated per group."""
    if native:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), **kwargs)


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionAttention(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.num_heads = spec.num_heads
        self.qkv = nn.Linear(spec.hidden_size, 3 * spec.hidden_size)
        self.proj = nn.Linear(spec.hidden_size, spec.hidden_size)

    def forward(self, x, cos, sin, windows, counts):
        """Attention inside windows (or images): ``counts``, the rows of each (eager); traced,
        ``windows`` (``PaddedWindows``) in the windowed blocks, or over the whole call (one image) when None."""
        n = x.shape[0]
        # [N, 3*D] -> 3 x [N, heads, head_dim]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).unbind(1)
        dtype = q.dtype
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        wide = _at_least_float32(dtype)
        q = (q.to(wide) * cos + rotate_half(q.to(wide)) * sin).to(dtype)
        k = (k.to(wide) * cos + rotate_half(k.to(wide)) * sin).to(dtype)
        if counts is not None:
            return self.proj(segment_attention(q, k, v, counts).reshape(n, -1))
        if windows is not None:
            return self.proj(padded_window_attention(q, k, v, windows).reshape(n, -1))
        # the call's one image: [1, heads, N, head_dim], no mask
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out[0].transpose(0, 1).reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.norm1 = RMSNorm(spec.hidden_size, 1e-6)
        self.norm2 = RMSNorm(spec.hidden_size, 1e-6)
        self.attn = VisionAttention(spec)
        self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, bias=True)

    def forward(self, x, cos, sin, windows, counts):
        x = x + self.attn(self.norm1(x), cos, sin, windows, counts)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        p, t = spec.patch_size, spec.temporal_patch_size
        self.proj = nn.Conv3d(spec.in_channels, spec.hidden_size, (t, p, p), stride=(t, p, p), bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # The 3-D convolution covers each patch exactly once: a matmul with the flattened kernel.
        weight = self.proj.weight  # [H, C, T, P, P]; flatten (not reshape) exports as one Flatten the exporter folds
        return F.linear(patches.to(weight.dtype), weight.flatten(1))


class Merger(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.unit = spec.hidden_size * spec.spatial_merge_size**2
        self.ln_q = RMSNorm(spec.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.unit, self.unit), nn.GELU(), nn.Linear(self.unit, spec.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.unit))


class VisionEncoder(nn.Module):
    """patches [N, C*T*P*P] in window order -> embeddings [N / merge^2, H] in window order."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.fullatt = frozenset(spec.fullatt_block_indexes)
        self.checkpointing = False  # gradient checkpointing over the blocks (editreward_rt.differentiable)
        self.patch_embed = PatchEmbed(spec)
        self.blocks = nn.ModuleList(VisionBlock(spec) for _ in range(spec.depth))
        self.merger = Merger(spec)

    @staticmethod
    def layout(feeds) -> tuple[list[int], list[int]]:
        """The patches per window and per image of several images' ``vision_feeds`` (numpy, read on
        the host), for ``forward`` on their ``join_feeds``: the eager path attends per image."""
        windows = [n for arrays in feeds for n in window_counts(arrays[3])]
        return windows, [len(arrays[0]) for arrays in feeds]

    def forward(self, patches, cos, sin, window_rows, window_slots, layout=None):
        """One image's ``vision_feeds`` (several images' joined, with their ``layout``).
        ``layout``: ``self.layout(...)`` of the feeds, when the caller has them on the host."""
        x = self.patch_embed(patches)
        if tracing():  # padded windows, then the call's one image: what the exported graph computes, for any image
            valid = window_rows >= 0
            # where, not clamp: ONNX Clip on int64 is outside TensorRT's published ONNX op support.
            rows = torch.where(valid, window_rows, 0)
            window, full = (PaddedWindows(rows, neg_mask(valid, x.dtype)[:, None, None, :], window_slots), None), (None, None)
        else:  # attention per window (per image in the full-attention blocks), no mask
            windows, images = layout or (window_counts(window_rows), [x.shape[0]])
            window, full = (None, windows), (None, images)
        for i, block in enumerate(self.blocks):
            x = _run(block, self.checkpointing, x, cos, sin, *(full if i in self.fullatt else window))
        return self.merger(x)


class DecoderAttention(nn.Module):
    def __init__(self, spec: TextSpec):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, spec.num_heads * spec.head_dim)
        self.k_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim)
        self.v_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, past_k, past_v, keep=None):
        """-> (attention output [B, S, H], or [R, H] at the (batch row, position) pairs ``keep``
        ([R] each) only; the keys and values of every position, past included)."""
        b, s, _ = x.shape
        # [B, S, heads*d] -> [B, heads, S, d]
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k = k * cos + rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=2)  # [B, kv_heads, P+S, d]
        v = torch.cat([past_v, v], dim=2)
        if keep is not None:
            return self.kept(x, cos, sin, mask, k, v, *keep), k, v
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        if mask is None:  # causal, nothing padded: no mask at all (FlashAttention's case on a GPU)
            out = gqa_attention(q, k, v, SDPA_GQA, is_causal=True)
        else:  # boolean (prefix-causal or padded), or additive when traced (what the exported graph has always had)
            out = gqa_attention(q, k, v, SDPA_GQA and mask.dtype == torch.bool, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), k, v

    def kept(self, x, cos, sin, mask, k, v, rows, pos) -> torch.Tensor:
        """Attention output [R, H] of the queries at (rows[r], pos[r]) alone, over their rows' keys.
        One query per row: its heads sharing a key/value head are that head's queries, [R, kv_heads,
        groups, d], so grouped-query attention needs no repeated keys. Shapes are spelled out, not -1:
        R is 0 in a call that keeps nothing, and ONNX's Reshape cannot infer -1 beside a 0."""
        r, groups = rows.shape[0], self.num_heads // self.num_kv_heads  # shape, not len(): traced, len() is a constant
        # cos, sin [B, 1, S, d] -> [R, 1, 1, d]; q [R, kv_heads, groups, d]; k, v [R, kv_heads, P+S, d]
        cos, sin = cos[rows, :, pos].unsqueeze(2), sin[rows, :, pos].unsqueeze(2)
        # [1, R, H] in: a 2-D input with a bias would export as a Gemm, not the MatMul + Add every
        # other linear is (weight quantizers and TensorRT's Q/DQ rules look for MatMuls)
        q = self.q_proj(x[rows, pos].unsqueeze(0))[0].reshape(r, self.num_kv_heads, groups, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        if mask is None:  # causal over an unpadded batch without a past: a query sees the keys up to its own
            mask = (torch.arange(k.shape[2], device=k.device)[None, :] <= pos[:, None])[:, None, None, :]
        else:
            mask = mask[rows, :, pos].unsqueeze(2)  # [B, 1, S, P+S] -> [R, 1, 1, P+S]
        out = F.scaled_dot_product_attention(q, k[rows], v[rows], attn_mask=mask)
        return self.o_proj(out.reshape(r, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, spec: TextSpec):
        super().__init__()
        self.self_attn = DecoderAttention(spec)
        self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, bias=False)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def linear_groups(self) -> list[list[tuple[nn.Module, str]]]:
        """The layer's linears as (parent, attribute), grouped by the input they share, in execution
        order: what layer-wise quantizers (GPTQ) calibrate together."""
        a, m = self.self_attn, self.mlp
        return [[(a, "q_proj"), (a, "k_proj"), (a, "v_proj")], [(a, "o_proj")], [(m, "gate_proj"), (m, "up_proj")],
                [(m, "down_proj")]]

    def forward(self, x, cos, sin, mask, past_k, past_v, keep=None):
        """``keep`` (rows [R], positions [R]): the output only there, [R, H] (keys and values everywhere)."""
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v, keep)
        x = x if keep is None else x[keep]
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


def rope_inv_freq(spec: TextSpec) -> torch.Tensor:
    return 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim))


class Decoder(nn.Module):
    """(ids [B,S], image rows [M,H], row index [B,S] (-1: text), positions [B,S],
    mask [B,P+S], past [L,2,B,kv,P,d], keep [..., 2] or None) -> (final-normed hidden [B,S,H], or
    [..., H] at the (batch row, position) pairs ``keep``; present [L,2,B,kv,P+S,d])."""

    def __init__(self, spec: TextSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.checkpointing = False  # gradient checkpointing over the layers (editreward_rt.differentiable)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(spec), persistent=False)

    def token_embedding(self) -> nn.Module:
        """The token table (quantizers replace it with ``set_token_embedding``)."""
        return self.embed_tokens

    def set_token_embedding(self, module: nn.Module) -> None:
        self.embed_tokens = module

    def embed(self, input_ids, image_embeds, image_index):
        text = self.embed_tokens(input_ids)
        is_image = image_index >= 0
        # where, not clamp: ONNX Clip on int64 is outside TensorRT's published ONNX op support.
        rows = image_embeds.to(text.dtype)[torch.where(is_image, image_index, 0)]
        return torch.where(is_image.unsqueeze(-1), rows, text)

    def rope(self, position_ids, dtype):
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq  # [B, S, d/2]
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # [B, 1, S, d]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def causal_mask(self, attention_mask, s, dtype):
        total = attention_mask.shape[1]
        past = total - s
        keys = torch.arange(total, device=attention_mask.device)
        queries = torch.arange(s, device=attention_mask.device) + past
        allowed = (keys[None, :] <= queries[:, None])[None] & (attention_mask[:, None, :] > 0)
        return neg_mask(allowed, dtype).unsqueeze(1)  # [B, 1, S, P+S]

    def attention_mask(self, attention_mask, s, dtype):
        """The mask the layers take: None without a past (SDPA's ``is_causal``), a boolean
        [B, 1, S, P+S] with one, or, traced, ``causal_mask``'s additive one. Without a past, rows are
        right-padded (the pipeline's and the differentiable reward's batches): a valid query's
        earlier keys are all valid, so causal alone is exact for it; padded rows are never read, and
        later calls mask their cache entries out. Decided from shapes: nothing is read back from the device.
        With a mask, a padded query may read its own key too: a row with no key at all is NaN in
        some SDPA kernels, and a NaN cache entry spreads (0 x NaN) to later queries. Valid rows are unchanged."""
        total = attention_mask.shape[1]
        if tracing():
            return self.causal_mask(attention_mask, s, dtype)
        if total == s:
            return None
        keys = torch.arange(total, device=attention_mask.device)
        queries = torch.arange(s, device=attention_mask.device) + total - s
        causal = (keys[None, :] <= queries[:, None])[None]
        return (causal & ((attention_mask[:, None, :] > 0) | (keys[None, :] == queries[:, None])[None])).unsqueeze(1)

    def forward(self, input_ids, image_embeds, image_index, position_ids, attention_mask, past, keep=None):
        """``keep``: the last layer computes its attention output and MLP at those rows alone (its keys
        and values at every position still go into the cache): nothing else reads the others."""
        x = self.embed(input_ids, image_embeds, image_index)
        cos, sin = self.rope(position_ids, x.dtype)
        mask = self.attention_mask(attention_mask, input_ids.shape[1], x.dtype)
        rows = None if keep is None else (keep[..., 0].reshape(-1), keep[..., 1].reshape(-1))
        present, last = [], len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, k, v = _run(layer, self.checkpointing, x, cos, sin, mask, past[i, 0].to(x.dtype), past[i, 1].to(x.dtype),
                           rows if i == last else None)
            present.append(torch.stack([k, v]))
        hidden = self.norm(x)
        return (hidden if keep is None else hidden.reshape(*keep.shape[:-1], hidden.shape[-1])), torch.stack(present)


def head_mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    # Same indices as the checkpoint: 0 Linear, 1 ReLU, 2 Dropout, 3 Linear, 4 ReLU, 5 Linear.
    return nn.Sequential(
        nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Dropout(0.0),
        nn.Linear(sizes[1], sizes[2]), nn.ReLU(), nn.Linear(sizes[2], sizes[3]),
    )


class RewardHeads(nn.Module):
    """hidden [B, K, H] (row k read by head k) -> [B, K, 2] (mu, log_sigma), in float32."""

    def __init__(self, spec: HeadSpec):
        super().__init__()
        self.heads = nn.ModuleDict({f"head_{k}": head_mlp(spec.layer_sizes) for k in range(spec.num_heads)})

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.heads["head_0"][0].weight.dtype)  # float32, as the reference (float64 in gradient checks)
        return torch.stack([head(hidden[:, k]) for k, head in enumerate(self.heads.values())], dim=1)


def build_modules(spec: ModelSpec, state: dict[str, torch.Tensor] | None,
                  dtype: torch.dtype) -> tuple[VisionEncoder, Decoder, RewardHeads]:
    """The three modules on torch's default device (``with torch.device(...)``), in ``dtype`` (the heads
    in float32), loaded strictly from a checkpoint state dict. They are built on the meta device and
    take the state's tensors (``assign``), each moved and cast on its own: no module is initialised,
    and no float32 copy of a bf16 model is ever made. A tensor already on the device in its dtype is
    shared, not copied. ``state`` None: uninitialised memory, for a quantized state to fill."""
    device = torch.get_default_device()
    with torch.device("meta"):
        vision, decoder, heads = VisionEncoder(spec.vision), Decoder(spec.text), RewardHeads(spec.heads)
    parts = split_state_dict(state) if state is not None else None
    for module, name, want in ((vision, "vision", dtype), (decoder, "decoder", dtype), (heads, "heads", torch.float32)):
        if parts is None:
            module.to(want).to_empty(device=device)  # cast while still meta: free
        else:
            module.load_state_dict({k: v.to(device=device, dtype=want) for k, v in parts[name].items()}, strict=True,
                                   assign=True)
        module.eval().requires_grad_(False)
    decoder.inv_freq = rope_inv_freq(spec.text).to(device)  # computed, not stored; float32, as in the reference
    return vision, decoder, heads


def _placeholder(shape: torch.Size, dtype: torch.dtype, index: int) -> torch.Tensor:
    """A full-shape stand-in holding one row: a one-hot row broadcast over the leading dimensions,
    different for every parameter (the ONNX exporter merges parameters of equal value)."""
    row = torch.zeros(shape[-1] if shape else 1, dtype=dtype)
    row[index % row.numel()] = 1 + index // row.numel()
    return row.expand(shape) if shape else row[0]


def placeholder_modules(spec: ModelSpec, dtype: torch.dtype) -> tuple[VisionEncoder, Decoder, RewardHeads]:
    """The three modules at full shape with (almost) no memory: every parameter is a distinct
    ``_placeholder``, buffers are computed. For tracing graphs whose weights are streamed in later."""
    with torch.device("meta"):
        modules = build_modules(spec, None, dtype)
    index = 0
    for module in modules:
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if param is not None:
                    owner._parameters[name] = nn.Parameter(_placeholder(param.shape, param.dtype, index), requires_grad=False)
                    index += 1
    modules[1].inv_freq = rope_inv_freq(spec.text)
    left = [name for module in modules for name, buf in module.named_buffers() if buf.is_meta]
    if left:
        raise RuntimeError(f"placeholder_modules: buffers {left[:3]} have no value; compute them here")
    return modules
