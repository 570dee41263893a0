"""Every backend and precision against the PyTorch reference, tolerances from editreward_rt.parity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from editreward_rt import Scorer
from editreward_rt.parity import max_abs_diff, tolerance, within

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
def variants(fast, tiny_onnx):
    return {"torch-fast": fast, "onnxruntime": Scorer.load(tiny_onnx, backend="onnxruntime")}


@pytest.mark.parametrize("scenario", ["single", "batches", "rank"])
@pytest.mark.parametrize("variant,precision", [("torch-fast", "float32"), ("onnxruntime", "float32")])
def test_matches_reference(variant, precision, scenario, variants, reference, images):
    scorer, tol = variants[variant], tolerance(variant, precision)
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
