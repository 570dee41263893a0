"""editreward_rt.preprocess against the reference pipeline built from transformers.

Reference: ``img.convert("RGB")`` -> qwen-vl-utils smart_resize -> PIL bicubic resize ->
transformers' Qwen2VLImageProcessorPil (the torchvision-backed default does not import here).
"""

from __future__ import annotations

import io
import json
import math
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from editreward_rt.errors import AspectRatioError, ImageError, ImageTooLargeError, ManifestError
from editreward_rt.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    ImageSpec,
    PreprocessedImage,
    load_image,
    patchify,
    preprocess_image,
    resize_for_model,
    smart_resize,
)
from PIL import Image

SPEC = ImageSpec()
TOL = 1e-5


# ---------------------------------------------------------------- reference pipeline


def ref_smart_resize(h, w, factor=28, min_pixels=200704, max_pixels=200704):
    """qwen-vl-utils smart_resize, written out independently of the module under test."""
    if max(h, w) / min(h, w) > 200:
        raise ValueError("ratio")
    h_bar = max(factor, round(h / factor) * factor)
    w_bar = max(factor, round(w / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        h_bar = math.floor(h / beta / factor) * factor
        w_bar = math.floor(w / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        h_bar = math.ceil(h * beta / factor) * factor
        w_bar = math.ceil(w * beta / factor) * factor
    return h_bar, w_bar


@pytest.fixture(scope="module")
def processor():
    from transformers import Qwen2VLImageProcessorPil

    # Same settings as the Qwen2.5-VL base model's preprocessor_config.json.
    return Qwen2VLImageProcessorPil(
        min_pixels=3136,
        max_pixels=12845056,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def reference(processor, img: Image.Image):
    """-> (pixel_values float32 [n, 1176], grid_thw tuple) as EditReward's reference computes them."""
    rgb = img.convert("RGB")
    # convert() keeps a colour key as info["transparency"]; transformers 5 composites that
    # colour onto white, the transformers 4 processor EditReward was trained with did not.
    rgb.info.pop("transparency", None)
    h, w = ref_smart_resize(rgb.height, rgb.width)
    rgb = rgb.resize((w, h), Image.BICUBIC)
    out = processor(images=[rgb], return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


def assert_matches(ours: PreprocessedImage, ref) -> float:
    ref_pv, ref_grid = ref
    assert ours.grid_thw == ref_grid
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == ref_pv.shape
    diff = float(np.abs(ours.pixel_values - ref_pv).max())
    assert diff <= TOL
    return diff


def random_rgb(rng, h, w) -> np.ndarray:
    """Noise over a smooth gradient: exercises the resampler and still compresses fast."""
    small = rng.integers(0, 256, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-20, 21, (h, w, 3), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


# ---------------------------------------------------------------- sizes


def _random_sizes(n=40, seed=1234):
    rng = np.random.default_rng(seed)
    sizes = []
    while len(sizes) < n:
        h, w = (int(round(math.exp(v))) for v in rng.uniform(math.log(20), math.log(3000), 2))
        if max(h, w) / min(h, w) <= 200:
            sizes.append((h, w))
    return sizes


FIXED_SIZES = [(1, 1), (1, 3), (28, 28), (448, 448), (800, 3000), (12, 2000), (2000, 12), (5, 1000), (10, 2000)]


@pytest.mark.parametrize("h,w", _random_sizes() + FIXED_SIZES)
def test_sizes_match_reference(processor, tmp_path, h, w):
    rng = np.random.default_rng(h * 10007 + w)
    path = save(Image.fromarray(random_rgb(rng, h, w)), tmp_path / "img.png")
    ours = preprocess_image(path, SPEC)
    with Image.open(path) as img:
        assert_matches(ours, reference(processor, img))
    assert ours.n_tokens == ours.pixel_values.shape[0] // 4


# ---------------------------------------------------------------- modes


def _mode_image(mode: str, rng) -> Image.Image:
    rgb = Image.fromarray(random_rgb(rng, 97, 131))
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (97, 131), dtype=np.uint8)
        return Image.merge("RGBA", (*rgb.split(), Image.fromarray(alpha)))
    if mode == "LA":
        alpha = rng.integers(0, 256, (97, 131), dtype=np.uint8)
        return Image.merge("LA", (rgb.convert("L"), Image.fromarray(alpha)))
    if mode == "P":
        return rgb.quantize(64)
    if mode == "P+tRNS":
        img = rgb.quantize(64)
        img.info["transparency"] = 3
        return img
    if mode in ("RGB+tRNS", "L+tRNS"):
        base = mode.split("+")[0]
        img = rgb.convert(base).quantize(8).convert(base)  # few colours, so the key occurs
        img.info["transparency"] = img.getpixel((0, 0))
        return img
    return rgb.convert(mode)


MODE_FILES = [
    ("RGB", "png"),
    ("RGBA", "png"),
    ("P", "png"),
    ("P", "gif"),
    ("P+tRNS", "png"),
    ("RGB+tRNS", "png"),
    ("L+tRNS", "png"),
    ("L", "png"),
    ("LA", "png"),
    ("1", "png"),
    ("CMYK", "jpg"),
    ("CMYK", "tiff"),
    ("RGB", "jpg"),
    ("L", "jpg"),
    ("RGB", "webp"),
    ("RGB", "bmp"),
]


@pytest.mark.parametrize("mode,ext", MODE_FILES)
def test_modes_match_reference(processor, tmp_path, mode, ext):
    img = _mode_image(mode, np.random.default_rng(7))
    kw = {"transparency": img.info["transparency"]} if mode.endswith("tRNS") else {}
    path = save(img, tmp_path / f"img.{ext}", **kw)
    with Image.open(path) as opened:
        ref = reference(processor, opened)
    assert_matches(preprocess_image(path, SPEC), ref)


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "LAB", "RGBA", "P", "F"])
def test_in_memory_modes_match_reference(processor, mode):
    img = _mode_image(mode, np.random.default_rng(3))
    assert_matches(preprocess_image(img, SPEC), reference(processor, img))


def test_16bit_png_is_scaled_not_clipped(processor, tmp_path):
    rng = np.random.default_rng(5)
    v16 = rng.integers(0, 65536, (83, 149), dtype=np.uint16)
    path = save(Image.fromarray(v16), tmp_path / "g16.png")
    with Image.open(path) as img:
        assert img.mode == "I;16"
    expected_l = Image.fromarray(np.round(v16 / 257).astype(np.uint8), "L")
    assert_matches(preprocess_image(path, SPEC), reference(processor, expected_l))


def test_16bit_values_map_to_8bit(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    expected = np.array([0, 1, 128, 255], dtype=np.uint8)
    sources = {
        "png I;16": save(Image.fromarray(values), tmp_path / "v.png"),
        "ppm (mode I)": save(Image.fromarray(values), tmp_path / "v.ppm"),
        "I;16B": Image.fromarray(values).convert("I").convert("I;16B"),
        "I": Image.fromarray(values.astype(np.int32)),
        "uint16 array": values,
        "big-endian uint16 array": values.astype(">u2"),
    }
    for name, src in sources.items():
        rgb = np.asarray(load_image(src, SPEC))
        assert rgb.shape == (1, 4, 3), name
        np.testing.assert_array_equal(rgb[0, :, 0], expected, err_msg=name)
        np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2], err_msg=name)


# ---------------------------------------------------------------- input types


def test_every_input_type_matches_path(tmp_path):
    rgb = random_rgb(np.random.default_rng(11), 150, 260)
    path = save(Image.fromarray(rgb), tmp_path / "x.png")
    data = path.read_bytes()
    want = preprocess_image(str(path), SPEC)
    with Image.open(path) as opened:
        sources = {
            "Path": path,
            "bytes": data,
            "bytearray": bytearray(data),
            "memoryview": memoryview(data),
            "PIL": opened,
            "uint8": rgb,
            "uint8 rgba": np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)]),
            "uint16": rgb.astype(np.uint16) * 257,
            "float32": rgb.astype(np.float32) / 255,
            "float64": rgb / 255.0,
        }
        for name, src in sources.items():
            got = preprocess_image(src, SPEC)
            assert got.grid_thw == want.grid_thw, name
            np.testing.assert_array_equal(got.pixel_values, want.pixel_values, err_msg=name)


