"""TensorRT GPU check: build engines, check parity against the PyTorch reference, time them.

See ``benchmarks/gpu_trt_check.py`` for usage and the expected output. Per model size (the tiny
fixture, and/or a full-size random-weight model of the real architecture made on the GPU) and
per precision: export (with the static op-support check), build, load, parity against the
PyTorch reference (computed once per size, before any engine takes GPU memory), latency at
batch 1 and throughput at larger batches, and the GPU memory the backend holds.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import ensure_fixture, results_document, synthetic_groups
from .gpu_matrix import InMemoryCheckpoint, timings

# Tolerance keys: ("tensorrt", dtype) for float engines, ("tensorrt", scheme) for quantized ones.
TOLERANCE_KEYS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
                  "fp8": "trt-fp8", "int8": "trt-int8-sq", "int4": "trt-int4-awq"}
GiB = 2**30


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_checkpoint(size: str, workdir: Path):
    """The tiny fixture, or the real 7B architecture with random weights (drawn on the GPU, kept on the host).

    The full model's embedding has the fixture tokenizer's rows (a few hundred), not Qwen's 151666:
    the exported folder checks tokenizer and embedding agree. That leaves out ~1 GiB (bf16) of weights."""
    import torch
    from editreward_rt.checkpoint import open_checkpoint

    paths = ensure_fixture(workdir, "tiny", export=False)  # realistic-length rubric prompts
    base = open_checkpoint(paths["ckpt"], prompts_from=paths["prompts_from"])
    if size == "tiny":
        return base
    full = base.family.PUBLISHED
    spec = full.full_spec(base.spec, vocab_size=base.spec.text.vocab_size)
    state = {k: v.cpu() for k, v in full.random_state(spec, "cuda", torch.bfloat16).items()}
    torch.cuda.empty_cache()
    return InMemoryCheckpoint(base, spec, full.full_config(base.config, spec), state)


def reference_outputs(ckpt, triples, dtype: str):
    """Prepared triples and the PyTorch reference's per-head outputs (two full passes per triple)."""
    import torch
    from editreward_rt.backends.torch_backend import TorchBackend
    from editreward_rt.scorer import Scorer

    backend = TorchBackend(ckpt, mode="reference", device="cuda", dtype=dtype)
    scorer = Scorer(backend, ckpt)
    prepared = [scorer.prepare(*t) for t in triples]
    outputs = np.concatenate([backend.head_outputs(prepared[i:i + 2]) for i in range(0, len(prepared), 2)])
    del scorer, backend
    gc.collect()
    torch.cuda.empty_cache()
    return prepared, outputs


def _tolerance(precision: str, reference_dtype: str):
    from editreward_rt.tolerances import Tolerance, tolerance

    tol = tolerance("tensorrt", TOLERANCE_KEYS[precision])
    if reference_dtype != "float32":  # a bf16 reference carries its own rounding
        ref = tolerance("torch-fast", reference_dtype)
        tol = Tolerance(max(tol.mu, ref.mu), max(tol.log_sigma, ref.log_sigma), min(tol.agreement, ref.agreement))
    return tol


def check_precision(ckpt, size: str, precision: str, prepared, expected, reference_dtype: str, args, workdir: Path) -> dict:
    import torch
    from editreward_rt.backends.trt_backend import TrtBackend
    from editreward_rt.tolerances import max_abs_diff
    from editreward_trt.build import PRECISIONS, build_engines, configure, prepare_onnx
    from editreward_trt.ops import check_exported

    result = {"variant": f"tensorrt-{precision}", "size": size, "precision": precision}
    folder = workdir / f"{size}-{precision}"
    try:
        t0 = time.perf_counter()
        prepare_onnx(ckpt, PRECISIONS[precision], folder, log=log)
        result["export_s"] = time.perf_counter() - t0
        ops = check_exported(folder)
        result["op_check"] = {"tensorrt_version": ops.tensorrt_version, "violations": [str(v) for v in ops.violations]}
        configure(folder, precision, max_batch=args.max_batch, workspace_gb=args.workspace, log=log)
        t0 = time.perf_counter()
        manifest = build_engines(folder, str(workdir / "timing.cache"), log=log)
        result["build_s"] = time.perf_counter() - t0
        result["engine_mb"] = {n: (folder / e["file"]).stat().st_size / 2**20 for n, e in manifest["trt"]["engines"].items()}
        result["memory_estimate_gib"] = manifest["trt"].get("memory_estimate_gib")
    except Exception as exc:  # a precision this machine or installation cannot build is a result, not a crash
        result.update(status="skipped", reason=f"{type(exc).__name__}: {exc}")
        return result
    free_before, total = torch.cuda.mem_get_info()
    t0 = time.perf_counter()
    backend = TrtBackend(folder, device="cuda", verify=False)
    result["load_s"] = time.perf_counter() - t0
    try:
        outputs = np.concatenate([backend.head_outputs(prepared[i:i + 2]) for i in range(0, len(prepared), 2)])
        diff = max_abs_diff(outputs, expected)
        try:
            tol = _tolerance(precision, reference_dtype)
        except KeyError as exc:  # a precision nobody stated a bound for yet: report the numbers
            tol, result["status"] = None, "no-tolerance"
            result["reason"] = str(exc)
        result["parity"] = {"max_abs_diff": diff, "tolerance": tol and {"mu": tol.mu, "log_sigma": tol.log_sigma},
                            "reference_dtype": reference_dtype, "triples": len(prepared), "finite": bool(np.isfinite(outputs).all())}
        if tol is not None:
            ok = diff["mu"] <= tol.mu and diff["log_sigma"] <= tol.log_sigma and result["parity"]["finite"]
            result["status"] = "ok" if ok else "failed-parity"
        result.update(timings(backend, prepared, args.reps, [b for b in (1, 2, 4, 8) if b <= args.max_batch]))
        free_after, _ = torch.cuda.mem_get_info()
        runners = backend.graphs.runners.values()
        result["gpu_memory_gib"] = {
            "held_by_backend": (free_before - free_after) / GiB,
            "engines_activation": sum(getattr(r.engine, "device_memory_size_v2", r.engine.device_memory_size) for r in runners) / GiB,
            "buffers": backend.graphs.pool.total_bytes() / GiB, "device_total": total / GiB}
    finally:
        backend.close()
        del backend
        gc.collect()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return result


