"""Just enough of the ONNX protobuf wire format to write a small helper model, so that a backend
can build a helper graph with onnxruntime alone (the ``onnx`` package is an export-time
dependency). Field numbers are those of ``onnx.proto3``; the bytes equal what ``onnx.helper``
serialises for the same model with ``ir_version=8`` (tested; onnxruntime 1.18 and later read IR 8)."""

from __future__ import annotations

FLOAT, INT64, FLOAT16 = 1, 7, 10  # TensorProto.DataType
_ATTRIBUTE_INT = 2  # AttributeProto.AttributeType.INT
IR_VERSION = 8


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative ints are encoded as their 64-bit two's complement
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, payload: bytes | str) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else payload
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def node(op_type: str, inputs: list[str], outputs: list[str], **int_attributes: int) -> bytes:
    """NodeProto: input (1), output (2), op_type (4), attribute (5: name 1, i 3, type 20)."""
    out = b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs) + _bytes(4, op_type)
    for name, value in int_attributes.items():
        out += _bytes(5, _bytes(1, name) + _int(3, value) + _int(20, _ATTRIBUTE_INT))
    return out


def value_info(name: str, elem_type: int, shape: list) -> bytes:
    """ValueInfoProto: name (1), type (2) -> tensor_type (1) -> elem_type (1), shape (2) -> dim (1):
    dim_value (1) for an int, dim_param (2) for a named axis."""
    dims = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, _int(1, elem_type) + _bytes(2, dims)))


def model(nodes: bytes | list[bytes], graph_name: str, inputs: list[bytes], outputs: list[bytes], opset: int) -> bytes:
    """ModelProto: ir_version (1), graph (7: node 1, name 2, input 11, output 12), opset_import (8: domain 1, version 2).
    ``nodes``: one node or a list, in topological order."""
    nodes = [nodes] if isinstance(nodes, bytes) else nodes
    graph = b"".join(_bytes(1, n) for n in nodes) + _bytes(2, graph_name) + b"".join(_bytes(11, i) for i in inputs) \
        + b"".join(_bytes(12, o) for o in outputs)
    return _int(1, IR_VERSION) + _bytes(7, graph) + _bytes(8, _bytes(1, "") + _int(2, opset))
