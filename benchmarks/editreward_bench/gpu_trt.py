"""TensorRT GPU check: build engines, check parity against the PyTorch reference, time them.

See ``benchmarks/gpu_trt_check.py`` for usage and the expected output. Per model size (the tiny
fixture, and/or a full-size random-weight model of the real architecture made on the GPU, both
with rubric prompts of the real length and 448 x 448 images) the PyTorch reference runs first, in
bf16 and in float32 where memory allows, each timed on the same workload as the engines. Then per
precision, in a process of its own: export (half-width graphs at full size, never self-validated
on the CPU there), the static op-support check, build, load, parity against the reference of the
engine's dtype, latency at batch 1 after a warm-up and throughput at each batch size, and the
GPU memory the backend holds beside the process's peak as the driver reports it.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from editreward_rt.schemes import SCHEMES, trt_precisions

from .common import gate_tolerance
from .gpu_matrix import BATCH_SIZES, MatrixVariant, measure_variant, parity, timings
from .isolated import log, run_isolated
from .plan_run import Results, Step, log_plan, parse_caps
from .plan_run import execute as run_plan
from .prereqs import machine, skip_reason

# Tolerance keys: ("tensorrt", dtype) for float engines, ("tensorrt", scheme) for quantized ones.
TOLERANCE_KEYS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", **trt_precisions()}
# At full size the engines are built from half-width graphs: float32 ones would be ~27 GiB each and
# the exporter would self-validate them with ONNX Runtime on the CPU, which for a 7B outlasts any session.
FULL_GRAPH_DTYPES = {"bf16": "bf16", "fp16": "fp16"}
REFERENCES = ("bfloat16", "float32")
GiB = 2**30


@dataclass(frozen=True)
class Engine:
    size: str
    precision: str

    @property
    def key(self) -> str:
        return f"{self.size}/tensorrt-{self.precision}"

    @property
    def reference(self) -> str:
        """The reference in the engine's own dtype: bf16 engines against the bf16 reference, the rest float32."""
        return f"{self.size}/torch-reference-{'bfloat16' if self.precision == 'bf16' else 'float32'}"

    def graph_dtype(self) -> str:
        from editreward_trt.build import PRECISIONS

        return FULL_GRAPH_DTYPES[self.precision] if self.size == "full" else PRECISIONS[self.precision].onnx_dtype

    @property
    def libraries(self) -> tuple[str, ...]:
        scheme = trt_precisions().get(self.precision)  # a quantized precision needs its scheme's library
        return ("torch", "onnx", "tensorrt", "cuda") + (SCHEMES[scheme].modules if scheme else ())


def reference_key(size: str, dtype: str) -> str:
    return f"{size}/torch-reference-{dtype}"


# ---------------------------------------------------------------- in the engine's own process


def export(engine: Engine, ckpt, folder: Path, log=log) -> None:
    """The exported folder the engines are built from; validated against PyTorch on the tiny model only."""
    from editreward_export.onnx_export import export_onnx
    from editreward_trt.build import PRECISIONS, prepare_onnx

    settings = PRECISIONS[engine.precision]
    if settings.quantized:  # float32 graphs, quantized: tiny only (the plan refuses them at full size)
        prepare_onnx(ckpt, settings, folder, log=log)
        return
    export_onnx(ckpt, folder, dtype=engine.graph_dtype(), kv_dtype=settings.kv_dtype, validate_export=engine.size == "tiny", log=log)


def build(engine: Engine, ckpt, folder: Path, request: dict) -> dict:
    from editreward_trt.build import build_engines, configure
    from editreward_trt.ops import check_exported

    t0 = time.perf_counter()
    export(engine, ckpt, folder)
    row = {"export_s": time.perf_counter() - t0, "graph_dtype": engine.graph_dtype()}
    ops = check_exported(folder)
    row["op_check"] = {"tensorrt_version": ops.tensorrt_version, "violations": [str(v) for v in ops.violations]}
    configure(folder, engine.precision, max_batch=request["max_batch"], workspace_gb=request["workspace"], log=log)
    t0 = time.perf_counter()
    manifest = build_engines(folder, str(Path(request["workdir"]) / "timing.cache"), log=log)
    row["build_s"] = time.perf_counter() - t0
    row["engine_mb"] = {n: (folder / e["file"]).stat().st_size / 2**20 for n, e in manifest["trt"]["engines"].items()}
    row["memory_estimate_gib"] = manifest["trt"].get("memory_estimate_gib")
    return row


