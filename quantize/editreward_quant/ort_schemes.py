"""ONNX Runtime schemes: rewrite the decoder graph (and the vision graph if opted in) of an
exported model folder; the result is a new exported model folder the same backend loads.

ONNX Runtime's own quantizers turn the weight MatMuls into int8 (``MatMulInteger`` via dynamic
quantization, or ``MatMulNBits``) or int4 (``MatMulNBits``), and the token-embedding ``Gather``
(544M of the 7B's 7.1B decoder parameters) becomes a quantized lookup. A graph is rewritten one
weight group at a time (the MatMuls that read one input: q/k/v, gate/up, ...): the group alone
goes through the quantizer as a small model, its nodes are spliced back and its new initializers
streamed out, so memory holds one layer's weights, not the model (a 7B's float32 decoder is 28 GB).
The embedding lookup gets ``embedding_bits`` bits:

- 8 (every scheme's default): an int8 table with one float scale per row, read with plain ONNX
  ops (``Gather`` -> ``Cast`` -> ``Mul``), which every execution provider implements;
- 4 (``ort-int4`` on request): ``com.microsoft.GatherBlockQuantized`` over a packed uint8 table
  with the scheme's block size (ONNX Runtime has it on the CPU and CUDA providers).

Without the second pass the float32 table alone would be 0.15x of the whole decoder in bf16.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from editreward_export.streaming import DataWriter, InitializerReader, TensorSink
from editreward_rt.manifest import EXTERNAL_DATA_BYTES, write_manifest
from editreward_rt.schemes import OrtInt4, OrtInt8, QuantizeError, QuantizeRequest, Scheme

from .embedding import blockwise_uint4, rowwise_int8, table_bits
from .output import float_export, staged_output

# ONNX Runtime's quantizers handle the weight MatMuls; the embedding Gather gets its own pass
# (below), and norms, biases and rotary math stay float.
OP_TYPES = ("MatMul",)


def _bits(scheme: Scheme) -> int:
    return 8 if isinstance(scheme, OrtInt8) else 4


def _quantize_group(sub, scheme: Scheme):
    """ONNX Runtime's own quantizer on ``sub``, a small model of the weight MatMuls that read one
    input; -> the quantized model proto."""
    if isinstance(scheme, OrtInt8) and scheme.mode == "dynamic":
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        weights = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[scheme.weight_type]
        with tempfile.TemporaryDirectory(prefix="editreward-q8-") as tmp:
            quantize_dynamic(sub, Path(tmp) / "q.onnx", per_channel=True, weight_type=weights, reduce_range=scheme.reduce_range,
                             op_types_to_quantize=list(OP_TYPES), extra_options={"MatMulConstBOnly": True})
            return onnx.load(str(Path(tmp) / "q.onnx"))
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    bits = _bits(scheme)
    config = DefaultWeightOnlyQuantConfig(
        block_size=scheme.block_size, is_symmetric=getattr(scheme, "symmetric", True),
        accuracy_level=getattr(scheme, "accuracy_level", 0), op_types_to_quantize=OP_TYPES, bits=bits)
    quantizer = MatMulNBitsQuantizer(sub, algo_config=config, bits=bits, block_size=scheme.block_size,
                                     is_symmetric=getattr(scheme, "symmetric", True))
    quantizer.process()
    return quantizer.model.model


def _plain_gemm(node) -> bool:
    """A ``Gemm`` that is a linear layer: ``A @ op(B) + C`` with unit alpha and beta, A untransposed."""
    attrs = {a.name: a for a in node.attribute}
    return node.op_type == "Gemm" and ("transA" not in attrs or attrs["transA"].i == 0) and \
        all(attrs[k].f == 1.0 for k in ("alpha", "beta") if k in attrs)


def _weight_matmuls(nodes: list, inits: dict) -> dict[str, list]:
    """MatMul nodes (and linear-layer Gemms: the vision tower's, on 2-D activations) whose weight
    (second input) is a 2-D float32 initializer, grouped by their first input: the products one
    quantized activation can feed (q/k/v, gate/up)."""
    from onnx import TensorProto

    groups: dict[str, list] = {}
    for node in nodes:
        if node.op_type not in OP_TYPES and not (node.op_type == "Gemm" and _plain_gemm(node)):
            continue
        weight = inits.get(node.input[1])
        if weight is not None and len(weight.dims) == 2 and weight.data_type == TensorProto.FLOAT:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def _as_matmuls(nodes: list, arrays: dict) -> tuple[list, dict]:
    """The group with each Gemm written as MatMul (+ Add of its bias), its weight transposed to
    [in, out] where ``transB``: the form ONNX Runtime's weight quantizers take (they skip Gemm)."""
    from onnx import helper

    out, weights = [], dict(arrays)
    for node in nodes:
        if node.op_type != "Gemm":
            out.append(node)
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        weight = f"{node.input[1]}.kn" if trans_b else node.input[1]
        weights[weight] = np.ascontiguousarray(weights.pop(node.input[1]).T) if trans_b else weights[node.input[1]]
        product = node.output[0] if len(node.input) < 3 or not node.input[2] else f"{node.output[0]}_matmul"
        out.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}_matmul"))
        if product != node.output[0]:
            out.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
    return out, weights


