"""Scorer.score_groups and rank on the tiny export: equal to per-triple scoring, with each source
encoded once per group, across batch chunks too; group-relative advantages."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import assert_same_score, random_image
from editreward_rt import Scorer
from editreward_rt.errors import ImageError, InputError
from editreward_rt.rl import ADVANTAGE_EPS, bt_preference, group_advantages
from editreward_rt.scorer import HeadScore, Score


@pytest.fixture(scope="module")
def scorer(tiny_onnx):
    return Scorer.load(tiny_onnx, threads=1, max_batch=3)


@pytest.fixture(scope="module")
def pictures():
    return [random_image(300 + i, 36 + 4 * i, 52) for i in range(10)]


class Counting:
    """Counts the images the vision graph encodes and the decoder's batch rows (the graphs' real calls)."""

    def __init__(self, scorer):
        self.graphs, self.vision, self.decoded = scorer.backend.graphs, 0, []

    def __enter__(self):
        vision, decode = self.graphs.vision, self.graphs.decode

        def counted_vision(feeds):
            self.vision += len(feeds)  # one vision call per backend call, over all its new images
            return vision(feeds)

        def counted_decode(ids, *a):
            self.decoded.append(ids.shape)
            return decode(ids, *a)

        self.graphs.vision, self.graphs.decode = counted_vision, counted_decode
        return self

    def __exit__(self, *exc):
        del self.graphs.vision, self.graphs.decode


def test_groups_equal_per_triple_scores(scorer, pictures):
    """A group of 7 (three chunks of max_batch 3) and two small groups sharing a chunk."""
    groups = [("add a cat", pictures[0], pictures[3:10]), ("make it red", pictures[1], pictures[3:5]),
              ("snow", pictures[2], [pictures[9]])]
    got = scorer.score_groups(groups)
    assert [len(g) for g in got] == [7, 2, 1]
    for (instruction, source, edits), scores in zip(groups, got):
        for edit, score in zip(edits, scores, strict=True):
            assert_same_score(score, scorer.score(instruction, source, edit))


def test_a_large_group_encodes_its_source_once(scorer, pictures):
    """7 edits at max_batch 3: the source goes through the vision tower once (not once per chunk)
    and its prefix is decoded once, then each chunk continues it."""
    with Counting(scorer) as seen:
        scorer.score_groups([("add a cat", pictures[0], pictures[3:10])])
    assert seen.vision == 1 + 7
    # The one-row shared prefix once, then two levels per chunk (each triple's prefix, the suffixes);
    # decoding the prefix again in each chunk would be 3 x 3 calls.
    assert len(seen.decoded) == 1 + 2 * 3 and seen.decoded[0][0] == 1
    with Counting(scorer) as seen:
        scorer.rank("add a cat", pictures[0], pictures[3:10])
    assert seen.vision == 1 + 7


def test_mixed_sources_in_one_call_share_each_source(tiny_onnx, pictures):
    """Two sources x 3 edits in one call: each source's image prefix is decoded once (a source
    level of 2 rows), and the scores equal one triple per call."""
    wide = Scorer.load(tiny_onnx, threads=1, max_batch=8)
    triples = [(f"edit {s}", pictures[s], e) for s in (0, 1) for e in pictures[3:6]]
    with Counting(wide) as seen:
        got = wide.score_batch(triples)
    assert [shape[0] for shape in seen.decoded] == [1, 2, 6, 12]  # shared, per source, per triple, suffixes
    for score, triple in zip(got, triples):
        assert_same_score(score, wide.score(*triple))


def test_bad_inputs_in_groups(scorer, pictures):
    groups = [("add a cat", pictures[0], [pictures[3], b"not an image", pictures[4]]),
              ("add a cat", b"\x89PNG broken", [pictures[3], pictures[4]])]
    got = scorer.score_groups(groups, errors="return")
    assert isinstance(got[0][1], ImageError) and isinstance(got[1][0], ImageError) and isinstance(got[1][1], ImageError)
    assert_same_score(got[0][2], scorer.score("add a cat", pictures[0], pictures[4]))
    with pytest.raises(ImageError):
        scorer.score_groups(groups)
    with pytest.raises(InputError, match="group 0"):
        scorer.score_groups([("add a cat", pictures[0])])


def _score(mu: float, log_sigma: float = 0.0) -> Score:
    return Score(mu, log_sigma, (HeadScore("h", mu, log_sigma),))


def test_group_advantages():
    groups = [[_score(1.0), _score(2.0), _score(4.0)], [_score(0.5)] * 4, [_score(3.0)]]
    adv = group_advantages(groups)
    mu = np.array([1.0, 2.0, 4.0])
    assert adv[0] == pytest.approx(list((mu - mu.mean()) / (mu.std() + ADVANTAGE_EPS)))
    assert adv[1] == [0.0] * 4 and adv[2] == [0.0]  # no spread: 0, not 0/0
    by_preference = group_advantages(groups, method="preference")
    assert np.argsort(by_preference[0]).tolist() == [0, 1, 2] and sum(by_preference[0]) == pytest.approx(0, abs=1e-9)
    # An uncertain edit's margin counts for less: same mu gap, larger sigma -> a smaller win rate.
    assert bt_preference(_score(1.0, math.log(3.0)), _score(0.0)) < bt_preference(_score(1.0), _score(0.0))
    with pytest.raises(InputError):
        group_advantages([[_score(1.0), ImageError("x")]])


def test_bt_preference_is_upstreams_expectation():
    """E[sigmoid(z)], z ~ N(mu_a - mu_b, sigma_a^2 + sigma_b^2), as upstream's uncertainty loss samples it."""
    a, b = _score(0.7, math.log(0.8)), _score(-0.2, math.log(1.3))
    z = np.random.default_rng(0).normal(a.mu - b.mu, math.hypot(a.sigma, b.sigma), 2_000_000)
    assert bt_preference(a, b) == pytest.approx(float(np.mean(1 / (1 + np.exp(-z)))), abs=2e-3)
    assert bt_preference(a, b) + bt_preference(b, a) == pytest.approx(1.0, abs=1e-9)


