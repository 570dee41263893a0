"""Differentiable image inputs for Qwen2.5-VL, in torch: the counterpart of ``preprocess`` (resize,
rescale, normalise, patchify) and ``vision_feeds`` for images that carry gradients.

The resize is bilinear (``F.interpolate``) to the same ``smart_resize`` target as the reference,
where the reference resizes with PIL's bicubic filter: the one deliberate difference, made
because PIL's resize has no gradient. An image already at its target size is not resized, and
then its patches equal ``preprocess.patchify``'s for the same pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from editreward_rt.preprocess import ImageSpec, smart_resize

from .vision import vision_inputs


def target_size(height: int, width: int, spec: ImageSpec) -> tuple[int, int]:
    return smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels, spec.max_aspect_ratio)


RESIZES = ("bilinear", "bicubic")


def resize(image: torch.Tensor, spec: ImageSpec, mode: str = "bilinear") -> torch.Tensor:
    """[3, H, W] in [0, 1] -> [3, h, w] at the reference's target size, unchanged when equal.
    ``bilinear``: upstream's differentiable processor; ``bicubic``: antialiased bicubic, closer to
    the reference's PIL resize when shrinking (clamped to [0, 1], as PIL's 8-bit output is)."""
    h, w = target_size(image.shape[1], image.shape[2], spec)
    if (h, w) == tuple(image.shape[1:]):
        return image
    if mode == "bicubic":
        out = F.interpolate(image[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
        return out.clamp(0, 1)
    return F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]


def patchify(image: torch.Tensor, spec: ImageSpec) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[3, h, w] in [0, 1] (sides multiples of spec.factor) -> normalised patches [N, C*T*P*P] in
    the processor's merge-unit order, and the grid (t, gh, gw): ``preprocess.patchify`` in torch."""
    channels, height, width = image.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = height // p, width // p
    mean = torch.tensor(spec.image_mean, dtype=image.dtype, device=image.device)[:, None, None]
    std = torch.tensor(spec.image_std, dtype=image.dtype, device=image.device)[:, None, None]
    x = ((image - mean) / std).reshape(channels, gh // m, m, p, gw // m, m, p)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, p, p]
    x = x[:, :, :, :, :, None].expand(*x.shape[:5], t, p, p)  # one frame repeated over the temporal axis
    return x.reshape(gh * gw, channels * t * p * p), (1, gh, gw)


def image_feeds(image: torch.Tensor, spec, resize_mode: str = "bilinear") -> tuple[tuple, torch.Tensor, int]:
    """[3, H, W] in [0, 1] -> the vision graph's inputs (window-ordered patches, cos, sin, window rows
    and slots), the index putting its output back in processor order, and the token count."""
    pixels, grid = patchify(resize(image, spec.image, resize_mode), spec.image)
    v = spec.vision
    prep = vision_inputs(grid, v.head_dim, v.spatial_merge_size, v.window_size, v.patch_size)
    n, d = pixels.shape
    unit = n // len(prep.window_index)
    order = torch.as_tensor(prep.window_index, device=image.device)
    patches = pixels.reshape(-1, unit, d)[order].reshape(n, d)
    to = lambda a, dtype=None: torch.as_tensor(np.ascontiguousarray(a), device=image.device, dtype=dtype)
    # The rotary tables stay float32 (float64 for float64 images) whatever the image's dtype: the
    # Scorer feeds the host's float32 tables, and the attention rotates q and k in float32.
    wide = torch.promote_types(image.dtype, torch.float32)
    feeds = (patches, to(prep.cos, wide), to(prep.sin, wide), to(prep.window_rows), to(prep.window_slots))
    return feeds, to(prep.reverse_index), grid[0] * grid[1] * grid[2] // v.spatial_merge_size**2