def test_gray_array_matches_gray_png(tmp_path):
    gray = random_rgb(np.random.default_rng(2), 64, 90)[:, :, 0]
    path = save(Image.fromarray(gray), tmp_path / "g.png")
    want = preprocess_image(path, SPEC).pixel_values
    for src in (gray, gray[:, :, None], gray.astype(np.uint16) * 257):
        np.testing.assert_array_equal(preprocess_image(src, SPEC).pixel_values, want)


def test_rgba_array_drops_alpha_like_png(tmp_path):
    img = _mode_image("RGBA", np.random.default_rng(4))
    path = save(img, tmp_path / "a.png")
    np.testing.assert_array_equal(
        preprocess_image(np.asarray(img), SPEC).pixel_values, preprocess_image(path, SPEC).pixel_values
    )


# ---------------------------------------------------------------- geometry + spec


def test_smart_resize_cases():
    assert smart_resize(1, 1) == (448, 448)
    assert smart_resize(448, 448) == (448, 448)
    for h, w in _random_sizes(200, seed=99) + FIXED_SIZES:
        got = smart_resize(h, w)
        assert got == ref_smart_resize(h, w)
        assert got[0] % 28 == 0 and got[1] % 28 == 0


def test_resize_for_model_keeps_matching_size():
    img = Image.fromarray(random_rgb(np.random.default_rng(0), 448, 448))
    out = resize_for_model(img, SPEC)
    assert out.size == (448, 448)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img))