def measure_engine(engine: Engine, request: dict, reference, reference_dtype: str) -> dict:
    """Export, build, load, parity, time one precision; runs in the engine's process."""
    from .workload import make_checkpoint

    folder = Path(request["workdir"]) / f"{engine.size}-{engine.precision}"
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(engine.graph_dtype(), "float32")
    ckpt = make_checkpoint(engine.size, "cuda", dtype, Path(request["workdir"]), small_vocab=True, host=True)
    try:
        row = {"variant": f"tensorrt-{engine.precision}", "size": engine.size, "precision": engine.precision,
               **build(engine, ckpt, folder, request)}
        row, outputs = run_engine(folder, ckpt, row, request, lambda out: gate(engine, out, reference, reference_dtype))
    finally:
        if not request["keep"]:
            shutil.rmtree(folder, ignore_errors=True)
    return {"rows": [row], "outputs": outputs}


def run_engine(folder: Path, ckpt, row: dict, request: dict, judge) -> tuple[dict, np.ndarray]:
    """Load the engines, judge their outputs on the workload, time them, and say what GPU memory they hold."""
    import torch
    from editreward_rt.backends.trt_backend import TrtBackend
    from editreward_rt.scorer import Scorer

    from .workload import workload_triples

    free_before, total = torch.cuda.mem_get_info()
    t0 = time.perf_counter()
    backend = TrtBackend(folder, device="cuda", verify=False)
    row["load_s"] = time.perf_counter() - t0
    try:
        prepared = [Scorer(backend, ckpt).prepare(*t) for t in workload_triples()]
        step = request["max_batch"]
        outputs = np.concatenate([backend.head_outputs(prepared[i:i + step]) for i in range(0, len(prepared), step)])
        row.update(judge(outputs))
        if row["status"] in ("ok", "no-tolerance"):  # validate first, time second
            row.update(timings(backend, prepared, request["reps"], [b for b in BATCH_SIZES if b <= request["max_batch"]]))
        free_after, _ = torch.cuda.mem_get_info()
        runners = backend.graphs.runners.values()
        row["gpu_memory_gib"] = {
            "held_by_backend": (free_before - free_after) / GiB,
            "engines_activation": sum(getattr(r.engine, "device_memory_size_v2", r.engine.device_memory_size) for r in runners) / GiB,
            "buffers": backend.graphs.pool.total_bytes() / GiB, "device_total": total / GiB}
    finally:
        backend.close()
        del backend
        gc.collect()
    return row, outputs


def gate(engine: Engine, outputs, reference, reference_dtype: str) -> dict:
    """Parity against the reference with the engine precision's tolerance (widened by a bf16 reference's rounding)."""
    try:
        tol = gate_tolerance("tensorrt", TOLERANCE_KEYS[engine.precision], reference_dtype)
    except KeyError as exc:  # a precision nobody stated a bound for yet: report the numbers, judge nothing
        from editreward_rt.tolerances import max_abs_diff

        return {"status": "no-tolerance", "reason": str(exc),
                "parity": {"max_abs_diff": max_abs_diff(outputs, reference), "reference_dtype": reference_dtype}}
    check = {**parity(outputs, reference, tol), "reference_dtype": reference_dtype}
    return {"status": "ok" if check["passed"] else "failed-parity", "parity": check}


# ---------------------------------------------------------------- the plan, in the parent


def reference_step(size: str, dtype: str) -> tuple[Step, MatrixVariant]:
    f32 = reference_key(size, "float32") if dtype != "float32" else None
    variant = MatrixVariant(f"torch-reference-{dtype}", "reference", dtype, libraries=("torch", "transformers"))
    return Step(reference_key(size, dtype), True, f32, {"variant": variant.label, "size": size}), variant


