"""Export a graph without holding its weights: trace it over placeholder parameters (no weight
memory), then stream the real tensors from the checkpoint into the ONNX file, one at a time.

The same idea as ONNX Runtime GenAI's model builder, which writes each weight as it reads it from
the Hugging Face files, but with the graph still traced from this project's torch modules, so the
ops are those the fast path was validated with. Peak memory is one tensor plus the small graph.

- ``trace``: ``torch.onnx.export`` with ``export_params=False``: every parameter becomes a graph
  input named after it. Constant folding is off, because it would fold ``Transpose(weight)`` into
  an anonymous input whose origin is lost; the pass below folds those transposes itself.
- ``attach_weights``: each parameter input becomes an initializer filled from the checkpoint
  (inline below 2 GB, else in ``<graph>.onnx.data``, each tensor page-aligned so ONNX Runtime can
  memory-map it); layout ops applied to a weight (``Transpose``, ``Flatten``) are folded into a
  transformed copy, so every MatMul's weight is an initializer, as the quantizers need.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from editreward_rt.errors import ExportError
from editreward_rt.families import GraphSpec

ALIGN = 4096  # ONNX Runtime memory-maps external data whose offset is a multiple of the page size


def _onnx_type(dtype) -> int:
    import torch
    from onnx import TensorProto

    types = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
             torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32, torch.uint8: TensorProto.UINT8,
             torch.int8: TensorProto.INT8}
    if dtype not in types:
        raise ExportError(f"no ONNX type for {dtype}")
    return types[dtype]


def as_bytes(tensor) -> np.ndarray:
    """A CPU tensor's data as a flat uint8 array (bfloat16 has no numpy dtype; its bits are copied)."""
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.view(torch.int16)
    return tensor.numpy().reshape(-1).view(np.uint8)


class DataWriter:
    """Tensors appended to one external-data file at page-aligned offsets."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0
        self.file = open(path, "wb")
        self.written: list[tuple[str, int, int, bytes, bytes]] = []  # name, offset, length, first and last 64 bytes

    def add(self, name: str, data: np.ndarray, dims, data_type: int):
        """Write ``data`` (flat uint8) and return its external ``TensorProto``."""
        from onnx import TensorProto

        self.offset = -(-self.offset // ALIGN) * ALIGN
        self.file.seek(self.offset)
        self.file.write(memoryview(data))
        tensor = TensorProto(name=name, dims=list(dims), data_type=data_type, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(data.nbytes))):
            tensor.external_data.add(key=key, value=value)
        self.written.append((name, self.offset, data.nbytes, bytes(data[:64]), bytes(data[-64:])))
        self.offset += data.nbytes
        return tensor

    def close(self) -> int:
        """Close, then read every tensor's first and last bytes back: offsets and lengths hold."""
        self.file.close()
        stored = np.memmap(self.path, dtype=np.uint8, mode="r") if self.written else []
        for name, offset, length, head, tail in self.written:
            if bytes(stored[offset:offset + len(head)]) != head or bytes(stored[offset + length - len(tail):offset + length]) != tail:
                raise ExportError(f"{self.path.name}: {name} reads back different bytes at offset {offset}")
        return len(self.written)


def trace(module, args, gspec: GraphSpec, path: Path, opset: int) -> int:
    """Trace ``module`` into ``path`` with its parameters as graph inputs (no weights written),
    constants folded (``fold_constants``); -> how many nodes were folded."""
    import onnx
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, export_params=False,
                          input_names=gspec.input_names, output_names=gspec.output_names,
                          dynamic_axes=gspec.dynamic_axes(), do_constant_folding=False)
    model = onnx.load(str(path))
    folded = fold_constants(model)
    onnx.save(model, str(path))
    return folded


