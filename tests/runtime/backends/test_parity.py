"""Every backend of the registry against the PyTorch reference, tolerances from editreward_rt.tolerances.

The matrix is read from ``editreward_rt.backends.BACKENDS``: a backend added there is tested here
on the tiny fixture (float32), or skipped with the reason where this machine cannot run it."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
from editreward_rt import Scorer
from editreward_rt.backends import BACKENDS
from editreward_rt.tolerances import max_abs_diff, tolerance, within


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _runnable(name: str) -> str | None:
    """Why backend ``name`` cannot run its fast path here, or None."""
    entry = BACKENDS[name]
    if "cpu" not in entry.devices and not _has_cuda():
        return f"the {name} backend runs on {'/'.join(entry.devices)} only and this machine has no CUDA GPU"
    if name == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (its engines are built and checked in tests/export/trt/ where it is)"
    if name == "openvino" and importlib.util.find_spec("openvino") is None:
        return "OpenVINO is not installed (pip install 'editreward-deploy[openvino]')"
    return None


# Tolerance rows: the torch backend's fast path is "torch-fast" (its reference mode is the reference itself).
MATRIX = [pytest.param("torch-fast" if name == "torch" else name, name, "float32", id=name,
                       marks=pytest.mark.skipif(_runnable(name) is not None, reason=str(_runnable(name))))
          for name, entry in BACKENDS.items() if "fast" in entry.modes]

INSTRUCTIONS = ["Add a green bowl on the branch", "Make it look like winter, with snow on the roofs",
                "remove the 2nd car (the red one)", "Turn the cat into a tiger"]


def scenario_triples(scorer, images, name):
    """Lists of (instruction, source, edited) covering sizes, aspect ratios, batches and shared sources."""
    if name == "single":
        return [[(INSTRUCTIONS[i % 4], images[i], images[(i + 1) % len(images)])] for i in range(len(images))]
    if name == "batches":
        pairs = list(itertools.permutations(range(len(images)), 2))
        return [[(INSTRUCTIONS[k % 4], images[a], images[b]) for k, (a, b) in enumerate(pairs[n : n + size])]
                for n, size in zip((0, 3, 9), (1, 3, 8))]
    if name == "rank":
        return [[(INSTRUCTIONS[0], images[0], edit) for edit in images[1:5]]]
    raise ValueError(name)


@pytest.fixture(scope="module")
def variants(tiny, tiny_onnx, tmp_path_factory):
    """Each backend loaded the way it loads: checkpoints for the ones that read them, else the export."""
    loaded = {}

    def load(name):
        if name not in loaded:
            entry = BACKENDS[name]
            if "checkpoint" in entry.reads:
                loaded[name] = Scorer.load(tiny.checkpoint, backend=name, mode="fast", prompts_from=tiny.prompts)
            elif name == "tensorrt":
                from editreward_trt.build import build_trt

                out = build_trt(str(tiny.checkpoint), precision="fp32", max_batch=8, prompts_from=str(tiny.prompts),
                                out=tmp_path_factory.mktemp("trt") / "fp32", log=lambda *_: None)
                loaded[name] = Scorer.load(out, backend=name, device="cuda")
            else:
                loaded[name] = Scorer.load(tiny_onnx, backend=name, device="cpu", precision="fp32")  # the matrix's float32
        return loaded[name]

    return load


@pytest.mark.parametrize("scenario", ["single", "batches", "rank"])
@pytest.mark.parametrize("variant,backend,precision", MATRIX)
def test_matches_reference(variant, backend, precision, scenario, variants, reference, images):
    scorer, tol = variants(backend), tolerance(variant, precision)
    for group in scenario_triples(scorer, images, scenario):
        prepared = [scorer.prepare(*t) for t in group]
        expected = reference.backend.head_outputs([reference.prepare(*t) for t in group])
        actual = scorer.backend.head_outputs(prepared)
        assert actual.shape == expected.shape == (len(group), 2, 2)
        diff = max_abs_diff(actual, expected)
        assert within(diff, tol), f"{variant}/{precision} {scenario}: {diff} beyond {tol}"
        # Task-level gate: the same preferred edit on every pair sharing a source.
        mu_a, mu_e = actual.mean(axis=1)[:, 0], expected.mean(axis=1)[:, 0]
        for i, j in itertools.combinations(range(len(group)), 2):
            if group[i][1] is group[j][1] and abs(mu_e[i] - mu_e[j]) > 2 * tol.mu:
                assert np.sign(mu_a[i] - mu_a[j]) == np.sign(mu_e[i] - mu_e[j])


def test_scores_vary_with_inputs(reference, images):
    """Guards the parity test against a degenerate model that scores everything alike."""
    mus = [reference.score(INSTRUCTIONS[i % 4], images[i], images[i + 1]).mu for i in range(4)]
    assert np.std(mus) > 1e-3


def test_fast_mode_decodes_less_than_reference(fast, images):
    """The fast path skips what follows <|Reward|> and shares the prefix: fewer decoded tokens."""
    triple = fast.prepare(INSTRUCTIONS[0], images[0], images[1])
    full = sum(len(p.ids) for p in triple.prompts)
    scored = [len(p.scored_ids) for p in triple.prompts]
    shared = next(i for i, (a, b) in enumerate(zip(*(p.ids for p in triple.prompts))) if a != b)
    assert sum(scored) - shared < full
    assert all(p.ids[p.reward_pos] == fast.spec.tokens.reward for p in triple.prompts)


def test_onnxruntime_sessions_do_not_spin_between_runs(tiny_onnx):
    """The fast path alternates between its sessions, each with its own intra-op pool: a pool that
    spins after its run takes a core from the next one (benchmarks/cpu_speed.py, 2 threads)."""
    scorer = Scorer.load(tiny_onnx, backend="onnxruntime", threads=2)
    sessions = scorer.backend.graphs.sessions
    assert set(sessions) >= {"vision", "decoder", "heads"}
    for session in sessions.values():
        assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
