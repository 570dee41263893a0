"""The scorer replica: one ``Scorer`` per replica (one GPU, or one group of CPU cores).

The images of each request are decoded on a small thread pool (each distinct image once, in
parallel), then every triple goes to the replica's ``BatchingScorer``, which merges the triples
of concurrent requests into batches of at most ``max_batch`` (default ``batching.MERGE_WIDTH``;
each source encoded once per batch), scored in calls of the scorer's per-call size. Nothing a
client sends can make a batch raise: failures are per triple. Results cross back to the gateway as plain dicts (``Score.to_dict()`` or ``{"error": ...}``), with the batches
run since the last answer (so the gateway's metrics count each batch once).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from ..batching import BatchingScorer
from ..errors import EditRewardError
from ..preprocess import PreprocessedImage
from ..scorer import Score, Scorer, preference
from .fair import FairPool
from .schemas import RequestTimeoutError, ServiceError, http_status

log = logging.getLogger("ray.serve")


def _outcome(result) -> dict:
    if isinstance(result, Score):
        return result.to_dict()
    return {"error": result.to_dict(), "status": http_status(result)}


def _deadline(budget_s: float | None) -> float | None:
    """A budget in seconds -> a deadline on this process's monotonic clock."""
    return None if budget_s is None else time.monotonic() + budget_s


def _named(exc: EditRewardError, field: str) -> EditRewardError:
    """The same error class with the request field it came from in front of the message."""
    try:
        return type(exc)(f"{field}: {exc}")
    except Exception:  # an error class with another constructor: keep the original
        return exc


def _late(item) -> bool:
    return item[5] is not None and time.monotonic() > item[5]


async def _until_deadline(futures: list, deadline: float | None) -> None:
    """Wait for thread-side futures (image decodes, queued triples) until ``deadline``, then cancel
    those not started (the fair pool and the batcher skip cancelled jobs) and wait for the ones
    running. Cancelling this wait (the gateway gave up) cancels every job not started."""
    if not futures:
        return
    waiting = [asyncio.wrap_future(f) for f in futures]
    try:
        _, pending = await asyncio.wait(waiting, timeout=None if deadline is None else
                                        max(0.0, deadline - time.monotonic()))
        if pending:
            for future in futures:
                future.cancel()  # refused (False) by a running job: it is awaited below
            await asyncio.wait(pending)
    except asyncio.CancelledError:
        for future in futures:
            future.cancel()
        raise


def _timed_out_or_result(future):
    if future.cancelled():
        return RequestTimeoutError("the request timed out before this triple was scored")
    return future.exception() or future.result()