def engine_step(engine: Engine) -> tuple[Step, Engine]:
    fields = {"variant": f"tensorrt-{engine.precision}", "size": engine.size, "precision": engine.precision}
    return Step(engine.key, False, reference_key(engine.size, "float32"), fields), engine


def plan_items(args) -> list:
    """(Step, what runs it) in order, per size: both references (a minute or two at full size, and
    every engine is judged against one), then the engines, bf16 first."""
    items = []
    for size in args.sizes:
        precisions = args.precisions or (["fp32", "fp16", "bf16"] if size == "tiny" else ["bf16", "fp16"])
        items += [reference_step(size, d) for d in REFERENCES]
        items += [engine_step(Engine(size, p)) for p in sorted(precisions, key=lambda p: p != "bf16")]
    return items


def engine_needs(engine: Engine, spec, args) -> dict:
    """GPU memory, host memory and disk one engine's process needs (GiB)."""
    from editreward_trt.build import compute_limits, estimate_memory_gib

    from .workload import DTYPE_BYTES, weight_bytes

    graph_bytes = weight_bytes(spec, {"bf16": "bfloat16", "fp16": "float16"}.get(engine.graph_dtype(), "float32")) / GiB
    limits = compute_limits(spec, args.max_batch, log=lambda _: None)
    engines = estimate_memory_gib(spec, limits, engine.precision, DTYPE_BYTES["bfloat16"])["total"]
    # The export holds the host copy, the CPU modules and their serialisation; disk holds graphs and engines.
    return {"device_gib": engines + args.workspace + 1.0, "ram_gib": 3 * graph_bytes + 2.0, "disk_gib": 2 * graph_bytes}


def plan(items, args) -> tuple[dict, object]:
    """Each step's skip reason (None: it runs), before any model is built; and the machine."""
    from .workload import device_memory_estimate_gib, tiny_base, workload_spec

    m = machine(args.device, Path(args.workdir))
    base = tiny_base(Path(args.workdir))
    reasons, kept_disk = {}, 0.0
    for step, what in items:
        spec = workload_spec(base, step.fields["size"], small_vocab=True)
        if isinstance(what, MatrixVariant):
            reasons[step.key] = skip_reason(m, what.libraries, device_gib=device_memory_estimate_gib(spec, what.dtype))
            continue
        reasons[step.key] = engine_reason(what, m, spec, args, kept_disk, reasons)
        if reasons[step.key] is None and args.keep:
            kept_disk += engine_needs(what, spec, args)["disk_gib"]
    return reasons, m


def engine_reason(engine: Engine, m, spec, args, kept_disk: float, reasons: dict) -> str | None:
    if engine.size == "full" and engine.precision not in FULL_GRAPH_DTYPES:  # on any machine
        from .workload import weight_bytes

        return (f"engines from float32 graphs are not built at full size here (~{weight_bytes(spec, 'float32') / GiB:.0f} GiB "
                "of graphs, and the exporter would validate a 7B on the CPU); build them with export/build_trt.py")
    needs = engine_needs(engine, spec, args)
    reason = skip_reason(m, engine.libraries, ("cuda",), needs["device_gib"], needs["ram_gib"], needs["disk_gib"] + kept_disk)
    if reason is None and judged_by(engine, reasons) is None:
        return "no reference can run"
    return reason


def judged_by(engine: Engine, reasons: dict) -> str | None:
    """The reference an engine is checked against: its own dtype's, else the other one (with the
    tolerance widened for a bf16 reference), else None. The references are planned first."""
    other = reference_key(engine.size, "float32" if engine.reference.endswith("bfloat16") else "bfloat16")
    return next((ref for ref in (engine.reference, other) if ref in reasons and not reasons[ref]), None)


