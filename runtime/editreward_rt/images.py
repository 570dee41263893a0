"""Images as trainers hand them over -> one image per item, as the Scorer reads them.

Accepted: a torch tensor ``[B, C, H, W]`` or ``[C, H, W]`` (float in [0, 1] or uint8; read without
importing torch unless one is given), a numpy array ``[B, H, W, C]`` or ``[H, W, C]`` (float in
[0, 1] or uint8), or a list of PIL images, arrays, paths or encoded bytes. Values are checked
per image by the preprocessor (a NaN or out-of-range float image is that image's ImageError).
"""

from __future__ import annotations

import io

import numpy as np

from .errors import ImageError


def identity(image) -> tuple:
    """A key equal for the same image: by content for arrays (a reused buffer is a new image), by
    value for paths and bytes, by object identity for the rest (PIL images)."""
    import hashlib
    import os

    if isinstance(image, np.ndarray):
        digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()
        return ("array", image.shape, str(image.dtype), digest)
    if isinstance(image, (str, bytes, os.PathLike)):
        return ("value", image)
    return ("id", id(image))


def _is_torch(value) -> bool:
    return type(value).__module__.split(".")[0] == "torch"


def _from_torch(tensor) -> np.ndarray:
    """[B, C, H, W] or [C, H, W] -> numpy channels-last."""
    array = tensor.detach().cpu()
    array = array.float().numpy() if array.dtype.is_floating_point else array.numpy()
    return np.moveaxis(array, -3, -1)


def as_images(images, n: int | None = None) -> list:
    """-> a list of images (uint8 HWC arrays, or the PIL images, paths and bytes as given)."""
    if _is_torch(images):
        images = _from_torch(images)
    if isinstance(images, np.ndarray):
        out = [images] if images.ndim == 3 else list(images)
    else:
        out = [_one(image) for image in images]
    if n is not None and len(out) != n:
        raise ImageError(f"{len(out)} images for {n} prompts")
    return out


def _one(image):
    return _from_torch(image) if _is_torch(image) else image


def encode_png(image) -> bytes:
    """An image as bytes to send: encoded bytes as they are, a path read, anything else as PNG."""
    import os

    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    from PIL import Image

    from .preprocess import _rgb_from_array  # the preprocessor's own checks and float -> uint8 rounding

    picture = Image.fromarray(_rgb_from_array(image, f"numpy array {image.shape}")) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()