def run(args) -> dict:
    import torch

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-trt-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    groups = synthetic_groups(2, 4, seed=0)
    triples = [(g[0], g[1], e) for g in groups for e in g[2]]
    total_gib = torch.cuda.get_device_properties(0).total_memory / GiB
    results = []
    for size in args.sizes.split(","):
        log(f"== {size} model")
        ckpt = make_checkpoint(size, workdir)
        reference_dtype = args.reference_dtype or ("float32" if size == "tiny" or total_gib >= 60 else "bfloat16")
        prepared, expected = reference_outputs(ckpt, triples, reference_dtype)
        precisions = args.precisions or ("fp32,fp16,bf16" if size == "tiny" else "bf16,fp16")
        for precision in precisions.split(","):
            log(f"== {size} {precision}")
            result = check_precision(ckpt, size, precision, prepared, expected, reference_dtype, args, workdir)
            results.append(result)
            log(json.dumps(result, default=float))
        del ckpt
        gc.collect()
    return results_document("latency", {"sizes": args.sizes, "triples": len(triples), "reps": args.reps,
                                        "max_batch": args.max_batch, "workdir": str(workdir)}, results, "cuda")


def table(results: list[dict]) -> str:
    head = f"{'size':<5} {'precision':<9} {'status':<13} {'build_s':>8} {'max|dmu|':>9} {'tol':>7} {'p50_ms':>8} {'p90_ms':>8} " \
           f"{'triples/s@max':>13} {'GiB':>6}"
    lines = [head]
    for r in results:
        if r["status"] == "skipped":
            lines.append(f"{r['size']:<5} {r['precision']:<9} skipped       {r['reason'][:90]}")
            continue
        b1, tp = r["batch1"], r["throughput"]
        lines.append(f"{r['size']:<5} {r['precision']:<9} {r['status']:<13} {r['build_s']:>8.1f} "
                     f"{r['parity']['max_abs_diff']['mu']:>9.2e} {(r['parity']['tolerance'] or {}).get('mu', float('nan')):>7.0e} {b1['p50_ms']:>8.1f} "
                     f"{b1['p90_ms']:>8.1f} {tp.get(str(max(map(int, tp))), 0):>13.1f} {r['gpu_memory_gib']['held_by_backend']:>6.2f}")
    return "\n".join(lines)


def main(argv=None, description: str = "") -> int:
    parser = argparse.ArgumentParser(description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,full", help="tiny, full or both (default tiny,full)")
    parser.add_argument("--precisions", help="comma list of bf16,fp16,fp32,fp8,int8,int4 (default: tiny fp32,fp16,bf16; full bf16,fp16)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--workspace", type=float, default=4.0, help="builder workspace, GB")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--reference-dtype", choices=("float32", "bfloat16"),
                        help="PyTorch reference dtype (default float32; bfloat16 for the full model under 60 GiB of GPU memory)")
    parser.add_argument("--workdir", help="where exports, engines and the timing cache go (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep each precision's folder (full size: ~30-60 GB each)")
    parser.add_argument("--out", default="results/gpu-trt-check.json")
    args = parser.parse_args(argv)
    doc = run(args)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=float))
    print(table(doc["results"]))
    print(f"wrote {path}")
    return 0 if all(r["status"] in ("ok", "skipped", "no-tolerance") for r in doc["results"]) else 1
