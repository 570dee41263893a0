"""OpenVINO schemes (``ov-int8``, ``ov-int4``): an exported float32 folder -> a folder of OpenVINO IR
graphs whose decoder weights NNCF has compressed, read by the openvino backend.

Each graph is read by OpenVINO's ONNX frontend, compressed where the scheme says (the decoder, the
vision tower on request, never the heads), saved as ``NAME.xml`` + ``NAME.bin`` and dropped before
the next graph is read: one graph's float weights and its compressed copy are in memory at a time.
The frontend memory-maps a graph's external data (a 7B decoder's 26 GiB), so those float32 pages
are file-backed, reclaimable under pressure (inline weights are parsed into memory instead: 1.7x
the small fixture decoder's float32 bytes, against 0.3x from external data). What compression
allocates is the compressed constants, held until the graph is saved, plus a transient of about
1.2x the float32 bytes of the weight being compressed (measured on 7B-sized matrices; the largest
is the token embedding, 2.2 GB at 7B). NNCF replaces each weight constant in place (a low-bit
constant, a float16 scale, a decompression subgraph the CPU plugin fuses into its matmul kernels);
``compress_to_fp16=False`` keeps the float tensors left (norms, the heads, an uncompressed vision
tower) in float32, as exported.

The folder then checks itself, in one of two ways, before anything is published. Where the float32
graphs fit in memory (``decoder_check_bytes`` within ``FIT_FRACTION`` of what the machine has
available), the whole decoder: windows of a few synthetic validation triples, recorded from the
float export on ONNX Runtime, run through the float and the compressed decoder on OpenVINO's CPU
plugin in float32; the hidden states' SNR must reach the scheme's floor
(``tolerances.hidden_snr_floor_db``). Those runtimes hold two to three times the float32 weights
(over 60 GB for a 7B), so beyond the budget every compressed weight is checked instead, one at a
time and in chunks: its IR constant decompressed (scale * (q - zero point)) against its float32
original, its relative noise power against the scheme's noise model (``Scheme.matmul_noise``).
Both graphs are memory-mapped there, so the check allocates a chunk's buffers, not a decoder's.
The manifest records which check ran and its numbers.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
from pathlib import Path

import numpy as np
from editreward_rt.manifest import write_manifest
from editreward_rt.schemes import OvInt4, OvInt8, QuantizeError, QuantizeRequest, Scheme
from editreward_rt.tolerances import MARGIN_DB, hidden_snr_floor_db, snr_db

from .calib import calibration_triples, synthetic_triples
from .output import float_export, staged_output

CHECK_TRIPLES = 2  # validation triples (a seed of their own, never the calibration ones)
CHECK_WINDOWS = 4  # decoder windows of 32 tokens each compared in the self-check
CHECK_SEED = 1
# Share of the machine's available memory the whole-decoder check may take: the rest is for the
# interpreter and its libraries (0.3 GB with OpenVINO, NNCF and ONNX Runtime imported), for the
# compressed graph until it is freed, and for what other processes allocate meanwhile.
FIT_FRACTION = 0.75
# What the whole-decoder check holds, per byte of the float32 graphs: recording the windows loads the
# whole folder on ONNX Runtime (its session held 1.7x the three graphs' bytes on the small fixture,
# weights in external data: its copy and its prepacked one), then OpenVINO compiles the float decoder
# (2.3x the decoder's bytes: the read graph and the plugin's repacked weights). 2.5 bounds both.
CHECK_GRAPH_FACTOR = 2.5
# Tokens of one decoder call in the check, bounded: two images of 256 merged tokens at the published
# 200,704 pixels, a rubric of about 400 tokens and the chat template stay under 1,300.
CHECK_TOKENS = 2048
WEIGHT_CHUNK = 1 << 22  # elements of a weight decompressed and compared at a time (16 MB of float32)
# Per weight, above the scheme's noise model: one matrix's absmax is a single sample of its tail,
# where the hidden-state floor (MARGIN_DB) averages every layer's matrices. A weight compressed with
# fewer bits than its scheme declares (4 for 8) lies 25 dB above the model, far beyond this margin.
WEIGHT_MARGIN_DB = 2 * MARGIN_DB


def _nncf_options(scheme: Scheme) -> dict:
    """The scheme as ``nncf.compress_weights`` arguments (dataset aside)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    if isinstance(scheme, OvInt8):
        return {"mode": nncf.CompressWeightsMode.INT8_SYM}
    mode = nncf.CompressWeightsMode.INT4_SYM if scheme.symmetric else nncf.CompressWeightsMode.INT4_ASYM
    # A group wider than a fan-in shrinks to it (the scheme's noise model takes min(group, k)).
    advanced = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST)
    return {"mode": mode, "group_size": scheme.group_size, "ratio": scheme.ratio, "awq": scheme.awq,
            "scale_estimation": scheme.scale_estimation, "advanced_parameters": advanced}


