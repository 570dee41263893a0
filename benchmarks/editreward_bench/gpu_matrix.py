"""python benchmarks/gpu_check.py: the GPU matrix in one call, on a full-size random-weight model
of the real architecture (Qwen2.5-VL-7B body + EditReward heads), generated on the GPU in memory.

Variants: PyTorch bf16 reference (two full passes per triple, as upstream), PyTorch bf16 fast
path, bitsandbytes LLM.int8 and NF4 on the fast path, GPTQ 4-bit (GPTQModel; quantized in the
run on synthetic triples, its time reported; skipped with the reason where gptqmodel is not
installed). ONNX Runtime on CUDA is not run here (the model exists only in this process, and
the lent machines' onnxruntime is CPU-only): its row says how to measure an exported folder with
``latency.py --device cuda``. Each variant is parity-checked against the reference before it is
timed. ``--size tiny --device cpu`` runs the same code on the tiny fixture for a dry run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import rl_bench
from .common import environment, results_document, synthetic_groups


class InMemoryCheckpoint:
    """Quacks like editreward_rt.checkpoint.Checkpoint, weights made on the device."""

    def __init__(self, base, spec, config, state):
        self.spec, self.config, self._state = spec, config, state
        self.tokenizer, self.chat_text, self.templates = base.tokenizer, base.chat_text, base.templates

    def state_dict(self):
        return self._state


def build(size: str, device: str, workdir: Path):
    import torch
    from editreward_rt.checkpoint import open_checkpoint
    from editreward_rt.families import DEFAULT_FAMILY, family

    fam = family(DEFAULT_FAMILY)
    paths = fam.write_fixture(workdir / "tiny", size="tiny")
    base = open_checkpoint(paths.checkpoint, prompts_from=paths.prompts)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if size == "tiny":
        return InMemoryCheckpoint(base, base.spec, base.config, base.state_dict()), dtype
    full = fam.PUBLISHED
    spec = full.full_spec(base.spec)
    return InMemoryCheckpoint(base, spec, full.full_config(base.config, spec), full.random_state(spec, device, dtype)), dtype


def variants(ckpt, device: str, dtype_name: str, gptq_calib: int = 16):
    """(label, factory) in the order they run; the reference first. ``gptq-int4`` is quantized
    here, in memory, calibrated on ``gptq_calib`` synthetic triples (skipped without gptqmodel)."""
    from editreward_rt.backends.torch_backend import TorchBackend

    def bnb(scheme):
        def make():
            from editreward_quant.layers.bnb import swap_linears

            backend = TorchBackend(ckpt, mode="fast", device=device, dtype=dtype_name)
            graphs = backend.graphs
            modules = {"vision": graphs.vision_module, "decoder": graphs.decoder, "heads": graphs.head_module}
            from editreward_quant.embedding import quantize_torch_embedding
            from editreward_rt.schemes import EMBEDDING_BLOCK, make_scheme

            config = make_scheme(scheme)
            swap_linears(modules, config.to_dict(), graphs.device, load_float=True)
            quantize_torch_embedding(graphs.decoder, config.embedding_bits, EMBEDDING_BLOCK)
            backend.description["quantization"] = scheme
            return backend
        return make

    def gptq():
        from editreward_quant.calib import synthetic_triples
        from editreward_quant.gptq_scheme import quantize_backend
        from editreward_rt.schemes import GptqInt4
        from editreward_rt.scorer import Scorer

        backend = TorchBackend(ckpt, mode="fast", device=device, dtype=dtype_name)
        t0 = time.perf_counter()
        info = quantize_backend(backend, Scorer(backend, ckpt), synthetic_triples(gptq_calib, seed=1), GptqInt4(),
                                log=lambda msg: print(msg, file=sys.stderr, flush=True))
        backend.description.update(quantization="gptq-int4", quantize_s=time.perf_counter() - t0, gptq=info)
        return backend

    return [("torch-reference", lambda: TorchBackend(ckpt, mode="reference", device=device, dtype=dtype_name)),
            ("torch-fast", lambda: TorchBackend(ckpt, mode="fast", device=device, dtype=dtype_name)),
            ("bnb-int8", bnb("bnb-int8")), ("bnb-nf4", bnb("bnb-nf4")), ("gptq-int4", gptq)]


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timings(backend, prepared, reps: int, batch_sizes) -> dict:
    """Batch-1 latency percentiles and throughput per batch size of a backend on prepared triples."""
    backend.head_outputs(prepared[:1])  # warm-up: first-use allocations
    seconds = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        backend.head_outputs(prepared[:1])
        _sync()
        seconds.append(time.perf_counter() - t0)
    ms = 1000 * np.asarray(seconds)
    throughput = {}
    for size in batch_sizes:
        if size <= len(prepared):
            backend.head_outputs(prepared[:size])
            _sync()
            t0 = time.perf_counter()
            backend.head_outputs(prepared[:size])
            _sync()
            throughput[str(size)] = size / (time.perf_counter() - t0)
    return {"batch1": {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                       "p99_ms": float(np.percentile(ms, 99)), "n": reps},
            "throughput": throughput}


def time_backend(scorer, triples, reps: int, batch_sizes) -> dict:
    import torch

    result = timings(scorer.backend, [scorer.prepare(*t) for t in triples], reps, batch_sizes)
    result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return result


def backward_rows(ckpt, device: str, dtype_name: str, batches=(1, 4)) -> list[dict]:
    """One backward pass of the differentiable reward per batch size (gradient checkpointing on, the
    source frozen): the estimate beside the measured peak (GPU memory on CUDA, RSS on a CPU)."""
    import torch
    from editreward_rt.backends.torch_backend import TorchBackend
    from editreward_rt.differentiable import DifferentiableReward, backward_memory_estimate_gib
    from editreward_rt.scorer import Scorer

    from .common import peak_rss_mb

    backend = TorchBackend(ckpt, mode="fast", device=device, dtype=dtype_name)
    reward = DifferentiableReward(Scorer(backend, ckpt), gradient_checkpointing=True, freeze_source=True)
    rows = []
    for batch in batches:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        source = torch.rand(batch, 3, 448, 448, device=reward.device)
        edited = torch.rand(batch, 3, 448, 448, device=reward.device, requires_grad=True)
        t0 = time.perf_counter()
        (-reward(["Add a green bowl"] * batch, source, edited)[:, 0]).mean().backward()
        _sync()
        row = {"variant": f"differentiable-backward-b{batch}", "status": "ok", "seconds": time.perf_counter() - t0,
               "estimate_gib": backward_memory_estimate_gib(reward.spec, batch, 2 if dtype_name == "bfloat16" else 4),
               "grad_finite": bool(torch.isfinite(edited.grad).all())}
        if torch.cuda.is_available():
            row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            row["peak_rss_mb"] = peak_rss_mb()
        rows.append(row)
    return rows


def run(args) -> dict:
    import gc

    import torch
    from editreward_rt.scorer import Scorer
    from editreward_rt.tolerances import max_abs_diff, tolerance

    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ckpt, dtype = build(args.size, args.device, workdir)
    dtype_name = str(dtype).replace("torch.", "")
    groups = synthetic_groups(2, 4, seed=0)
    triples = [(g[0], g[1], e) for g in groups for e in g[2]]
    results, reference = [], None
    chosen = variants(ckpt, args.device, dtype_name, args.gptq_calib)
    if args.only:
        unknown = set(args.only) - {label for label, _ in chosen} - {"differentiable-backward", "rl"}
        if unknown:
            raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {[label for label, _ in chosen]}")
        chosen = [(label, make) for label, make in chosen if label == "torch-reference" or label in args.only]
    for label, make in chosen:
        print(f"== {label}", file=sys.stderr, flush=True)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            backend = make()
        except Exception as exc:  # a variant's library missing on this machine is a result, not a crash
            results.append({"variant": label, "status": "skipped", "reason": f"{type(exc).__name__}: {exc}"})
            continue
        scorer = Scorer(backend, ckpt)
        outputs = scorer.backend.head_outputs([scorer.prepare(*t) for t in triples[:4]])
        result = {"variant": label, "backend": backend.description, "load_s": time.perf_counter() - t0}
        if reference is None:
            reference, result["status"] = outputs, "ok"
        else:
            tol = tolerance("torch-fast", dtype_name) if label == "torch-fast" else tolerance("torch", label)
            diff = max_abs_diff(outputs, reference)
            result["parity"] = {"max_abs_diff": diff, "tolerance": {"mu": tol.mu, "log_sigma": tol.log_sigma}}
            result["status"] = "ok" if diff["mu"] <= tol.mu and diff["log_sigma"] <= tol.log_sigma else "failed-parity"
        if result["status"] == "ok":
            result.update(time_backend(scorer, triples, args.reps, [1, 2, 4, 8]))
        results.append(result)
        del scorer, backend
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not args.only or "differentiable-backward" in args.only:
        try:
            results.extend(backward_rows(ckpt, args.device, dtype_name))
        except Exception as exc:  # out of memory, say: the rows above are kept
            results.append({"variant": "differentiable-backward", "status": "failed", "reason": f"{type(exc).__name__}: {exc}"})
    if not args.only or "rl" in args.only:
        results.extend(rl_bench.gpu_rows(ckpt, args.device, dtype_name))
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except ImportError:
        providers = []
    # The random model lives only in this process; exporting a 7B to ONNX here would take most of
    # a GPU session. ONNX Runtime on CUDA is measured on an exported folder instead.
    how = ("measure an exported folder with: python benchmarks/latency.py --ckpt CKPT "
           "--variant model:EXPORTED_DIR --device cuda")
    reason = how if "CUDAExecutionProvider" in providers else f"onnxruntime has no CUDA provider here; {how}"
    results.append({"variant": "onnxruntime-cuda", "status": "skipped", "reason": reason})
    return results_document("latency", {"size": args.size, "dtype": dtype_name, "triples": len(triples),
                                        "reps": args.reps, "model": "random weights, real architecture" if args.size == "full" else "tiny fixture"},
                            results, args.device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gptq-calib", type=int, default=16, help="synthetic calibration triples for gptq-int4")
    parser.add_argument("--only", nargs="+", metavar="VARIANT",
                        help="run only these variants (the reference always runs): torch-fast bnb-int8 bnb-nf4 gptq-int4 differentiable-backward rl")
    parser.add_argument("--out", default="results/gpu-check.json")
    args = parser.parse_args(argv)
    doc = run(args)
    doc["environment"] = environment(args.device)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    import json

    path.write_text(json.dumps(doc, indent=1))
    for r in doc["results"]:
        extra = f"p50 {r['batch1']['p50_ms']:.1f} ms, peak GPU {r.get('peak_gpu_mb') or 0:.0f} MB" if "batch1" in r else r.get("reason", "")
        print(f"{r['variant']:<18} {r['status']:<14} {extra}")
    print(f"wrote {path}")
    return 0
