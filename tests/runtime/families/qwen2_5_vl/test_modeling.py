"""The family's torch modules: built on the meta device straight into their dtype, and the eager
fast paths (attention without a materialised mask in the decoder, windowed vision attention per
window) against the masked computation the exported graphs keep (``modeling.tracing()`` True)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from editreward_families.qwen2_5_vl import modeling
from editreward_families.qwen2_5_vl.vision import vision_inputs
from editreward_families.qwen2_5_vl.weights import split_state_dict
from editreward_rt.checkpoint import open_checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@pytest.fixture(scope="module")
def ckpt(tiny):
    return open_checkpoint(tiny.checkpoint, prompts_from=tiny.prompts)


@pytest.fixture
def masked(monkeypatch):
    """Run the modules as the exporter traces them: additive masks over every pair."""
    monkeypatch.setattr(modeling, "tracing", lambda: True)


class RealTensors(TorchDispatchMode):
    """Every tensor with storage (not meta) that an op makes while the mode is on: (op, dtype, numel)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += [(str(func), t.dtype, t.numel()) for t in tree_flatten(out)[0]
                      if isinstance(t, torch.Tensor) and not t.is_meta]
        return out


def old_build(spec, state, dtype):
    """The construction the meta build replaced: modules initialised in float32, loaded, then cast."""
    parts = split_state_dict(state)
    modules = modeling.VisionEncoder(spec.vision), modeling.Decoder(spec.text), modeling.RewardHeads(spec.heads)
    for module, name in zip(modules, ("vision", "decoder", "heads")):
        module.load_state_dict(parts[name], strict=True)
        module.eval().requires_grad_(False)
    modules[0].to(dtype)
    modules[1].to(dtype)
    # Recomputed: the cast above rounded the float32 RoPE frequencies to bf16 (a flaw of that build, gone now).
    modules[1].inv_freq = modeling.rope_inv_freq(spec.text)
    return modules[0], modules[1], modules[2].float()


def test_modules_are_built_straight_into_their_dtype(ckpt):
    """A bf16 model from a bf16 state: no float32 copy of any weight is made (only the float32 heads
    and RoPE frequencies are float32), nothing is initialised, and the weights are the state's own tensors."""
    state = {k: v if k.startswith("rm_heads") else v.bfloat16() for k, v in ckpt.state_dict().items()}
    with RealTensors() as seen:
        vision, decoder, heads = modeling.build_modules(ckpt.spec, state, torch.bfloat16)
    heads_numel = sum(p.numel() for p in heads.parameters()) + decoder.inv_freq.numel()
    assert sum(n for _, dtype, n in seen.made if dtype == torch.float32) <= heads_numel
    assert not [op for op, _, _ in seen.made if "uniform" in op or "normal" in op]  # no initialisation
    assert {p.dtype for m in (vision, decoder) for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in heads.parameters()} == {torch.float32} and decoder.inv_freq.dtype == torch.float32
    embed = decoder.embed_tokens.weight
    assert embed.data_ptr() == state["model.language_model.embed_tokens.weight"].data_ptr()  # shared, not copied
    assert not any(p.requires_grad for m in (vision, decoder, heads) for p in m.parameters())


def pipeline_outputs(ckpt, modules, dtype, triples):
    from editreward_rt.backends.torch_backend import TorchGraphs
    from editreward_rt.pipeline import FastPipeline

    graphs = TorchGraphs(ckpt.spec, None, torch.device("cpu"), dtype, modules=modules)
    if modeling.tracing():  # as an exported vision graph runs: one image per call
        joined = graphs.vision
        graphs.vision = lambda feeds: torch.cat([joined([arrays]) for arrays in feeds])
    return FastPipeline(graphs).run(triples)


def prepared(tiny, images):
    """Three triples, two sharing a source and one of another size: padded levels and unequal images."""
    from editreward_rt import Scorer

    scorer = Scorer.load(tiny.checkpoint, backend="torch", prompts_from=tiny.prompts, threads=1)
    return [scorer.prepare("Add a green bowl", images[0], images[1]), scorer.prepare("Make it night", images[0], images[2]),
            scorer.prepare("Zoom out, please", images[3], images[4])]


def test_meta_build_scores_as_the_float32_build_did(tiny, ckpt, images):
    triples = prepared(tiny, images)
    for dtype in (torch.float32, torch.bfloat16):
        new = pipeline_outputs(ckpt, modeling.build_modules(ckpt.spec, ckpt.state_dict(), dtype), dtype, triples)
        old = pipeline_outputs(ckpt, old_build(ckpt.spec, ckpt.state_dict(), dtype), dtype, triples)
        np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_attention_scores_as_the_masked_form(tiny, ckpt, images, dtype, monkeypatch):
    """The whole fast path (vision per window, decoder with is_causal / boolean masks and native
    grouped-query attention) against the same modules computing with the exported graphs' additive
    masks, held to the dtype's tolerance."""
    from editreward_rt.tolerances import tolerance, within, max_abs_diff

    triples = prepared(tiny, images)
    torch_dtype = getattr(torch, dtype)
    modules = modeling.build_modules(ckpt.spec, ckpt.state_dict(), torch_dtype)
    fast = pipeline_outputs(ckpt, modules, torch_dtype, triples)
    monkeypatch.setattr(modeling, "tracing", lambda: True)
    slow = pipeline_outputs(ckpt, modules, torch_dtype, triples)
    assert np.isfinite(fast).all()
    assert within(max_abs_diff(fast, slow), tolerance("torch-fast", dtype))
    if dtype == "float32":
        np.testing.assert_allclose(fast, slow, atol=2e-5, rtol=0)


