"""python benchmarks/latency.py: per-triple latency, throughput, stage split and memory of each
variant, with the PyTorch reference mode always measured in the same invocation as the baseline.

Every variant runs in its own process (so peak memory is its own; on a GPU, what the driver
reports for that process, whatever allocated it) and must pass its parity gate against the
reference before it is timed. The torch variants and the reference compute in ``--dtype``
(default float32 on a CPU, bfloat16 on a GPU) and are judged by that dtype's tolerance. A variant
that fails is reported as ``failed`` with its error; a failing reference aborts the run (exit
code 2). The results file is rewritten after every variant.
"""

from __future__ import annotations

import argparse
import sys

from .common import REFERENCE, add_model_args, resolve_model_args, results_document, synthetic_groups, write_document
from .isolated import device_memory_reader, run_isolated
from .measure import measure


def build_config(args) -> dict:
    resolve_model_args(args)
    groups = synthetic_groups(n_groups=4, edits_per_source=max(4, max(args.scaling)), seed=args.seed)
    triples = [(g[0], g[1], e) for g in groups for e in g[2][:4]]
    parity = [(g[0], g[1], e) for g in groups[:2] for e in g[2][:2]]
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return {"ckpt": args.ckpt, "base": args.base, "prompts_from": args.prompts_from, "device": args.device, "dtype": dtype,
            "threads": args.threads, "reps": args.reps, "warmup": args.warmup, "batch_sizes": args.batch_sizes,
            "scaling": args.scaling, "parity_triples": parity, "triples": triples, "scaling_group": groups[0]}


def add_ratios(results: list[dict]) -> None:
    base = next(r for r in results if r["variant"] == REFERENCE)
    for r in results:
        if r["status"] != "ok":
            continue
        r["vs_reference"] = {
            "batch1_speedup": base["batch1"]["p50_ms"] / r["batch1"]["p50_ms"],
            "throughput_ratio": r["throughput"]["best_triples_per_s"] / base["throughput"]["best_triples_per_s"],
        }


def summary_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['variant']:<40} {r['status']}: {r.get('error') or (r.get('parity') or {}).get('max_abs_diff')}"
    ratio = r.get("vs_reference", {})
    return (f"{r['variant']:<40} p50 {r['batch1']['p50_ms']:8.1f} ms  best {r['throughput']['best_triples_per_s']:6.2f} "
            f"triples/s @ b{r['throughput']['best_batch']}  x{ratio.get('throughput_ratio', 1):.2f} vs reference  "
            f"peak RSS {r['peak_rss_mb']:.0f} MB" + (f", peak GPU {r['peak_gpu_mb']:.0f} MB" if r.get("peak_gpu_mb") is not None else ""))


def measured(label: str, cfg: dict, reference_outputs, reader) -> tuple[dict, object]:
    """One variant's result row (``failed`` with the error when its process failed) and its parity outputs."""
    out = run_isolated(measure, (label, cfg, reference_outputs), None, reader)
    if "result" not in out:
        return {"variant": label, **out}, None
    row = {**out["result"], **{k: out[k] for k in ("process_s", "device_memory") if k in out}}
    row["peak_gpu_mb"] = out["device_memory"]["peak_mb"] if "device_memory" in out else None
    return row, out["outputs"]


def write(cfg: dict, results: list[dict], device: str, out: str):
    public_cfg = {k: v for k, v in cfg.items() if k not in ("parity_triples", "triples", "scaling_group")}
    public_cfg.update({"n_parity_triples": len(cfg["parity_triples"]), "image_shapes": sorted({t[2].shape for t in cfg["triples"]})})
    return write_document(results_document("latency", public_cfg, results, device), out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, out="results/latency.json")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="torch variants' dtype (default float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--scaling", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    args = parser.parse_args(argv)
    cfg = build_config(args)
    labels = [REFERENCE] + [v for v in args.variant if v != REFERENCE]
    results, reference_outputs, reader = [], None, device_memory_reader()
    for i, label in enumerate(labels, start=1):
        print(f"[{i}/{len(labels)}] {label}", file=sys.stderr, flush=True)
        row, outputs = measured(label, cfg, reference_outputs, reader)
        results.append(row)
        write(cfg, results, args.device, args.out)
        if label == REFERENCE and row["status"] != "ok":
            print(f"ABORT: the reference failed ({row.get('error')}); no variant can be judged", file=sys.stderr)
            return 2
        reference_outputs = outputs if label == REFERENCE else reference_outputs
    add_ratios(results)
    path = write(cfg, results, args.device, args.out)
    for r in results:
        print(summary_line(r))
    print(f"wrote {path}")
    return 1 if any(r["status"] == "failed" for r in results) else 0
