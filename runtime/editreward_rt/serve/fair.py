"""A thread pool whose callers take turns: each owner (a request) has its own queue of jobs, and
every free worker runs the next job of the next owner in line. A request of 16 large images then
delays a one-image request by at most one image per request ahead of it, not by all 16, as a
first-in first-out pool would (the replica decodes images on it, replica.py)."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Callable, Hashable, Iterable


class FairPool:
    def __init__(self, workers: int, name: str = "fair"):
        self._queues: OrderedDict[Hashable, deque] = OrderedDict()  # owner -> its jobs not started, in order
        self._ready = threading.Condition()
        for i in range(workers):  # daemon threads: they live as long as the replica's process
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def submit_all(self, owner: Hashable, fn: Callable, args: Iterable) -> list[Future]:
        """Queue ``fn(arg)`` for each arg as ``owner``'s jobs; their futures, in order (a cancelled
        one is skipped when its turn comes)."""
        jobs = [(Future(), fn, arg) for arg in args]
        if not jobs:  # an owner in line has at least one job (_next takes one)
            return []
        with self._ready:
            self._queues.setdefault(owner, deque()).extend(jobs)
            self._ready.notify(len(jobs))
        return [future for future, _, _ in jobs]

    def _next(self) -> tuple:
        with self._ready:
            while not self._queues:
                self._ready.wait()
            owner, jobs = self._queues.popitem(last=False)
            job = jobs.popleft()
            if jobs:  # the owner's next job goes to the back of the line
                self._queues[owner] = jobs
            return job

    def _work(self) -> None:
        while True:
            future, fn, arg = self._next()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(arg))
            except BaseException as exc:  # handed to the caller, as ThreadPoolExecutor does
                future.set_exception(exc)
