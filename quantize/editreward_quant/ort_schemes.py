"""ONNX Runtime schemes: rewrite the decoder graph (and the vision graph if opted in) of an
exported model folder; the result is a new exported model folder the same backend loads.

Two passes per graph: ONNX Runtime's own quantizers turn the weight MatMuls into int8
(``MatMulInteger`` via dynamic quantization, or ``MatMulNBits``) or int4 (``MatMulNBits``);
then the token-embedding ``Gather`` (544M of the 7B's 7.1B decoder parameters) becomes a
quantized lookup, with ``embedding_bits`` bits:

- 8 (every scheme's default): an int8 table with one float scale per row, read with plain ONNX
  ops (``Gather`` -> ``Cast`` -> ``Mul``), which every execution provider implements;
- 4 (``ort-int4`` on request): ``com.microsoft.GatherBlockQuantized`` over a packed uint8 table
  with the scheme's block size (ONNX Runtime has it on the CPU and CUDA providers).

Without the second pass the float32 table alone would be 0.15x of the whole decoder in bf16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from editreward_rt.manifest import EXTERNAL_DATA_BYTES, MANIFEST, open_exported, write_manifest
from editreward_rt.schemes import OrtInt4, OrtInt8, QuantizeError, QuantizeRequest, Scheme

from .embedding import blockwise_uint4, rowwise_int8, table_bits
from .output import staged_output

# ONNX Runtime's quantizers handle the weight MatMuls; the embedding Gather gets its own pass
# (below), and norms, biases and rotary math stay float.
OP_TYPES = ("MatMul",)


def _bits(scheme: Scheme) -> int:
    return 8 if isinstance(scheme, OrtInt8) else 4


def _quantize_matmuls(src: Path, dst: Path, scheme: Scheme) -> None:
    import onnx

    large = _stored_bytes(src) > EXTERNAL_DATA_BYTES
    if isinstance(scheme, OrtInt8) and scheme.mode == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        weights = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[scheme.weight_type]
        quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=weights,
                         op_types_to_quantize=list(OP_TYPES), use_external_data_format=large,
                         extra_options={"MatMulConstBOnly": True})
        return
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    bits = _bits(scheme)
    config = DefaultWeightOnlyQuantConfig(
        block_size=scheme.block_size, is_symmetric=getattr(scheme, "symmetric", True),
        accuracy_level=getattr(scheme, "accuracy_level", 0), op_types_to_quantize=OP_TYPES, bits=bits)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config, bits=bits, block_size=scheme.block_size,
                                     is_symmetric=getattr(scheme, "symmetric", True))
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=large)


def _quantize_graph(src: Path, dst: Path, scheme: Scheme) -> dict:
    """Quantize one graph from ``src`` into ``dst`` (plus ``dst.data`` when over 2 GB); returns
    what was done to the embedding, for the manifest."""
    import onnx

    stage = dst.parent / f".{dst.stem}-matmuls"
    stage.mkdir()
    try:
        _quantize_matmuls(src, stage / dst.name, scheme)
        model = onnx.load(str(stage / dst.name))
        embedding = quantize_embeddings(model, scheme.embedding_bits, scheme.block_size) if scheme.embedding_bits else []
        large = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
        onnx.save_model(model, str(dst), save_as_external_data=large, all_tensors_to_one_file=True,
                        location=dst.name + ".data", size_threshold=1024)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    onnx.checker.check_model(str(dst))
    return {"tables": embedding}


def _embedding_gathers(model) -> list:
    """``Gather`` nodes on axis 0 of a 2-D float32 initializer: token-embedding lookups."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        table = inits[node.input[0]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if axis == 0 and len(table.dims) == 2 and table.data_type == TensorProto.FLOAT:
            found.append(node)
    return found


