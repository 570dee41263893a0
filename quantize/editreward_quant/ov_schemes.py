"""OpenVINO schemes (``ov-int8``, ``ov-int4``): an exported float32 folder -> a folder of OpenVINO IR
graphs whose decoder weights NNCF has compressed, read by the openvino backend.

Each graph is read by OpenVINO's ONNX frontend, compressed where the scheme says (the decoder, the
vision tower on request, never the heads), saved as ``NAME.xml`` + ``NAME.bin`` and dropped before
the next graph is read: one graph's float weights and its compressed copy are in memory at a time.
The frontend memory-maps a graph's external data (a 7B decoder's 26 GB), so those float32 pages are
file-backed, reclaimable under pressure; what compression allocates was 0.55-0.65x of the float32
weights on the small fixture (int8 and int4 alike, NNCF's temporaries included). NNCF replaces each
weight constant in place (a low-bit constant, a float16 scale, a decompression subgraph the CPU
plugin fuses into its matmul kernels); ``compress_to_fp16=False`` keeps the float tensors left
(norms, the heads, an uncompressed vision tower) in float32, as exported.

The folder then checks itself: decoder windows of a few synthetic validation triples, recorded from
the float export, run through the float and the compressed decoder on OpenVINO's CPU plugin in
float32; the hidden states' SNR must reach the scheme's floor (``tolerances.hidden_snr_floor_db``),
or nothing is published. The check runs the float decoder (ONNX Runtime, then OpenVINO), so it, not
the compression, sets the peak memory of a full-size conversion.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import numpy as np
from editreward_rt.manifest import open_exported, write_manifest
from editreward_rt.schemes import OvInt4, OvInt8, QuantizeError, QuantizeRequest, Scheme
from editreward_rt.tolerances import hidden_snr_floor_db, snr_db

from .calib import calibration_triples, synthetic_triples
from .output import staged_output

CHECK_TRIPLES = 2  # validation triples (a seed of their own, never the calibration ones)
CHECK_WINDOWS = 4  # decoder windows of 32 tokens each compared in the self-check
CHECK_SEED = 1


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


def compressed_constants(model) -> dict[str, int]:
    """Element type -> number of compressed weight tensors of that type in an ``ov.Model`` (zero
    points aside): one per weight MatMul or embedding lookup NNCF compressed."""
    counts: dict[str, int] = {}
    for op in model.get_ops():
        kind = op.get_element_type().get_type_name() if op.get_type_name() == "Constant" else None
        if kind in LOW_BIT and not _zero_point(op):
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


def _float_source(model_dir: Path, scheme: Scheme):
    """The exported folder, opened and verified; refused unless a float32, unquantized export."""
    if not isinstance(scheme, (OvInt8, OvInt4)):
        raise QuantizeError(f"{scheme.name} is not an OpenVINO scheme")
    model = open_exported(model_dir)
    if model.manifest.get("quantization"):
        raise QuantizeError(f"{model_dir} is already quantized ({model.manifest['quantization']['scheme']}); "
                            "start from a float export")
    if model.manifest.get("precision") != "float32":
        raise QuantizeError(f"{scheme.name} starts from a float32 export; {model_dir} is {model.manifest.get('precision')}")
    return model


def quantize_exported(model_dir: Path, scheme: Scheme, out: Path, calib=None, calib_size: int = 64, log=print) -> Path:
    """Float32 exported folder -> an OpenVINO IR folder with ``scheme``'s weights at ``out``. ``calib``: JSONL
    of {instruction, source, edited} for a calibrated ``ov-int4`` (default: ``calib_size`` synthetic triples)."""
    import openvino as ov

    from .trt_schemes import record_windows

    model, model_dir, out = _float_source(Path(model_dir), scheme), Path(model_dir), Path(out)
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
        log("checking the compressed decoder against the float one on validation windows")
        feeds = record_windows(model_dir, synthetic_triples(CHECK_TRIPLES, seed=CHECK_SEED), limit=CHECK_WINDOWS)
        floor = hidden_snr_floor_db(quantization, model.spec)
        quantization["check"] = self_check(core, decoder, tmp / "decoder.xml", feeds, floor)
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
