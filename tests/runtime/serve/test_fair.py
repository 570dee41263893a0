"""The fair pool: concurrent owners' jobs take turns, in a deterministic order on one worker."""

from __future__ import annotations

import threading

import pytest

from editreward_rt.serve.fair import FairPool


def test_a_small_request_is_not_queued_behind_a_big_one():
    """One worker, held by a first job: a 16-job owner queues first, then a 1-job owner. The small
    owner's job runs second, not after all 16 (first in, first out would run it last)."""
    pool, gate, order = FairPool(1, "test-fair"), threading.Event(), []

    def job(name: str) -> str:
        if name == "gate":
            assert gate.wait(30)
        order.append(name)
        return name

    first = pool.submit_all("holder", job, ["gate"])
    big = pool.submit_all("big", job, [f"big{i}" for i in range(16)])
    small = pool.submit_all("small", job, ["small"])
    gate.set()
    assert small[0].result(30) == "small"
    assert [f.result(30) for f in first + big] == ["gate"] + [f"big{i}" for i in range(16)]
    assert order[:3] == ["gate", "big0", "small"], order
    assert order[3:] == [f"big{i}" for i in range(1, 16)]


def test_cancelled_jobs_are_skipped_and_errors_reach_the_caller():
    pool, gate = FairPool(1, "test-fair"), threading.Event()
    held = pool.submit_all("holder", lambda _: gate.wait(30), [None])
    ran = []
    doomed = pool.submit_all("doomed", ran.append, [1, 2, 3])
    failing = pool.submit_all("failing", lambda x: 1 / x, [0])
    assert pool.submit_all("nothing", lambda x: x, []) == []  # an empty owner never reaches a worker
    assert all(f.cancel() for f in doomed)
    gate.set()
    assert held[0].result(30) is True
    with pytest.raises(ZeroDivisionError):
        failing[0].result(30)
    assert pool.submit_all("after", lambda x: x + 1, [1])[0].result(30) == 2  # the worker is still alive
    assert ran == []
