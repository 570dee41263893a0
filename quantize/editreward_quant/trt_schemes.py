"""Q/DQ ONNX for TensorRT strongly typed networks, made with NVIDIA ModelOpt's ONNX PTQ.

The decoder graph of a float32 exported folder becomes a graph with explicit
QuantizeLinear/DequantizeLinear nodes on its linear layers (the MatMuls with a weight):

- ``trt-int8-sq``: SmoothQuant (activation outliers moved into the weights), then per-channel
  int8 weights and per-tensor int8 activations;
- ``trt-fp8``: E4M3 weights and activations, per-tensor scales;
- ``trt-int4-awq``: block-wise int4 weights (AWQ clip search), activations unquantized.

Everything else is converted to ``high_precision_dtype`` (fp16 by default), except the RMSNorm
statistics and the rotary angles, which stay float32: a residual stream of a few hundred squared
overflows fp16, and a position of 1000 has a resolution of 0.5 radians in fp16. TensorRT builds
such a graph as a strongly typed network: every tensor's type is the one in the graph.

Calibration data are the decoder feeds recorded while the float export scores calibration
triples on ONNX Runtime (CPU), cut into windows of ``WINDOW`` real tokens that continue the
recorded key/value cache. ModelOpt's AWQ concatenates activations across calibration feeds, so
all feeds must share one shape; the windows give that without padding tokens, and their hidden
states are exactly those of the recorded calls.

ModelOpt brings onnxruntime-gpu and cupy, which replace the CPU onnxruntime: install the
``trt-quant`` extra in a virtual environment of its own.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from editreward_rt.extras import require
from editreward_rt.manifest import EXTERNAL_DATA_BYTES, write_manifest
from editreward_rt.schemes import (QuantizeError, QuantizeRequest, Scheme, TrtFp8, TrtInt4Awq, TrtInt8Sq, make_scheme,
                                   trt_precisions)
from editreward_rt.tolerances import snr_db

from .calib import calibration_triples, prepare_all
from .output import float_export, staged_output

# The decoder graph's inputs by role, in the order the fast path feeds them (their names are the family's).
ROLES = ("ids", "embeds", "index", "positions", "mask", "cache")  # GraphRunner.decode's arrays (its keep aside)
GRAPH_ROLES = ("ids", "embeds", "index", "positions", "mask", "keep", "cache")  # the decoder graph's inputs
WINDOW = 32  # tokens per calibration feed (AWQ samples 64 tokens over all feeds; max/entropy ranges see them all)
MAX_WINDOWS = 64
CHECK_WINDOWS = 4
FP16_MAX = float(np.finfo(np.float16).max)
INSTALL_NOTE = ("in a virtual environment of its own (ModelOpt brings onnxruntime-gpu and cupy, which replace the "
                "CPU onnxruntime)")


def require_modelopt():
    """ModelOpt's ONNX quantizer and mixed-precision converter, imported on first use; a QuantizeError
    naming the extra without them (call it first to fail before a long export)."""
    what = "TensorRT quantization (NVIDIA ModelOpt with its ONNX extras)"
    quantize = require("modelopt.onnx.quantization", "trt-quant", what, INSTALL_NOTE, QuantizeError).quantize
    autocast = require("modelopt.onnx.autocast", "trt-quant", what, INSTALL_NOTE, QuantizeError)
    return quantize, autocast.convert_to_mixed_precision


def resolve_scheme(precision_or_scheme: str | Scheme) -> Scheme:
    """``fp8``/``int8``/``int4``, a scheme name or a scheme -> a TensorRT-targeted scheme."""
    scheme, precisions = precision_or_scheme, trt_precisions()
    if isinstance(scheme, str):
        scheme = make_scheme(precisions.get(scheme, scheme))
    if scheme.target != "trt":
        raise QuantizeError(f"{scheme.name} is not a TensorRT scheme; "
                            f"choose a precision ({', '.join(precisions)}) or one of {', '.join(precisions.values())}")
    return scheme


# --- calibration feeds ------------------------------------------------------------------------

def _evenly(items: list, k: int) -> list:
    if len(items) <= k:
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, k).round().astype(int))]


def window_spans(feed: dict, window: int) -> list[tuple[int, int]]:
    """(row, start) of every whole window of real tokens in one decoder call (rows are right-padded)."""
    p, mask = feed["cache"].shape[4], feed["mask"]
    return [(b, s) for b in range(mask.shape[0]) for s in range(0, int(mask[b, p:].sum()) - window + 1, window)]


def window_feed(feed: dict, present: np.ndarray, b: int, s: int, window: int) -> dict:
    """Tokens [s, s + window) of row ``b`` as a batch-1 feed (keyed by role) continuing the call's cache:
    cache = present[:, :, b, :, :P + s] ([L, 2, 1, kv, P + s, d]); P + s may be 0. Every token is kept
    ([1, window, 2]), so the calibration sees the last layer at every row, not only at <|Reward|>."""
    p = feed["cache"].shape[4]
    rows = feed["index"][b, s : s + window]
    used = np.unique(rows[rows >= 0])
    table = feed["embeds"][used] if len(used) else np.zeros((1, feed["embeds"].shape[1]), np.float32)
    return {
        "ids": np.ascontiguousarray(feed["ids"][b : b + 1, s : s + window]),
        "embeds": np.ascontiguousarray(table, dtype=np.float32),
        "index": np.where(rows >= 0, np.searchsorted(used, rows), -1)[None].astype(np.int64),
        "positions": np.ascontiguousarray(feed["positions"][b : b + 1, s : s + window]),
        "mask": np.ascontiguousarray(feed["mask"][b : b + 1, : p + s + window]),
        "keep": np.stack([np.zeros(window, np.int64), np.arange(window)], axis=-1)[None],
        "cache": np.ascontiguousarray(present[:, :, b : b + 1, :, : p + s]),
    }


def call_windows(feed: dict, present: np.ndarray, window: int, limit: int) -> list[dict]:
    """Up to ``limit`` evenly spread windows of one recorded decoder call."""
    return [window_feed(feed, present, b, s, window) for b, s in _evenly(window_spans(feed, window), limit)]


def record_windows(model_dir: Path, triples: list, window: int = WINDOW, limit: int = MAX_WINDOWS,
                   log=lambda *_: None) -> list[dict]:
    """Score ``triples`` with the float export on ONNX Runtime (CPU), keeping windows of the decoder
    calls as feeds keyed by the decoder graph's input names."""
    from editreward_rt import Scorer

    scorer = Scorer.load(model_dir, backend="onnxruntime", device="cpu")
    graphs = scorer.backend.graphs
    names = decoder_inputs(scorer.backend.model.manifest)
    prepared = prepare_all(scorer, triples)
    calls = 3 * -(-len(prepared) // scorer.max_batch)  # at most three levels per batch (pipeline.py)
    per_call = -(-limit // calls)
    windows, decode = [], graphs.decode

    host = lambda a: a.numpy() if hasattr(a, "numpy") else a  # the cache is an OrtValue when it stays on a GPU

    def recording(*args):
        hidden, present = decode(*args)
        for w in call_windows(dict(zip(ROLES, map(host, args))), host(present), window, per_call):
            windows.append({names[role]: value for role, value in w.items()})
        return hidden, present

    graphs.decode = recording
    try:
        for start in range(0, len(prepared), scorer.max_batch):
            scorer.score_prepared(prepared[start : start + scorer.max_batch])
            log(f"      scored {min(start + scorer.max_batch, len(prepared))}/{len(prepared)} calibration triples")
    finally:
        del graphs.decode
    if not windows:
        raise QuantizeError(f"no calibration prompt has {window} tokens to decode; use more or larger calibration triples")
    return _evenly(windows, limit)


def decoder_inputs(manifest: dict) -> dict[str, str]:
    """Role -> the decoder graph's input name, from the manifest's graph I/O."""
    return dict(zip(GRAPH_ROLES, (item["name"] for item in manifest["graphs"]["decoder"]["inputs"])))


class WindowReader:
    """The calibration-reader protocol of ONNX Runtime and ModelOpt over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.position = feeds, 0

    def get_next(self):
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def get_first(self):
        return self.feeds[0]

    def rewind(self):
        self.position = 0

    def __iter__(self):
        return iter(self.feeds)


# --- graph rewrites ---------------------------------------------------------------------------

def weight_matmuls(graph) -> list:
    """MatMul nodes whose second input is a 2-D initializer: the linear layers."""
    dims = {t.name: len(t.dims) for t in graph.initializer}
    return [n for n in graph.node if n.op_type == "MatMul" and dims.get(n.input[1]) == 2 and n.input[0] not in dims]


def _consumers(graph) -> dict:
    users = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def activation_maxima(model, feeds: list[dict], tensors: list[str], work: Path) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each named tensor over ``feeds`` (float graph on ONNX Runtime, CPU)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([onnx.ValueInfoProto(name=t) for t in tensors])
    path = _save(probe, work / "probe.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    maxima = {}
    for feed in feeds:
        for name, value in zip(tensors, session.run(tensors, feed)):
            amax = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            maxima[name] = np.maximum(maxima.get(name, 0.0), amax)
    return maxima


def smooth(model, maxima: dict[str, np.ndarray], alpha: float) -> int:
    """SmoothQuant: for each activation x feeding linear layers W_i, s_j = max|x_j|^a / max_i|W_i[j]|^(1-a);
    W_i[j, :] *= s_j and x_j /= s_j. The division folds into an RMSNorm weight where x is that norm's
    output and no other node reads its values; elsewhere (o_proj, down_proj) an explicit Mul is inserted,
    which TensorRT fuses with the pointwise ops around it. Returns the groups smoothed."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users = _consumers(graph)
    producer = {o: n for n in graph.node for o in n.output}
    groups, inserted = defaultdict(list), {}
    for node in weight_matmuls(graph):
        groups[node.input[0]].append(node)
    for x, layers in groups.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in layers]  # [in, out] each
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        a_max = maxima[x]
        valid = (a_max > 0) & (w_max > 0)
        s = np.where(valid, np.power(a_max, alpha) / np.power(np.where(valid, w_max, 1.0), 1.0 - alpha), 1.0)
        s = np.clip(s, 1e-4, 1e4).astype(np.float32)
        for node, w in zip(layers, weights):
            name = node.input[1]
            if len(users[name]) > 1:  # a weight shared with another node gets a copy of its own
                name = f"{node.name}/smoothed_weight"
                node.input[1] = name
                graph.initializer.append(numpy_helper.from_array(w, name))
                inits[name] = graph.initializer[-1]
            inits[name].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(w.dtype), name))
        norm = producer.get(x)
        gamma = None
        if norm is not None and norm.op_type == "Mul":
            gamma = next((i for i in norm.input if i in inits and len(inits[i].dims) == 1), None)
        value_readers = [u for u in users[x] if u.op_type != "Shape"]  # a Shape reads no values
        if gamma and len(value_readers) == len(layers) and len(users[gamma]) == 1:
            g = numpy_helper.to_array(inits[gamma])
            inits[gamma].CopyFrom(numpy_helper.from_array((g / s).astype(g.dtype), gamma))
            continue
        prefix = layers[0].name.rsplit("/", 1)[0]
        scale, smoothed = f"{prefix}/smooth_scale", f"{prefix}/smooth/Mul_output_0"
        graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), scale))
        inserted[layers[0].name] = helper.make_node("Mul", [x, scale], [smoothed], name=f"{prefix}/smooth/Mul")
        for node in layers:
            node.input[0] = smoothed
    if inserted:  # each new Mul goes right before the first layer it feeds (graph.node stays sorted)
        nodes = [m for n in graph.node for m in ([inserted[n.name]] if n.name in inserted else []) + [n]]
        del graph.node[:]
        graph.node.extend(nodes)
    return len(groups)


