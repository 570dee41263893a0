"""python benchmarks/cpu_speed.py: CPU throughput of every variant against the PyTorch reference,
in one run, at each thread count, with the machine's GEMM peaks measured in the same run.

For each thread count (``--threads 1,2``), each in its own process:
- a GEMM microbenchmark (``gemm_peak``): every kernel a variant's matrix products run, on one large
  product, best of several runs: float32 (ONNX Runtime, torch, OpenVINO), bfloat16 (torch,
  OpenVINO's bf16 hint), ONNX Runtime's integer and 4-bit kernels, and OpenVINO's 8- and 4-bit
  weight kernels (under the default precision's hint, the one the ``ov-*`` rows run: bf16 where the
  CPU has bf16 units); a library that is not installed is skipped, and the results say so;
- the reference (two full passes per triple, the upstream computation) and every variant, scoring
  the same triples: one triple per call, then at the default triples per call
  (``backends.default_max_batch``), then 8 per call. Variants: ``torch-fast``, ``model:PATH``
  (the backend the folder's manifest names), ``BACKEND:PATH`` (``openvino:PATH``), each optionally
  ``@fp32``/``@bf16``/``@auto`` (``common.Variant``); a variant whose engine's library is not
  installed is recorded as skipped, with why;
- ``cli:PATH[@PRECISION]``: the whole ``editreward score --input ... --output ...`` process on the
  folder, with no ``--backend`` (the engine ``Scorer.load`` picks by default, in the precision asked
  for, or its default ``auto`` without one; ``$EDITREWARD_PRECISION`` is cleared), ``--threads``
  and ``OMP_NUM_THREADS`` pinned to the thread count, timed from process start to exit after one
  untimed process has filled the compiled-model cache (in a folder of the run's own).

The FLOPs per triple come from the model spec (the family's ``FLOPS``), counted on the tokens each
call actually decodes, padding excluded: what the fast path needs, and for the reference what its
two passes compute. Achieved GFLOP/s = FLOPs per triple x triples/s at one triple per call (where
they were counted); "% of peak" divides that by the peak of the kernel the row's products run
(``peak_of``): a quantized scheme's own kernel, else the best kernel of the precision it computed
in (float32 rows by the best float32 peak, bf16 rows by the best bf16 one).

Fidelity, in the same run: every variant's scores against the reference's (the tolerance of the
backend and precision that ran, ``tolerances.py``), and pairwise agreement with the float32
reference on groups of edits that share a source, with the flipped pairs and how close they were.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from editreward_rt.hardware import DTYPE_PRECISIONS, cpu_matrix_units

from .common import (
    PRECISION_DTYPE,
    REFERENCE,
    Variant,
    cpu_model,
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
CLI = "cli"  # cli:PATH[@PRECISION]: the whole `editreward score` process on PATH
# gemm_peak's keys (``KEY_gflops``) -> (the arithmetic, the kernel): the best kernel of each float
# precision is that precision's peak; a quantized row's own kernel is ``SCHEME_KERNELS``'s.
KERNELS = {
    "float32": ("float32", "onnxruntime MatMul"),
    "torch_float32": ("float32", "torch matmul"),
    "openvino_float32": ("float32", "openvino MatMul"),
    "torch_bfloat16": ("bfloat16", "torch matmul"),
    "openvino_bfloat16": ("bfloat16", "openvino MatMul"),
    "u8s8": ("int8", "onnxruntime MatMulInteger U8S8"),
    "u8u8": ("int8", "onnxruntime MatMulInteger U8U8"),
    "openvino_int8_bf16": ("int8 weights", "openvino MatMul, bf16 hint"),
    "openvino_int8_fp32": ("int8 weights", "openvino MatMul, f32 hint"),
    "int4_block32": ("int4", "onnxruntime MatMulNBits block 32"),
    "int4_block64": ("int4", "onnxruntime MatMulNBits block 64"),
    "int4_block128": ("int4", "onnxruntime MatMulNBits block 128"),
    "openvino_int4_bf16": ("int4 weights", "openvino MatMul group 128, bf16 hint"),
    "openvino_int4_fp32": ("int4 weights", "openvino MatMul group 128, f32 hint"),
}
# A quantization scheme -> the KERNELS key of what its matrix products run, from its config and the
# precision the row ran in; None: they run in that precision (ort-int8's static and weight-only
# modes dequantize to float).
SCHEME_KERNELS = {
    "ort-int8": lambda c, ran: ("u8s8" if c.get("weight_type") == "int8" else "u8u8") if c.get("mode") == "dynamic" else None,
    "ort-int4": lambda c, ran: f"int4_block{c['block_size']}" if c.get("accuracy_level") == 4 else None,
    "ov-int8": lambda c, ran: f"openvino_int8_{ran}",
    "ov-int4": lambda c, ran: f"openvino_int4_{ran}",
}


def _matmul_model(op: str, a_elem, b, out_elem, extra=()):
    from onnx import helper, numpy_helper

    m, k = GEMM[0], b.shape[0]
    inits = [numpy_helper.from_array(b, "b")] + [numpy_helper.from_array(v, n) for n, v in extra]
    graph = helper.make_graph([helper.make_node(op, ["a", "b"] + [n for n, _ in extra], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", a_elem, [m, k])],
                              [helper.make_tensor_value_info("c", out_elem, [m, b.shape[1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _gflops(run, reps: int) -> float:
    """GFLOP/s of ``run`` (one GEMM-shaped product): a first call (allocation, weight packing) untimed,
    then the best of ``reps``."""
    run()
    m, k, n = GEMM
    return 2.0 * m * k * n / min(_timed(run, reps)) / 1e9


def _ort_peaks(threads: int, reps: int, act_f, weight) -> dict:
    """ONNX Runtime: float32 MatMul; MatMulInteger with uint8 activations x uint8 weights (U8U8) and
    x int8 weights in [-64, 64] (U8S8, ort-int8's default: VNNI where the CPU has it); 4-bit
    MatMulNBits with int8 compute (accuracy_level 4) at blocks of 32, 64 (ort-int4's default) and 128."""
    import onnxruntime as ort
    from onnx import TensorProto
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    m, k, n = GEMM
    rng = np.random.default_rng(1)
    act_u8 = rng.integers(0, 256, (m, k), dtype=np.uint8)
    zero = ("a_zero", np.array(0, np.uint8))
    models = {
        "float32": (_matmul_model("MatMul", TensorProto.FLOAT, weight, TensorProto.FLOAT), act_f),
        "u8u8": (_matmul_model("MatMulInteger", TensorProto.UINT8, rng.integers(0, 256, (k, n), dtype=np.uint8), TensorProto.INT32,
                               (zero, ("b_zero", np.array(128, np.uint8)))), act_u8),
        "u8s8": (_matmul_model("MatMulInteger", TensorProto.UINT8, rng.integers(-64, 65, (k, n), dtype=np.int8), TensorProto.INT32,
                               (zero, ("b_zero", np.array(0, np.int8)))), act_u8),
    }
    for block in (32, 64, 128):
        config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4, bits=4)
        quantizer = MatMulNBitsQuantizer(_matmul_model("MatMul", TensorProto.FLOAT, weight, TensorProto.FLOAT), algo_config=config,
                                         bits=4, block_size=block, is_symmetric=True, accuracy_level=4)
        quantizer.process()
        models[f"int4_block{block}"] = (quantizer.model.model, act_f)
    out = {}
    for name, (model, a) in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        out[f"{name}_gflops"] = _gflops(lambda: session.run(None, {"a": a}), reps)
    return out


def _torch_peaks(threads: int, reps: int, act_f, weight) -> dict:
    """torch.matmul in float32 and bfloat16 (oneDNN: AMX or AVX512-BF16 where the CPU has them)."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for dtype in ("float32", "bfloat16"):
        a, b = (torch.from_numpy(v).to(getattr(torch, dtype)) for v in (act_f, weight))
        out[f"torch_{dtype}_gflops"] = _gflops(lambda: torch.matmul(a, b), reps)
    return out


def _openvino_peaks(threads: int, reps: int, act_f, weight) -> dict:
    """OpenVINO's CPU plugin on a one-MatMul model with a constant weight, compiled as the openvino
    backend compiles: f32 and bf16 hints, and (NNCF installed) the weight compressed to 8 bits
    (INT8_SYM, ov-int8's) and 4 bits (INT4_SYM, group 128, ov-int4's) under the default precision's
    hint here (``auto``, or $EDITREWARD_PRECISION), the one an ``ov-*`` row runs without ``@PRECISION``.
    A bf16 hint the CPU cannot honour (it runs f32) is no bf16 peak: skipped, and said."""
    import logging

    import openvino as ov
    import openvino.opset13 as ops
    from editreward_rt.backends.ov_backend import HINTS, RAN
    from editreward_rt.hardware import resolve_precision

    def model():
        a = ops.parameter(list(act_f.shape), ov.Type.f32, name="a")
        return ov.Model([ops.matmul(a, ops.constant(weight), False, False)], [a], "gemm")

    hint = resolve_precision(None, "cpu")
    models = {"openvino_float32": (model(), "fp32"), "openvino_bfloat16": (model(), "bf16")}
    out = {"skipped": {}}
    if importlib.util.find_spec("nncf") is None:
        out["skipped"][f"openvino_int8_{hint}, openvino_int4_{hint}"] = "nncf is not installed (the ov-* schemes' weight compression)"
    else:
        import nncf

        nncf.set_log_level(logging.ERROR)
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is the benchmark's tables
            models[f"openvino_int8_{hint}"] = (nncf.compress_weights(model(), mode=nncf.CompressWeightsMode.INT8_SYM), hint)
            models[f"openvino_int4_{hint}"] = (nncf.compress_weights(model(), mode=nncf.CompressWeightsMode.INT4_SYM, group_size=128,
                                                             all_layers=True), hint)  # all_layers: the one MatMul is also the last
    core = ov.Core()
    for key, (graph, precision) in models.items():
        compiled = core.compile_model(graph, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": HINTS[precision],
                                                     "INFERENCE_NUM_THREADS": threads})
        ran = RAN.get(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
        if key == "openvino_bfloat16" and ran != "bf16":
            out["skipped"][key] = f"the CPU has no bf16 units: OpenVINO ran the bf16 hint in {ran}"
            continue
        request = compiled.create_infer_request()
        out[f"{key}_gflops"] = _gflops(lambda: request.infer([act_f]), reps)
    return out


# Optional engines' GEMMs: (library, measure); a library that is not installed is skipped, and said.
OPTIONAL_PEAKS = (("torch", _torch_peaks), ("openvino", _openvino_peaks))


def gemm_peak(threads: int, reps: int = 7) -> dict:
    """GFLOP/s (GOP/s for integers) of each ``KERNELS`` kernel on one large product, the weight a
    constant as in the graphs, best of ``reps``: which kernels are fast on this CPU, and each
    precision's peak (the best of its kernels) that "% of peak" divides by. ``skipped``: the kernels
    not measured, and why."""
    m, k, n = GEMM
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    act_f = rng.standard_normal((m, k)).astype(np.float32)
    out = {"shape_mkn": [m, k, n], "threads": threads, "reps": reps, "skipped": {},
           **_ort_peaks(threads, reps, act_f, weight)}
    for library, measure in OPTIONAL_PEAKS:
        if importlib.util.find_spec(library) is None:
            out["skipped"][library] = f"{library} is not installed"
            continue
        measured = measure(threads, reps, act_f, weight)
        out["skipped"].update(measured.pop("skipped", {}))
        out.update(measured)
    return out


def best_peak(peaks: dict, arithmetic: str) -> tuple[str, float] | None:
    """(kernel, GFLOP/s) of the fastest measured kernel computing in ``arithmetic``, or None."""
    measured = [(peaks[f"{key}_gflops"], f"{what} {kernel}") for key, (what, kernel) in KERNELS.items()
                if what == arithmetic and f"{key}_gflops" in peaks]
    if not measured:
        return None
    value, kernel = max(measured)
    return kernel, value


def peak_of(row: dict, peaks: dict) -> tuple[str, float] | None:
    """(kernel, GFLOP/s) of what ``row``'s matrix products run: its quantization scheme's own kernel
    (``SCHEME_KERNELS``), else the best kernel of the precision it computed in; None where that
    kernel was not measured."""
    d = row.get("backend") or {}
    pick = SCHEME_KERNELS.get(d.get("quantization"))
    ran = d.get("precision") or DTYPE_PRECISIONS.get(d.get("dtype"))
    key = pick(row.get("quant_config") or {}, ran) if pick else None
    if key is not None:
        what, kernel = KERNELS[key]
        return (f"{what} {kernel}", peaks[f"{key}_gflops"]) if f"{key}_gflops" in peaks else None
    return best_peak(peaks, PRECISION_DTYPE.get(ran, "float32"))


def missing_library(backend: str) -> str | None:
    """Why ``backend`` cannot run here (its library is not installed), or None. Each engine's library
    imports by its backend's name (torch, onnxruntime, openvino, tensorrt)."""
    from editreward_rt.backends import BACKENDS

    if importlib.util.find_spec(backend) is not None:
        return None
    return f"{backend} is not installed: pip install 'editreward-deploy[{BACKENDS[backend].extra}]'"


class FlopCounter:
    """Wraps a fast path's graphs; adds up the spec's FLOPs of every call, by stage (``vision``,
    ``decoder``, ``heads``, and ``decoder_weights``: the decoder's weight GEMMs, part of ``decoder``)."""

    def __init__(self, graphs, flops):
        self.inner, self.flops, self.spec = graphs, flops, graphs.spec
        self.stages = dict.fromkeys(("vision", "decoder", "decoder_weights", "heads"), 0.0)

    @property
    def total(self) -> float:
        return self.stages["vision"] + self.stages["decoder"] + self.stages["heads"]

    def take(self) -> dict:
        """The FLOPs by stage since the last take; the count starts again."""
        out, self.stages = self.stages, dict.fromkeys(self.stages, 0.0)
        return out

    def vision(self, feeds):
        self.stages["vision"] += sum(self.flops.vision_call(self.spec, *arrays) for arrays in feeds)
        return self.inner.vision(feeds)

    def decode(self, input_ids, image_embeds, image_index, position_ids, attention_mask, past, keep):
        seq = input_ids.shape[1]
        self.stages["decoder"] += self.flops.decode_call(self.spec, attention_mask, seq)
        self.stages["decoder_weights"] += self.flops.decoder_token(self.spec) * float(np.asarray(attention_mask)[:, -seq:].sum())
        return self.inner.decode(input_ids, image_embeds, image_index, position_ids, attention_mask, past, keep)

    def heads(self, hidden):
        self.stages["heads"] += self.flops.heads(self.spec, hidden.shape[0])
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
    reason = missing_library(variant.backend_name())
    if reason:
        return {"status": "skipped", "reason": reason}
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
        counter.take()
    t0 = time.perf_counter()
    scores = scorer.score_batch(triples)
    first = time.perf_counter() - t0
    flops = counter.total / len(triples) if counter is not None else _reference_flops(scorer, triples)
    result = {"variant": label, "threads": threads, "backend": scorer.description, "flops_per_triple": flops,
              "mu": _mu(scores), "log_sigma": [s.log_sigma for s in scores], "default_batch": default,
              "tolerance_key": list(variant.tolerance_key(scorer))}
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


def _write_inputs(folder: Path, groups) -> Path:
    """(instruction, source, [edited, ...]) groups -> a JSONL file of their triples in ``folder``,
    each image a PNG (lossless: the process reads the pixels the in-process rows score), a group's
    source one file, so that the CLI scores the group's edits against it once."""
    from PIL import Image

    folder.mkdir(parents=True)
    lines = []
    for g, (instruction, source, edits) in enumerate(groups):
        names = [f"{g}-{i}.png" for i in range(len(edits) + 1)]
        for name, image in zip(names, [source, *edits]):
            Image.fromarray(image).save(folder / name, compress_level=1)
        lines += [json.dumps({"instruction": instruction, "source": names[0], "edited": name}) for name in names[1:]]
    path = folder / "triples.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _score_process(command: list[str], input_path: Path, output: Path, env: dict) -> tuple[float, list[dict]]:
    """Seconds from the start of ``command --input --output`` to its exit, and its results in input order."""
    t0 = time.perf_counter()
    done = subprocess.run([*command, "--input", str(input_path), "--output", str(output)], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"editreward score exited with {done.returncode}: {done.stderr.strip()[-600:]}")
    results = sorted((json.loads(line) for line in output.read_text(encoding="utf-8").splitlines() if line.strip()),
                     key=lambda r: r["index"])
    failed = next((r["error"] for r in results if "error" in r), None)
    if failed is not None:
        raise RuntimeError(f"editreward score returned an error: {failed}")
    return seconds, results


def run_cli(label: str, cfg: dict, threads: int, with_parity: bool) -> dict:
    """In a child process: ``cli:PATH[@PRECISION]``, the whole ``editreward score`` process on the
    triples (the user's view: interpreter start, imports, load, image decoding, scoring, writing),
    with no ``--backend``, so the engine is the one ``Scorer.load`` picks by default; the median of
    ``reps`` processes after one untimed process (the parity groups where ``with_parity``) has filled
    the compiled-model cache, kept in a folder of this run's own. The results' ``backend`` field
    names the engine and precision that ran, which pick the row's tolerance."""
    from editreward_rt.backends import BACKENDS
    from editreward_rt.hardware import PRECISION_ENV

    variant = Variant(label)
    path = variant.name.partition(":")[2]
    command = [sys.executable, "-m", "editreward_rt.cli", "score", "--model", path, "--threads", str(threads)]
    command += ["--precision", variant.precision] if variant.precision else []
    pinned = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="editreward-cli-") as tmp:
        tmp = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k != PRECISION_ENV} | pinned | {"XDG_CACHE_HOME": str(tmp / "cache")}
        timed = _write_inputs(tmp / "triples", [(instruction, source, [edited]) for instruction, source, edited in cfg["triples"]])
        groups = _write_inputs(tmp / "groups", cfg["parity_groups"]) if with_parity else None
        _, warm = _score_process(command, groups or timed, tmp / "warm.jsonl", env)
        runs = [_score_process(command, timed, tmp / f"run{i}.jsonl", env) for i in range(cfg["reps"])]
    results = runs[-1][1]
    engine = results[0]["backend"]
    backend, precision, *scheme = engine.split()
    seconds = [s for s, _ in runs]
    result = {"variant": label, "threads": threads, "whole_process": True, "engine": engine,
              "backend": {"backend": backend, "precision": precision, "quantization": scheme[0] if scheme else None},
              "command": " ".join(["editreward", *command[3:], "--input", "IN", "--output", "OUT"]), "pinned_env": pinned,
              "process_runs_s": seconds, "triples_per_s": {"1": len(cfg["triples"]) / float(np.median(seconds))},
              "mu": [r["mu"] for r in results], "log_sigma": [r["log_sigma"] for r in results],
              "tolerance_key": [BACKENDS[backend].tolerance_key, scheme[0] if scheme else PRECISION_DTYPE[precision]]}
    if with_parity:
        sizes = np.cumsum([0] + [len(edits) for _, _, edits in cfg["parity_groups"]])
        result["parity_mu"] = [[r["mu"] for r in warm[a:b]] for a, b in zip(sizes[:-1], sizes[1:])]
    return result


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
    """Ratios, GFLOP/s, % of peak and parity against the reference, in place. A whole-process row
    (``cli:``) has its process's triples/s and parity only: nothing was counted inside it."""
    reference = next(r for r in rows if r["variant"] == REFERENCE and r["status"] == "ok")
    ref_tps = reference["triples_per_s"]["1"]
    fp32 = best_peak(peaks, "float32")
    for r in rows:
        if r["status"] != "ok":
            continue
        r["vs_reference"] = {k: v / ref_tps for k, v in r["triples_per_s"].items()}
        diff = np.abs(np.asarray(r["mu"]) - np.asarray(reference["mu"]))
        tol = gate_tolerance(*r["tolerance_key"], "float32")
        r["parity"] = {"max_abs_dmu": float(diff.max()),
                       "max_abs_dlog_sigma": float(np.abs(np.asarray(r["log_sigma"]) - np.asarray(reference["log_sigma"])).max()),
                       "tolerance_mu": tol.mu, "within": bool(diff.max() <= tol.mu)}
        if r is not reference and "parity_mu" in r and "parity_mu" in reference:
            r["agreement_vs_reference"] = _agreement(reference["parity_mu"], r["parity_mu"])
        if r.get("whole_process"):
            continue
        one = r["triples_per_s"]["1"]  # the FLOPs were counted one triple per call; a batch shares more
        default = r["triples_per_s"].get(str(r["default_batch"]), r["triples_per_s"]["1"])
        r["default_vs_batch1"] = default / r["triples_per_s"]["1"]
        g = r["group_triples_per_s"]
        r["group_vs_reference"] = {k: v / reference["group_triples_per_s"]["1"] for k, v in g.items()}
        r["group_default_vs_batch1"] = g.get(str(r["default_batch"]), g["1"]) / g["1"]
        r["gflops_achieved"] = r["flops_per_triple"] * one / 1e9
        if fp32 is not None:  # the microbenchmark's process may have failed: no column then
            r["pct_of_float32_peak"] = 100 * r["gflops_achieved"] / fp32[1]
        kernel = peak_of(r, peaks)
        if kernel is not None:
            r["peak_kernel"], r["pct_of_peak"] = kernel[0], 100 * r["gflops_achieved"] / kernel[1]


