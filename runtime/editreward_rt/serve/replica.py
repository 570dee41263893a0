"""The scorer replica: one ``Scorer`` per replica (one GPU, or one group of CPU cores).

Requests are preprocessed on a small thread pool, cut into chunks of at most ``max_batch``
triples, and the chunks of concurrent requests are merged by ``@serve.batch`` into one
fast-path call. Nothing a client sends can make a batch raise: failures are per triple.
Results cross back to the gateway as plain dicts (``Score.to_dict()`` or ``{"error": ...}``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from ..errors import EditRewardError
from ..preprocess import PreprocessedImage
from ..scorer import Scorer, Score, preference
from .schemas import ServiceError, http_status

log = logging.getLogger("ray.serve")


def _outcome(result) -> dict:
    if isinstance(result, Score):
        return result.to_dict()
    return {"error": result.to_dict(), "status": http_status(result)}


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
                 max_batch: int = 8, batch_wait_s: float = 0.005, max_input_pixels: int | None = None):
        self.scorer = Scorer.load(model, backend=backend, device=device, threads=threads, max_batch=max_batch,
                                  max_input_pixels=max_input_pixels)
        self.max_batch = max_batch
        self._prep = ThreadPoolExecutor(max_workers=max(1, threads or 1), thread_name_prefix="editreward-prep")
        self._run = ThreadPoolExecutor(max_workers=1, thread_name_prefix="editreward-run")
        self._batch.set_max_batch_size(max_batch)
        self._batch.set_batch_wait_timeout_s(batch_wait_s)

    def ready(self) -> dict:
        return {**self.scorer.description, "max_batch": self.max_batch,
                "max_input_pixels": self.scorer.image_spec.max_input_pixels}

    # ------------------------------------------------------------ preprocessing (thread pool)

    def _image(self, data, field: str, cache: dict):
        if isinstance(data, PreprocessedImage):  # rank's shared source
            return data
        if data not in cache:
            try:
                cache[data] = self.scorer.preprocess(data)
            except EditRewardError as exc:
                cache[data] = exc
        found = cache[data]
        if isinstance(found, EditRewardError):
            raise _named(found, field)
        return found

    def _prepare_triples(self, triples, names) -> list:
        cache, out = {}, []
        for (instruction, source, edited), (src_name, edit_name) in zip(triples, names):
            try:
                src = self._image(source, src_name, cache)
                out.append(self.scorer.prepare(instruction, src, self._image(edited, edit_name, cache)))
            except EditRewardError as exc:
                out.append(exc)
            except Exception as exc:  # never let one triple fail the request
                log.exception("preprocessing failed")
                out.append(ServiceError(f"preprocessing failed: {type(exc).__name__}: {exc}"))
        return out

    # ------------------------------------------------------------ batched scoring

    def _score_safely(self, triples: list) -> list:
        """Score a merged batch; if the batch fails as a whole, score triple by triple."""
        try:
            return self.scorer.score_prepared(triples)
        except Exception:
            log.warning("a batch of %d failed; scoring its triples one by one", len(triples), exc_info=True)
        out = []
        for t in triples:
            try:
                out.append(self.scorer.score_prepared([t])[0])
            except EditRewardError as exc:
                out.append(exc)
            except Exception as exc:
                log.exception("scoring failed")
                out.append(ServiceError(f"scoring failed: {type(exc).__name__}: {exc}"))
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, batch_size_fn=_triple_count)
    async def _batch(self, chunks: list[list]) -> list[tuple[list, dict | None]]:
        flat = [t for chunk in chunks for t in chunk]
        start = time.perf_counter()
        results = await asyncio.get_running_loop().run_in_executor(self._run, self._score_safely, flat)
        info = {"size": len(flat), "requests": len(chunks), "seconds": time.perf_counter() - start}
        out, at = [], 0
        for i, chunk in enumerate(chunks):  # the first chunk reports the batch, so it is counted once
            out.append((results[at : at + len(chunk)], info if i == 0 else None))
            at += len(chunk)
        return out

    async def _score(self, prepared: list) -> tuple[list, list[dict]]:
        """Prepared triples or errors -> (per-triple results, infos of the batches that ran them)."""
        results = list(prepared)
        todo = [i for i, p in enumerate(prepared) if not isinstance(p, EditRewardError)]
        groups = [todo[s : s + self.max_batch] for s in range(0, len(todo), self.max_batch)]
        done = await asyncio.gather(*(self._batch([prepared[i] for i in g]) for g in groups))
        batches = []
        for group, (scores, info) in zip(groups, done):
            for i, score in zip(group, scores):
                results[i] = score
            if info is not None:
                batches.append(info)
        return results, batches

    async def _prepare(self, fn, *args) -> list:
        return await asyncio.get_running_loop().run_in_executor(self._prep, fn, *args)

    # ------------------------------------------------------------ methods the gateway calls

    async def score(self, triples: list[tuple[str, bytes, bytes]]) -> dict:
        many = len(triples) > 1
        names = [(f"triples[{i}].source", f"triples[{i}].edited") if many else ("source", "edited")
                 for i in range(len(triples))]
        prepared = await self._prepare(self._prepare_triples, triples, names)
        results, batches = await self._score(prepared)
        return {"results": [_outcome(r) for r in results], "batches": batches}

    def _prepare_rank(self, instruction: str, source: bytes, edits: list[bytes], names: list[str]) -> list:
        """As ``Scorer.rank``: the source is preprocessed once and every triple shares it."""
        try:
            src = self.scorer.preprocess(source)
        except EditRewardError as exc:
            return [_named(exc, "source")] * len(edits)
        return self._prepare_triples([(instruction, src, e) for e in edits], [("source", n) for n in names])

    async def rank(self, instruction: str, source: bytes, edits: list[bytes], names: list[str] | None = None) -> dict:
        names = names or [f"edits[{i}]" for i in range(len(edits))]
        prepared = await self._prepare(self._prepare_rank, instruction, source, edits, names)
        results, batches = await self._score(prepared)
        return {"results": [_outcome(r) for r in results], "batches": batches}

    async def prefer(self, instruction: str, source: bytes, a: bytes, b: bytes) -> dict:
        out = await self.rank(instruction, source, [a, b], ["a", "b"])
        sa, sb = out["results"]
        if "error" not in sa and "error" not in sb:
            a_score = Score(sa["mu"], sa["log_sigma"], ())
            b_score = Score(sb["mu"], sb["log_sigma"], ())
            out["p_a_over_b"] = preference(a_score, b_score)
        return out
