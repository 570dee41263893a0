"""Measuring one variant in its own process: parity gate first, then latency, throughput, scaling."""

from __future__ import annotations

import time

import numpy as np
from editreward_rt.tolerances import max_abs_diff, within

from .common import REFERENCE, Variant, gate_tolerance, peak_rss_mb


def _gpu_peak_mb(reset: bool = False) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _percentiles(seconds: list[float]) -> dict:
    ms = 1000 * np.asarray(seconds)
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "n": len(ms)}


def _timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def parity_gate(variant: Variant, scorer, parity_triples, reference_outputs, reference_dtype: str) -> dict:
    """The variant's outputs against the reference's (run in ``reference_dtype``), with the tolerance of the
    variant's backend and the dtype or scheme it actually ran in."""
    prepared = [scorer.prepare(*t) for t in parity_triples]
    outputs = scorer.backend.head_outputs(prepared)
    if reference_outputs is None:
        return {"outputs": outputs}
    key = variant.tolerance_key(scorer)
    tol = gate_tolerance(*key, reference_dtype)
    diff = max_abs_diff(outputs, reference_outputs)
    return {"outputs": outputs, "max_abs_diff": diff, "tolerance": {"mu": tol.mu, "log_sigma": tol.log_sigma},
            "tolerance_key": list(key), "reference_dtype": reference_dtype,
            "passed": bool(np.isfinite(outputs).all()) and within(diff, tol)}


def stage_split(scorer, triple, reps: int) -> dict:
    """Mean seconds per stage for one triple: preprocess, vision, prefix, suffixes, heads."""
    pipeline = getattr(scorer.backend, "pipeline", None)
    prep = _timed(lambda: scorer.prepare(*triple), reps)
    split = {"preprocess_ms": 1000 * float(np.mean(prep))}
    if pipeline is None:  # the reference runs its passes monolithically
        return split
    prepared = scorer.prepare(*triple)
    before = pipeline.times.as_dict()
    for _ in range(reps):
        scorer.backend.head_outputs([prepared])
    after = pipeline.times.as_dict()
    split.update({f"{k}_ms": 1000 * (after[k] - before[k]) / reps for k in after})
    return split


def measure(label: str, cfg: dict, reference_outputs) -> dict:
    """Runs in a child process; returns a JSON-able result (plus raw parity outputs)."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    variant = Variant(label)
    t0 = time.perf_counter()
    _gpu_peak_mb(reset=True)
    scorer = variant.load(cfg["ckpt"], cfg.get("base"), cfg.get("prompts_from"), cfg["device"], cfg.get("threads"), cfg["dtype"])
    result = {"variant": label, "backend": scorer.description, "load_s": time.perf_counter() - t0}
    gate = parity_gate(variant, scorer, cfg["parity_triples"], reference_outputs, cfg["dtype"])
    outputs = gate.pop("outputs")
    result["parity"] = gate
    if reference_outputs is not None and not gate["passed"]:
        result["status"] = "failed-parity"
        return {"result": result, "outputs": outputs}
    triples = cfg["triples"]
    for _ in range(cfg["warmup"]):
        scorer.score_batch(triples[:1])
    result["batch1"] = _percentiles(_timed(lambda: scorer.score_batch(triples[:1]), cfg["reps"]))
    result["stages"] = stage_split(scorer, triples[0], max(2, cfg["reps"] // 3))
    result["throughput"] = _throughput(scorer, triples, cfg["batch_sizes"], cfg["reps"])
    result["scaling"] = _scaling(scorer, cfg["scaling_group"], cfg["scaling"])
    result["peak_rss_mb"] = peak_rss_mb()
    result["torch_peak_allocated_mb"] = _gpu_peak_mb()  # the parent adds the driver's count, every allocator's
    result["status"] = "ok"
    return {"result": result, "outputs": outputs}


def _throughput(scorer, triples, batch_sizes, reps) -> dict:
    per_batch = {}
    for size in batch_sizes:
        batch = triples[:size]
        if len(batch) < size:
            continue
        scorer.max_batch = size
        seconds = _timed(lambda: scorer.score_batch(batch), max(2, reps // size))
        per_batch[str(size)] = {"triples_per_s": size / float(np.median(seconds)), "latency_ms": 1000 * float(np.median(seconds))}
    best = max(per_batch, key=lambda k: per_batch[k]["triples_per_s"])
    return {"per_batch": per_batch, "best_batch": int(best), "best_triples_per_s": per_batch[best]["triples_per_s"]}


def _scaling(scorer, group, counts) -> list[dict]:
    """Ranking n edits against one source, n increasing: latency and the process's peak memory so far."""
    instruction, source, edits = group
    rows = []
    for n in counts:
        if n > len(edits):
            break
        scorer.max_batch = max(n, 1)
        seconds = _timed(lambda: scorer.rank(instruction, source, edits[:n]), 2)
        rows.append({"edits": n, "latency_ms": 1000 * float(np.median(seconds)),
                     "ms_per_edit": 1000 * float(np.median(seconds)) / n, "peak_rss_mb": peak_rss_mb(),
                     "peak_gpu_mb": _gpu_peak_mb()})
    return rows


def reference_label() -> str:
    return REFERENCE