def engine(row: dict) -> str:
    """What ran: ``openvino bf16 ov-int8``, ``torch bf16``; a whole process adds so."""
    d = row.get("backend") or {}
    words = [d.get("backend", "?"), d.get("precision") or d.get("dtype"), d.get("quantization")]
    return " ".join(str(w) for w in words if w) + (" (whole process)" if row.get("whole_process") else "")


def machine_line(cpu: dict | None) -> str:
    """The CPU model and which matrix units it has (``hardware.cpu_matrix_units``)."""
    if not cpu:
        return "CPU: not recorded"
    units = cpu["matrix_units"]
    has, lacks = [u for u, v in units.items() if v], [u for u, v in units.items() if not v]
    return (f"CPU: {cpu['model']}; matrix units: {', '.join(has) or 'none of ' + ', '.join(units)}"
            + (f" (not: {', '.join(lacks)})" if has and lacks else ""))


def peak_line(peaks: dict) -> str:
    """Each arithmetic's kernels, fastest first (the first is its peak), and what was not measured."""
    if "float32_gflops" not in peaks:
        return f"GEMM peak: not measured ({peaks.get('error')})"
    by = {}
    for key, (what, kernel) in KERNELS.items():
        if f"{key}_gflops" in peaks:
            by.setdefault(what, []).append((peaks[f"{key}_gflops"], kernel))
    parts = [f"{what} " + ", ".join(f"{v:.0f} {kernel}" for v, kernel in sorted(kernels, reverse=True))
             for what, kernels in by.items()]
    skipped = "; not measured: " + ", ".join(f"{k} ({why})" for k, why in peaks["skipped"].items()) if peaks.get("skipped") else ""
    t = peaks["threads"]
    return (f"GEMM peak ({t} thread{'s' if t > 1 else ''}, {GEMM[0]}x{GEMM[1]}x{GEMM[2]}, best of {peaks.get('reps', 7)}; "
            f"GFLOP/s, GOP/s for integer kernels, fastest first): " + "; ".join(parts) + skipped)


