"""The torch backend's GPU memory modes: ``resident`` keeps the weights on the device, ``per-call``
puts a device copy there for each call and frees it after (even when the call fails). On a CPU the
"device copy" is a real copy too, so the switching and the release are checked here; the GPU test
checks that the CUDA memory comes back."""

from __future__ import annotations

import gc
import weakref

import pytest
from conftest import assert_same_score, random_image
from editreward_rt import Scorer
from editreward_rt.errors import BackendError

torch = pytest.importorskip("torch")


def _load(tiny, memory, device="cpu"):
    return Scorer.load(tiny.checkpoint, backend="torch", prompts_from=tiny.prompts, memory=memory, device=device)


def _watch(scorer):
    """During each decoder call: the weight's storage address and a weak reference to its storage."""
    decoder, seen = scorer.backend.graphs.decoder, []

    def hook(module, args):
        weight = next(module.parameters())
        seen.append((weight.data_ptr(), weakref.ref(weight.untyped_storage())))

    return decoder.register_forward_pre_hook(hook), seen


def test_per_call_copies_for_the_call_and_releases_after(tiny):
    per_call, resident = _load(tiny, "per-call"), _load(tiny, "resident")
    triple = ("add a cat", random_image(1, 40, 56), random_image(2, 40, 56))
    host = next(per_call.backend.graphs.decoder.parameters()).data_ptr()
    handle, seen = _watch(per_call)
    try:
        assert_same_score(per_call.score(*triple), resident.score(*triple), tol=1e-6)
    finally:
        handle.remove()
    assert seen and all(ptr != host for ptr, _ in seen)  # the call ran on a copy
    gc.collect()
    assert all(ref() is None for _, ref in seen)  # and the copy is freed
    assert next(per_call.backend.graphs.decoder.parameters()).data_ptr() == host  # the weights point home again
    assert per_call.description["memory"] == "per-call"


def test_per_call_releases_when_the_call_fails(tiny):
    scorer = _load(tiny, "per-call")
    decoder = scorer.backend.graphs.decoder
    host = next(decoder.parameters()).data_ptr()

    def boom(module, args):
        raise RuntimeError("out of memory, say")

    handle = decoder.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            scorer.score("add a cat", random_image(1, 40, 56), random_image(2, 40, 56))
    finally:
        handle.remove()
    assert next(decoder.parameters()).data_ptr() == host


def test_resident_keeps_one_copy_and_modes_are_checked(tiny):
    scorer = _load(tiny, "resident")
    resident_ptr = next(scorer.backend.graphs.decoder.parameters()).data_ptr()
    handle, seen = _watch(scorer)
    try:
        scorer.score("add a cat", random_image(1, 40, 56), random_image(2, 40, 56))
    finally:
        handle.remove()
    assert [ptr for ptr, _ in seen] == [resident_ptr] * len(seen)
    with pytest.raises(BackendError, match="unknown memory mode"):
        _load(tiny, "sometimes")
    with pytest.raises(BackendError, match="fast path"):
        Scorer.load(tiny.checkpoint, backend="torch", mode="reference", prompts_from=tiny.prompts, memory="per-call")


def test_per_call_is_refused_where_it_would_do_nothing(tiny_onnx):
    with pytest.raises(BackendError, match="'memory': it is an option of the torch backend"):
        Scorer.load(tiny_onnx, memory="per-call")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: measures the device memory given back")
def test_per_call_gives_the_gpu_memory_back(tiny):
    baseline = torch.cuda.memory_allocated()
    scorer = _load(tiny, "per-call", device="cuda")
    assert torch.cuda.memory_allocated() - baseline < 1 << 20  # the weights are not on the GPU between calls
    resident = _load(tiny, "resident", device="cuda")
    triple = ("add a cat", random_image(1, 40, 56), random_image(2, 40, 56))
    assert_same_score(scorer.score(*triple), resident.score(*triple), tol=5e-2)
    del resident
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() - baseline < 1 << 20
    assert next(scorer.backend.graphs.decoder.parameters()).device.type == "cpu"