def test_patchify_layout():
    # Encode (row, col, channel) into the pixel so the layout can be checked exactly.
    spec = SPEC
    h, w = 56, 84
    levels = np.arange(h * w).reshape(h, w) % 256
    rgb = np.stack([levels, (levels + 1) % 256, (levels + 2) % 256], -1).astype(np.uint8)
    pv = patchify(rgb, spec).pixel_values.reshape(-1, 3, 2, 14, 14)
    assert pv.shape[0] == (h // 14) * (w // 14)
    norm = (rgb / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    for idx in range(pv.shape[0]):
        block, within = divmod(idx, 4)
        bh, bw = divmod(block, w // 28)
        mh, mw = divmod(within, 2)
        r0, c0 = (bh * 2 + mh) * 14, (bw * 2 + mw) * 14
        want = norm[r0 : r0 + 14, c0 : c0 + 14].transpose(2, 0, 1)
        np.testing.assert_allclose(pv[idx, :, 0], want, atol=1e-5)
        np.testing.assert_array_equal(pv[idx, :, 0], pv[idx, :, 1])


def test_spec_json_roundtrip():
    spec = ImageSpec(max_input_pixels=1234, min_pixels=3136)
    back = ImageSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec
    assert back.factor == 28
    with pytest.raises(ManifestError, match=r"spec\.image\.bogus: unknown field"):
        ImageSpec.from_dict({"bogus": 1})


# ---------------------------------------------------------------- bad inputs


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, followed by a tiny IDAT: nothing to decode."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(random_rgb(np.random.default_rng(1), 200, 300)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name,content,error",
    [
        ("empty.png", b"", ImageError),
        ("half.png", None, ImageError),
        ("half.jpg", None, ImageError),
        ("garbage.png", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), ImageError),
        ("notes.txt", b"this is not an image\n" * 10, ImageError),
        ("bomb.png", _png_header_only(100_000, 100_000), ImageTooLargeError),
        ("wide.png", None, AspectRatioError),
    ],
)
def test_bad_files_raise_typed_errors(tmp_path, name, content, error):
    if name.startswith("half"):
        data = _encoded("PNG" if name.endswith("png") else "JPEG")
        content = data[: len(data) // 2]
    elif name == "wide.png":
        buf = io.BytesIO()
        Image.new("RGB", (201, 1)).save(buf, "PNG")
        content = buf.getvalue()
    path = tmp_path / name
    path.write_bytes(content)
    for src in (path, str(path)):
        with pytest.raises(error) as info:
            load_image(src, ImageSpec(max_input_pixels=10_000))
        assert str(path) in str(info.value)
    if content:
        with pytest.raises(error):
            load_image(content, ImageSpec(max_input_pixels=10_000))


def test_missing_file_and_directory(tmp_path):
    for src in (tmp_path / "nope.png", tmp_path):
        with pytest.raises(ImageError) as info:
            load_image(src, SPEC)
        assert str(src) in str(info.value)


def test_bomb_header_is_rejected_fast_without_decoding():
    data = _png_header_only(100_000, 100_000)
    start = time.perf_counter()
    # Tiny configured limit: our own header check.
    with pytest.raises(ImageTooLargeError):
        load_image(data, ImageSpec(max_input_pixels=1000))
    # Default limit: 1e10 pixels also trips PIL's own DecompressionBombError first.
    with pytest.raises(ImageTooLargeError):
        load_image(data, SPEC)
    assert time.perf_counter() - start < 1.0


def test_too_large_in_memory_sources():
    small = ImageSpec(max_input_pixels=100)
    with pytest.raises(ImageTooLargeError):
        load_image(np.zeros((20, 20, 3), np.uint8), small)
    with pytest.raises(ImageTooLargeError):
        load_image(Image.new("RGB", (20, 20)), small)


def test_aspect_ratio_limit():
    with pytest.raises(AspectRatioError):
        smart_resize(1, 201)
    with pytest.raises(AspectRatioError):
        load_image(np.zeros((1, 201), np.uint8), SPEC)
    with pytest.raises(AspectRatioError):
        preprocess_image(Image.new("RGB", (201, 1)), SPEC)
    assert smart_resize(1, 200) == ref_smart_resize(1, 200)
    load_image(np.zeros((1, 200), np.uint8), SPEC)


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros((10,), np.uint8),
        np.zeros((10, 10, 2), np.uint8),
        np.zeros((10, 10, 5), np.uint8),
        np.zeros((10, 10, 3, 1), np.uint8),
        np.zeros((0, 10, 3), np.uint8),
        np.zeros((10, 10, 3), np.int32),
        np.zeros((10, 10, 3), bool),
        np.zeros((10, 10, 3), np.complex64),
        np.full((10, 10, 3), np.nan, np.float32),
        np.full((10, 10, 3), np.inf, np.float64),
        np.full((10, 10, 3), 1.5, np.float32),
        np.full((10, 10, 3), -0.1, np.float32),
    ],
    ids=lambda a: f"{a.shape}-{a.dtype}",
)
def test_bad_arrays(arr):
    with pytest.raises(ImageError):
        load_image(arr, SPEC)