class ScorerReplica:
    def __init__(self, model: str, backend: str | None = None, device: str = "cpu", threads: int | None = None,
                 max_batch: int | None = None, batch_wait_s: float = 0.01, max_input_pixels: int | None = None,
                 options: dict | None = None, precision: str | None = None):
        # max_batch None: the device's per-call size (backends.default_max_batch) and the batcher's merge width.
        self.scorer = Scorer.load(model, backend=backend, device=device, threads=threads, max_batch=max_batch,
                                  max_input_pixels=max_input_pixels, precision=precision, options=options)
        # Requests take turns on the decoding threads: a request of many large images cannot hold them all.
        self._prep = FairPool(max(1, threads or 1), name="editreward-prep")
        self._infos, self._infos_lock = [], threading.Lock()
        # The handle bounds the requests in flight (Serve's max_ongoing_requests, app.py, or LocalHandle,
        # local.py): no second bound here.
        self.batcher = BatchingScorer(self.scorer, max_batch=max_batch, max_wait_ms=batch_wait_s * 1000.0, max_queue=None,
                                      on_batch=self._record)

    def ready(self) -> dict:
        return {**self.scorer.description, "max_batch": self.batcher.max_batch, "per_call": self.scorer.max_batch,
                "max_input_pixels": self.scorer.image_spec.max_input_pixels,
                "heads": list(self.scorer.spec.heads.names), "fusion": self.scorer.spec.heads.fusion}

    def _record(self, info: dict) -> None:
        with self._infos_lock:
            self._infos.append(info)

    def _batches(self) -> list[dict]:
        """The batches run since the last answer, each reported once."""
        with self._infos_lock:
            out, self._infos = self._infos, []
        return out

    # ------------------------------------------------------------ preprocessing (fair thread pool)

    def _preprocess(self, data: bytes):
        try:
            return self.scorer.preprocess(data)
        except EditRewardError as exc:
            return exc
        except Exception as exc:  # never let one image fail the batch
            log.exception("preprocessing failed")
            return ServiceError(f"preprocessing failed: {type(exc).__name__}: {exc}")

    async def _preprocess_all(self, images: list, deadline: float | None) -> dict:
        """Distinct images -> PreprocessedImage or error, in parallel on the preprocessing threads,
        taking turns with the images of other requests; those not begun by ``deadline`` are not
        decoded (a timeout error)."""
        futures = self._prep.submit_all(object(), self._preprocess, images)  # this call: one owner
        await _until_deadline(futures, deadline)
        return {image: _timed_out_or_result(f) for image, f in zip(images, futures)}

    @staticmethod
    def _images(item, images: dict):
        """(source, edited) as PreprocessedImages, or the first one's error named by its field."""
        _, source, edited, src_name, edit_name, _ = item
        src = source if isinstance(source, PreprocessedImage) else images[source]
        for image, name in ((src, src_name), (images[edited], edit_name)):
            if isinstance(image, EditRewardError):
                return _named(image, name)
        return src, images[edited]

    async def _run_items(self, items: list) -> dict:
        """Items (instruction, source, edited, source name, edited name, deadline; one deadline for all)
        -> results and batch infos. Work whose deadline passed is skipped before decoding, and at the
        deadline the triples still queued are withdrawn from the batcher: the answer (what was scored,
        per-item timeouts for the rest) leaves once the batch running then ends, and a timed-out
        request frees the replica for the requests behind it."""
        live = [item for item in items if not _late(item)]
        distinct = {b: None for _, s, e, _, _, _ in live for b in (s, e) if not isinstance(b, PreprocessedImage)}
        images = await self._preprocess_all(list(distinct), items[0][5] if items else None)
        tag, results, waiting = object(), [None] * len(items), []
        for i, item in enumerate(items):
            pair = RequestTimeoutError("the request timed out before this triple was scored") if _late(item) \
                else self._images(item, images)
            if isinstance(pair, EditRewardError):
                results[i] = pair
                continue
            waiting.append((i, self.batcher.submit(item[0], *pair, deadline=item[5], tag=tag)))
        await _until_deadline([f for _, f in waiting], items[0][5] if items else None)
        for i, future in waiting:
            results[i] = _timed_out_or_result(future)
        return {"results": [_outcome(r) for r in results], "batches": self._batches()}

    # ------------------------------------------------------------ methods the gateway calls

    async def score(self, triples: list[tuple[str, bytes, bytes]], names: list[tuple[str, str]] | None = None,
                    budget_s: float | None = None) -> dict:
        """``names``: each triple's (source, edited) field names, used in error messages; ``budget_s``:
        seconds after which work not yet done is dropped (the gateway has answered 504 by then)."""
        names = names or [(f"triples[{n}].source", f"triples[{n}].edited") for n in range(len(triples))]
        deadline = _deadline(budget_s)
        return await self._run_items([(*t, *n, deadline) for t, n in zip(triples, names)])

    async def rank(self, instruction: str, source: bytes, edits: list[bytes], names: list[str] | None = None,
                   budget_s: float | None = None) -> dict:
        """As ``Scorer.rank``: the source is preprocessed once and every triple shares it."""
        names = names or [f"edits[{i}]" for i in range(len(edits))]
        deadline = _deadline(budget_s)
        src = (await self._preprocess_all([source], deadline))[source]
        if isinstance(src, EditRewardError):
            err = _outcome(_named(src, "source"))
            return {"results": [err] * len(edits), "source_error": err, "batches": []}
        return await self._run_items([(instruction, src, e, "source", n, deadline) for e, n in zip(edits, names)])

    async def prefer(self, instruction: str, source: bytes, a: bytes, b: bytes, budget_s: float | None = None) -> dict:
        out = await self.rank(instruction, source, [a, b], ["a", "b"], budget_s)
        sa, sb = out["results"]
        if "error" not in sa and "error" not in sb:
            out["p_a_over_b"] = preference(Score(sa["mu"], sa["log_sigma"], ()), Score(sb["mu"], sb["log_sigma"], ()))
        return out
