"""The fast path's graph protocol (``editreward_rt.pipeline.GraphRunner``): arrays stay where their
engine computes. Per call, the one device-to-host copy is the heads' [T, K, 2], and the vision
graph is called once over all of the call's images. Counted on real backends: torch through a
TorchFunctionMode that records every way a tensor leaves torch, ONNX Runtime with I/O binding
through the OrtValues it hands to numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

# The ways a tensor's values reach the host: a copy to the CPU device, or an exit from torch.
HOST_EXITS = {"cpu", "numpy", "tolist", "item", "__array__"}


class HostCopies(TorchFunctionMode):
    """Records (method, shape) of every tensor method call that copies values towards the host."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_cpu = name == "to" and any(str(a) == "cpu" for a in (*args[1:], kwargs.get("device")))
        if (name in HOST_EXITS or to_cpu) and args and isinstance(args[0], torch.Tensor):
            self.seen.append((name, tuple(args[0].shape)))
        return func(*args, **kwargs)


def counting(graphs, name: str, calls: list) -> None:
    """Counts calls of one of ``graphs``' primitives (an instance attribute over the real method)."""
    original = getattr(graphs, name)
    setattr(graphs, name, lambda *a, **k: (calls.append(name), original(*a, **k))[1])


@pytest.fixture(scope="module")
def torch_scorer(tiny):
    from editreward_rt import Scorer

    return Scorer.load(tiny.checkpoint, backend="torch", prompts_from=tiny.prompts, threads=1, max_batch=8)


def mixed(images) -> list:
    """Four triples, two sources: a call that has shared and unshared images and several levels."""
    return [("Add a bowl", images[0], images[1]), ("Add a bowl", images[0], images[2]),
            ("Make it snow", images[3], images[4]), ("Make it snow", images[3], images[1])]


def test_torch_copies_to_the_host_once_per_call(torch_scorer, images):
    prepared = [torch_scorer.prepare(*t) for t in mixed(images)]
    backend, k = torch_scorer.backend, torch_scorer.spec.heads.num_heads
    vision = []
    counting(backend.graphs, "vision", vision)
    try:
        with HostCopies() as copies:
            out = backend.head_outputs(prepared)
    finally:
        del backend.graphs.vision
    assert out.shape == (4, k, 2)
    # heads' result, [T, K, 2], moved to the CPU device and handed to numpy: nothing else leaves the device.
    assert copies.seen == [("cpu", (4, k, 2)), ("numpy", (4, k, 2))]
    assert vision == ["vision"]  # five distinct images, one vision call


def test_torch_shared_prefix_stays_on_the_device(torch_scorer, images):
    """A source's prefix kept across calls (``encode_prefix``) copies nothing to the host; each
    call continuing it copies its heads' output only."""
    prepared = [torch_scorer.prepare("Add a bowl", images[0], e) for e in images[1:4]]
    backend, k = torch_scorer.backend, torch_scorer.spec.heads.num_heads
    with HostCopies() as copies:
        prefix = backend.encode_prefix(prepared)
    assert copies.seen == []
    with HostCopies() as copies:
        first = backend.head_outputs(prepared[:2], prefix)
        second = backend.head_outputs(prepared[2:], prefix)
    assert copies.seen == [("cpu", (2, k, 2)), ("numpy", (2, k, 2)), ("cpu", (1, k, 2)), ("numpy", (1, k, 2))]
    np.testing.assert_allclose(np.concatenate([first, second]), backend.head_outputs(prepared), atol=1e-5)


def test_ort_io_binding_copies_to_the_host_once_per_call(tiny_onnx, images, monkeypatch):
    """With I/O binding, ONNX Runtime's outputs stay OrtValues on the session's device; the heads'
    result is the one handed to numpy, and no session returns host arrays (``run``)."""
    import onnxruntime as ort
    from editreward_rt import Scorer
    from editreward_rt.backends.ort_backend import OrtBackend

    backend = OrtBackend(tiny_onnx, io_binding=True, threads=1)
    scorer = Scorer(backend, backend.model, max_batch=8)
    prepared = [scorer.prepare(*t) for t in mixed(images)]
    want = Scorer.load(tiny_onnx, threads=1, max_batch=8).backend.head_outputs(prepared)
    k = scorer.spec.heads.num_heads
    exits, host_runs, vision = [], [], []
    to_numpy, run = ort.OrtValue.numpy, ort.InferenceSession.run
    monkeypatch.setattr(ort.OrtValue, "numpy", lambda self: (exits.append(tuple(self.shape())), to_numpy(self))[1])
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **kw: (host_runs.append(1), run(self, *a, **kw))[1])
    counting(backend.graphs, "vision", vision)
    got = backend.head_outputs(prepared)
    assert exits == [(4, k, 2)] and host_runs == [] and vision == ["vision"]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_prompts_carry_their_image_spans(torch_scorer, images):
    """The builder records where each image's pads are; the pipeline reads rows from those spans."""
    triple = torch_scorer.prepare("Add a bowl", images[0], images[1])
    pad = torch_scorer.spec.tokens.image_pad
    for prompt in triple.prompts:
        (s0, n0), (s1, n1) = prompt.images
        assert (n0, n1) == (triple.source.n_tokens, triple.edited.n_tokens)
        assert np.flatnonzero(prompt.scored_ids == pad).tolist() == [*range(s0, s0 + n0), *range(s1, s1 + n1)]
        rows = prompt.image_rows(10, 100)
        assert rows[s0:s0 + n0].tolist() == list(range(10, 10 + n0)) and rows[s1:s1 + n1].tolist() == list(range(100, 100 + n1))
        assert (rows >= 0).sum() == n0 + n1


def test_level_cuts_bound_each_call_and_keep_the_kept_rows_together():
    from editreward_rt.pipeline import level_cuts

    assert level_cuts(2, 391, None, None) == [0, 391]  # no bound: one call
    assert level_cuts(2, 100, None, 256) == [0, 100]  # within the bound: one call
    assert level_cuts(1, 600, None, 256) == [0, 256, 512, 600]
    # Two rubric passes with <|Reward|> at columns 380 and 390: chunks of 128 columns (256 tokens),
    # the last from before 380 on, so one call holds both kept rows.
    keep = np.array([[[0, 390], [1, 380]]])
    assert level_cuts(2, 391, keep, 256) == [0, 128, 256, 391]
    assert level_cuts(2, 391, np.array([[[0, 100], [1, 390]]]), 256) == [0, 391]  # a kept row at 100: that call holds it
    assert level_cuts(4, 400, None, 2) == list(range(0, 400)) + [400]  # fewer tokens than rows: one column a call