LOW_BIT = ("u8", "i8", "u4", "i4")


def _zero_point(constant) -> bool:
    """A low-bit constant read as an asymmetric zero point: Convert, then Subtract's second input."""
    return any(use.get_node().get_type_name() == "Subtract" and use.get_index() == 1
               for convert in constant.output(0).get_target_inputs()
               for use in convert.get_node().output(0).get_target_inputs())


def _compressed_weights(model):
    """(element type, constant) of each compressed weight of an ``ov.Model``, zero points aside."""
    for op in model.get_ops():
        kind = op.get_element_type().get_type_name() if op.get_type_name() == "Constant" else None
        if kind in LOW_BIT and not _zero_point(op):
            yield kind, op


def compressed_constants(model) -> dict[str, int]:
    """Element type -> number of compressed weight tensors of that type in an ``ov.Model`` (zero
    points aside): one per weight MatMul or embedding lookup NNCF compressed."""
    counts: dict[str, int] = {}
    for kind, _ in _compressed_weights(model):
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _convert_graph(core, src: Path, dst: Path, options: dict | None, dataset=None) -> dict:
    """Read one ONNX graph, compress its weights when ``options`` are given, save it as IR at ``dst``
    (``.xml``; weights in the same-stem ``.bin``). Returns the compressed constants by element type."""
    import nncf
    import openvino as ov

    model = core.read_model(str(src))
    if options is not None:
        model = nncf.compress_weights(model, dataset=dataset, **options)
    counts = compressed_constants(model)
    ov.save_model(model, str(dst), compress_to_fp16=False)
    del model
    gc.collect()  # the graph's weights go before the next graph's come
    return counts


def _calibration(model_dir: Path, scheme: Scheme, calib, calib_size: int, log):
    """NNCF's dataset of decoder windows from the calibration triples, for the activation-aware steps."""
    if not (isinstance(scheme, OvInt4) and scheme.calibrated):
        return None, None
    import nncf

    from .trt_schemes import MAX_WINDOWS, record_windows

    log(f"recording decoder calibration windows: {calib or 'synthetic'} triples, up to {calib_size}")
    feeds = record_windows(model_dir, calibration_triples(calib, calib_size), limit=MAX_WINDOWS)
    record = {"triples": str(calib) if calib else f"synthetic:{calib_size}", "windows": len(feeds)}
    return nncf.Dataset(feeds), record


def self_check(core, float_decoder: Path, ir_decoder: Path, feeds: list[dict], floor_db: float) -> dict:
    """The compressed decoder against the float one, both on the CPU plugin in float32, on ``feeds``:
    hidden-state SNR, refused below ``floor_db`` or when not finite."""
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    outputs = []
    for path in (float_decoder, ir_decoder):
        request = core.compile_model(str(path), "CPU", config).create_infer_request()
        outputs.append([np.array(request.infer(feed)[0]) for feed in feeds])  # output 0: the hidden states
        del request
    want, got = (np.concatenate([h.reshape(-1, h.shape[-1]) for h in hs]) for hs in outputs)
    if not np.isfinite(got).all():
        raise QuantizeError(f"{ir_decoder.name} gives non-finite hidden states on validation windows")
    snr = snr_db(want, got)
    if snr < floor_db:
        raise QuantizeError(f"{ir_decoder.name}: hidden-state SNR {snr:.1f} dB on validation windows is below the "
                            f"scheme's floor {floor_db:.1f} dB; nothing written")
    return {"hidden_snr_db": round(snr, 2), "floor_db": round(floor_db, 2), "windows": len(feeds),
            "triples": f"synthetic:{CHECK_TRIPLES}:seed{CHECK_SEED}"}


