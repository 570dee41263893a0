"""BatchingScorer on the tiny ONNX export: concurrent producers get exactly Scorer.score's numbers,
in merged batches; a full queue refuses at once; close drains; a bad triple fails alone."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import pytest
from conftest import assert_same_score, random_image
from editreward_rt import BatchingScorer, Scorer
from editreward_rt.errors import DeadlineError, ImageError, NotReadyError, OverloadedError


@pytest.fixture(scope="module")
def scorer(tiny_onnx):
    return Scorer.load(tiny_onnx, threads=1, max_batch=8)


@pytest.fixture(scope="module")
def pictures():
    return [random_image(200 + i, 40 + 6 * i, 56) for i in range(8)]


class Gate:
    """Holds the scorer's backend inside its call until opened, so the queue fills while it waits."""

    def __init__(self, scorer):
        self.backend, self.open, self.entered = scorer.backend, threading.Event(), threading.Event()
        self.original = self.backend.head_outputs

    def __enter__(self):
        def held(*args, **kwargs):
            self.entered.set()
            self.open.wait(30)
            return self.original(*args, **kwargs)

        self.backend.head_outputs = held
        return self

    def __exit__(self, *exc):
        self.open.set()
        del self.backend.head_outputs


def test_concurrent_producers_get_score_exactly(scorer, pictures):
    """12 producer threads x 6 triples over 3 sources: every future equals Scorer.score, and the
    triples shared batches (fewer batches than triples)."""
    cases = [(f"edit {k % 3}", pictures[k % 3], pictures[3 + (k + j) % 5]) for k in range(12) for j in range(6)]
    want = [scorer.score(*c) for c in cases]
    got = [None] * len(cases)
    start = threading.Barrier(12)
    with BatchingScorer(scorer, max_wait_ms=30) as batcher:
        def producer(k):
            start.wait()
            for j in range(6):
                got[k * 6 + j] = batcher.submit(*cases[k * 6 + j])

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = [f.result(timeout=60) for f in got]
        stats = batcher.stats()
    for r, w in zip(results, want, strict=True):
        assert_same_score(r, w)
    assert stats["triples"] == 72 and stats["batches"] < 72 and stats["mean_batch"] > 1
    assert set(stats) >= {"batches", "triples", "mean_batch"}


def test_a_bad_image_fails_only_its_own_future(scorer, pictures):
    buf = io.BytesIO()
    pictures[4].save(buf, "PNG")
    corrupt = buf.getvalue()[:150]
    with BatchingScorer(scorer, max_wait_ms=50) as batcher:
        futures = [batcher.submit("add a cat", pictures[0], e) for e in (pictures[3], corrupt, pictures[5])]
        futures.append(batcher.submit("", pictures[0], pictures[3]))
    assert isinstance(futures[1].exception(), ImageError)
    assert futures[3].exception().kind == "instruction_error"
    assert_same_score(futures[0].result(), scorer.score("add a cat", pictures[0], pictures[3]))
    assert_same_score(futures[2].result(), scorer.score("add a cat", pictures[0], pictures[5]))


def test_a_full_queue_refuses_at_once_and_close_drains(scorer, pictures):
    batcher = BatchingScorer(scorer, max_batch=1, max_wait_ms=0, max_queue=3)
    with Gate(scorer) as gate:
        first = batcher.submit("add a cat", pictures[0], pictures[3])
        assert gate.entered.wait(30)  # the worker is inside the backend with the first triple
        queued = [batcher.submit("add a cat", pictures[0], pictures[4 + i]) for i in range(3)]
        t0 = time.monotonic()
        with pytest.raises(OverloadedError, match="max_queue 3"):
            batcher.submit("add a cat", pictures[0], pictures[7])
        assert time.monotonic() - t0 < 1.0  # refused at once, not after a wait
        assert batcher.stats()["rejected"] == 1 and batcher.stats()["queued"] == 3
        closing = threading.Thread(target=batcher.close)
        closing.start()  # close while four triples are accepted and unscored
        time.sleep(0.1)
        with pytest.raises(NotReadyError):
            batcher.submit("add a cat", pictures[0], pictures[3])
    closing.join(60)
    assert not closing.is_alive()
    for f, e in zip([first, *queued], pictures[3:7]):
        assert_same_score(f.result(timeout=0), scorer.score("add a cat", pictures[0], e))
    assert batcher.stats()["triples"] == 4


