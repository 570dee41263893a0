"""The family's FLOP counts (``flops.py``, the "% of peak" column's numerator) against PyTorch's own
FlopCounterMode run over the family's real modules on the tiny spec. PyTorch counts every matmul
as executed: attention over all keys, masked or not. The spec's count keeps only the pairs a query
may see (causal; within a window): the decoder's masked pairs are the difference, and the vision
tower, which attends per window, executes exactly the spec's count (its exported graph, windows
padded to one length, the ``graph`` count)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def modules(fast):
    from editreward_families.qwen2_5_vl.modeling import placeholder_modules

    return fast.spec, placeholder_modules(fast.spec, torch.float32)


def _counted(fn) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # The math backend runs attention as matmuls the counter sees (the CPU's fused kernel it does not).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def test_decoder_flops_are_the_executed_ones_less_the_masked_pairs(modules):
    from editreward_families.qwen2_5_vl import flops

    spec, (_, decoder, _) = modules
    t = spec.text
    for past, new in ((0, 37), (19, 11)):
        cache = torch.zeros(t.num_layers, 2, 1, t.num_kv_heads, past, t.head_dim)
        ids = torch.zeros(1, new, dtype=torch.long)
        counted = _counted(lambda: decoder(ids, torch.zeros(1, t.hidden_size), torch.full((1, new), -1),
                                           torch.arange(past, past + new)[None], torch.ones(1, past + new, dtype=torch.long), cache))
        masked = new * (past + new) - (new * past + new * (new + 1) // 2)  # future keys of each query
        assert flops.decoder(spec, [past], [new]) == counted - 4 * t.num_layers * t.num_heads * t.head_dim * masked
        mask = np.ones((1, past + new))
        assert flops.decode_call(spec, mask, new) == flops.decoder(spec, [past], [new])
    # padding is not work: a padded row counts what its real tokens need
    mask = np.array([[1] * 5 + [1] * 4 + [0] * 3])
    assert flops.decode_call(spec, mask, 7) == flops.decoder(spec, [5], [4])


def test_vision_flops_are_the_executed_ones(modules, fast, monkeypatch):
    """The vision tower attends per window (over the image in its full-attention blocks), so what
    PyTorch executes eagerly is exactly the spec's count; traced, as the exported graph computes it,
    each window is padded to one length, and the ``graph`` count is what executes there."""
    from conftest import random_image
    from editreward_families.qwen2_5_vl import flops, modeling
    from editreward_families.qwen2_5_vl.vision import vision_feeds

    spec, (vision, _, _) = modules
    image = fast.preprocess(random_image(7, 150, 230))
    feeds, _ = vision_feeds(image, spec)
    tensors = [torch.as_tensor(a) for a in feeds]
    counted = _counted(lambda: vision(*tensors))
    rows, n = feeds[3], len(feeds[0])
    assert len(rows) > 1 and (rows < 0).any()  # several windows, some padded: the counts differ
    assert flops.vision_call(spec, *feeds) == counted
    monkeypatch.setattr(modeling, "tracing", lambda: True)
    executed = _counted(lambda: vision(*tensors))
    assert flops.vision_call(spec, *feeds, graph=True) == executed > counted
    assert rows.size * rows.shape[1] < n * n  # fewer pairs than the [N, N] mask the graph had before


def test_heads_and_reference_flops(modules, fast):
    from conftest import random_image
    from editreward_families.qwen2_5_vl import flops
    from editreward_families.qwen2_5_vl.vision import vision_feeds

    spec, (_, _, heads) = modules
    assert flops.heads(spec, 3) == _counted(lambda: heads(torch.zeros(3, spec.heads.num_heads, spec.text.hidden_size)))
    triple = fast.prepare("add a cat", random_image(1, 60, 80), random_image(2, 64, 64))
    images = sum(flops.vision_call(spec, *vision_feeds(i, spec)[0]) for i in (triple.source, triple.edited))
    rubric = [flops.decoder(spec, [0], [len(p.ids)]) + flops.heads(spec, len(p.ids)) / spec.heads.num_heads for p in triple.prompts]
    assert flops.reference_triple(spec, triple) == pytest.approx(2 * images + sum(rubric))