def quantize_embeddings(model, bits: int, block_size: int) -> list[dict]:
    """Rewrite every embedding ``Gather`` of ``model`` (in place) into a quantized lookup with the
    same output, in the layouts of ``editreward_quant.embedding``. Returns what each table became."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done = []
    for node in _embedding_gathers(model):
        name = node.input[0]
        table = numpy_helper.to_array(inits[name]).astype(np.float32)
        bits_here = table_bits(table.shape[1], bits)
        if bits_here == 8:
            data, scales = rowwise_int8(table)
            new_inits = [numpy_helper.from_array(data, f"{name}_int8"), numpy_helper.from_array(scales, f"{name}_scale")]
            row_scale, values = f"{name}_row_scale", f"{name}_values"
            nodes = [
                helper.make_node("Gather", [f"{name}_int8", node.input[1]], [f"{name}_rows"], name=f"{node.name}_int8", axis=0),
                helper.make_node("Gather", [f"{name}_scale", node.input[1]], [row_scale], name=f"{node.name}_scale", axis=0),
                helper.make_node("Cast", [f"{name}_rows"], [values], name=f"{node.name}_cast", to=onnx.TensorProto.FLOAT),
                helper.make_node("Mul", [values, row_scale], list(node.output), name=f"{node.name}_dequantize"),
            ]
        else:
            data, scales = blockwise_uint4(table, block_size)
            new_inits = [numpy_helper.from_array(data, f"{name}_q4"), numpy_helper.from_array(scales, f"{name}_scales")]
            nodes = [helper.make_node("GatherBlockQuantized", [f"{name}_q4", node.input[1], f"{name}_scales"], list(node.output),
                                      name=f"{node.name}_q4", domain="com.microsoft", bits=4, block_size=block_size,
                                      gather_axis=0, quantize_axis=1)]
        graph_nodes = list(model.graph.node)
        users = [n for n in graph_nodes if name in n.input and n is not node]
        if users:
            raise QuantizeError(f"the embedding table {name} is also read by {users[0].name}; not quantizing a shared table")
        position = graph_nodes.index(node)
        del model.graph.node[:]
        model.graph.node.extend(graph_nodes[:position] + nodes + graph_nodes[position + 1:])
        model.graph.initializer.remove(inits[name])
        model.graph.initializer.extend(new_inits)
        done.append({"table": name, "shape": list(table.shape), "bits": bits_here,
                     "block_size": block_size if bits_here == 4 else table.shape[1]})
    if any(t["bits"] == 4 for t in done) and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


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
            if name.split(".")[0] not in graphs:  # a rewritten graph's external data is not copied either
                shutil.copy2(model.root / name, tmp / name)
        embedding = {}
        for name in graphs:
            log(f"quantizing {name}.onnx with {scheme.name}")
            embedding[name] = _quantize_graph(model.graph_path(name), tmp / f"{name}.onnx", scheme)
        manifest = {k: v for k, v in model.manifest.items() if k not in ("format", "manifest_version", "files", "validation")}
        manifest["quantization"] = {**scheme.to_dict(), "source": source, "graphs": graphs, "embedding": embedding}
        write_manifest(tmp, manifest)
    log(f"wrote {out}")
    return out


def quantize(request: QuantizeRequest) -> Path:
    """Registry entry of ``ort-int8`` and ``ort-int4``: an exported float32 folder -> a quantized one."""
    return quantize_exported(Path(request.source), request.scheme, Path(request.out))


def _initializer_bytes(tensor) -> int:
    from onnx import TensorProto

    if tensor.data_location == TensorProto.EXTERNAL:
        entries = {e.key: e.value for e in tensor.external_data}
        if "length" in entries:
            return int(entries["length"])
        import onnx.helper

        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize
    return len(tensor.raw_data) or tensor.ByteSize()


def _stored_bytes(path: Path) -> int:
    import onnx

    return sum(_initializer_bytes(t) for t in onnx.load(str(path), load_external_data=False).graph.initializer)


def weight_bytes(model_dir: Path, graphs=("decoder",)) -> int:
    """Bytes of initializers (weights) in the named graphs, as stored (inline or external data)."""
    return sum(_stored_bytes(Path(model_dir) / f"{name}.onnx") for name in graphs)


def describe(out: Path) -> dict:
    return json.loads((Path(out) / MANIFEST).read_text())["quantization"]