def test_asubmit_deadline_and_cancel(scorer, pictures):
    batcher = BatchingScorer(scorer, max_batch=1, max_wait_ms=0)
    try:
        got = asyncio.run(batcher.asubmit("add a cat", pictures[1], pictures[3]))
        assert_same_score(got, scorer.score("add a cat", pictures[1], pictures[3]))
        with Gate(scorer) as gate:
            busy = batcher.submit("add a cat", pictures[1], pictures[4])
            assert gate.entered.wait(30)
            late = batcher.submit("add a cat", pictures[1], pictures[5], deadline=time.monotonic() + 0.05)
            dropped = batcher.submit("add a cat", pictures[1], pictures[6])
            assert dropped.cancel()  # not taken yet: cancelled, never scored
            time.sleep(0.2)
        assert busy.result(timeout=30)
        assert isinstance(late.exception(timeout=30), DeadlineError)
        assert batcher.stats()["expired"] == 1
    finally:
        batcher.close()
    assert batcher.stats()["triples"] == 2  # the expired and the cancelled triple were not scored


def test_a_batch_waits_for_late_arrivals_up_to_max_wait(scorer, pictures):
    """Triples 50 ms apart join the oldest one's batch while it waits (max_wait_ms 2000); at a full
    batch the wait ends early."""
    with BatchingScorer(scorer, max_batch=3, max_wait_ms=2000) as batcher:
        start = time.monotonic()
        futures = []
        for e in pictures[3:6]:
            futures.append(batcher.submit("add a cat", pictures[0], e))
            time.sleep(0.05)
        for f in futures:
            f.result(timeout=60)
        assert batcher.stats()["batches"] == 1 and time.monotonic() - start < 2.0


def test_a_cpu_default_scorer_still_merges_and_shares_sources(tiny_onnx, pictures):
    """With the CPU default of one triple per model call, the batcher still takes 8 triples a batch,
    and the scorer gives the edits of one source one prefix: 4 edits of one source submitted
    together encode that source once (1 + 4 images encoded, not 8)."""
    from test_groups import Counting

    one = Scorer.load(tiny_onnx, threads=1)
    assert one.max_batch == 1
    cases = [("add a hat", pictures[0], pictures[1 + j]) for j in range(4)]
    want = [one.score(*c) for c in cases]
    with BatchingScorer(one, max_wait_ms=500) as batcher, Counting(one) as count:
        assert batcher.max_batch == 8
        futures = [batcher.submit(*c) for c in cases]
        got = [f.result(timeout=60) for f in futures]
    assert count.vision == 1 + len(cases)
    for g, w in zip(got, want, strict=True):
        assert_same_score(g, w)


def test_a_rewritten_file_or_an_image_edited_in_place_is_scored_anew(scorer, pictures, tmp_path):
    """An RL loop that rewrites rollout.png each step, or edits an image object in place, gets the
    new content's score (Scorer.score's), never the remembered preprocessing of the old one."""
    path = tmp_path / "rollout.png"
    canvas = pictures[5].copy()
    with BatchingScorer(scorer, max_wait_ms=1) as batcher:
        got, want = [], []
        for step, picture in enumerate(pictures[3:5]):
            picture.save(path)  # the same path each step, new content
            where = str(path) if step else path
            want.append(scorer.score("add a cat", pictures[0], where))
            got.append(batcher.submit("add a cat", pictures[0], where).result(timeout=60))
        want.append(scorer.score("add a cat", pictures[0], canvas))
        got.append(batcher.submit("add a cat", pictures[0], canvas).result(timeout=60))
        canvas.paste(pictures[6].resize(canvas.size))  # the same object, new pixels
        want.append(scorer.score("add a cat", pictures[0], canvas))
        got.append(batcher.submit("add a cat", pictures[0], canvas).result(timeout=60))
    for g, w in zip(got, want, strict=True):
        assert_same_score(g, w)
    assert got[0].mu != got[1].mu and got[2].mu != got[3].mu  # the contents score apart


def test_equal_content_is_preprocessed_once_and_a_bad_file_is_named(scorer, pictures, tmp_path):
    """The same bytes at two paths are one source (remembered by content); a corrupt file's error
    names the file although its bytes, not its path, were preprocessed."""
    for name in ("a.png", "b.png"):
        pictures[0].save(tmp_path / name)
    (tmp_path / "cut.png").write_bytes((tmp_path / "a.png").read_bytes()[:150])
    infos = []
    with BatchingScorer(scorer, max_batch=2, max_wait_ms=2000, on_batch=infos.append) as batcher:
        futures = [batcher.submit("add a cat", tmp_path / name, e) for name, e in (("a.png", pictures[3]), ("b.png", pictures[4]))]
        for f, e in zip(futures, pictures[3:5]):
            assert_same_score(f.result(timeout=60), scorer.score("add a cat", pictures[0], e))
        cut = batcher.submit("add a cat", tmp_path / "cut.png", pictures[3])
        with pytest.raises(ImageError, match="cut.png"):
            cut.result(timeout=60)
    assert infos[0]["size"] == 2 and infos[0]["sources"] == 1