def decoder_inputs(spec, batch, s, past_len, padded_rows, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = spec.text
    ids = torch.randint(0, t.vocab_size, (batch, s), generator=gen)
    mask = torch.ones(batch, past_len + s, dtype=torch.long)
    for row, pad in padded_rows.items():  # right padding: the last ``pad`` positions of the row
        mask[row, past_len + s - pad:] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]
    past = torch.randn(t.num_layers, 2, batch, t.num_kv_heads, past_len, t.head_dim, generator=gen)
    return ids, torch.zeros(1, t.hidden_size), torch.full((batch, s), -1), positions, mask, past


@pytest.mark.parametrize("past_len,padded,kind", [(0, {}, None), (0, {1: 3}, None), (0, {1: 7}, None), (5, {}, torch.bool),
                                                  (5, {0: 2, 1: 6}, torch.bool), (5, {1: 12}, torch.bool)])  # last: a row all padding, past too
def test_decoder_attention_equals_the_additive_mask(ckpt, past_len, padded, kind, monkeypatch):
    """Causal without a mask when there is no past (rows right-padded), else a boolean mask; rows
    all padding included. The valid rows' hidden states and cache entries equal the additive-mask computation's."""
    decoder = modeling.build_modules(ckpt.spec, ckpt.state_dict(), torch.float32)[1]
    ids, embeds, index, positions, mask, past = decoder_inputs(ckpt.spec, 2, 7, past_len, padded)
    chosen = decoder.attention_mask(mask, ids.shape[1], torch.float32)
    assert (chosen is None) if kind is None else (chosen.dtype == kind)
    # Every query reads some key: a fully masked row is NaN in some SDPA kernels, and a NaN cache entry spreads.
    assert chosen is None or chosen.any(-1).all()
    with torch.inference_mode():
        hidden, present = decoder(ids, embeds, index, positions, mask, past)
        monkeypatch.setattr(modeling, "tracing", lambda: True)
        want_hidden, want_present = decoder(ids, embeds, index, positions, mask, past)
    valid = mask[:, past_len:].bool()  # valid queries: their outputs are all anything reads
    assert torch.isfinite(hidden).all() and torch.isfinite(present).all()
    torch.testing.assert_close(hidden[valid], want_hidden[valid], atol=1e-5, rtol=1e-5)
    keep = mask.bool()[None, None, :, None, :, None].expand_as(present)
    torch.testing.assert_close(present[keep], want_present[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("past_len,padded", [(0, {}), (0, {1: 3}), (5, {0: 2, 1: 4})])
def test_decoder_last_layer_at_the_kept_rows_alone(ckpt, past_len, padded, traced, monkeypatch):
    """``keep``: the last layer's attention output and MLP at those (row, position) pairs alone
    equal the full computation's hidden states there, shaped as ``keep`` less its last axis; the
    cache is the same, every position's; an empty ``keep`` (a level that keeps nothing) gives [0, 1, H]."""
    decoder = modeling.build_modules(ckpt.spec, ckpt.state_dict(), torch.float32)[1]
    inputs = decoder_inputs(ckpt.spec, 2, 7, past_len, padded)
    last = [7 - padded.get(row, 0) - 1 for row in (0, 1)]  # each row's last valid position (its <|Reward|>)
    keep = torch.tensor([[[0, last[0]], [1, last[1]]], [[0, 0], [1, 2]]])  # [T=2, K=2, 2], a row kept twice
    if traced:
        monkeypatch.setattr(modeling, "tracing", lambda: True)
    with torch.inference_mode():
        full, present = decoder(*inputs)
        kept, kept_present = decoder(*inputs, keep)
        none, _ = decoder(*inputs, torch.zeros(0, 1, 2, dtype=torch.long))
    assert kept.shape == (2, 2, ckpt.spec.text.hidden_size) and none.shape == (0, 1, ckpt.spec.text.hidden_size)
    torch.testing.assert_close(kept, full[keep[..., 0], keep[..., 1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kept_present, present, atol=0, rtol=0)


def vision_feeds(spec, grid, seed=0):
    """One image's vision inputs (random patches) as numpy arrays, in the graph's input order."""
    v = spec.vision
    prep = vision_inputs(grid, v.head_dim, v.spatial_merge_size, v.window_size, v.patch_size)
    n = len(prep.window_slots)
    patches = np.random.default_rng(seed).standard_normal((n, v.in_channels * v.temporal_patch_size * v.patch_size**2))
    return patches.astype(np.float32), prep.cos, prep.sin, prep.window_rows, prep.window_slots


def masked_vision(vision, patches, cos, sin, windows: list[int]):
    """The tower as the graphs computed it before per-window attention: every block over all N
    patches, window blocks under an additive [N, N] mask of equal window ids."""
    ids = torch.as_tensor(np.repeat(np.arange(len(windows)), windows))
    mask = modeling.neg_mask(ids[:, None] == ids[None, :], patches.dtype)
    x = vision.patch_embed(patches)
    for i, block in enumerate(vision.blocks):
        attn = block.attn
        h = block.norm1(x)
        q, k, v = attn.qkv(h).reshape(len(h), 3, attn.num_heads, -1).unbind(1)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * c + modeling.rotate_half(q) * s, k * c + modeling.rotate_half(k) * s
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None if i in vision.fullatt else mask)
        x = x + attn.proj(out[0].transpose(0, 1).reshape(len(h), -1))
        x = x + block.mlp(block.norm2(x))
    return vision.merger(x)


GRIDS = {"one-window": (1, 4, 6), "equal-windows": (1, 16, 16), "unequal-windows": (1, 20, 28)}


@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
def test_vision_windows_eager_and_traced_equal_the_masked_form(ckpt, grid, monkeypatch):
    """Per window eagerly (runs of equal size batched), and as the exported graph computes it
    (windows gathered into [windows, heads, W, d] with padded keys masked, the full blocks over
    the call's one image), both against attention over all N patches under an [N, N] mask."""
    vision = modeling.build_modules(ckpt.spec, ckpt.state_dict(), torch.float32)[0]
    arrays = vision_feeds(ckpt.spec, grid)
    feeds = tuple(torch.as_tensor(a) for a in arrays)
    windows, images = vision.layout([arrays])  # read on the host
    assert images == [len(arrays[0])] and sum(windows) == len(arrays[0])
    assert (len(set(windows)) > 1) == (grid == GRIDS["unequal-windows"])  # the case it names
    assert (arrays[3] < 0).any() == (grid != GRIDS["equal-windows"])  # padded windows: the case the mask is for
    with torch.inference_mode():
        want = masked_vision(vision, *feeds[:3], windows)
        fast = vision(*feeds, layout=(windows, images))
        found = vision(*feeds)  # no layout given: read from the window rows
        monkeypatch.setattr(modeling, "tracing", lambda: True)
        traced = vision(*feeds)
    torch.testing.assert_close(fast, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(traced, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(found, fast, atol=0, rtol=0)


def test_vision_window_feeds_cover_each_patch_once(ckpt):
    """``window_rows`` lists every patch once, in order, each window's rows consecutive and padding
    at the end; ``window_slots`` is each patch's place in the flattened rows; joined, the images'
    windows stay apart."""
    from editreward_families.qwen2_5_vl.vision import join_feeds

    parts = [vision_feeds(ckpt.spec, grid) for grid in GRIDS.values()]
    for *_, rows, slots in parts + [join_feeds(parts)]:
        flat = rows.reshape(-1)
        assert np.array_equal(flat[flat >= 0], np.arange(len(slots))) and np.array_equal(flat[slots], np.arange(len(slots)))
        assert all(np.all(np.diff(np.flatnonzero(r >= 0)) == 1) and r[0] >= 0 for r in rows)


def test_vision_attention_per_window_has_gradients(ckpt):
    """The differentiable reward backpropagates through the per-window path (gather and scatter included)."""
    vision = modeling.build_modules(ckpt.spec, ckpt.state_dict(), torch.float64)[0]
    patches, cos, sin, rows, slots = (torch.as_tensor(a) for a in vision_feeds(ckpt.spec, GRIDS["unequal-windows"]))
    patches = patches.double().requires_grad_(True)
    counts = [3, 2, 3, 1]  # unequal runs: the gather-and-scatter branch
    q = torch.randn(sum(counts), 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: modeling.segment_attention(x, x * 2, x * 3, counts), (q,))
    vision(patches, cos.double(), sin.double(), rows, slots).sum().backward()
    assert torch.isfinite(patches.grad).all() and patches.grad.abs().sum() > 0


def test_images_joined_in_one_vision_call_equal_one_call_each(fast, images):
    """``join_vision_feeds``: one call over several images of different sizes gives each image's own
    embeddings, concatenated in order (windows and images never span two of them)."""
    from editreward_rt.families import family_for

    graphs, fam = fast.backend.graphs, family_for(fast.spec)
    feeds = [fam.vision_feeds(fast.preprocess(images[i]))[0] for i in (0, 2, 5)]
    alone = torch.cat([graphs.vision([f]) for f in feeds])
    joined = graphs.vision(feeds)
    assert joined.shape == alone.shape
    torch.testing.assert_close(joined, alone, atol=1e-5, rtol=1e-5)