FOLD_LIMIT = 1 << 20  # bytes: larger constant results (none in these graphs) stay computed
UNFOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def fold_constants(model) -> int:
    """Evaluate (with ONNX's reference evaluator) every node whose inputs are all constants and
    replace it by a ``Constant``, as the exporter's own folding would: shape arithmetic, axes,
    masks of fixed size. TensorRT's parser needs some of these constant (Slice axes, for one).
    Weights are graph inputs at this point, so nothing here touches them."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph, values, nodes, folded = model.graph, {}, [], 0
    opsets = list(model.opset_import)
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant" or (inputs and all(i in values for i in inputs) and node.domain in ("", "ai.onnx")
                                          and node.op_type not in UNFOLDABLE and not any(a.g.node or a.graphs for a in node.attribute)):
            single = helper.make_model(helper.make_graph(
                [node], "fold", [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(values[i].dtype), values[i].shape)
                                 for i in dict.fromkeys(inputs)],
                [helper.make_tensor_value_info(o, 0, None) for o in node.output]), opset_imports=opsets)
            results = ReferenceEvaluator(single).run(None, {i: values[i] for i in inputs})
            if all(np.asarray(r).nbytes <= FOLD_LIMIT for r in results):
                for name, result in zip(node.output, results):
                    values[name] = np.asarray(result)
                    nodes.append(helper.make_node("Constant", [], [name], name=f"{node.name or name}_folded",
                                                  value=numpy_helper.from_array(values[name], name)))
                folded += node.op_type != "Constant"
                continue
        nodes.append(node)
    read = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(n for n in nodes if n.op_type != "Constant" or n.output[0] in read)
    return folded


def _fold(node, tensor):
    """``node`` applied to the constant ``tensor`` if it is a layout op that folds (Transpose,
    Flatten), else None."""
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Transpose":
        perm = list(attrs["perm"].ints) if "perm" in attrs else list(range(tensor.dim()))[::-1]
        return tensor.permute(perm).contiguous()
    if node.op_type == "Flatten":
        axis = attrs["axis"].i if "axis" in attrs else 1
        axis = axis + tensor.dim() if axis < 0 else axis
        return tensor.reshape(int(np.prod(tensor.shape[:axis], dtype=np.int64)), -1)
    return None


def _fold_chain(name: str, tensor, readers: dict) -> tuple[list, object]:
    """The layout ops applied to ``name`` (each the only reader of the last) and their result."""
    chain, value = [], name
    while len(readers.get(value, [])) == 1:
        folded = _fold(readers[value][0], tensor)
        if folded is None:
            break
        chain.append(readers[value][0])
        tensor, value = folded, readers[value][0].output[0]
    return chain, tensor


@dataclass
class Attached:
    tensors: int
    bytes: int
    folded_transposes: int


def attach_weights(path: Path, graph_inputs: int, fetch: Callable[[str], "object"], external: bool) -> Attached:
    """Turn the parameter inputs of the traced graph at ``path`` (every input after the first
    ``graph_inputs``) into initializers: ``fetch(name)`` returns the tensor (torch, the parameter's
    shape and dtype), called once per parameter, so one tensor is in memory at a time."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path))
    graph = model.graph
    params = {i.name: i for i in graph.input[graph_inputs:]}
    readers: dict[str, list] = {name: [] for name in params}  # value -> the nodes that read it
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    writer = DataWriter(path.with_name(path.name + ".data")) if external else None
    initializers, folded, total = [], [], 0

    def emit(name: str, tensor) -> None:
        nonlocal total
        data = as_bytes(tensor)
        data_type = _onnx_type(tensor.dtype)
        if writer is not None:
            initializers.append(writer.add(name, data, tensor.shape, data_type))
        else:
            initializers.append(TensorProto(name=name, dims=list(tensor.shape), data_type=data_type, raw_data=data.tobytes()))
        total += data.nbytes

    for name, value in params.items():
        tensor = fetch(name)
        expected = tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
        if tuple(tensor.shape) != expected or _onnx_type(tensor.dtype) != value.type.tensor_type.elem_type:
            raise ExportError(f"{path.name}: {name} is {tuple(tensor.shape)} {tensor.dtype}, the graph expects {expected}")
        unfolded = not readers[name]
        for i, node in enumerate(readers[name]):
            first = _fold(node, tensor)
            if first is None:
                unfolded = True
                continue
            chain, result = _fold_chain(node.output[0], first, readers)
            chain = [node, *chain]
            folded_name = f"{name}.{'.'.join(n.op_type for n in chain)}{i or ''}"
            emit(folded_name, result)
            _rename_input(graph, chain[-1].output[0], folded_name)
            folded.extend(chain)
        if unfolded:
            emit(name, tensor)
        del tensor
    if writer is not None:
        writer.close()
    for node in folded:
        graph.node.remove(node)
    del graph.input[graph_inputs:]
    graph.initializer.extend(initializers)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return Attached(len(initializers), total, len(folded))


def _rename_input(graph, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


class InitializerReader:
    """Arrays of a graph's initializers, inline or in external data (memory-mapped, then copied)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def array(self, tensor, rows: slice = slice(None)) -> np.ndarray:
        """The tensor (or ``rows`` of its first axis), read with plain file reads: a memory map would
        count every page it touched as resident until it is dropped."""
        from onnx import TensorProto, helper, numpy_helper

        if tensor.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)[rows]
        info = {e.key: e.value for e in tensor.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        dims = tuple(tensor.dims)
        start, stop, _ = rows.indices(dims[0] if dims else 1)
        row = int(np.prod(dims[1:], dtype=np.int64)) * dtype.itemsize
        path = self.folder / info["location"]
        if path.resolve().parent != self.folder.resolve():
            raise ExportError(f"{tensor.name}: external data {info['location']!r} is outside {self.folder}")
        with open(path, "rb") as f:
            f.seek(int(info.get("offset", 0)) + start * row)
            data = np.fromfile(f, dtype=dtype, count=(stop - start) * row // dtype.itemsize)
        return data.reshape((stop - start, *dims[1:]) if dims else ())

    def row_chunks(self, tensor, rows: int):
        """The tensor in chunks of ``rows`` along its first axis."""
        for start in range(0, tensor.dims[0], rows):
            yield self.array(tensor, slice(start, start + rows))


class TensorSink:
    """Initializers for a graph being rewritten: into a ``DataWriter`` (external data) or inline."""

    def __init__(self, writer: DataWriter | None):
        self.writer, self.tensors, self.names = writer, [], set()

    def add(self, name: str, array: np.ndarray, data_type: int) -> None:
        from onnx import TensorProto

        if name in self.names:
            raise ExportError(f"two initializers named {name}")
        self.names.add(name)
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if self.writer is not None:
            self.tensors.append(self.writer.add(name, data, array.shape, data_type))
        else:
            self.tensors.append(TensorProto(name=name, dims=list(array.shape), data_type=data_type, raw_data=data.tobytes()))

    def close(self) -> list:
        if self.writer is not None:
            self.writer.close()
        return self.tensors
