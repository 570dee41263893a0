"""ONNX Runtime schemes: rewrite the decoder graph (and the vision graph if opted in) of an
exported model folder; the result is a new exported model folder the same backend loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from editreward_rt.manifest import MANIFEST, open_exported, write_manifest

from .output import staged_output
from .schemes import OrtInt4, OrtInt8, QuantizeError, Scheme

# Only the big matrix multiplications carry weights worth quantizing; the embedding Gather,
# norms and rotary math stay float.
OP_TYPES = ("MatMul",)


def _quantize_graph(src: Path, dst: Path, scheme: Scheme) -> None:
    import onnx

    if isinstance(scheme, OrtInt8) and scheme.mode == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=list(OP_TYPES), extra_options={"MatMulConstBOnly": True})
        return
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    bits = 8 if isinstance(scheme, OrtInt8) else 4
    config = DefaultWeightOnlyQuantConfig(
        block_size=scheme.block_size, is_symmetric=getattr(scheme, "symmetric", True),
        accuracy_level=getattr(scheme, "accuracy_level", 0), op_types_to_quantize=OP_TYPES, bits=bits)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config, bits=bits, block_size=scheme.block_size,
                                     is_symmetric=getattr(scheme, "symmetric", True))
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def quantize_exported(model_dir: Path, scheme: Scheme, out: Path, log=print) -> Path:
    if not isinstance(scheme, (OrtInt8, OrtInt4)):
        raise QuantizeError(f"{scheme.name} does not apply to an exported ONNX folder")
    model = open_exported(model_dir)
    if model.manifest.get("quantization"):
        raise QuantizeError(f"{model_dir} is already quantized ({model.manifest['quantization']['scheme']}); start from a float export")
    if model.manifest.get("precision") != "float32":
        raise QuantizeError(f"{scheme.name} starts from a float32 export; {model_dir} is {model.manifest.get('precision')}")
    source = {"model_dir": str(Path(model_dir).resolve()), "decoder_sha256": model.manifest["files"]["decoder.onnx"]}
    graphs = ["decoder"] + (["vision"] if scheme.include_vision else [])
    with staged_output(out, source) as tmp:
        for name in model.manifest["files"]:
            if Path(name).stem not in graphs:
                shutil.copy2(model.root / name, tmp / name)
        for name in graphs:
            log(f"quantizing {name}.onnx with {scheme.name}")
            _quantize_graph(model.graph_path(name), tmp / f"{name}.onnx", scheme)
        manifest = {k: v for k, v in model.manifest.items() if k not in ("format", "manifest_version", "files", "validation")}
        manifest["quantization"] = {**scheme.to_dict(), "source": source, "graphs": graphs}
        write_manifest(tmp, manifest)
    log(f"wrote {out}")
    return out


def weight_bytes(model_dir: Path, graphs=("decoder",)) -> int:
    """Bytes of initializers (weights) in the named graphs, as stored."""
    import onnx

    total = 0
    for name in graphs:
        graph = onnx.load(str(Path(model_dir) / f"{name}.onnx"), load_external_data=False).graph
        total += sum(len(t.raw_data) or t.ByteSize() for t in graph.initializer)
    return total


def describe(out: Path) -> dict:
    return json.loads((Path(out) / MANIFEST).read_text())["quantization"]