def _sub_model(model, nodes: list, arrays: dict):
    """A model of ``nodes`` alone: the values they read but neither make nor get in ``arrays`` (the
    initializers) as float graph inputs, the values they make and do not read as graph outputs."""
    from onnx import TensorProto, helper, numpy_helper

    made = {o for n in nodes for o in n.output}
    read = {i for n in nodes for i in n.input if i}
    inputs = sorted(read - made - set(arrays))
    graph = helper.make_graph(
        nodes, "part", [helper.make_tensor_value_info(i, TensorProto.FLOAT, None) for i in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for n in nodes for o in n.output if o not in read],
        [numpy_helper.from_array(a, name) for name, a in arrays.items()])
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _copy(node):
    from onnx import NodeProto

    out = NodeProto()
    out.CopyFrom(node)
    return out


def _quantize_graph(src: Path, dst: Path, scheme: Scheme) -> dict:
    """Quantize one graph from ``src`` into ``dst`` (plus ``dst.data`` when ``src``'s weights are
    over 2 GB), one weight group at a time: no more than a layer's weights are ever in memory, so a 7B
    quantizes in a few GB. Returns what was done to the embedding, for the manifest."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    reader = InitializerReader(src.parent)
    inits = {t.name: t for t in graph.initializer}
    # Quantizing only shrinks a graph: one whose float weights fit inline stays inline.
    large = sum(_initializer_bytes(t) for t in graph.initializer) > EXTERNAL_DATA_BYTES
    writer = DataWriter(dst.with_name(dst.name + ".data")) if large else None
    out = TensorSink(writer)
    replaced: dict[int, list] = {}  # position of a group's first node -> the nodes that replace the group
    dropped, used = set(), set()
    original = list(graph.node)  # one wrapper per node: protobuf makes a new one on each access
    order = {id(n): i for i, n in enumerate(original)}
    for nodes in _weight_matmuls(original, inits).values():
        arrays = {n.input[1]: reader.array(inits[n.input[1]]) for n in nodes}
        biases = {n.input[2] for n in nodes if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] in inits}
        arrays.update({b: reader.array(inits[b]) for b in biases})
        quantized = _quantize_group(_sub_model(model, *_as_matmuls(nodes, arrays)), scheme)
        _splice(quantized, nodes, order, replaced, dropped, out, model)
        used.update({n.input[1] for n in nodes} | biases)
    embedding = []
    if scheme.embedding_bits:
        for node in (original[original.index(g)] for g in _embedding_gathers(model)):
            _check_unshared(original, node)
            table = inits[node.input[0]]
            new_nodes, arrays, record = embedding_lookup(node, reader.row_chunks(table, ROWS_PER_CHUNK), tuple(table.dims),
                                                         scheme.embedding_bits, scheme.embedding_block)
            replaced.setdefault(order[id(node)], []).extend(new_nodes)
            dropped.add(id(node))
            for name, array in arrays.items():
                out.add(name, array, helper.np_dtype_to_tensor_dtype(array.dtype))
            used.add(node.input[0])
            embedding.append(record)
        _need_contrib_domain(model, embedding)
    nodes = []
    for i, node in enumerate(original):
        nodes.extend(replaced.get(i, []))
        if id(node) not in dropped:
            nodes.append(node)
    for tensor in graph.initializer:
        if tensor.name not in used:
            out.add(tensor.name, reader.array(tensor), tensor.data_type)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(out.close())
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst))
    return {"tables": embedding}


def _splice(quantized, nodes: list, order: dict, replaced: dict, dropped: set, out: "TensorSink", model) -> None:
    """Put ``quantized``'s nodes where the first of ``nodes`` was (they read only its input and
    constants), stream its initializers out, and add any operator domain it brought."""
    from onnx import numpy_helper

    first = min(order[id(n)] for n in nodes)
    # Copies: a protobuf sub-message keeps its whole model (weights included) alive.
    replaced.setdefault(first, []).extend(_copy(n) for n in quantized.graph.node)
    dropped.update(id(n) for n in nodes)
    for tensor in quantized.graph.initializer:
        out.add(tensor.name, numpy_helper.to_array(tensor), tensor.data_type)
    have = {o.domain for o in model.opset_import}
    model.opset_import.extend(o for o in quantized.opset_import if o.domain not in have)


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


ROWS_PER_CHUNK = 8192  # embedding rows quantized at a time (a 7B's table is 2.2 GB in float32)


def embedding_lookup(node, table_chunks, shape: tuple[int, int], bits: int, block_size: int):
    """The quantized replacement of embedding ``Gather`` ``node`` over a table of ``shape`` given as
    row chunks (rows quantize independently): -> (nodes, {initializer: array}, manifest record)."""
    import onnx
    from onnx import helper

    name = node.input[0]
    bits_here = table_bits(shape[1], bits)
    quantize = rowwise_int8 if bits_here == 8 else (lambda chunk: blockwise_uint4(chunk, block_size))
    parts = [quantize(np.asarray(chunk, np.float32)) for chunk in table_chunks]
    data, scales = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
    if bits_here == 8:
        arrays = {f"{name}_int8": data, f"{name}_scale": scales}
        row_scale, values = f"{name}_row_scale", f"{name}_values"
        nodes = [
            helper.make_node("Gather", [f"{name}_int8", node.input[1]], [f"{name}_rows"], name=f"{node.name}_int8", axis=0),
            helper.make_node("Gather", [f"{name}_scale", node.input[1]], [row_scale], name=f"{node.name}_scale", axis=0),
            helper.make_node("Cast", [f"{name}_rows"], [values], name=f"{node.name}_cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [values, row_scale], list(node.output), name=f"{node.name}_dequantize"),
        ]
    else:
        arrays = {f"{name}_q4": data, f"{name}_scales": scales}
        nodes = [helper.make_node("GatherBlockQuantized", [f"{name}_q4", node.input[1], f"{name}_scales"], list(node.output),
                                  name=f"{node.name}_q4", domain="com.microsoft", bits=4, block_size=block_size,
                                  gather_axis=0, quantize_axis=1)]
    record = {"table": name, "shape": list(shape), "bits": bits_here, "block_size": block_size if bits_here == 4 else shape[1]}
    return nodes, arrays, record


def _check_unshared(nodes: list, gather) -> None:
    users = [n for n in nodes if gather.input[0] in n.input and n is not gather]
    if users:
        raise QuantizeError(f"the embedding table {gather.input[0]} is also read by {users[0].name}; not quantizing a shared table")


def _need_contrib_domain(model, records: list[dict]) -> None:
    from onnx import helper

    if any(t["bits"] == 4 for t in records) and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def quantize_embeddings(model, bits: int, block_size: int) -> list[dict]:
    """Rewrite every embedding ``Gather`` of the in-memory ``model`` (in place) into a quantized
    lookup with the same output (``embedding_lookup``). Returns what each table became."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done = []
    for node in _embedding_gathers(model):
        graph_nodes = list(model.graph.node)
        node = graph_nodes[graph_nodes.index(node)]
        _check_unshared(graph_nodes, node)
        table = numpy_helper.to_array(inits[node.input[0]])
        nodes, arrays, record = embedding_lookup(node, [table], table.shape, bits, block_size)
        position = graph_nodes.index(node)
        del model.graph.node[:]
        model.graph.node.extend(graph_nodes[:position] + nodes + graph_nodes[position + 1:])
        model.graph.initializer.remove(inits[node.input[0]])
        model.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in arrays.items())
        done.append(record)
    _need_contrib_domain(model, done)
    return done


def quantize_exported(model_dir: Path, scheme: Scheme, out: Path, log=print) -> Path:
    if not isinstance(scheme, (OrtInt8, OrtInt4)):
        raise QuantizeError(f"{scheme.name} does not apply to an exported ONNX folder")
    model = float_export(model_dir, scheme.name)
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