def table(rows: list[dict], peaks: dict, cpu: dict | None = None) -> str:
    """docs/performance.md's block for one thread count (report.py writes it there): the machine, the
    GEMM peaks, and one row per variant; "% of peak" names the kernel it divides by."""
    lines = ["| variant | engine | triples/s (1 per call) | default batch | batch 8 | x reference | "
             "ranked group of 8, triples/s (default batch) | GFLOP/triple | GFLOP/s (1 per call) | % of peak (kernel) | "
             "max abs d mu | pairs kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | | {r['status']}: {r.get('reason') or r.get('error', '')} | | | | | | | | | |")
            continue
        tps = r["triples_per_s"]
        a = r.get("agreement_vs_reference")
        kept = f"{a['pairs'] - a['flipped']}/{a['pairs']}" if a else "-"
        head = f"| {r['label']} | {engine(r)} | {tps['1']:.2f} |"
        tail = f"{r['parity']['max_abs_dmu']:.2g} | {kept} |"
        if r.get("whole_process"):
            lines.append(f"{head} - | - | {r['vs_reference']['1']:.2f}x | - | - | - | - | {tail}")
            continue
        default = f"{tps.get(str(r['default_batch']), tps['1']):.2f} (b{r['default_batch']})"
        g = r["group_triples_per_s"]
        group = f"{g.get(str(r['default_batch']), g['1']):.2f} ({r['group_vs_reference'].get(str(r['default_batch']), r['group_vs_reference']['1']):.2f}x)"
        pct = f"{r['pct_of_peak']:.0f}% ({r['peak_kernel']})" if "pct_of_peak" in r else "-"
        batch8 = f"{tps['8']:.2f}" if "8" in tps else "-"  # the reference runs triple by triple at any batch
        lines.append(f"{head} {default} | {batch8} | {max(r['vs_reference'].values()):.2f}x | {group} | "
                     f"{r['flops_per_triple'] / 1e9:.1f} | {r['gflops_achieved']:.1f} | {pct} | {tail}")
    return "\n\n".join([machine_line(cpu), peak_line(peaks), "\n".join(lines)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt")
    parser.add_argument("--base")
    parser.add_argument("--prompts-from")
    parser.add_argument("--fixture", default="small")
    parser.add_argument("--workdir", default="results/work")
    parser.add_argument("--variant", action="append",
                        help="torch-fast | model:PATH | BACKEND:PATH | cli:PATH, each optionally @fp32, @bf16 or @auto "
                             "(repeatable); the reference always runs")
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
            target = run_cli if label.startswith(f"{CLI}:") else run_variant
            out = run_isolated(target, (label, cfg, threads, threads == args.threads[-1]), None)
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
    config["cpu"] = {"model": cpu_model(), "matrix_units": cpu_matrix_units()}
    doc = results_document("cpu-speed", config, [r for b in results.values() for r in b["rows"]], "cpu")
    path = write_document(doc, args.out)
    for threads, block in results.items():
        print(table(block["rows"], block["gemm_peak"], config["cpu"]))
        for r in block["rows"]:
            if "agreement_vs_reference" in r:
                a = r["agreement_vs_reference"]
                print(f"  {r['label']}: agreement with the reference {a['agreement']:.3f} ({a['flipped']} of {a['pairs']} pairs flipped, "
                      f"margins {', '.join(f'{m:.3g}' for m in a['flip_margins']) or '-'}; median pair gap {a['median_pair_gap']:.3g})")
            if r.get("stages_ms"):
                print(f"  {r['label']}: ms per triple " + ", ".join(f"{k} {v:.0f}" for k, v in r["stages_ms"].items()))
            for graph, ops in (r.get("op_profile_ms_per_triple") or {}).items():
                print(f"    {graph}: " + ", ".join(f"{op} {ms:.1f}" for op, ms in ops.items()))
        print()
    print(f"wrote {path}")
    failed = [r["variant"] for b in results.values() for r in b["rows"]
              if r["status"] == "failed" or (r["status"] == "ok" and not r["parity"]["within"])]
    return 1 if failed else 0


def _short(label: str) -> str:
    """``model:some/dir/small-ov-int8`` -> ``small-ov-int8``; ``openvino:dir/onnx-fp32@bf16`` ->
    ``openvino:onnx-fp32@bf16``: the folder's name, with the engine or process and the precision asked."""
    variant = Variant(label)
    prefix, sep, path = variant.name.partition(":")
    if not sep or not (variant.path or prefix == CLI):
        return label
    name = os.path.basename(os.path.normpath(path))
    return (name if prefix in ("model", "onnx") else f"{prefix}:{name}") + (f"@{variant.precision}" if variant.precision else "")


if __name__ == "__main__":
    sys.exit(main())