def clip_to_fp16_range(model) -> int:
    """Clip float32 constants beyond fp16's range (the attention mask's fill value) to its largest
    finite value, so that converting to fp16 gives -65504 rather than -inf. Returns the tensors changed."""
    from onnx import TensorProto, numpy_helper

    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    changed = 0
    for tensor in tensors:
        if tensor.data_type != TensorProto.FLOAT:
            continue
        value = numpy_helper.to_array(tensor)
        if value.size and np.abs(value).max() > FP16_MAX:
            tensor.CopyFrom(numpy_helper.from_array(np.clip(value, -FP16_MAX, FP16_MAX), tensor.name))
            changed += 1
    return changed


def float32_nodes(graph, positions: str) -> list[str]:
    """Nodes that stay float32 in a reduced-precision graph: the rotary angles (from the ``positions``
    input up to Cos/Sin) and each RMSNorm's statistics (from Pow(x, 2) to the Mul that scales x)."""
    users = _consumers(graph)
    keep, frontier = set(), [positions]
    while frontier:
        for node in users[frontier.pop()]:
            if node.name not in keep:
                keep.add(node.name)
                if node.op_type not in ("Cos", "Sin"):
                    frontier.extend(node.output)
    for power in (n for n in graph.node if n.op_type == "Pow"):
        x, chain, level = power.input[0], [power], [power]
        for _ in range(6):
            level = [u for n in level for o in n.output for u in users[o]]
            done = [u for u in level if u.op_type == "Mul" and x in u.input]
            if done:
                keep.update(n.name for n in chain + done)
                break
            chain += level
    return sorted(keep)


