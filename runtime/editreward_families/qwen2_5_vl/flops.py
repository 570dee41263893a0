"""Matrix-multiply FLOPs of a Qwen2.5-VL EditReward model, from the spec and the tokens actually scored.

Counted: every weight matmul and the two attention matmuls (scores and values), 2 FLOPs per
multiply-add; norms, activations and softmax are left out (a few percent, and not GEMM work).
Attention counts only the pairs a query may see: causal in the decoder, within a window or an
image in the vision tower. Padding is never counted, so the figures are the work the model
needs, whatever a backend executes: the bound a "% of peak" column divides by (``vision``'s
``graph`` flag counts what the exported vision graph executes, its padded windows included).
"""

from __future__ import annotations

import numpy as np


def vision(spec, window_rows: np.ndarray, graph: bool = False) -> float:
    """One vision-graph call on one image, its windows ``window_rows`` [windows, W] (-1: padding).
    ``graph``: what the exported graph executes instead, every window's W x W pairs, padding included."""
    v = spec.vision
    rows = np.asarray(window_rows)
    counts = (rows >= 0).sum(1).astype(np.int64)
    n, h = int(counts.sum()), v.hidden_size
    patch = v.in_channels * v.temporal_patch_size * v.patch_size**2
    total = 2.0 * n * patch * h  # patch embedding
    windowed = rows.size * rows.shape[1] if graph else int((counts**2).sum())
    for block in range(v.depth):
        total += 2.0 * n * (4 * h * h + 3 * h * v.intermediate_size)  # qkv, proj, gated MLP
        total += 4.0 * (n * n if block in v.fullatt_block_indexes else windowed) * h  # scores and values, all heads
    unit = h * v.spatial_merge_size**2
    return total + 2.0 * (n // v.spatial_merge_size**2) * (unit * unit + unit * v.out_hidden_size)


def vision_call(spec, patches, cos, sin, window_rows, window_slots, graph: bool = False) -> float:
    """One vision-graph call, from its inputs (``vision.vision_feeds``' order)."""
    return vision(spec, window_rows, graph)


def decoder_token(spec) -> float:
    """Weight-matmul FLOPs of one token through every decoder layer."""
    t = spec.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    return 2.0 * t.num_layers * (t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size)


def decoder(spec, past: np.ndarray, new: np.ndarray) -> float:
    """Decoding ``new[b]`` tokens after ``past[b]`` cached ones, for each row b (causal attention)."""
    t = spec.text
    past, new = np.asarray(past, np.float64), np.asarray(new, np.float64)
    pairs = (new * past + new * (new + 1) / 2).sum()  # token j of a row sees past + j + 1 positions
    return float(new.sum() * decoder_token(spec) + 4.0 * t.num_layers * t.num_heads * t.head_dim * pairs)


def heads(spec, rows: int) -> float:
    sizes = spec.heads.layer_sizes
    return 2.0 * rows * spec.heads.num_heads * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def decode_call(spec, attention_mask: np.ndarray, seq: int) -> float:
    """One decoder-graph call from its mask [B, past + seq] (1 = a real position)."""
    mask = np.asarray(attention_mask)
    split = mask.shape[1] - seq
    return decoder(spec, mask[:, :split].sum(1), mask[:, split:].sum(1))


def reference_triple(spec, triple) -> float:
    """What the reference computes for one ``PreparedTriple``: per rubric, the vision tower on both
    images and the whole prompt (tokens after <|Reward|> included) from scratch, then that rubric's
    head on every position (it keeps the one at <|Reward|>)."""
    from .vision import vision_feeds

    images = sum(vision_call(spec, *vision_feeds(image, spec)[0]) for image in (triple.source, triple.edited))
    one_head = lambda rows: heads(spec, rows) / spec.heads.num_heads
    return float(sum(images + decoder(spec, [0], [len(p.ids)]) + one_head(len(p.ids)) for p in triple.prompts))
