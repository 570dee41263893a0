"""Symmetric round-to-nearest quantization of a token-embedding table, shared by the ONNX
schemes (a rewritten ``Gather``) and the torch schemes (``editreward_quant.layers.embedding``).

A lookup is not a matrix product, so there is nothing for GPTQ or activation-aware methods to
calibrate: every scheme quantizes its embedding this way. The tables use the same layouts as
ONNX Runtime's ``GatherBlockQuantized`` with uint8 data: int8 rows with a float scale each, or
4-bit codes in [-8, 7] stored with offset 8, two per byte, low nibble first, with a float scale
per ``block_size`` columns (the last block of a row may be short). A table of odd width, which
4-bit packing cannot hold exactly, gets 8 bits.
"""

from __future__ import annotations

import numpy as np
from editreward_rt.schemes import QuantizeError


def table_bits(width: int, bits: int) -> int:
    if bits not in (4, 8):
        raise QuantizeError(f"embedding quantization takes 4 or 8 bits, not {bits}")
    return 8 if width % 2 else bits


def rowwise_int8(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes [V, H] and float32 scales [V, 1]."""
    table = np.asarray(table, np.float32)
    scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(table / scale), -127, 127).astype(np.int8), scale


def blockwise_uint4(table: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed uint8 codes [V, H/2] and float32 scales [V, ceil(H / block_size)]; H must be even."""
    table = np.asarray(table, np.float32)
    rows, cols = table.shape
    assert cols % 2 == 0, cols
    blocks = -(-cols // block_size)
    padded = np.zeros((rows, blocks * block_size), np.float32)
    padded[:, :cols] = table
    grouped = padded.reshape(rows, blocks, block_size)
    scale = np.abs(grouped).max(axis=2, keepdims=True) / 7.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = (np.clip(np.rint(grouped / scale), -8, 7) + 8).astype(np.uint8).reshape(rows, -1)[:, :cols]
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed, scale.reshape(rows, blocks)


def quantize_torch_embedding(decoder, bits: int, block_size: int) -> dict | None:
    """Replace the decoder's token embedding (a float ``nn.Embedding``) by a filled
    ``QuantizedEmbedding``; returns the format for the manifest (None for ``bits`` 0)."""
    if not bits:
        return None
    import torch

    from .layers.embedding import QuantizedEmbedding

    float_table = decoder.token_embedding()
    table = float_table.weight.detach().float().cpu().numpy()
    bits = table_bits(table.shape[1], bits)
    data, scales = rowwise_int8(table) if bits == 8 else blockwise_uint4(table, block_size)
    device, dtype = float_table.weight.device, float_table.weight.dtype
    module = QuantizedEmbedding(table.shape[0], table.shape[1], bits, block_size, dtype)
    module.qweight.copy_(torch.from_numpy(data))
    module.scales.copy_(torch.from_numpy(scales))
    decoder.set_token_embedding(module.to(device))
    return {"bits": bits, "block_size": module.block_size, "shape": list(table.shape)}