# --- quantization -----------------------------------------------------------------------------

def _save(model, path: Path) -> Path:
    import onnx

    large = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=large, location=path.name + ".data")
    return path


def _modelopt_quantize(src: Path, dst: Path, scheme: Scheme, feeds: list[dict], layers: list[str], large: bool) -> None:
    quantize, _ = require_modelopt()
    common = dict(calibration_data_reader=WindowReader(feeds), calibration_eps=["cpu"], output_path=str(dst),
                  use_external_data_format=large, log_level="WARNING")
    if isinstance(scheme, TrtInt4Awq):
        quantize(str(src), quantize_mode="int4", calibration_method=scheme.calibration_method,
                 block_size=scheme.block_size, nodes_to_exclude=[], **common)
        return
    # Only the linear layers: Q/DQ on a residual Add or a norm would quantize the residual stream.
    quantize(str(src), quantize_mode="fp8" if isinstance(scheme, TrtFp8) else "int8",
             calibration_method=scheme.calibration_method, op_types_to_quantize=["MatMul"],
             nodes_to_quantize=[f"^{re.escape(n)}$" for n in layers], high_precision_dtype="fp32",
             dq_only=True, **common)


def _to_high_precision(src: Path, dst: Path, scheme: Scheme, keep: list[str]) -> None:
    import onnx

    if scheme.high_precision_dtype == "fp32":
        _save(onnx.load(str(src)), dst)
        return
    _, convert = require_modelopt()
    _save(convert(str(src), low_precision_type=scheme.high_precision_dtype, keep_io_types=True, data_max=np.inf,
                  nodes_to_exclude=[f"^{re.escape(n)}$" for n in keep]), dst)