def available_memory() -> int:
    """Bytes this process could allocate now without swapping: the kernel's MemAvailable (free memory
    plus the page cache it can drop); where there is no /proc/meminfo, the free pages sysconf counts
    (0 where it cannot tell, which sends the check down the streaming path)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def decoder_check_bytes(model) -> int:
    """Memory the whole-decoder check needs: ``CHECK_GRAPH_FACTOR`` times the float32 graphs' bytes,
    plus one call's activations (``CHECK_TOKENS`` of key/value cache over every layer, and the widest
    MLP's three intermediate rows and a few hidden-size ones per token, in float32)."""
    graphs = sum((model.root / name).stat().st_size for name in model.manifest["files"]
                 if name.split(".")[0] in model.manifest["graphs"])
    t = model.spec.text
    per_token = 2 * t.num_layers * t.num_kv_heads * t.head_dim + 3 * t.intermediate_size + 4 * t.hidden_size
    return int(CHECK_GRAPH_FACTOR * graphs) + 4 * CHECK_TOKENS * per_token


DECOMPRESSION = ("Convert", "Subtract", "Multiply", "Reshape")  # NNCF's ops from a low-bit constant to its weight


def _decompression(constant):
    """The ops from a compressed constant to the weight its consumer reads, each with the port its
    other operand (zero point, scale) comes in at, and the consumer's input that reads the weight."""
    steps, node = [], constant
    while True:
        targets = list(node.output(0).get_target_inputs())
        if len(targets) != 1:
            raise QuantizeError(f"{constant.get_friendly_name()}: its decompression branches "
                                f"({len(targets)} consumers)")
        user = targets[0].get_node()
        if user.get_type_name() not in DECOMPRESSION:
            return steps, targets[0]
        steps.append((user, 1 - targets[0].get_index()))
        node = user


