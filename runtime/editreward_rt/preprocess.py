"""Image preprocessing of the Qwen-VL processors, matching EditReward's reference pipeline. Its
geometry (patch, temporal patch and merge sizes, pixel bounds, mean/std) comes from the model
family's ``ImageSpec``, so families built on the same processor (Qwen2.5-VL, MiMo-VL; Qwen3-VL
with 16-pixel patches) share it.

Reference (modified qwen-vl-utils, then transformers' Qwen2-VL image processor):

1. open the image and ``img.convert("RGB")`` (alpha is dropped, not composited);
2. ``smart_resize`` to a multiple of 28 with ``min_pixels <= h*w <= max_pixels``
   (both 200704 for EditReward) and a PIL bicubic resize to that size;
3. rescale by 1/255, normalise with the CLIP mean/std, repeat the single frame
   ``temporal_patch_size`` times and cut 14x14 patches grouped 2x2 for merging.

This module reproduces that with numpy and Pillow only; ``pixel_values`` match
transformers' Qwen2-VL image processor (its PIL backend) bit for bit (the same float64 rescale,
float32 cast and float32 normalise, done through a 256-entry lookup table).

Deliberate differences from the reference:

* 16-bit images (PIL modes ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, and ``I``
  whose values all lie in 0..65535, e.g. 16-bit grayscale PNG, PGM or TIFF) are
  scaled to 8 bits as ``round(v * 255 / 65535)``.  PIL's ``convert("RGB")``
  clips them to 0..255 instead, which turns almost every pixel white.  Pillow
  itself decodes 16-bit *colour* PNGs to 8-bit RGB by keeping the high byte;
  that behaviour is kept.
* Inputs are checked up front: missing, empty, truncated, corrupt or
  unidentifiable files, decoded sizes above ``ImageSpec.max_input_pixels`` (read
  from the header before any pixel is decoded; PIL's own process-wide limit is never
  changed, so it caps a larger one) and aspect ratios above
  ``ImageSpec.max_aspect_ratio`` raise the typed errors of ``editreward_rt.errors``.
* ``smart_resize`` never returns a side below ``factor`` (newer qwen-vl-utils
  behaviour); with the defaults this cannot happen anyway.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import AspectRatioError, ImageError, ImageTooLargeError
from .manifest_schema import array, fields, integer, number, positive_int

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers rescales by the Python float 1/255 (in float64, then casts to float32).
_RESCALE_FACTOR = 1 / 255
_MODES_16BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

# Bounds of a folder's image limits: one side of a decoded image, and max_input_pixels (the decoded
# RGB image alone is 3 bytes a pixel: 1 << 30 pixels are 3 GiB).
MAX_SIDE = 1 << 16
MAX_INPUT_PIXELS = 1 << 30

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


@dataclass(frozen=True)
class ImageSpec:
    """Vision-tower geometry and input limits; serialisable to JSON via to_dict()."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 200704
    max_pixels: int = 200704
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    max_aspect_ratio: float = 200.0
    max_input_pixels: int = 89_478_485

    @property
    def factor(self) -> int:
        """Side lengths of the resized image are multiples of this."""
        return self.patch_size * self.merge_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict, at: str = "spec.image") -> "ImageSpec":
        """A manifest's image section (``at``: its JSON path), every value checked: a ``ManifestError``
        names the field. Missing fields keep their defaults."""
        size, channel = partial(integer, lo=1, hi=MAX_SIDE), partial(array, length=3)
        readers = {"patch_size": size, "temporal_patch_size": size, "merge_size": size,
                   "min_pixels": positive_int, "max_pixels": positive_int,
                   "image_mean": partial(channel, item=number), "image_std": partial(channel, item=partial(number, positive=True)),
                   "max_aspect_ratio": partial(number, lo=1.0, hi=MAX_SIDE),
                   "max_input_pixels": partial(integer, lo=1, hi=MAX_INPUT_PIXELS)}
        return cls(**fields(d, at, readers, optional=tuple(readers)))


@dataclass
class PreprocessedImage:
    pixel_values: np.ndarray  # float32 [grid_t*grid_h*grid_w, C*temporal*patch*patch] = [n_patches, 1176]
    grid_thw: tuple[int, int, int]  # (grid_t, grid_h, grid_w) in patches
    merge_size: int = 2

    @property
    def n_tokens(self) -> int:
        """Number of LLM tokens after the 2x2 patch merger."""
        t, h, w = self.grid_thw
        return t * h * w // self.merge_size**2