def qdq_summary(path: Path) -> dict:
    """Structure of a Q/DQ graph: node counts, quantized linear layers, weight bytes by element type."""
    import onnx
    from onnx import TensorProto

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    count = lambda op: sum(n.op_type == op for n in graph.node)
    by_type = defaultdict(int)
    for t in graph.initializer:
        by_type[TensorProto.DataType.Name(t.data_type).lower()] += len(t.raw_data) or t.ByteSize()
    return {
        "quantize_linear": count("QuantizeLinear"), "dequantize_linear": count("DequantizeLinear"),
        "matmuls": count("MatMul"),
        "quantized_matmuls": sum(n.op_type == "MatMul" and producer.get(n.input[1]) == "DequantizeLinear" for n in graph.node),
        "weight_bytes": dict(sorted(by_type.items())),
    }


def self_check(float_path: Path, qdq_path: Path, feeds: list[dict]) -> dict:
    """Run the Q/DQ graph on ONNX Runtime (CPU) against the float graph on a few windows: hidden-state
    SNR where ONNX Runtime implements the ops, the reason where it does not. Non-finite outputs raise."""
    import onnxruntime as ort

    report = {"onnxruntime": ort.__version__}
    reference = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"])
    for level in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"):
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        try:
            session = ort.InferenceSession(str(qdq_path), options, providers=["CPUExecutionProvider"])
            hidden = [session.get_outputs()[0].name]  # the decoder's first output: its hidden states
            got = [session.run(hidden, f)[0] for f in feeds]
        except Exception as exc:  # onnxruntime raises its own exception classes
            report[level] = str(exc).splitlines()[0][:300]
            continue
        want = [reference.run(hidden, f)[0] for f in feeds]
        if not all(np.isfinite(g).all() for g in got):
            raise QuantizeError(f"{qdq_path.name} gives non-finite hidden states on calibration windows "
                                "(fp16 overflow?); try high_precision_dtype=bf16 or fp32")
        report.update(ran=True, optimization=level, hidden_snr_db=round(snr_db(np.concatenate(want), np.concatenate(got)), 2))
        return report
    report["ran"] = False
    return report


