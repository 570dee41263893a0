"""Host-side (numpy) inputs of the vision encoder for one image grid.

Qwen2.5-VL's vision tower permutes patches into attention windows, uses 2-D rotary
positions and alternates window and full attention. All of that depends only on the grid,
so it is computed here once per image shape and cached, and the exported graph stays free
of data-dependent control flow: it gathers each window's rows, padded to the largest window
the spec allows, from ``window_rows`` and puts them back with ``window_slots``, so that its
windowed blocks compute the windows' attention, not all N x N pairs under a mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class VisionInputs:
    window_index: np.ndarray  # [N / unit] merge-unit order fed to the encoder
    reverse_index: np.ndarray  # [N / unit] undoes window_index on the merged output
    cos: np.ndarray  # [N, head_dim] float32, window order
    sin: np.ndarray
    window_rows: np.ndarray  # [windows, window_len] int64: each window's patch rows, -1 past its end
    window_slots: np.ndarray  # [N] int64: each patch's slot in the flattened [windows * window_len] layout

    def permute_patches(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, D] in processor order -> [N, D] in window order."""
        n, d = pixel_values.shape
        unit = n // len(self.window_index)
        return pixel_values.reshape(-1, unit, d)[self.window_index].reshape(n, d)


def _patch_coordinates(grid_h: int, grid_w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each patch in the processor's merge-unit-major order."""
    rows = np.broadcast_to(np.arange(grid_h)[:, None], (grid_h, grid_w))
    cols = np.broadcast_to(np.arange(grid_w)[None, :], (grid_h, grid_w))
    # [gh, gw] -> [gh/m, m, gw/m, m] -> [gh/m, gw/m, m, m]
    order = lambda a: a.reshape(grid_h // merge, merge, grid_w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
    return order(rows), order(cols)


def _window_index(grid_t: int, llm_h: int, llm_w: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge-unit permutation into window-major order, and the unit count of each window."""
    index = np.arange(grid_t * llm_h * llm_w).reshape(grid_t, llm_h, llm_w)
    pad_h, pad_w = -llm_h % window, -llm_w % window
    padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
    nh, nw = (llm_h + pad_h) // window, (llm_w + pad_w) // window
    # [t, nh*win, nw*win] -> [t, nh, nw, win, win]: window-major, row-major inside a window
    windows = padded.reshape(grid_t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(grid_t, nh * nw, -1)
    sizes = (windows >= 0).sum(-1).reshape(-1)
    flat = windows.reshape(-1)
    return flat[flat >= 0], sizes[sizes > 0]


def window_len(window_size: int, merge: int, patch_size: int) -> int:
    """Patches in the largest window (a side of window_size / patch_size patches, 64 in the
    published config): the fixed padded length of ``window_rows``."""
    return (window_size // merge // patch_size * merge) ** 2


def padded_windows(sizes: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Patches per window (consecutive runs) -> ``window_rows`` [windows, length] and ``window_slots`` [N]."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    offsets = np.arange(length)
    rows = np.where(offsets < sizes[:, None], starts[:, None] + offsets, -1)
    # Valid slots in flattened order are the patches in order: windows are consecutive runs.
    return rows.astype(np.int64), np.flatnonzero(rows.reshape(-1) >= 0).astype(np.int64)


@lru_cache(maxsize=64)
def vision_inputs(grid: tuple[int, int, int], head_dim: int, merge: int, window_size: int, patch_size: int,
                  theta: float = 10000.0) -> VisionInputs:
    grid_t, grid_h, grid_w = grid
    unit = merge * merge
    rows, cols = _patch_coordinates(grid_h, grid_w, merge)
    rows, cols = np.tile(rows, grid_t), np.tile(cols, grid_t)
    # Axial RoPE: half the rotary dims rotate with the row, half with the column.
    rot_dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, rot_dim, 2, dtype=np.float32) / np.float32(rot_dim)))
    inv_freq = inv_freq.astype(np.float32)
    freqs = np.concatenate([rows[:, None] * inv_freq, cols[:, None] * inv_freq], axis=-1).astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1)  # [N, head_dim]

    window = window_size // merge // patch_size
    window_index, sizes = _window_index(grid_t, grid_h // merge, grid_w // merge, window)
    n = len(rows)
    permute = lambda a: a.reshape(-1, unit, a.shape[-1])[window_index].reshape(n, -1)
    window_rows, window_slots = padded_windows(sizes * unit, window_len(window_size, merge, patch_size))
    return VisionInputs(
        window_index=window_index,
        reverse_index=np.argsort(window_index),
        cos=np.cos(permute(emb)).astype(np.float32),
        sin=np.sin(permute(emb)).astype(np.float32),
        window_rows=window_rows,
        window_slots=window_slots,
    )


def vision_feeds(image, spec) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """One preprocessed image -> the vision graph's inputs in order (window-ordered patches, cos,
    sin, window rows, window slots) and the index that puts its output back in processor order.
    A graph call is one image: its full-attention blocks attend over all of the call's patches."""
    v = spec.vision
    if image.grid_thw[0] != 1:
        raise ValueError(f"an image has one temporal patch, not {image.grid_thw[0]} (videos are not scored)")
    prep = vision_inputs(tuple(image.grid_thw), v.head_dim, v.spatial_merge_size, v.window_size, v.patch_size)
    patches = prep.permute_patches(image.pixel_values).astype(np.float32, copy=False)
    return (patches, prep.cos, prep.sin, prep.window_rows, prep.window_slots), prep.reverse_index


def join_feeds(feeds: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Several images' ``vision_feeds`` as one call's inputs for the eager modules (which attend per
    image in their full-attention blocks; a graph call is one image): patches and rotary tables
    concatenated, each image's window rows and slots moved past the previous image's, so that no
    window spans two of them. The merged output is the images' outputs, concatenated in order."""
    if len(feeds) == 1:
        return feeds[0]
    patches, cos, sin, rows, slots = zip(*feeds)
    first_row = np.cumsum([0] + [len(p) for p in patches[:-1]])
    first_slot = np.cumsum([0] + [r.size for r in rows[:-1]])
    rows = [np.where(r >= 0, r + start, -1) for r, start in zip(rows, first_row)]
    return (np.concatenate(patches), np.concatenate(cos), np.concatenate(sin), np.concatenate(rows),
            np.concatenate([s + start for s, start in zip(slots, first_slot)]))


def window_counts(window_rows) -> list[int]:
    """Patches in each window of ``window_rows``: a numpy array, or a tensor (one host sync)."""
    return (window_rows >= 0).sum(1).tolist()


def max_windows(tokens: int, window: int) -> int:
    """The most windows an image of at most ``tokens`` merged tokens has (a grid of h x w tokens has
    ceil(h / window) x ceil(w / window) windows of ``window`` x ``window`` tokens): a TensorRT profile's bound."""
    return max(-(-h // window) * -(-(tokens // h) // window) for h in range(1, tokens + 1))