def _values(constant, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Flat elements ``start:stop`` of an OpenVINO constant as float32. Its ``data`` is a view of the
    constant's memory (a memory-mapped file's pages for weights read from IR or external data), so
    only the slice is read; 4-bit types come packed two to a byte, the first in the low nibble."""
    kind, data = constant.get_element_type().get_type_name(), constant.data
    stop = int(np.prod(constant.get_output_shape(0))) if stop is None else stop
    if kind not in ("i4", "u4"):
        return data.reshape(-1)[start:stop].astype(np.float32)
    packed = data.view(np.uint8).reshape(-1)[start // 2 : (stop + 1) // 2]
    nibbles = np.stack([packed & 15, packed >> 4], axis=-1).reshape(-1)[start % 2 : start % 2 + stop - start]
    return (((nibbles ^ 8).astype(np.int8) - 8) if kind == "i4" else nibbles).astype(np.float32)


def _operand(node) -> np.ndarray:
    """A zero point or scale: a constant, possibly through a Convert, as float32 in its own shape."""
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        raise QuantizeError(f"{node.get_friendly_name()}: a decompression operand that is not a constant "
                            f"({node.get_type_name()})")
    return _values(node).reshape(tuple(node.get_output_shape(0)))


def _decompressed(constant, steps, rows: slice, operands: dict) -> np.ndarray:
    """Rows ``rows`` (along axis 0) of a compressed constant put through its decompression ``steps``
    in float32, flattened: the same flat range of the weight, since a Reshape keeps the order."""
    shape = tuple(constant.get_output_shape(0))
    inner = int(np.prod(shape[1:]))
    x = _values(constant, rows.start * inner, rows.stop * inner).reshape((rows.stop - rows.start,) + shape[1:])
    for op, port in steps:
        kind = op.get_type_name()
        if kind == "Reshape":
            x = x.reshape(-1)
        elif kind in ("Subtract", "Multiply"):
            if x.ndim != len(shape):
                raise QuantizeError(f"{op.get_friendly_name()}: a {kind} after the Reshape of a decompression")
            v = operands[op.get_friendly_name()]
            if v.ndim == len(shape) and v.shape[0] == shape[0] > 1:
                v = v[rows]  # per-row (or per-group) operands: the chunk's rows
            a, b = (x, v) if port == 1 else (v, x)
            x = a - b if kind == "Subtract" else a * b
    return x.reshape(-1)


def _fan_in(consumer, shape: tuple) -> int:
    """Fan-in of a weight ``shape`` read by a MatMul (its second input; transposed or not)."""
    return shape[-1] if consumer.get_attributes()["transpose_b"] else shape[-2]


def _reconstruction_snr(constant, steps, want: np.ndarray) -> float:
    """10 log10(weight variance / mean squared error) of a compressed constant decompressed through
    ``steps`` against its float32 original ``want`` (flat), ``WEIGHT_CHUNK`` elements at a time;
    NaN where a decompressed value is not finite."""
    operands = {op.get_friendly_name(): _operand(op.input_value(port).get_node()) for op, port in steps
                if op.get_type_name() in ("Subtract", "Multiply")}
    rows = constant.get_output_shape(0)[0]
    inner, step = want.size // rows, max(1, WEIGHT_CHUNK * rows // want.size)
    noise = total = square = 0.0
    for start in range(0, rows, step):
        chunk = slice(start, min(start + step, rows))
        got = _decompressed(constant, steps, chunk, operands).astype(np.float64)
        if not np.isfinite(got).all():
            return math.nan
        ref = want[chunk.start * inner : chunk.stop * inner].astype(np.float64)
        noise, total, square = noise + np.square(got - ref).sum(), total + ref.sum(), square + np.square(ref).sum()
    variance = square / want.size - (total / want.size) ** 2
    if noise == 0 or variance <= 0:  # exact; or a constant matrix, where any error is too much
        return math.inf if noise == 0 else -math.inf
    return 10 * math.log10(variance / (noise / want.size))


def weight_check(core, float_graph: Path, ir_graph: Path, scheme: Scheme, spec) -> dict:
    """Every compressed weight of ``ir_graph`` against its float32 original in ``float_graph`` (the
    constant its consumer reads there), one at a time: its reconstruction SNR must reach the scheme's
    noise model for its fan-in (the token embedding: the model's embedding term) less
    ``WEIGHT_MARGIN_DB``, or the folder is refused. Both graphs are memory-mapped, so this allocates
    one chunk's buffers at a time."""
    floats, ir = core.read_model(str(float_graph)), core.read_model(str(ir_graph))
    by_name = {op.get_friendly_name(): op for op in floats.get_ops()}
    worst, checked = None, 0
    for kind, constant in _compressed_weights(ir):
        steps, target = _decompression(constant)
        consumer, name = target.get_node(), constant.get_friendly_name()
        original = by_name.get(consumer.get_friendly_name())
        source = original.input_value(target.get_index()).get_node() if original is not None else None
        if source is None or source.get_type_name() != "Constant":
            raise QuantizeError(f"{ir_graph.name}: {name} has no float32 constant in {float_graph.name} "
                                "to check against")
        model = (scheme.noise(spec)["embedding"] if consumer.get_type_name() == "Gather"
                 else scheme.matmul_noise(_fan_in(consumer, tuple(source.get_output_shape(0))))[0])
        floor = -10 * math.log10(model) - WEIGHT_MARGIN_DB
        snr = _reconstruction_snr(constant, steps, source.data.reshape(-1))  # a view of the mapped float weight
        if not snr >= floor:  # NaN: not finite
            raise QuantizeError(f"{ir_graph.name}: {name} ({kind}) reconstructs at {snr:.1f} dB, below the scheme's "
                                f"per-weight floor {floor:.1f} dB; nothing written")
        checked += 1
        if worst is None or snr - floor < worst["snr_db"] - worst["floor_db"]:
            worst = {"weight": name, "snr_db": round(snr, 2), "floor_db": round(floor, 2)}
    if not checked:
        raise QuantizeError(f"{ir_graph.name} holds no compressed weight to check")
    return {"weights": checked, "worst": worst, "margin_db": WEIGHT_MARGIN_DB}


def _float_source(model_dir: Path, scheme: Scheme):
    """The exported folder, opened and verified; refused unless a float32, unquantized export."""
    if not isinstance(scheme, (OvInt8, OvInt4)):
        raise QuantizeError(f"{scheme.name} is not an OpenVINO scheme")
    return float_export(model_dir, scheme.name)


def _check_plan(model, scheme: Scheme, budget: int | None, log) -> dict:
    """Which self-check the folder gets: ``decoder`` where the whole-decoder check's memory
    (``decoder_check_bytes``) is within ``budget`` (default: ``FIT_FRACTION`` of the memory available
    now), else ``weights``. A calibrated ``ov-int4`` runs the float decoder to calibrate, and AWQ
    moves scale between weights (so no weight matches its original alone): beyond the budget it is
    refused before any work."""
    needs = decoder_check_bytes(model)
    budget = int(FIT_FRACTION * available_memory()) if budget is None else budget
    kind = "decoder" if needs <= budget else "weights"
    if kind == "weights" and isinstance(scheme, OvInt4) and scheme.calibrated:
        raise QuantizeError(f"{scheme.name} with awq or scale_estimation calibrates on the float32 decoder (about "
                            f"{needs / 2**30:.1f} GiB with the whole-decoder check), beyond this machine's budget of "
                            f"{budget / 2**30:.1f} GiB; convert without them (data-free), or where the decoder fits")
    log(f"self-check: {kind} (the whole-decoder check needs {needs / 2**30:.2f} GiB, budget {budget / 2**30:.2f} GiB)")
    return {"kind": kind, "decoder_check_bytes": needs, "budget_bytes": budget}


def quantize_exported(model_dir: Path, scheme: Scheme, out: Path, calib=None, calib_size: int = 64, log=print,
                      check_budget: int | None = None) -> Path:
    """Float32 exported folder -> an OpenVINO IR folder with ``scheme``'s weights at ``out``. ``calib``: JSONL
    of {instruction, source, edited} for a calibrated ``ov-int4`` (default: ``calib_size`` synthetic triples).
    ``check_budget``: bytes the whole-decoder self-check may take (default: from the available memory)."""
    import openvino as ov

    from .trt_schemes import record_windows

    model, model_dir, out = _float_source(Path(model_dir), scheme), Path(model_dir), Path(out)
    plan = _check_plan(model, scheme, check_budget, log)
    decoder = model.graph_path("decoder")
    source = {"model_dir": str(model_dir.resolve()), "decoder_sha256": model.manifest["files"][decoder.name]}
    compressed = ["decoder"] + (["vision"] if scheme.include_vision else [])
    dataset, calibration = _calibration(model_dir, scheme, calib, calib_size, log)
    core = ov.Core()
    with staged_output(out, source) as tmp:
        for name in model.manifest["files"]:
            if name.split(".")[0] not in model.manifest["graphs"]:  # a graph and its external data become IR
                shutil.copy2(model.root / name, tmp / name)
        graphs, constants = {}, {}
        for name, graph in model.manifest["graphs"].items():
            log(f"converting {name} to OpenVINO IR" + (f", {scheme.name} weights" if name in compressed else ""))
            options = _nncf_options(scheme) if name in compressed else None
            constants[name] = _convert_graph(core, model.graph_path(name), tmp / f"{name}.xml", options,
                                             dataset if name == "decoder" else None)
            graphs[name] = {**graph, "file": f"{name}.xml"}
        dropped = ("format", "manifest_version", "files", "validation")  # validation was of the float graphs
        manifest = {**{k: v for k, v in model.manifest.items() if k not in dropped}, "runtime": "openvino", "graphs": graphs}
        quantization = manifest["quantization"] = {
            **scheme.to_dict(), "source": source, "graphs": compressed,
            "compressed_constants": {g: constants[g] for g in compressed},
            "tools": {"openvino": ov.get_version(), "nncf": _nncf_version()},
            **({"calibration": calibration} if calibration else {})}
        if plan["kind"] == "decoder":
            log("checking the compressed decoder against the float one on validation windows")
            feeds = record_windows(model_dir, synthetic_triples(CHECK_TRIPLES, seed=CHECK_SEED), limit=CHECK_WINDOWS)
            floor = hidden_snr_floor_db(quantization, model.spec)
            check = self_check(core, decoder, tmp / "decoder.xml", feeds, floor)
        else:
            log("checking every compressed weight against its float32 original")
            check = {"graphs": {g: weight_check(core, model.graph_path(g), tmp / f"{g}.xml", scheme, model.spec)
                                for g in compressed}}
        quantization["check"] = {**plan, **check}
        log(f"      {quantization['check']}")
        write_manifest(tmp, manifest)
    log(f"wrote {out}")
    return out


def _nncf_version() -> str:
    import nncf

    return nncf.__version__


def quantize(request: QuantizeRequest) -> Path:
    """Registry entry of ``ov-int8`` and ``ov-int4``: an exported float32 folder -> an OpenVINO IR one."""
    return quantize_exported(Path(request.source), request.scheme, Path(request.out), calib=request.calib,
                             calib_size=request.calib_size)