def quantize_for_trt(onnx_dir, precision_or_scheme, out_dir, calib=None, calib_size: int = 32, log=print) -> Path:
    """Float32 exported folder -> new exported folder whose decoder.onnx is a Q/DQ graph for TensorRT.

    ``precision_or_scheme``: fp8 / int8 / int4, a scheme name, or a scheme. ``calib``: JSONL of
    {instruction, source, edited} (default: ``calib_size`` synthetic triples).
    """
    import onnx

    scheme = resolve_scheme(precision_or_scheme)
    require_modelopt()
    model_dir, out = Path(onnx_dir), Path(out_dir)
    exported = float_export(model_dir, scheme.name)
    decoder = exported.graph_path("decoder")
    source = {"model_dir": str(model_dir.resolve()), "decoder_sha256": exported.manifest["files"][decoder.name]}

    with staged_output(out, source) as tmp, tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".trt-work-") as work:
        work = Path(work)
        log(f"[1/4] recording decoder calibration feeds: {calib or 'synthetic'} triples, up to {calib_size}")
        feeds = record_windows(model_dir, calibration_triples(calib, calib_size), log=log)
        log(f"      {len(feeds)} windows of {WINDOW} tokens")
        model = onnx.load(str(decoder))
        large = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
        layers = [n.name for n in weight_matmuls(model.graph)]
        rewrites = {}
        if scheme.high_precision_dtype == "fp16":
            rewrites["clipped_to_fp16_range"] = clip_to_fp16_range(model)
        if isinstance(scheme, TrtInt8Sq):
            log(f"[2/4] SmoothQuant (alpha {scheme.alpha}) over {len(layers)} linear layers")
            tensors = sorted({n.input[0] for n in weight_matmuls(model.graph)})
            rewrites["smoothed_groups"] = smooth(model, activation_maxima(model, feeds, tensors, work), scheme.alpha)
        prepared = _save(model, work / "decoder.float.onnx")
        keep = float32_nodes(model.graph, decoder_inputs(exported.manifest)["positions"])
        del model
        log(f"[3/4] ModelOpt {scheme.name} ({scheme.calibration_method}) on {len(layers)} linear layers")
        _modelopt_quantize(prepared, work / "decoder.qdq.onnx", scheme, feeds, layers, large)
        _to_high_precision(work / "decoder.qdq.onnx", tmp / "decoder.onnx", scheme, keep)
        onnx.checker.check_model(str(tmp / "decoder.onnx"))
        log("[4/4] checking the Q/DQ graph on ONNX Runtime (CPU)")
        check = self_check(decoder, tmp / "decoder.onnx", _evenly(feeds, CHECK_WINDOWS))
        log(f"      {check}")
        for name in exported.manifest["files"]:
            if not name.startswith(decoder.name):
                shutil.copy2(exported.root / name, tmp / name)
        dropped = ("format", "manifest_version", "files", "validation")  # validation was of the float graphs
        manifest = {k: v for k, v in exported.manifest.items() if k not in dropped}
        manifest["quantization"] = {
            **scheme.to_dict(), "source": source, "graphs": ["decoder"], "strongly_typed": True,
            "calibration": {"triples": str(calib) if calib else f"synthetic:{calib_size}", "windows": len(feeds),
                            "window_tokens": WINDOW},
            "rewrites": rewrites, "float32_nodes": len(keep), "qdq": qdq_summary(tmp / "decoder.onnx"),
            "check": check, "tools": _versions(),
        }
        write_manifest(tmp, manifest)
    log(f"wrote {out}")
    return out


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("nvidia-modelopt", "onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def quantize(request: QuantizeRequest) -> Path:
    """Registry entry of the ``trt-*`` schemes."""
    return quantize_for_trt(Path(request.source), request.scheme, Path(request.out), calib=request.calib,
                            calib_size=request.calib_size)
