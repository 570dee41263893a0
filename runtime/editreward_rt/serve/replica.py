"""The scorer replica: one ``Scorer`` per replica (one GPU, or one group of CPU cores).

Requests are cut into chunks of at most ``max_batch`` triples; ``@serve.batch`` merges the
chunks of concurrent requests into one batch, which is preprocessed on a small thread pool
(each distinct image once) and scored in one fast-path call. Nothing a client sends can make a
batch raise: failures are per triple. Results cross back to the gateway as plain dicts
(``Score.to_dict()`` or ``{"error": ...}``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from ..errors import EditRewardError
from ..preprocess import PreprocessedImage
from ..scorer import Score, Scorer, preference
from .schemas import RequestTimeoutError, ServiceError, http_status

log = logging.getLogger("ray.serve")


def _outcome(result) -> dict:
    if isinstance(result, Score):
        return result.to_dict()
    return {"error": result.to_dict(), "status": http_status(result)}


def _deadline(budget_s: float | None) -> float | None:
    """A budget in seconds -> a deadline on this process's monotonic clock."""
    return None if budget_s is None else time.monotonic() + budget_s


def _triple_count(chunks) -> int:
    return sum(len(c) for c in chunks)


def _named(exc: EditRewardError, field: str) -> EditRewardError:
    """The same error class with the request field it came from in front of the message."""
    try:
        return type(exc)(f"{field}: {exc}")
    except Exception:  # an error class with another constructor: keep the original
        return exc


class ScorerReplica:
    def __init__(self, model: str, backend: str | None = None, device: str = "cpu", threads: int | None = None,
                 max_batch: int = 8, batch_wait_s: float = 0.01, max_input_pixels: int | None = None):
        self.scorer = Scorer.load(model, backend=backend, device=device, threads=threads, max_batch=max_batch,
                                  max_input_pixels=max_input_pixels)
        self.max_batch = max_batch
        self._prep = ThreadPoolExecutor(max_workers=max(1, threads or 1), thread_name_prefix="editreward-prep")
        self._run = ThreadPoolExecutor(max_workers=1, thread_name_prefix="editreward-run")
        self._batch.set_max_batch_size(max_batch)  # 2 x max_batch <= max_ongoing_requests (see app.py)
        self._batch.set_batch_wait_timeout_s(batch_wait_s)

    def ready(self) -> dict:
        return {**self.scorer.description, "max_batch": self.max_batch,
                "max_input_pixels": self.scorer.image_spec.max_input_pixels}

    # ------------------------------------------------------------ preprocessing (thread pool)

    def _preprocess(self, data: bytes):
        try:
            return self.scorer.preprocess(data)
        except EditRewardError as exc:
            return exc
        except Exception as exc:  # never let one image fail the batch
            log.exception("preprocessing failed")
            return ServiceError(f"preprocessing failed: {type(exc).__name__}: {exc}")

    async def _preprocess_all(self, images: list) -> dict:
        """Distinct images -> PreprocessedImage or error, in parallel on the preprocessing threads."""
        loop = asyncio.get_running_loop()
        done = await asyncio.gather(*(loop.run_in_executor(self._prep, self._preprocess, b) for b in images))
        return dict(zip(images, done))

    def _prepare(self, item, images: dict):
        instruction, source, edited, src_name, edit_name, _ = item
        try:
            src = source if isinstance(source, PreprocessedImage) else images[source]
            if isinstance(src, EditRewardError):
                raise _named(src, src_name)
            edit = images[edited]
            if isinstance(edit, EditRewardError):
                raise _named(edit, edit_name)
            return self.scorer.prepare(instruction, src, edit)
        except EditRewardError as exc:
            return exc
        except Exception as exc:
            log.exception("prompt assembly failed")
            return ServiceError(f"prompt assembly failed: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------ batched preprocessing and scoring

    def _score_safely(self, triples: list) -> list:
        """Score a merged batch; if the batch fails as a whole, score triple by triple."""
        def wrap(exc):
            log.exception("scoring failed")
            return ServiceError(f"scoring failed: {type(exc).__name__}: {exc}")

        return self.scorer.score_prepared_isolated(triples, wrap)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=2, batch_size_fn=_triple_count)
    async def _batch(self, chunks: list[list]) -> list[tuple[list, dict | None]]:
        """Chunks of concurrent requests -> one batch: each distinct image is decoded once, in
        parallel, then one fast-path call. Two batches may be in flight, so one is preprocessed
        while the other is scored."""
        flat = [item for chunk in chunks for item in chunk]
        start = time.perf_counter()
        try:
            results = await self._process(flat)
        except Exception as exc:  # a bug, not a bad input: still answer every request
            log.exception("a batch failed")
            results = [ServiceError(f"batch failed: {type(exc).__name__}: {exc}")] * len(flat)
        info = {"size": len(flat), "requests": len(chunks), "seconds": time.perf_counter() - start}
        out, at = [], 0
        for i, chunk in enumerate(chunks):  # the first chunk reports the batch, so it is counted once
            out.append((results[at : at + len(chunk)], info if i == 0 else None))
            at += len(chunk)
        return out

    async def _process(self, flat: list) -> list:
        # Work whose request has timed out at the gateway (its deadline passed) is skipped, before
        # decoding and again before scoring: a 504 frees the replica for the requests behind it.
        late = lambda item: item[5] is not None and time.monotonic() > item[5]
        expired = RequestTimeoutError("the request timed out before this triple was scored")
        live = [item for item in flat if not late(item)]
        distinct = {b: None for _, s, e, _, _, _ in live for b in (s, e) if not isinstance(b, PreprocessedImage)}
        images = await self._preprocess_all(list(distinct))
        prepared = [expired if late(item) else self._prepare(item, images) for item in flat]
        todo = [i for i, p in enumerate(prepared) if not isinstance(p, EditRewardError)]
        loop = asyncio.get_running_loop()
        scores = await loop.run_in_executor(self._run, self._score_safely, [prepared[i] for i in todo])
        results = list(prepared)
        for i, score in zip(todo, scores):
            results[i] = score
        return results

    async def _run_items(self, items: list) -> dict:
        """Items (instruction, source, edited, source name, edited name, deadline) -> results and batch infos."""
        chunks = [items[s : s + self.max_batch] for s in range(0, len(items), self.max_batch)]
        done = await asyncio.gather(*(self._batch(chunk) for chunk in chunks))
        results = [_outcome(r) for part, _ in done for r in part]
        return {"results": results, "batches": [info for _, info in done if info is not None]}

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
        src = (await self._preprocess_all([source]))[source]
        if isinstance(src, EditRewardError):
            err = _outcome(_named(src, "source"))
            return {"results": [err] * len(edits), "batches": []}
        return await self._run_items([(instruction, src, e, "source", n, deadline) for e, n in zip(edits, names)])

    async def prefer(self, instruction: str, source: bytes, a: bytes, b: bytes, budget_s: float | None = None) -> dict:
        out = await self.rank(instruction, source, [a, b], ["a", "b"], budget_s)
        sa, sb = out["results"]
        if "error" not in sa and "error" not in sb:
            out["p_a_over_b"] = preference(Score(sa["mu"], sa["log_sigma"], ()), Score(sb["mu"], sb["log_sigma"], ()))
        return out
