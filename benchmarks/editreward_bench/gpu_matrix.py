"""python benchmarks/gpu_check.py: the GPU matrix in one call (< 8 minutes on an H100/H200), on a
full-size random-weight model of the real architecture (Qwen2.5-VL-7B body + EditReward heads)
generated on the GPU in memory, with rubric prompts of the real length (~400 tokens per pass,
~926 per prompt) and 448 x 448 images (256 tokens each).

Variants, most important first: the PyTorch reference (two full passes per triple, as upstream)
and the fast path in bf16, the RL workload (``rl_bench``, 8 prompts x 8 edits) and the
differentiable reward's backward pass, then the reference and fast path in float32, then
bitsandbytes LLM.int8 and NF4 and GPTQ 4-bit (quantized in the run on synthetic triples) on the
fast path. Each variant runs in a process of its own, under a time cap, within ``--budget-s``.
It is parity-checked against the reference of the dtype it computes in, with the tolerance of
that dtype (``editreward_rt.tolerances``), then timed; a variant off parity is timed too and
labelled ``failed-parity``. bf16 rows also report their drift from the float32 reference.
Latency percentiles come from ``--reps`` (default 20) batch-1 calls and throughput from up to as
many calls per batch size, each size warmed up first, with the count ``n`` beside every figure;
batches are the first n triples of 4 sources x 2 edits with sources interleaved, so every batch
mixes sources. Memory is reported in two phases: ``load_memory`` (building the modules) and, after
the allocator's peak is reset, the serving peak; the driver's device-wide peak for the variant's
process (CUDA context included) is ``device_memory``. The drawn weights are released once the
modules hold them.

Before anything is built, every variant's prerequisites are checked (its libraries, the GPU, the
memory it needs): what cannot run is reported as ``skipped`` with the reason, up front. A variant
that then fails is ``failed`` with its error; a failing reference aborts the run (exit code 2).
The JSON results are rewritten after every variant. ONNX Runtime on CUDA is measured on an
exported folder with ``latency.py --device cuda`` (this model exists only in memory).

On the lent GPU machine (no network; torch and transformers installed, no bitsandbytes,
gptqmodel, TensorRT or onnxruntime-gpu): ``pip install --no-build-isolation --no-deps -e .`` in
the repository, or ``export PYTHONPATH=runtime:export:quantize:benchmarks``, then
``python benchmarks/gpu_check.py``. ``--dry-run`` (tiny fixture, CPU) is what CI runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from editreward_rt.errors import EditRewardError

from . import rl_bench
from .common import gate_tolerance, peak_rss_mb
from .isolated import log, run_isolated
from .measure import _timed
from .plan_run import EXIT_ABORTED, Results, Step, log_plan, parse_caps
from .plan_run import execute as run_plan
from .prereqs import machine, skip_reason

BATCH_SIZES = (1, 2, 4, 8)  # the first n of the workload's 8 triples: 4 sources x 2 edits, sources interleaved
RL_WORKLOAD = {"full": (8, 8), "tiny": (2, 4)}  # (prompts, edits): the RL step; the dry run's smaller one keeps CI short
MIN_REPS = 20  # timed calls behind a percentile: p99 of fewer is the maximum under another name
MIN_THROUGHPUT_CALLS = 3
THROUGHPUT_SLOT_S = 12.0  # seconds of timed calls per batch size beyond the first three (the 8-minute budget)
ORT_ROW = "onnxruntime-cuda"
COMPILE_MODE = "reduce-overhead"  # torch.compile, and CUDA graphs on a GPU (inductor's C++ code on a CPU)
COMPILED_WARMUP = 3  # calls per shape before timing a compiled variant: compile, the graph's warm-up run, its recording


@dataclass(frozen=True)
class MatrixVariant:
    label: str
    mode: str  # "reference", "fast", "backward" (the differentiable reward's backward pass) or "rl" (rl_bench)
    dtype: str  # what it computes in
    scheme: str | None = None  # a torch quantization scheme on the fast path
    libraries: tuple[str, ...] = ("torch",)
    devices: tuple[str, ...] = ("cpu", "cuda")
    compile: str | None = None  # the torch backend's ``compile`` mode (None: eager)

    @property
    def reference(self) -> str | None:
        """The reference it is checked against: the reference mode in its own dtype."""
        return None if self.mode == "reference" else f"torch-reference-{self.dtype}"

    def tolerance_key(self, ran_in: str) -> tuple[str, str]:
        """The TOLERANCES row: the scheme's, or the fast path's in the dtype the backend says it ran in."""
        return ("torch", self.scheme) if self.scheme else ("torch-fast", ran_in)


def matrix(dtypes: list[str]) -> list[MatrixVariant]:
    """The variants in the order they run: bf16 (the deployment dtype) before float32, and the
    quantized ones, whose libraries the lent machines lack, last."""
    main = dtypes[0]
    rows = []
    for dtype in dtypes:
        rows += [MatrixVariant(f"torch-reference-{dtype}", "reference", dtype, libraries=("torch", "transformers")),
                 MatrixVariant(f"torch-fast-{dtype}", "fast", dtype)]
        if dtype == main:  # the RL workload (the headline figure) and the backward pass before the slower dtypes
            rows += [MatrixVariant(f"rl-{main}", "rl", main), MatrixVariant(f"differentiable-backward-{main}", "backward", main)]
            # The same two workloads with the decoder compiled, each shape's CUDA graph replayed on a GPU:
            # with and without, side by side (the first calls of each shape, compiling, are warm-up).
            rows += [MatrixVariant(f"torch-fast-{main}-compiled", "fast", main, compile=COMPILE_MODE),
                     MatrixVariant(f"rl-{main}-compiled", "rl", main, compile=COMPILE_MODE)]
    rows += [MatrixVariant(scheme, "fast", main, scheme, ("torch", "bitsandbytes"), ("cuda",)) for scheme in ("bnb-int8", "bnb-nf4")]
    rows.append(MatrixVariant("gptq-int4", "fast", main, "gptq-int4", ("torch", "gptqmodel")))
    return rows


# ---------------------------------------------------------------- in the variant's own process


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timings(backend, prepared, reps: int, batch_sizes, slot_s: float = THROUGHPUT_SLOT_S, warmup: int = 1) -> dict:
    """Batch-1 latency percentiles over ``reps`` calls, and throughput per batch size from up to
    ``reps`` calls (fewer, but at least ``MIN_THROUGHPUT_CALLS``, where they would take more than
    ``slot_s``), each batch size warmed up first with ``warmup`` calls (first-use allocations, kernel
    selection and autotuning at that shape; with ``COMPILE_MODE``, compiling it and recording its
    CUDA graph). ``n`` beside every figure says how many calls it comes from."""

    def call(n):
        backend.head_outputs(prepared[:n])
        _sync()

    throughput, calls, batch1 = {}, {}, None
    for size in (s for s in batch_sizes if s <= len(prepared)):
        for _ in range(warmup):
            call(size)
        seconds = _timed(lambda: call(size), reps if size == 1 else MIN_THROUGHPUT_CALLS)
        more = min(reps, int(slot_s / max(np.median(seconds), 1e-9))) - len(seconds)
        if size != 1 and more > 0:
            seconds += _timed(lambda: call(size), more)
        throughput[str(size)] = size / float(np.median(seconds))
        calls[str(size)] = len(seconds)
        if size == 1:
            ms = 1000 * np.asarray(seconds)
            batch1 = {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                      "p99_ms": float(np.percentile(ms, 99)), "n": len(seconds)}
    return {"batch1": batch1, "throughput": throughput, "throughput_n": calls}


def torch_memory() -> dict:
    """What PyTorch's allocator saw since its peak was last reset (beside the driver's count the
    parent takes), or host RSS on a CPU (the process's peak so far: it cannot be reset)."""
    import torch

    if not torch.cuda.is_available():
        return {"peak_rss_mb": peak_rss_mb()}
    return {"peak_rss_mb": peak_rss_mb(), "torch_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "torch_peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}


def end_of_load(backend) -> dict:
    """The load-time peak (the fast path's graphs reset the allocator's peak after building their
    modules and keep what it was); then the allocator's cache is emptied and its peak reset, so that
    what ``torch_memory`` says next is what serving needs."""
    import torch

    load = torch_memory()
    built = getattr(getattr(backend, "graphs", None), "load_peak_mb", None)
    if built is not None:
        load["torch_peak_allocated_mb"] = max(load["torch_peak_allocated_mb"], built)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return load


def release(ckpt) -> None:
    """Drop the checkpoint's drawn weights once a backend holds its modules (the in-memory checkpoint)."""
    if hasattr(ckpt, "release_weights"):
        ckpt.release_weights()


def load_checkpoint(request: dict):
    """The checkpoint folder given (its own rubrics), or the workload's model made in memory."""
    from .workload import make_checkpoint

    if request["ckpt"]:
        from editreward_rt.checkpoint import open_checkpoint

        return open_checkpoint(request["ckpt"], prompts_from=request["prompts_from"])
    return make_checkpoint(request["size"], request["device"], request["dtype"], Path(request["workdir"]),
                           small_vocab=request.get("small_vocab", False))


def build_backend(ckpt, v: MatrixVariant, request: dict):
    from editreward_rt.backends.torch_backend import TorchBackend

    backend = TorchBackend(ckpt, mode="reference" if v.mode == "reference" else "fast", device=request["device"], dtype=v.dtype,
                           compile=v.compile)
    if v.scheme:
        _quantize_in_memory(backend, ckpt, v.scheme, request["gptq_calib"])
    return backend


def _quantize_in_memory(backend, ckpt, name: str, calib: int) -> None:
    """The scheme's registered ``quantize_backend`` on the loaded model, in place (no folder round trip),
    with ``calib`` synthetic calibration triples for the schemes that calibrate."""
    from editreward_quant.calib import synthetic_triples
    from editreward_rt.schemes import entry, make_scheme

    t0 = time.perf_counter()
    info = entry(name).function("quantize_backend")(backend, ckpt, make_scheme(name), synthetic_triples(calib, seed=1), log=log)
    backend.description.update(quantization=name, quantize_s=time.perf_counter() - t0, quantize=info)


def parity(outputs, reference, tol) -> dict:
    from editreward_rt.tolerances import max_abs_diff, within

    diff = max_abs_diff(outputs, reference)
    finite = bool(np.isfinite(outputs).all())
    return {"max_abs_diff": diff, "tolerance": {"mu": tol.mu, "log_sigma": tol.log_sigma}, "finite": finite,
            "passed": finite and within(diff, tol)}


def measure_variant(v: MatrixVariant, request: dict, reference) -> dict:
    """Build, parity-gate against ``reference`` (outputs of the same triples), then time. Runs in the variant's process."""
    import torch
    from editreward_rt.scorer import Scorer

    from .workload import prompt_lengths, workload_triples

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if v.dtype == "float32":  # float32 means float32: no TF32 in matmuls or in the vision tower's convolution
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    ckpt = load_checkpoint(request)
    backend = build_backend(ckpt, v, request)
    release(ckpt)
    load_memory = end_of_load(backend)
    scorer = Scorer(backend, ckpt)
    prepared = [scorer.prepare(*t) for t in workload_triples()]
    row = {"variant": v.label, "mode": v.mode, "dtype": v.dtype, "backend": backend.description,
           "load_s": time.perf_counter() - t0, "prompt_tokens": prompt_lengths(prepared[0]), "load_memory": load_memory}
    outputs = backend.head_outputs(prepared)
    tol = gate_tolerance(*v.tolerance_key(backend.description["dtype"]), v.dtype)
    if reference is None:
        row["status"] = "ok" if np.isfinite(outputs).all() else "failed-parity"
    else:
        row["parity"] = parity(outputs, reference, tol)
        row["parity"]["reference"] = v.reference
        row["status"] = "ok" if row["parity"]["passed"] else "failed-parity"
    # Validated first, timed second: a row off parity is timed too, and its status says so.
    row.update(timings(backend, prepared, request["reps"], BATCH_SIZES, warmup=COMPILED_WARMUP if v.compile else 1))
    if v.compile and reference is not None:  # the first call compiled; what the timed calls replayed is checked too
        row["parity_replayed"] = parity(backend.head_outputs(prepared), reference, tol)
        if not row["parity_replayed"]["passed"]:
            row["status"] = "failed-parity"
    row.update(torch_memory())  # the serving peak: reset at the end of the load
    return {"rows": [row], "outputs": outputs}


def measure_backward(v: MatrixVariant, request: dict, reference) -> dict:
    """One backward pass of the differentiable reward per batch size, in the variant's process."""
    rows = backward_rows(load_checkpoint(request), request["device"], v.dtype)
    return {"rows": [{**row, "mode": v.mode, "dtype": v.dtype} for row in rows], "outputs": None}


def measure_rl(v: MatrixVariant, request: dict, reference) -> dict:
    """The RL reward workload (``rl_bench``: producers, BatchingScorer, score_groups) on the fast path."""
    prompts, edits = RL_WORKLOAD[request["size"]]
    rows = rl_bench.gpu_rows(load_checkpoint(request), request["device"], v.dtype, prompts, edits, compile=v.compile)
    return {"rows": [{**row, "mode": v.mode, "dtype": v.dtype} for row in rows], "outputs": None}


BACKWARD_REPS = 3  # timed backward passes per batch size, after one warm-up pass


def _backward_pass(reward, batch: int) -> tuple[float, bool]:
    """One backward pass of the reward at ``batch`` -> (seconds, whether the gradient is finite).
    Its tensors die with the call, so the next pass's peak is its own."""
    import torch

    source = torch.rand(batch, 3, 448, 448, device=reward.device)
    edited = torch.rand(batch, 3, 448, 448, device=reward.device, requires_grad=True)
    t0 = time.perf_counter()
    (-reward(["Add a green bowl"] * batch, source, edited)[:, 0]).mean().backward()
    _sync()
    return time.perf_counter() - t0, bool(torch.isfinite(edited.grad).all())


def backward_rows(ckpt, device: str, dtype_name: str, batches=(1, 4)) -> list[dict]:
    """Backward passes of the differentiable reward per batch size (gradient checkpointing on, the
    source frozen): the estimate beside the measured peak (GPU memory on CUDA, RSS on a CPU)."""
    import torch
    from editreward_rt.backends.torch_backend import TorchBackend
    from editreward_rt.differentiable import DifferentiableReward, backward_memory_estimate_gib
    from editreward_rt.scorer import Scorer

    backend = TorchBackend(ckpt, mode="fast", device=device, dtype=dtype_name)
    release(ckpt)
    load_memory = end_of_load(backend)
    reward = DifferentiableReward(Scorer(backend, ckpt), gradient_checkpointing=True, freeze_source=True)
    rows = []
    for batch in batches:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        _backward_pass(reward, batch)  # warm-up: first-use allocations and kernel selection at this shape
        passes = [_backward_pass(reward, batch) for _ in range(BACKWARD_REPS)]
        row = {"variant": f"differentiable-backward-b{batch}", "status": "ok",
               "seconds": float(np.median([s for s, _ in passes])), "n": len(passes),
               "estimate_gib": backward_memory_estimate_gib(reward.spec, batch, 2 if dtype_name == "bfloat16" else 4),
               "grad_finite": all(finite for _, finite in passes), "load_memory": load_memory}
        if torch.cuda.is_available():
            row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            row["peak_rss_mb"] = peak_rss_mb()
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the plan, in the parent


def plan(variants: list[MatrixVariant], args, spec):
    """Each variant's skip reason (None: it runs), decided before any model is built, and the machine."""
    from .workload import device_memory_estimate_gib

    m = machine(args.device, Path(args.workdir))
    reasons = {}
    for v in variants:
        need = device_memory_estimate_gib(spec, v.dtype)
        reason = skip_reason(m, v.libraries, v.devices, device_gib=need, disk_gib=0.1)
        if reason is None and v.reference and reasons.get(v.reference):
            reason = f"its reference {v.reference} is skipped"
        reasons[v.label] = reason
    reasons[ORT_ROW] = _ort_reason()
    return reasons, m


def _ort_reason() -> str:
    how = "measure an exported folder with: python benchmarks/latency.py --ckpt CKPT --variant model:EXPORTED_DIR --device cuda"
    try:
        import onnxruntime
    except ImportError:
        return f"onnxruntime not installed; {how}"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return f"onnxruntime has no CUDA provider (onnxruntime-gpu not installed); {how}"
    return f"not run here (the model exists only in memory); {how}"


def plan_spec(args):
    """The spec of the model the variants will build, from the tiny fixture (seconds, no weights drawn)."""
    from editreward_rt.checkpoint import open_checkpoint

    from .workload import tiny_base, workload_spec

    if args.ckpt:
        return open_checkpoint(args.ckpt, prompts_from=args.prompts_from).spec
    return workload_spec(tiny_base(Path(args.workdir)), args.size)


def steps(variants: list[MatrixVariant]) -> list[Step]:
    f32 = "torch-reference-float32" if any(v.label == "torch-reference-float32" for v in variants) else None
    rows = [Step(v.label, v.mode == "reference", f32 if v.dtype != "float32" and v.mode in ("reference", "fast") else None)
            for v in variants]
    return rows + [Step(ORT_ROW, False)]


def run_variant(v: MatrixVariant, args, references: dict, timeout_s: float, reader) -> tuple[list[dict], object]:
    """The variant's result rows (one, or one per batch for the backward pass) and its outputs."""
    request = {"size": args.size, "device": args.device, "dtype": v.dtype, "workdir": args.workdir, "ckpt": args.ckpt,
               "prompts_from": args.prompts_from, "reps": args.reps, "gptq_calib": args.gptq_calib}
    target = {"backward": measure_backward, "rl": measure_rl}.get(v.mode, measure_variant)
    out = run_isolated(target, (v, request, references.get(v.reference)), timeout_s, reader)
    if "rows" not in out:  # the process failed: build error, crash, time cap
        return [{"variant": v.label, "mode": v.mode, "dtype": v.dtype, **out}], None
    process = {k: out[k] for k in ("process_s", "device_memory") if k in out}  # the whole process's, on each row
    return [{**row, **process} for row in out["rows"]], out["outputs"]


def execute(args) -> int:
    variants = matrix(args.dtypes)
    unknown = set(args.only or ()) - {v.label for v in variants}
    if unknown:
        log(f"unknown variant(s) {sorted(unknown)}; known: {[v.label for v in variants]}")
        return EXIT_ABORTED
    if args.only:
        keep = set(args.only) | {v.reference for v in variants if v.label in args.only}
        variants = [v for v in variants if v.label in keep]
    try:
        spec = plan_spec(args)
    except EditRewardError as exc:
        log(f"ABORT: cannot read the model the reference needs: {exc}")
        return EXIT_ABORTED
    reasons, m = plan(variants, args, spec)
    plan_steps, by_key = steps(variants), {v.label: v for v in variants}
    log_plan(plan_steps, reasons)
    config = {"size": args.size, "device": args.device, "dtypes": args.dtypes, "reps": args.reps, "budget_s": args.budget_s,
              "ckpt": args.ckpt, "model": "checkpoint" if args.ckpt else ("random weights, real architecture" if args.size == "full"
                                                                          else "tiny fixture"),
              "workload": "8 triples (4 sources x 2 edits, sources interleaved: every batch mixes sources), 448x448 images, long rubrics", "machine": m.to_dict()}
    results = Results(config, plan_steps, reasons, args.out, args.device)

    def run_step(step, outputs, timeout_s, reader):
        rows, out = run_variant(by_key[step.key], args, outputs, timeout_s, reader)
        for row in rows:
            log(summary(row))
        return rows, out

    code = run_plan(plan_steps, reasons, results, run_step, args.budget_s, parse_caps(args.cap_s, 150.0))
    print("\n".join(summary(r) for r in results.rows))
    print(f"wrote {args.out}")
    return code


def summary(r: dict) -> str:
    if r.get("batch1"):
        peak = (r.get("device_memory") or {}).get("peak_mb")
        memory = f"peak GPU {peak:.0f} MB" if peak is not None else f"peak RSS {r.get('peak_rss_mb', 0):.0f} MB"
        drift = (r.get("parity") or {}).get("max_abs_diff", {}).get("mu")
        return (f"{r['variant']:<32} {r['status']:<14} p50 {r['batch1']['p50_ms']:.1f} ms (n {r['batch1']['n']}), "
                f"{max(r['throughput'].values()):.2f} triples/s, {memory}" + (f", |dmu| {drift:.2e}" if drift is not None else ""))
    if r.get("mode") == "rl":
        return rl_bench.summary_line(r)
    if r.get("mode") == "backward" and r["status"] == "ok":
        peak = r.get("peak_gpu_mb") or r.get("peak_rss_mb")
        return f"{r['variant']:<32} ok             {r['seconds']:.2f} s, peak {peak:.0f} MB, estimate {r['estimate_gib']['total']} GiB"
    return f"{r['variant']:<32} {r['status']:<14} {r.get('reason') or r.get('error') or ''}"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dry_run:
        args.size, args.device = "tiny", "cpu"
    if args.device != "cpu" and args.reps < MIN_REPS:
        parser.error(f"--reps {args.reps}: a GPU run times at least {MIN_REPS} calls (fewer is for a CPU dry run)")
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="gpu-check-")
    return execute(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="the same run on the tiny fixture and the CPU (what CI runs)")
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["bfloat16", "float32"],
                        help="torch dtypes, the first also for the quantized and backward rows (default bfloat16,float32)")
    parser.add_argument("--ckpt", help="a checkpoint folder instead of the random-weight model (its own rubrics)")
    parser.add_argument("--prompts-from", help="with --ckpt: the upstream clone holding its rubric prompts")
    parser.add_argument("--reps", type=int, default=MIN_REPS,
                        help=f"timed batch-1 calls behind the percentiles (default {MIN_REPS}; fewer only for a CPU dry run)")
    parser.add_argument("--gptq-calib", type=int, default=16, help="synthetic calibration triples for gptq-int4")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants (and the references they are checked against)")
    parser.add_argument("--budget-s", type=float, default=440,
                        help="wall-clock budget for all variants (default 440: with start-up, the run stays under 8 minutes)")
    parser.add_argument("--cap-s", action="append", metavar="[VARIANT=]SECONDS",
                        help="time cap per variant (default 150), or for one variant; repeatable")
    parser.add_argument("--workdir", help="where the tiny fixture (tokenizer, config) goes (default: a new temp folder)")
    parser.add_argument("--out", default="results/gpu-check.json")
    return parser


if __name__ == "__main__":
    sys.exit(main())
