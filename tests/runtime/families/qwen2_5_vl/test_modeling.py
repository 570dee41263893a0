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


def vision_batch(spec, grids, seed=0):
    """Several images' vision inputs concatenated (window and image ids made distinct across images)."""
    v = spec.vision
    rng = np.random.default_rng(seed)
    parts, windows, images = [], [], []
    for i, grid in enumerate(grids):
        prep = vision_inputs(grid, v.head_dim, v.spatial_merge_size, v.window_size, v.patch_size)
        parts.append((prep.cos, prep.sin))
        windows.append(prep.window_segments + (windows[-1].max() + 1 if windows else 0))
        images.append(prep.image_segments + i)
    n = sum(len(w) for w in windows)
    patches = rng.standard_normal((n, v.in_channels * v.temporal_patch_size * v.patch_size**2)).astype(np.float32)
    cos, sin = (np.concatenate([p[j] for p in parts]) for j in (0, 1))
    return tuple(torch.as_tensor(a) for a in (patches, cos, sin, np.concatenate(windows), np.concatenate(images)))


@pytest.mark.parametrize("grids", [[(1, 16, 16)], [(1, 20, 28)], [(1, 16, 16), (1, 20, 28)]],
                         ids=["equal-windows", "unequal-windows", "two-images"])
def test_vision_attention_per_window_equals_the_masked_form(ckpt, grids, monkeypatch):
    vision = modeling.build_modules(ckpt.spec, ckpt.state_dict(), torch.float32)[0]
    feeds = vision_batch(ckpt.spec, grids)
    windows, images = vision.layout(feeds[3].numpy(), feeds[4].numpy())  # read on the host
    assert (windows, images) == (modeling.run_lengths(feeds[3]), modeling.run_lengths(feeds[4]))
    assert (len(set(windows)) > 1) == (grids != [(1, 16, 16)]) and len(images) == len(grids)  # the case it names
    with torch.inference_mode():
        fast = vision(*feeds, (windows, images))
        found = vision(*feeds)  # no layout given: read from the segments
        monkeypatch.setattr(modeling, "tracing", lambda: True)
        want = vision(*feeds)
    torch.testing.assert_close(fast, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(found, fast, atol=0, rtol=0)


def test_vision_attention_per_window_has_gradients(ckpt):
    """The differentiable reward backpropagates through the per-window path (gather and scatter included)."""
    vision = modeling.build_modules(ckpt.spec, ckpt.state_dict(), torch.float64)[0]
    patches, cos, sin, windows, images = vision_batch(ckpt.spec, [(1, 20, 28)])
    patches = patches.double().requires_grad_(True)
    counts = [3, 2, 3, 1]  # unequal runs: the gather-and-scatter branch
    q = torch.randn(sum(counts), 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: modeling.segment_attention(x, x * 2, x * 3, counts), (q,))
    vision(patches, cos.double(), sin.double(), windows, images).sum().backward()
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