def run_step_for(args, reasons):
    request = {"device": args.device, "workdir": args.workdir, "reps": args.reps, "max_batch": args.max_batch,
               "workspace": args.workspace, "keep": args.keep, "ckpt": None, "prompts_from": None, "small_vocab": True}

    def run_step(step, what, outputs, timeout_s, reader):
        if isinstance(what, MatrixVariant):
            out = run_isolated(measure_variant, (what, {**request, "size": step.fields["size"], "dtype": what.dtype}, None), timeout_s, reader)
        else:
            ref = judged_by(what, reasons)
            out = run_isolated(measure_engine, (what, request, outputs[ref], ref.rsplit("-", 1)[1]), timeout_s, reader)
        if "rows" not in out:  # the process failed: build error, crash, time cap
            return [{**step.fields, **out}], None
        process = {k: out[k] for k in ("process_s", "device_memory") if k in out}
        return [{**row, **step.fields, **process} for row in out["rows"]], out["outputs"]
    return run_step


def execute(args) -> int:
    items = plan_items(args)
    reasons, m = plan(items, args)
    steps, by_key = [s for s, _ in items], {s.key: what for s, what in items}
    log_plan(steps, reasons)
    config = {"sizes": args.sizes, "device": args.device, "reps": args.reps, "max_batch": args.max_batch,
              "workdir": str(args.workdir), "budget_s": args.budget_s, "machine": m.to_dict(),
              "workload": "8 triples (2 sources x 4 edits), 448x448 images, long rubrics"}
    results = Results(config, steps, reasons, args.out, args.device)
    run_one = run_step_for(args, reasons)
    code = run_plan(steps, reasons, results, lambda s, o, t, r: run_one(s, by_key[s.key], o, t, r),
                    args.budget_s, parse_caps(args.cap_s, 1800.0))
    print(table(results.rows))
    print(f"wrote {args.out}")
    return code


def table(results: list[dict]) -> str:
    head = f"{'size':<5} {'variant':<25} {'status':<13} {'build_s':>8} {'max|dmu|':>9} {'tol':>7} {'p50_ms':>8} {'p90_ms':>8} " \
           f"{'triples/s@max':>13} {'peak GiB':>8}"
    lines = [head]
    for r in results:
        if not r.get("batch1"):
            lines.append(f"{r['size']:<5} {r['variant']:<25} {r['status']:<13} {(r.get('reason') or r.get('error') or '')[:100]}")
            continue
        drift = (r.get("parity") or {}).get("max_abs_diff", {}).get("mu", float("nan"))
        tol = ((r.get("parity") or {}).get("tolerance") or {}).get("mu", float("nan"))
        peak = ((r.get("device_memory") or {}).get("peak_mb") or r.get("peak_rss_mb", float("nan"))) / 1024  # RSS on a CPU run
        b1, tp = r["batch1"], r["throughput"]
        lines.append(f"{r['size']:<5} {r['variant']:<25} {r['status']:<13} {r.get('build_s', float('nan')):>8.1f} {drift:>9.2e} "
                     f"{tol:>7.0e} {b1['p50_ms']:>8.1f} {b1['p90_ms']:>8.1f} {tp[str(max(map(int, tp)))]:>13.1f} {peak:>8.2f}")
    return "\n".join(lines)


def main(argv=None, description: str = "") -> int:
    parser = argparse.ArgumentParser(description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=lambda s: s.split(","), default=["tiny", "full"], help="tiny, full or both (default tiny,full)")
    parser.add_argument("--precisions", type=lambda s: s.split(","),
                        help="comma list of bf16,fp16,fp32,fp8,int8,int4 (default: tiny fp32,fp16,bf16; full bf16,fp16)")
    parser.add_argument("--device", default="cuda", help="where the references run (the engines always run on CUDA)")
    parser.add_argument("--dry-run", action="store_true", help="the same run on the tiny fixture and the CPU (what CI runs)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--workspace", type=float, default=4.0, help="builder workspace, GB")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=480, help="wall-clock budget for all steps (default 480)")
    parser.add_argument("--cap-s", action="append", metavar="[KEY=]SECONDS",
                        help="time cap per step (default 1800), or for one step (e.g. full/tensorrt-bf16=2400); repeatable")
    parser.add_argument("--workdir", help="where exports, engines and the timing cache go (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep each precision's folder (full size: ~30 GB each)")
    parser.add_argument("--out", default="results/gpu-trt-check.json")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.sizes, args.device = ["tiny"], "cpu"
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-trt-check-"))
    return execute(args)


if __name__ == "__main__":
    sys.exit(main())