@pytest.mark.parametrize("src", [None, 3, [[0, 0]], {"path": "x.png"}])
def test_unsupported_source_types(src):
    with pytest.raises(ImageError):
        load_image(src, SPEC)


def test_patchify_rejects_bad_input():
    with pytest.raises(ImageError):
        patchify(np.zeros((30, 28, 3), np.uint8), SPEC)
    with pytest.raises(ImageError):
        patchify(np.zeros((28, 28, 3), np.float32), SPEC)



def test_the_pixel_limit_never_changes_pils_process_wide_guard(monkeypatch):
    """An image over twice PIL's own limit (182 M pixels): refused with the configured limit in the
    message. A configured limit above PIL's does not lift PIL's guard for the process: the image is
    refused naming PIL's limit, and PIL's limit is unchanged. Where the application itself lifts
    PIL's guard, the configured limit is honoured (the image is then decoded, and fails here only
    because its pixel data is missing)."""
    from PIL import Image

    data = _png_header_only(14_000, 13_000)
    pil = Image.MAX_IMAGE_PIXELS
    assert 14_000 * 13_000 > 2 * pil
    with pytest.raises(ImageTooLargeError, match=str(ImageSpec().max_input_pixels)):
        preprocess_image(data, ImageSpec())
    with pytest.raises(ImageTooLargeError, match=f"PIL's process-wide limit of {2 * pil}"):
        preprocess_image(data, ImageSpec(max_input_pixels=200_000_000))
    assert Image.MAX_IMAGE_PIXELS == pil
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageError, match="corrupt or truncated") as info:
        preprocess_image(data, ImageSpec(max_input_pixels=200_000_000))
    assert not isinstance(info.value, ImageTooLargeError)