def test_a_jsonl_ranked_set_encodes_its_source_once(tiny_onnx, pictures, tmp_path):
    """``editreward score --input``: consecutive lines with one instruction and source are one
    group, so at one triple per call (a 7B on a CPU) the source is still encoded once."""
    from editreward_rt.cli import score_file

    for i in (0, 3, 4, 5):
        pictures[i].save(tmp_path / f"{i}.png")
    rows = [{"instruction": "add a cat", "source": "0.png", "edited": f"{e}.png"} for e in (3, 4, 5)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = Scorer.load(tiny_onnx, threads=1, max_batch=1)
    with Counting(one) as seen:
        score_file(one, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    assert seen.vision == 1 + 3
    got = [json.loads(line)["mu"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert got == pytest.approx([one.score(r["instruction"], tmp_path / "0.png", tmp_path / r["edited"]).mu for r in rows], abs=1e-5)


def test_default_max_batch_per_device(tiny_onnx):
    """One triple per call on a CPU (batches only add padding there: benchmarks/cpu_speed.py), 8 on
    a GPU; ``auto`` follows where the backend really runs."""
    from editreward_rt.backends import default_max_batch

    assert default_max_batch("cpu") == 1 and Scorer.load(tiny_onnx).max_batch == 1
    import onnxruntime as ort

    on_gpu = "CUDAExecutionProvider" in ort.get_available_providers()  # where "auto" really runs
    assert Scorer.load(tiny_onnx, device="auto").max_batch == (8 if on_gpu else 1)
    assert default_max_batch("cuda:0") == 8


def test_score_batch_encodes_each_source_once_at_one_triple_per_call(tiny_onnx, pictures):
    """At the CPU default of one triple per call, a batch's edits of one source continue one prefix:
    the source is encoded once (3 + 1 sources, 6 edits: 4 + 6 images encoded, not 12), and the
    scores, in the caller's order, equal per-triple scoring."""
    one = Scorer.load(tiny_onnx, threads=1, max_batch=1)
    triples = [("add a cat", pictures[0], pictures[3]), ("snow", pictures[1], pictures[4]),
               ("add a cat", pictures[0], pictures[5]), ("make it red", pictures[0], pictures[6]),
               ("snow", pictures[1], pictures[7]), ("fog", pictures[2], pictures[8])]
    with Counting(one) as count:
        got = one.score_batch(triples)
    assert count.vision == 3 + len(triples)
    for triple, score in zip(triples, got, strict=True):
        assert_same_score(score, one.score(*triple))


def test_sources_that_fit_a_call_keep_sharing_calls(tiny_onnx, pictures):
    """At 4 triples per call, 6 triples over 4 sources (2, 2, 1, 1) take two calls, [A A B B] and
    [C D]: grouping by source never splits a call's worth of small sources into one call each."""
    four = Scorer.load(tiny_onnx, threads=1, max_batch=4)
    triples = [("a", pictures[0], pictures[4]), ("b", pictures[1], pictures[5]), ("c", pictures[2], pictures[6]),
               ("a", pictures[0], pictures[7]), ("b", pictures[1], pictures[8]), ("d", pictures[3], pictures[9])]
    calls = []
    original = four.backend.head_outputs
    four.backend.head_outputs = lambda chunk, *a: calls.append(len(chunk)) or original(chunk, *a)
    try:
        with Counting(four) as count:
            got = four.score_batch(triples)
    finally:
        del four.backend.head_outputs
    assert calls == [4, 2] and count.vision == 4 + len(triples)
    for triple, score in zip(triples, got, strict=True):
        assert_same_score(score, four.score(*triple))
