"""Non-blocking batched scoring for many concurrent callers (an RL trainer's rollout workers, a
server's requests).

``BatchingScorer`` queues each ``submit`` and returns a future at once; its images start
preprocessing at once on ``prep_threads`` threads (an image submitted again while still
remembered, such as the source of a group's edits, is preprocessed once; remembered by its
content, so a file rewritten at the same path or an image edited in place is a new image). One
worker thread takes what arrived within ``max_wait_ms`` of the oldest waiting triple (up to
``max_batch``) and scores it in one fast-path call, in which each source image and its prefix are
encoded once for all its edits (the pipeline's source level), while the next batch's images are
preprocessed. The scores equal ``Scorer.score`` of each triple; a bad triple fails only its own future.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import stat
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from .errors import BackendError, DeadlineError, EditRewardError, ImageError, NotReadyError, OverloadedError
from .scorer import Score, Scorer, attempt, scoring_failed

log = logging.getLogger(__name__)


@dataclass
class _Item:
    instruction: str
    source: Any
    edited: Any
    deadline: float | None  # time.monotonic() after which the triple is dropped unscored
    tag: Any  # who submitted it (a request id, say): batch infos count distinct tags
    images: tuple[Future, Future]  # the source and edited image, being preprocessed
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


# Triples a batch merges unless asked otherwise, whatever the scorer's per-call size
# (``backends.default_max_batch``): the scorer splits a batch into its own calls, each source's edits
# continuing one prefix of it, so a wider batch still shares sources on a CPU's one-triple calls.
MERGE_WIDTH = 8


# A file larger than this is preprocessed from its path, unremembered, rather than read whole on the
# caller's thread to be hashed (a 12-megapixel PNG is about 20 MB).
SNAPSHOT_MAX_BYTES = 1 << 27


def _digest(*parts) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part)
    return h.digest()


def _content(image, max_pixels: int) -> tuple[tuple | None, Any, str | None]:
    """(key, source, name) of an image as submitted. ``key`` comes from its content, never from a
    path string or an object's id: a file rewritten at one path, or a PIL image or array edited in
    place, is a new image. ``source`` is a copy of that content, so what the caller changes after
    the submit cannot reach the queued triple; ``name`` is the path a file's bytes came from. ``key``
    None: not remembered, ``source`` the image as given (what cannot be read here, or is too large
    to copy, the scorer reports as its typed error)."""
    try:
        if isinstance(image, (str, os.PathLike)):
            info = os.stat(image)
            if stat.S_ISREG(info.st_mode) and info.st_size <= SNAPSHOT_MAX_BYTES:
                with open(image, "rb") as f:
                    data = f.read(SNAPSHOT_MAX_BYTES + 1)
                return ("bytes", _digest(data)), data, os.fspath(image)
        elif isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            return ("bytes", _digest(data)), data, None
        elif isinstance(image, np.ndarray) and not image.dtype.hasobject:
            copy = np.array(image, order="C", copy=True)
            return ("array", copy.shape, copy.dtype.str, _digest(copy.data)), copy, None
        elif isinstance(image, Image.Image) and image.width * image.height <= max_pixels:
            copy = image.copy()  # decodes a lazily opened image
            palette = copy.palette.mode.encode() + copy.palette.tobytes() if copy.palette else b""
            return ("pil", copy.mode, copy.size, _digest(copy.tobytes(), palette)), copy, None
    except Exception:  # whatever fails here fails again, typed, when the scorer reads the image as given
        pass
    return None, image, None


class BatchingScorer:
    """Thread-safe ``submit(instruction, source, edited) -> Future[Score]`` (and ``await asubmit``).

    ``max_queue`` bounds the triples waiting (None: unbounded, for callers with their own bound);
    a submit beyond it raises ``OverloadedError`` at once. ``close()`` refuses new triples and
    scores every one already accepted. ``on_batch(info)`` is called from the worker after each
    batch is scored and before its futures resolve, with ``{"size", "sources", "requests", "seconds"}``.
    """

    def __init__(self, scorer: Scorer, max_batch: int | None = None, max_wait_ms: float = 5.0,
                 max_queue: int | None = 1024, on_batch: Callable[[dict], None] | None = None, prep_threads: int = 2):
        if max_queue is not None and max_queue < 1:
            raise ValueError("max_queue must be at least 1, or None")
        self.scorer = scorer
        # Triples the worker takes per batch (None: MERGE_WIDTH, or the scorer's per-call size if larger).
        self.max_batch = max(1, max_batch or max(MERGE_WIDTH, scorer.max_batch))
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._counts = {"batches": 0, "triples": 0, "rejected": 0, "expired": 0}
        self._prep = ThreadPoolExecutor(max_workers=max(1, prep_threads), thread_name_prefix="editreward-prep")
        # content key -> its preprocessing (a PreprocessedImage or its error), least recent first
        self._recent: OrderedDict[tuple, Future] = OrderedDict()
        self._recent_max = max(16, 2 * self.max_batch)  # a preprocessed photo is ~5 MB
        self._worker = threading.Thread(target=self._loop, name="editreward-batcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------ callers

    def submit(self, instruction: str, source, edited, *, deadline: float | None = None, tag=None) -> Future:
        """Queue one triple; its future resolves to its ``Score`` or its typed error. ``deadline``
        (``time.monotonic()`` seconds): dropped with a ``DeadlineError`` if not scored by then."""
        max_pixels = self.scorer.image_spec.max_input_pixels
        images = (_content(source, max_pixels), _content(edited, max_pixels))  # read and hashed outside the lock
        with self._cond:
            if self._closed:
                raise NotReadyError("the BatchingScorer is closed")
            if self.max_queue is not None and len(self._queue) >= self.max_queue:
                self._counts["rejected"] += 1
                raise OverloadedError(f"{len(self._queue)} triples are queued (max_queue {self.max_queue}); retry later")
            item = _Item(instruction, source, edited, deadline, tag, tuple(self._preprocess(*image) for image in images))
            self._queue.append(item)
            self._cond.notify()
        return item.future

    def _preprocess(self, key: tuple | None, source, name: str | None) -> Future:
        """The image's preprocessing (PreprocessedImage or its error), started now or shared with a
        recent submit of the same content. Called under the lock."""
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        future = self._prep.submit(attempt, "return", "an image", self._preprocess_named, source, name)
        if key is not None:
            self._recent[key] = future
            while len(self._recent) > self._recent_max:
                self._recent.popitem(last=False)
        return future

    def _preprocess_named(self, source, name: str | None):
        """``scorer.preprocess`` of a file's bytes names the file in its error, as it would the path."""
        try:
            return self.scorer.preprocess(source)
        except ImageError as exc:
            if name is None:
                raise
            raise type(exc)(f"{name!r}: {exc}") from None

    async def asubmit(self, instruction: str, source, edited, *, deadline: float | None = None, tag=None) -> Score:
        """``submit`` for asyncio callers; cancelling the await cancels the triple if not yet taken."""
        return await asyncio.wrap_future(self.submit(instruction, source, edited, deadline=deadline, tag=tag))

    def score_groups(self, groups, errors: str = "raise") -> list[list]:
        """(instruction, source, [edited, ...]) groups -> their scores, as ``Scorer.score_groups``, with
        the triples of every caller merged into batches. With ``errors="return"`` errors stay in place."""
        futures = [[self.submit(instruction, source, e) for e in edits] for instruction, source, edits in groups]
        out = [[f.exception() or f.result() for f in group] for group in futures]
        failed = next((r for group in out for r in group if not isinstance(r, Score)), None)
        if errors == "raise" and failed is not None:
            raise failed
        return out

    def close(self, timeout: float | None = None) -> None:
        """Refuse new triples, score those accepted, and stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)
        if not self._worker.is_alive():
            self._prep.shutdown(wait=False)
            self._recent.clear()

    def __enter__(self) -> "BatchingScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        with self._cond:
            counts = dict(self._counts, queued=len(self._queue))
        counts["mean_batch"] = counts["triples"] / counts["batches"] if counts["batches"] else 0.0
        return counts

    # ------------------------------------------------------------ the worker

    def _take(self) -> list[_Item] | None:
        """The next batch: wait for a first triple, then until ``max_batch`` are queued or the oldest
        has waited ``max_wait_ms``; None once closed and drained."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            until = self._queue[0].arrived + self.max_wait_s
            while len(self._queue) < self.max_batch and not self._closed:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._run(batch)
            except Exception as exc:  # a bug: fail this batch's futures, keep serving the next ones
                log.exception("a batch failed")
                error = BackendError(f"batch failed: {type(exc).__name__}: {exc}")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)

    def _run(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]  # skip cancelled ones
        prepared = self._prepare(live)
        now = time.monotonic()
        late = [i for i, item in enumerate(live) if item.deadline is not None and now > item.deadline]
        for i in late:
            prepared[i] = DeadlineError("the deadline passed before this triple was scored")
        todo = [i for i, p in enumerate(prepared) if not isinstance(p, EditRewardError)]
        scores = self.scorer.score_prepared_isolated([prepared[i] for i in todo], scoring_failed)
        for i, score in zip(todo, scores):
            prepared[i] = score
        with self._cond:
            self._counts["expired"] += len(late)
            if todo:
                self._counts["batches"] += 1
                self._counts["triples"] += len(todo)
        if todo and self.on_batch is not None:
            self.on_batch({"size": len(todo), "sources": len({live[i].images[0] for i in todo}),
                           "requests": len({live[i].tag for i in todo}), "seconds": time.perf_counter() - start})
        for item, outcome in zip(live, prepared):
            if isinstance(outcome, Score):
                item.future.set_result(outcome)
            else:
                item.future.set_exception(outcome)

    def _prepare(self, live: list[_Item]) -> list:
        """Each item -> a PreparedTriple or its error."""
        out = []
        for item in live:
            src, edit = (f.result() for f in item.images)
            failed = next((x for x in (src, edit) if isinstance(x, EditRewardError)), None)
            out.append(failed or attempt("return", "a triple", self.scorer.prepare, item.instruction, src, edit))
        return out
