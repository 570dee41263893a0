"""The torch fast path's ``compile`` option: the decoder through ``torch.compile`` (inductor's C++
code on a CPU) scores what the eager fast path and the reference score, to the float32 tolerance,
across calls of different shapes and with a source prefix kept between calls; and it really ran
compiled code. CUDA-graph replay (``reduce-overhead`` on a GPU) is measured by gpu_check.py."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_image
from editreward_rt import Scorer
from editreward_rt.backends import BACKENDS
from editreward_rt.errors import BackendError

torch = pytest.importorskip("torch")


def _mus(results):
    return np.array([[r.mu, r.log_sigma] for r in results])


def test_compiled_decoder_scores_as_the_reference(tiny, reference):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    frames = counters["frames"]["ok"]
    scorer = Scorer.load(tiny.checkpoint, backend="torch", prompts_from=tiny.prompts, dtype="float32",
                         options={"compile": True})
    assert scorer.description["compile"] == "default"
    source = random_image(3, 64, 80)
    edits = [random_image(4, 72, 48), random_image(5, 40, 40)]
    other = ("make it snow", random_image(6, 30, 90), random_image(7, 56, 56))
    tol = BACKENDS["torch"].tolerances["float32"]
    try:
        # Three calls of different shapes (two triples of one source, one triple, one alone), then
        # the groups path, whose source prefix is decoded once and kept across its calls.
        got = _mus(scorer.score_batch([("add a hat", source, e) for e in edits] + [other]))
        got_groups = _mus(scorer.score_groups([("add a hat", source, edits)])[0])
        assert counters["frames"]["ok"] > frames  # the decoder was compiled, not run eagerly
        want = _mus(reference.score_batch([("add a hat", source, e) for e in edits] + [other]))
        assert np.abs(got - want).max() <= tol.mu
        assert np.abs(got_groups - want[:2]).max() <= tol.mu
    finally:
        torch._dynamo.reset()  # the compiled graphs and their guards go with the test


def test_compile_option_is_checked(tiny):
    load = lambda **kw: Scorer.load(tiny.checkpoint, backend="torch", prompts_from=tiny.prompts, **kw)  # noqa: E731
    with pytest.raises(BackendError, match="compile must be"):
        load(options={"compile": "fastest"})
    with pytest.raises(BackendError, match="resident weights"):
        load(memory="per-call", options={"compile": "reduce-overhead"})
    with pytest.raises(BackendError, match="fast path"):
        load(mode="reference", options={"compile": True})
    assert load(options={"compile": False}).description["compile"] is None


def test_graph_replay_runs_on_one_thread_and_copies_its_outputs_out():
    """``GraphReplayer`` (CUDA-graph modes on a GPU), exercised on a CPU with a stand-in for the
    compiled decoder that, like a replayed CUDA graph, returns the same output memory every call."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from editreward_rt.backends.torch_backend import GraphReplayer

    hidden, present, seen = torch.zeros(2, 3), torch.zeros(4), []

    def graph(x, keep):
        seen.append((threading.current_thread().name, torch.is_inference_mode_enabled()))
        hidden.fill_(float(x)), present.fill_(float(x))
        return hidden, present

    replay = GraphReplayer(torch, graph, "cpu")
    with ThreadPoolExecutor(3) as callers:  # callers on several threads, as a batching worker and producers are
        outs = list(callers.map(lambda x: replay(x, torch.ones(1)), range(6)))
    assert {name for name, _ in seen} == {seen[0][0]} and seen[0][0] != threading.current_thread().name
    assert all(inference for _, inference in seen)
    for x, (h, p) in enumerate(outs):  # each call's own values, not the shared buffer's last ones
        assert h.eq(x).all() and p.eq(x).all() and h.data_ptr() != hidden.data_ptr()
    assert replay(7, None)[0] is None  # nothing kept: the hidden states are not copied
