"""A quantized token embedding for the torch backend, the counterpart of the ONNX schemes'
quantized ``Gather``: the table is stored as symmetric int8 rows (one float scale per row) or
4-bit codes packed two per byte, low nibble first, with one float scale per ``block_size``
columns of a row (the last block of a row may be short). A lookup dequantizes only the rows
asked for, so the table stays at 1 or 0.5 byte per weight in memory.

The quantize tool fills it (``editreward_quant.embedding``); the runtime rebuilds an empty one
from the manifest and loads the saved buffers.
"""

from __future__ import annotations

import torch
from torch import nn


class QuantizedEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, block_size: int, dtype=torch.float32):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"a quantized embedding has 4 or 8 bits, not {bits}")
        if bits == 4 and embedding_dim % 2:
            raise ValueError("4-bit packing needs an even embedding width")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.block_size, self.dtype = bits, (block_size if bits == 4 else embedding_dim), dtype
        width = embedding_dim if bits == 8 else embedding_dim // 2
        blocks = -(-embedding_dim // self.block_size)
        self.register_buffer("qweight", torch.zeros(num_embeddings, width, dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer("scales", torch.ones(num_embeddings, blocks, dtype=torch.float32))

    def forward(self, input_ids):
        rows, scales = self.qweight[input_ids], self.scales[input_ids]
        if self.bits == 8:
            return (rows.float() * scales).to(self.dtype)
        codes = torch.stack((rows & 15, rows >> 4), dim=-1).flatten(-2).float() - 8.0
        scale = scales.repeat_interleave(self.block_size, dim=-1)[..., : self.embedding_dim]
        return (codes * scale).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, block_size={self.block_size}"


def swap_empty_embedding(decoder, config: dict | None, dtype) -> None:
    """Before loading a quantized folder's state: put an empty quantized table of the recorded
    format where the decoder's float embedding is (nothing when the folder kept it float)."""
    if not config:
        return
    table = decoder.token_embedding()
    decoder.set_token_embedding(QuantizedEmbedding(table.num_embeddings, table.embedding_dim, config["bits"],
                                                   config["block_size"], dtype))
