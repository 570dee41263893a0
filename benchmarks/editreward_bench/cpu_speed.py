"""python benchmarks/cpu_speed.py: CPU throughput of every variant against the PyTorch reference,
in one run, at each thread count, with the machine's GEMM peak measured in the same run.

For each thread count (``--threads 1,2``), each in its own process:
- a GEMM microbenchmark: ONNX Runtime's float32 MatMul on a large problem, best of several runs
  (the peak the "% of peak" column divides by), and the integer and 4-bit kernels the quantized
  schemes run (``gemm_peak``);
- the reference (two full passes per triple, the upstream computation) and every variant, scoring
  the same triples: one triple per call, then at the default triples per call
  (``backends.default_max_batch``), then 8 per call.

The FLOPs per triple come from the model spec (the family's ``FLOPS``), counted on the tokens each
call actually decodes, padding excluded: what the fast path needs, and for the reference what its
two passes compute. Achieved GFLOP/s = FLOPs per triple x triples/s at one triple per call (where
they were counted); "% of peak" divides that by
the float32 GEMM peak (ort-int8 variants also against their integer kernel's peak).

Fidelity, in the same run: every variant's scores against the reference's (the tolerance of its
backend and precision, ``tolerances.py``), and pairwise agreement with float32 ONNX Runtime on
groups of edits that share a source, with the flipped pairs and how close they were.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from .common import (
    REFERENCE,
    Variant,
    gate_tolerance,
    peak_rss_mb,
    resolve_model_args,
    results_document,
    synthetic_groups,
    synthetic_images,
    write_document,
)
from .isolated import log, run_isolated
from .measure import _timed
from .rank_metrics import group_pairs

GEMM = (1024, 2048, 2048)  # M, K, N: large enough that the kernel, not the call, is timed


def _matmul_model(op: str, a_elem, b, out_elem, extra=()):
    from onnx import helper, numpy_helper

    m, k = GEMM[0], b.shape[0]
    inits = [numpy_helper.from_array(b, "b")] + [numpy_helper.from_array(v, n) for n, v in extra]
    graph = helper.make_graph([helper.make_node(op, ["a", "b"] + [n for n, _ in extra], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", a_elem, [m, k])],
                              [helper.make_tensor_value_info("c", out_elem, [m, b.shape[1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def gemm_peak(threads: int, reps: int = 7) -> dict:
    """GFLOP/s (GOP/s for integers) of ONNX Runtime's CPU kernels on one large product, best of
    ``reps``, the weight a constant as in the graphs: float32 MatMul (the peak "% of peak" divides
    by), MatMulInteger with uint8 activations x uint8 weights (U8U8) and x int8 weights in [-64, 64]
    (U8S8, ort-int8's default: VNNI where the CPU has it), and 4-bit MatMulNBits with int8 compute
    (accuracy_level 4) at blocks of 32 and 128: which kernels are fast on this CPU."""
    import onnxruntime as ort
    from onnx import TensorProto
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    m, k, n = GEMM
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    act_f, act_u8 = rng.standard_normal((m, k)).astype(np.float32), rng.integers(0, 256, (m, k), dtype=np.uint8)
    zero = ("a_zero", np.array(0, np.uint8))
    models = {
        "float32": (_matmul_model("MatMul", TensorProto.FLOAT, weight, TensorProto.FLOAT), act_f),
        "u8u8": (_matmul_model("MatMulInteger", TensorProto.UINT8, rng.integers(0, 256, (k, n), dtype=np.uint8), TensorProto.INT32,
                               (zero, ("b_zero", np.array(128, np.uint8)))), act_u8),
        "u8s8": (_matmul_model("MatMulInteger", TensorProto.UINT8, rng.integers(-64, 65, (k, n), dtype=np.int8), TensorProto.INT32,
                               (zero, ("b_zero", np.array(0, np.int8)))), act_u8),
    }
    for block in (32, 128):
        config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4, bits=4)
        quantizer = MatMulNBitsQuantizer(_matmul_model("MatMul", TensorProto.FLOAT, weight, TensorProto.FLOAT), algo_config=config,
                                         bits=4, block_size=block, is_symmetric=True, accuracy_level=4)
        quantizer.process()
        models[f"int4_block{block}"] = (quantizer.model.model, act_f)
    out = {"shape_mkn": [m, k, n], "threads": threads}
    for name, (model, a) in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, {"a": a})
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            session.run(None, {"a": a})
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_gflops"] = 2.0 * m * k * n / best / 1e9
    return out


class FlopCounter:
    """Wraps a fast path's graphs; adds up the spec's FLOPs of every vision, decoder and heads call."""

    def __init__(self, graphs, flops):
        self.inner, self.flops, self.total = graphs, flops, 0.0
        self.spec = graphs.spec

    def vision(self, feeds):
        self.total += sum(self.flops.vision_call(self.spec, *arrays) for arrays in feeds)
        return self.inner.vision(feeds)

    def decode(self, input_ids, image_embeds, image_index, position_ids, attention_mask, past, keep):
        self.total += self.flops.decode_call(self.spec, attention_mask, input_ids.shape[1])
        return self.inner.decode(input_ids, image_embeds, image_index, position_ids, attention_mask, past, keep)

    def heads(self, hidden):
        self.total += self.flops.heads(self.spec, hidden.shape[0])
        return self.inner.heads(hidden)

    def __getattr__(self, name):  # empty_cache, select and the rest pass through
        return getattr(self.inner, name)


def _reference_flops(scorer, triples) -> float:
    from editreward_rt.families import family

    flops = family(scorer.spec.family).FLOPS
    return sum(flops.reference_triple(scorer.spec, scorer.prepare(*t)) for t in triples) / len(triples)


def _timed_run(scorer, triples, max_batch: int, reps: int) -> float:
    """Median seconds to score ``triples`` at ``max_batch`` triples per call."""
    scorer.max_batch = max_batch
    return float(np.median(_timed(lambda: scorer.score_batch(triples), reps)))


def _mu(scores) -> list[float]:
    return [s.mu for s in scores]


def run_variant(label: str, cfg: dict, threads: int, with_parity: bool) -> dict:
    """In a child process: one variant at one thread count."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from editreward_rt.families import family
    from editreward_rt.backends import default_max_batch

    variant = Variant(label)
    scorer = variant.load(cfg["ckpt"], cfg.get("base"), cfg.get("prompts_from"), "cpu", threads, "float32")
    triples = cfg["triples"]
    default = default_max_batch("cpu")
    pipeline = getattr(scorer.backend, "pipeline", None)
    counter = None
    if pipeline is not None:
        counter = pipeline.graphs = FlopCounter(pipeline.graphs, family(scorer.spec.family).FLOPS)
    scorer.max_batch = 1
    scorer.score_batch(triples[:2])  # warm-up: sessions, arenas, caches
    if counter is not None:
        counter.total = 0.0
    t0 = time.perf_counter()
    scores = scorer.score_batch(triples)
    first = time.perf_counter() - t0
    flops = counter.total / len(triples) if counter is not None else _reference_flops(scorer, triples)
    result = {"variant": label, "threads": threads, "backend": scorer.description, "flops_per_triple": flops,
              "mu": _mu(scores), "log_sigma": [s.log_sigma for s in scores], "default_batch": default,
              "tolerance_key": list(variant.tolerance_key(scorer)) if variant.path else ["torch-fast", "float32"]}
    model = getattr(scorer.backend, "model", None)
    if variant.path and model is not None and (model.manifest.get("quantization") or {}).get("config"):
        result["quant_config"] = model.manifest["quantization"]["config"]
    if pipeline is not None:
        before = pipeline.times.as_dict()
    seconds = {"1": min(first, _timed_run(scorer, triples, 1, cfg["reps"]))}
    if pipeline is not None:
        after = pipeline.times.as_dict()
        result["stages_ms"] = {k: 1000 * (after[k] - before[k]) / (cfg["reps"] * len(triples)) for k in after}
    if label != REFERENCE:  # the reference runs its passes triple by triple: its batch size changes nothing
        scorer.score_batch(triples[: max(default, 8)])  # warm the batched shapes
        for size in sorted({default, 8}):
            seconds[str(size)] = _timed_run(scorer, triples, size, cfg["reps"])
    result["triples_per_s"] = {k: len(triples) / v for k, v in seconds.items()}
    # A ranked group (GRPO: G edits of one source): the source is encoded once at any batch size.
    instruction, source, edits = cfg["parity_groups"][0]
    group = {}
    for size in sorted({1, default, 8}) if label != REFERENCE else [1]:
        scorer.max_batch = size
        scorer.rank(instruction, source, edits)
        t0 = time.perf_counter()
        scorer.rank(instruction, source, edits)
        group[str(size)] = len(edits) / (time.perf_counter() - t0)
    result["group_triples_per_s"] = group
    if with_parity:
        scorer.max_batch = default
        result["parity_mu"] = [_mu(scorer.rank(instruction, source, edits)) for instruction, source, edits in cfg["parity_groups"]]
    if cfg.get("profile"):
        result["op_profile_ms_per_triple"] = op_profile(scorer, triples)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def op_profile(scorer, triples) -> dict | None:
    """Where ONNX Runtime's time goes: {graph: {op type: ms per triple}} (largest first), from its
    profiler over one pass of ``triples`` (one per call); None for other backends. The profiled
    sessions are made with the backend's own options; a first pass warms them and is not counted."""
    import collections
    import json
    import tempfile

    graphs = getattr(scorer.backend, "graphs", None)
    if not hasattr(graphs, "options"):
        return None
    saved, options, names = dict(graphs.sessions), graphs.options, ("vision", "decoder")

    def profiled_pass(prefix: str, batch) -> dict[str, str]:
        """Score ``batch`` on fresh profiling sessions -> each graph's profile file."""
        options.enable_profiling, options.profile_file_prefix = True, prefix
        try:
            for name in names:
                graphs.sessions[name] = graphs.ort.InferenceSession(str(scorer.backend.model.graph_path(name)), options,
                                                                    providers=graphs.providers_asked)
        finally:
            options.enable_profiling = False
        scorer.score_batch(batch)
        return {name: graphs.sessions[name].end_profiling() for name in names}

    scorer.max_batch = 1
    out = {}
    try:
        with tempfile.TemporaryDirectory(prefix="editreward-profile-") as tmp:
            profiled_pass(f"{tmp}/warm", triples[:1])  # a new session's first run allocates: not what is measured
            for name, path in profiled_pass(f"{tmp}/timed", triples).items():
                by_op = collections.Counter()
                for e in json.loads(open(path).read()):
                    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                        by_op[e["args"]["op_name"]] += e["dur"] / 1000 / len(triples)
                out[name] = dict(by_op.most_common(12))
    finally:
        graphs.sessions.update(saved)
    return out


def _agreement(base: list[list[float]], other: list[list[float]]) -> dict:
    """Pairwise agreement of ``other`` with ``base`` within each group; the flipped pairs' margins."""
    flat_base, flat_other = np.concatenate(base), np.concatenate(other)
    sizes = [len(g) for g in base]
    starts = np.cumsum([0] + sizes[:-1])
    pairs = group_pairs([list(range(s, s + n)) for s, n in zip(starts, sizes)])
    flips = [(i, j) for i, j in pairs if np.sign(flat_base[i] - flat_base[j]) != np.sign(flat_other[i] - flat_other[j])]
    return {"pairs": len(pairs), "flipped": len(flips), "agreement": 1 - len(flips) / len(pairs),
            "flip_margins": sorted(float(abs(flat_base[i] - flat_base[j])) for i, j in flips),
            "median_pair_gap": float(np.median([abs(flat_base[i] - flat_base[j]) for i, j in pairs]))}


def summarise(rows: list[dict], peaks: dict) -> None:
    """Ratios, GFLOP/s, % of peak and parity, in place."""
    reference = next(r for r in rows if r["variant"] == REFERENCE and r["status"] == "ok")
    ref_tps = reference["triples_per_s"]["1"]
    float_label = next((r["variant"] for r in rows if r["status"] == "ok" and r.get("tolerance_key") == ["onnxruntime", "float32"]), None)
    float_row = next((r for r in rows if r["variant"] == float_label), None)
    for r in rows:
        if r["status"] != "ok":
            continue
        one = r["triples_per_s"]["1"]  # the FLOPs were counted one triple per call; a batch shares more
        default = r["triples_per_s"].get(str(r["default_batch"]), r["triples_per_s"]["1"])
        r["vs_reference"] = {k: v / ref_tps for k, v in r["triples_per_s"].items()}
        r["default_vs_batch1"] = default / r["triples_per_s"]["1"]
        g = r["group_triples_per_s"]
        r["group_vs_reference"] = {k: v / reference["group_triples_per_s"]["1"] for k, v in g.items()}
        r["group_default_vs_batch1"] = g.get(str(r["default_batch"]), g["1"]) / g["1"]
        r["gflops_achieved"] = r["flops_per_triple"] * one / 1e9
        if "float32_gflops" in peaks:  # the microbenchmark's process may have failed: no column then
            r["pct_of_float32_peak"] = 100 * r["gflops_achieved"] / peaks["float32_gflops"]
        if r.get("quant_config", {}).get("mode") == "dynamic" and "u8s8_gflops" in peaks:  # ort-int8: its own kernel's peak
            kernel = "u8s8" if r["quant_config"].get("weight_type") == "int8" else "u8u8"
            r["pct_of_int8_peak"] = 100 * r["gflops_achieved"] / peaks[f"{kernel}_gflops"]
        diff = np.abs(np.asarray(r["mu"]) - np.asarray(reference["mu"]))
        tol = gate_tolerance(*r["tolerance_key"], "float32")
        r["parity"] = {"max_abs_dmu": float(diff.max()),
                       "max_abs_dlog_sigma": float(np.abs(np.asarray(r["log_sigma"]) - np.asarray(reference["log_sigma"])).max()),
                       "tolerance_mu": tol.mu, "within": bool(diff.max() <= tol.mu)}
        if float_row is not None and "parity_mu" in r and "parity_mu" in float_row and r is not float_row:
            r["agreement_vs_float32"] = _agreement(float_row["parity_mu"], r["parity_mu"])


def table(rows: list[dict], peaks: dict) -> str:
    """docs/performance.md's table for one thread count (report.py writes it there)."""
    if "float32_gflops" in peaks:
        head = (f"GEMM peak ({peaks['threads']} thread{'s' if peaks['threads'] > 1 else ''}, ONNX Runtime {GEMM[0]}x{GEMM[1]}x{GEMM[2]}): "
                f"float32 {peaks['float32_gflops']:.0f} GFLOP/s; MatMulInteger U8S8 {peaks['u8s8_gflops']:.0f}, U8U8 "
                f"{peaks['u8u8_gflops']:.0f} GOP/s; MatMulNBits 4-bit (accuracy_level 4) block 32 {peaks['int4_block32_gflops']:.0f}, "
                f"block 128 {peaks['int4_block128_gflops']:.0f}")
    else:
        head = f"GEMM peak: not measured ({peaks.get('error')})"
    lines = [head,
             "| variant | triples/s (1 per call) | default batch | batch 8 | x reference | ranked group of 8, triples/s (default batch) | "
             "GFLOP/triple | GFLOP/s (1 per call) | % of fp32 peak | max abs d mu |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['status']}: {r.get('error', '')} | | | | | | | | |")
            continue
        tps = r["triples_per_s"]
        default = f"{tps.get(str(r['default_batch']), tps['1']):.2f} (b{r['default_batch']})"
        g = r["group_triples_per_s"]
        group = f"{g.get(str(r['default_batch']), g['1']):.2f} ({r['group_vs_reference'].get(str(r['default_batch']), r['group_vs_reference']['1']):.2f}x)"
        pct = (f"{r['pct_of_float32_peak']:.0f}%" if "pct_of_float32_peak" in r else "-") + \
            (f" ({r['pct_of_int8_peak']:.0f}% of int8)" if "pct_of_int8_peak" in r else "")
        batch8 = f"{tps['8']:.2f}" if "8" in tps else "-"  # the reference runs triple by triple at any batch
        lines.append(f"| {r['label']} | {tps['1']:.2f} | {default} | {batch8} | "
                     f"{max(r['vs_reference'].values()):.2f}x | {group} | {r['flops_per_triple'] / 1e9:.1f} | {r['gflops_achieved']:.1f} | {pct} | "
                     f"{r['parity']['max_abs_dmu']:.2g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt")
    parser.add_argument("--base")
    parser.add_argument("--prompts-from")
    parser.add_argument("--fixture", default="small")
    parser.add_argument("--workdir", default="results/work")
    parser.add_argument("--variant", action="append", help="model:PATH (repeatable); the reference always runs")
    parser.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--triples", type=int, default=8, help="distinct triples of mixed image sizes")
    parser.add_argument("--parity-groups", type=int, default=4)
    parser.add_argument("--parity-edits", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also ONNX Runtime's per-op-type time (ms per triple)")
    parser.add_argument("--out", default="results/cpu-speed.json")
    args = parser.parse_args(argv)
    resolve_model_args(args)
    images = synthetic_images(2 * args.triples, seed=1)
    instructions = [g[0] for g in synthetic_groups(args.triples, 0)]
    cfg = {"ckpt": args.ckpt, "base": args.base, "prompts_from": args.prompts_from, "reps": args.reps, "profile": args.profile,
           "triples": [(instructions[i], images[2 * i], images[2 * i + 1]) for i in range(args.triples)],
           "parity_groups": synthetic_groups(args.parity_groups, args.parity_edits, seed=2)}
    labels = [REFERENCE] + [v for v in args.variant if v != REFERENCE]
    results = {}
    for threads in args.threads:
        log(f"[threads {threads}] GEMM peak")
        peaks = run_isolated(gemm_peak, (threads,), None)
        rows = []
        for label in labels:
            log(f"[threads {threads}] {label}")
            out = run_isolated(run_variant, (label, cfg, threads, threads == args.threads[-1]), None)
            row = {"variant": label, "status": "ok", **out} if "mu" in out else {"variant": label, **out}
            row["label"], row["threads"] = _short(label), threads  # a failed row too: report.py groups rows by threads
            rows.append(row)
            if label == REFERENCE and row["status"] != "ok":
                log(f"ABORT: the reference failed ({row.get('error')})")
                return 2
        results[str(threads)] = {"gemm_peak": peaks, "rows": rows}
    for threads, block in results.items():  # parity groups are scored at the last thread count
        parity = {r["variant"]: r.get("parity_mu") for r in results[str(args.threads[-1])]["rows"]}
        for r in block["rows"]:
            r.setdefault("parity_mu", parity.get(r["variant"]))
            if r["parity_mu"] is None:
                r.pop("parity_mu")
        summarise(block["rows"], block["gemm_peak"])
    config = {k: v for k, v in vars(args).items()}
    config["image_shapes"] = sorted({im.shape for im in images})
    config["gemm_peaks"] = {t: b["gemm_peak"] for t, b in results.items()}
    doc = results_document("cpu-speed", config, [r for b in results.values() for r in b["rows"]], "cpu")
    path = write_document(doc, args.out)
    for threads, block in results.items():
        print(table(block["rows"], block["gemm_peak"]))
        for r in block["rows"]:
            if "agreement_vs_float32" in r:
                a = r["agreement_vs_float32"]
                print(f"  {r['label']}: agreement with fp32 {a['agreement']:.3f} ({a['flipped']} of {a['pairs']} pairs flipped, "
                      f"margins {', '.join(f'{m:.3g}' for m in a['flip_margins']) or '-'}; median pair gap {a['median_pair_gap']:.3g})")
            if r.get("stages_ms"):
                print(f"  {r['label']}: ms per triple " + ", ".join(f"{k} {v:.0f}" for k, v in r["stages_ms"].items()))
            for graph, ops in (r.get("op_profile_ms_per_triple") or {}).items():
                print(f"    {graph}: " + ", ".join(f"{op} {ms:.1f}" for op, ms in ops.items()))
        print()
    print(f"wrote {path}")
    failed = [r["variant"] for b in results.values() for r in b["rows"] if r["status"] != "ok" or not r["parity"]["within"]]
    return 1 if failed else 0


def _short(label: str) -> str:
    path = Variant(label).path
    if not path:
        return label
    return os.path.basename(os.path.normpath(path))


if __name__ == "__main__":
    sys.exit(main())