# ---------------------------------------------------------------- geometry


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 200704,
    max_pixels: int = 200704,
    max_ratio: float = 200.0,
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area in [min_pixels, max_pixels], aspect kept."""
    if height <= 0 or width <= 0:
        raise ImageError(f"image has an empty side: {width}x{height}")
    ratio = max(height, width) / min(height, width)
    if ratio > max_ratio:
        raise AspectRatioError(
            f"aspect ratio {ratio:.1f} of a {width}x{height} image exceeds the limit {max_ratio:g}"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _check_size(width: int, height: int, spec: ImageSpec, name: str) -> None:
    """Reject empty, oversized or too elongated images from their (header) size alone."""
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has an empty side ({width}x{height})")
    if width * height > spec.max_input_pixels:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{spec.max_input_pixels} pixels"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > spec.max_aspect_ratio:
        raise AspectRatioError(
            f"{name}: aspect ratio {ratio:.1f} of a {width}x{height} image exceeds the limit "
            f"{spec.max_aspect_ratio:g}"
        )


# ---------------------------------------------------------------- loading


def load_image(src: ImageSource, spec: ImageSpec = ImageSpec()) -> Image.Image:
    """Decode ``src`` into a new RGB PIL image, raising typed errors for anything unusable."""
    if isinstance(src, (str, os.PathLike)):
        return _load_path(os.fspath(src), spec)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _load_bytes(bytes(src), spec)
    if isinstance(src, Image.Image):
        return _from_pil(src, spec, "PIL image")
    if isinstance(src, np.ndarray):
        return _from_array(src, spec)
    raise ImageError(f"unsupported image source type {type(src).__name__}")


def _load_path(path: str, spec: ImageSpec) -> Image.Image:
    name = repr(path)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise ImageError(f"{name}: image file not found") from None
    except (OSError, ValueError) as e:  # ValueError: a path the OS refuses (a NUL byte)
        raise ImageError(f"{name}: cannot read image file ({e})") from None
    if os.path.isdir(path):
        raise ImageError(f"{name}: is a directory, not an image file")
    if size == 0:
        raise ImageError(f"{name}: image file is empty (0 bytes)")
    try:
        with open(path, "rb") as fp:
            return _decode(fp, spec, name)
    except OSError as e:  # open() itself failed, e.g. permission denied
        raise ImageError(f"{name}: cannot read image file ({e})") from None


def _load_bytes(data: bytes, spec: ImageSpec) -> Image.Image:
    if not data:
        raise ImageError("image bytes: empty (0 bytes)")
    return _decode(io.BytesIO(data), spec, f"image bytes ({len(data)} bytes)")


def _pil_refusal(name: str, spec: ImageSpec) -> ImageTooLargeError:
    """PIL refuses images above twice its process-wide ``Image.MAX_IMAGE_PIXELS`` before our header
    check runs. That guard belongs to the process: a model folder's or a caller's limit never lifts
    it (an application that wants larger images raises PIL's limit itself), so a configured limit
    above PIL's is capped by it, and the message says which limit refused the image."""
    pil = Image.MAX_IMAGE_PIXELS
    if pil is not None and spec.max_input_pixels > 2 * pil:
        return ImageTooLargeError(f"{name}: more pixels than PIL's process-wide limit of {2 * pil} "
                                  f"(2 x PIL.Image.MAX_IMAGE_PIXELS), below max_input_pixels {spec.max_input_pixels}")
    return ImageTooLargeError(f"{name}: more pixels than the limit of {spec.max_input_pixels} (max_input_pixels)")


def _decode(fp, spec: ImageSpec, name: str) -> Image.Image:
    """Open from a binary file object, check the header size, then fully decode and convert."""
    try:
        # _from_pil's header check is the bomb guard; PIL's warning (at its own limit, below the
        # refusal at twice it) is noise beside it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as img:  # reads only the header
                return _from_pil(img, spec, name)
    except Image.DecompressionBombError:
        raise _pil_refusal(name, spec) from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format") from None
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        # PIL reports truncated/corrupt data as OSError ("image file is truncated",
        # "broken data stream"), SyntaxError (bad PNG chunks), ValueError or EOFError.
        raise ImageError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from None


def _from_pil(img: Image.Image, spec: ImageSpec, name: str) -> Image.Image:
    """Check the (header) size, fully decode, and convert to RGB the way the reference does."""
    _check_size(*img.size, spec, name)
    try:
        img.load()  # forces a full decode, so truncation is detected here, not later
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, EOFError, zlib.error...
        raise ImageError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from None
    if img.mode in _MODES_16BIT or (img.mode == "I" and _fits_uint16(img)):
        return Image.fromarray(_rgb_from_array(np.asarray(img).astype(np.uint16), name))
    try:
        rgb = img.convert("RGB")  # a new image even when already RGB; alpha is dropped
    except (ValueError, OSError) as e:
        raise ImageError(f"{name}: cannot convert mode {img.mode} to RGB ({e})") from None
    # convert() turns a palette/gray colour key into info["transparency"] = (r, g, b);
    # transformers >= 5 would composite that colour onto white, the reference does not.
    rgb.info.pop("transparency", None)
    return rgb


def _fits_uint16(img: Image.Image) -> bool:
    lo, hi = img.getextrema()
    return lo >= 0 and hi <= 65535


def _from_array(arr: np.ndarray, spec: ImageSpec) -> Image.Image:
    name = f"numpy array {arr.shape} {arr.dtype}"
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(f"{name}: expected shape HxW, HxWx1, HxWx3 or HxWx4")
    height, width = arr.shape[:2]
    _check_size(width, height, spec, name)
    return Image.fromarray(_rgb_from_array(arr, name))


def _rgb_from_array(arr: np.ndarray, name: str) -> np.ndarray:
    """[H,W] / [H,W,3] / [H,W,4] uint8, uint16 or float in [0,1] -> contiguous uint8 [H,W,3]."""
    u8 = _to_uint8(arr, name)
    if u8.ndim == 2:
        u8 = np.repeat(u8[:, :, None], 3, axis=2)  # same as PIL's L -> RGB
    return np.ascontiguousarray(u8[:, :, :3])  # RGBA: alpha dropped, as convert("RGB") does


def _to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:  # either byte order
        # round(v * 255 / 65535) == round(v / 257); v / 257 is never exactly x.5.
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError(f"{name}: float image holds NaN or infinite values")
        if arr.min() < 0 or arr.max() > 1:
            raise ImageError(
                f"{name}: float image values must lie in [0, 1], got [{arr.min():g}, {arr.max():g}]"
            )
        return np.rint(arr.astype(np.float64) * 255).astype(np.uint8)
    raise ImageError(f"{name}: unsupported dtype {arr.dtype} (use uint8, uint16 or float in [0, 1])")


# ---------------------------------------------------------------- resize + patches


def resize_for_model(img: Image.Image, spec: ImageSpec = ImageSpec()) -> Image.Image:
    """Bicubic resize to ``smart_resize`` size (PIL returns a copy when the size already matches)."""
    width, height = img.size
    new_h, new_w = smart_resize(
        height, width, spec.factor, spec.min_pixels, spec.max_pixels, spec.max_aspect_ratio
    )
    return img.resize((new_w, new_h), Image.BICUBIC)


def _normalise_lut(spec: ImageSpec) -> np.ndarray:
    """float32 [3, 256]: value of each uint8 level per channel, computed like transformers.

    transformers: ``float32(float64(x) * (1/255))``, then ``(x - mean) / std`` in float32.
    """
    levels = (np.arange(256, dtype=np.float64) * _RESCALE_FACTOR).astype(np.float32)
    mean = np.asarray(spec.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(spec.image_std, dtype=np.float32)[:, None]
    return (levels[None, :] - mean) / std


def patchify(rgb_uint8: np.ndarray, spec: ImageSpec = ImageSpec()) -> PreprocessedImage:
    """uint8 [H,W,3] (H, W multiples of spec.factor) -> normalised float32 patches + grid."""
    if rgb_uint8.dtype != np.uint8 or rgb_uint8.ndim != 3 or rgb_uint8.shape[2] != 3:
        raise ImageError(f"patchify expects uint8 [H,W,3], got {rgb_uint8.dtype} {rgb_uint8.shape}")
    height, width, channels = rgb_uint8.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    if height % spec.factor or width % spec.factor:
        raise ImageError(f"patchify needs sides that are multiples of {spec.factor}, got {width}x{height}")
    grid_h, grid_w = height // p, width // p

    lut = _normalise_lut(spec)
    chw = np.stack([lut[c][rgb_uint8[:, :, c]] for c in range(channels)])  # [C, H, W] float32

    x = chw.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, p, p]
    # One frame repeated over the temporal axis: [gh/m, gw/m, m, m, C, T, p, p].
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    pixel_values = x.reshape(grid_h * grid_w, channels * t * p * p)
    return PreprocessedImage(pixel_values, (1, grid_h, grid_w), m)


def preprocess_image(src: ImageSource, spec: ImageSpec = ImageSpec()) -> PreprocessedImage:
    """load_image -> resize_for_model -> patchify."""
    img = resize_for_model(load_image(src, spec), spec)
    return patchify(np.asarray(img), spec)
