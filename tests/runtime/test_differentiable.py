"""The differentiable reward: gradients that match finite differences, the same numbers as the
Scorer at the target size, no graph without gradients, typed errors for bad inputs."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from editreward_rt.differentiable import DifferentiableReward
from editreward_rt.errors import ImageError, InputError

TARGET = (448, 448)  # 200704 pixels: its own smart_resize target, so nothing is resized


def as_tensor(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(i)).permute(2, 0, 1) for i in images]).double() / 255


@pytest.fixture(scope="module")
def reward32(tiny):
    return DifferentiableReward.load(tiny.checkpoint, prompts_from=tiny.prompts, dtype="float32")


@pytest.fixture(scope="module")
def reward64(tiny):
    return DifferentiableReward.load(tiny.checkpoint, prompts_from=tiny.prompts, dtype="float64")


def pixels(seed: int, shape=TARGET) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_equals_the_scorer_at_the_target_size(reward32):
    from editreward_rt.tolerances import tolerance

    src, edits = pixels(0), [pixels(1), pixels(2)]
    out = reward32(["Add a bowl", "Make it red"], as_tensor([src, src]).float(), as_tensor(edits).float())
    expected = [reward32.scorer.score(i, src, e) for i, e in zip(["Add a bowl", "Make it red"], edits)]
    tol = tolerance("torch-fast", "float32")
    np.testing.assert_allclose(out[:, 0].numpy(), [s.mu for s in expected], atol=tol.mu)
    np.testing.assert_allclose(out[:, 1].numpy(), [s.log_sigma for s in expected], atol=tol.log_sigma)


def test_gradient_matches_finite_differences(reward64):
    """Directional derivative along a random direction, float64, through the bilinear resize
    (300 x 420 is not a target size) and both images; relative error <= 1e-4. Pixels stay inside
    (0.02, 0.98), so the +-1e-5 steps never leave [0, 1]."""
    inside = lambda seed: 0.02 + 0.96 * as_tensor([pixels(seed, (300, 420))])
    source, edited = inside(3).requires_grad_(True), inside(4).requires_grad_(True)
    f = lambda s, e: reward64(["Add a bowl"], s, e)[0, 0]
    f(source, edited).backward()
    rng = np.random.default_rng(5)
    ds, de = (torch.from_numpy(rng.standard_normal(tuple(x.shape))) * 1e-2 for x in (source, edited))
    eps = 1e-3
    with torch.no_grad():
        numeric = (f(source + eps * ds, edited + eps * de) - f(source - eps * ds, edited - eps * de)) / (2 * eps)
    analytic = (source.grad * ds).sum() + (edited.grad * de).sum()
    assert abs(float(analytic)) > 1e-6
    assert abs(float(numeric - analytic)) <= 1e-4 * abs(float(analytic)), (float(numeric), float(analytic))


def test_no_gradient_requested_keeps_no_graph(reward32):
    src, edit = as_tensor([pixels(6)]).float(), as_tensor([pixels(7)]).float()
    plain = reward32(["Add a bowl"], src, edit)
    assert not plain.requires_grad and plain.grad_fn is None
    edit.requires_grad_(True)
    tracked = reward32(["Add a bowl"], src, edit)
    assert tracked.requires_grad
    assert torch.equal(plain, tracked.detach())


def test_checkpointing_and_a_frozen_source_change_no_number(tiny, reward32):
    src, edit = as_tensor([pixels(8)]).float(), as_tensor([pixels(9)]).float()
    results = []
    for options in ({}, {"gradient_checkpointing": True, "freeze_source": True}):
        reward = DifferentiableReward.load(tiny.checkpoint, prompts_from=tiny.prompts, dtype="float32", **options)
        s, e = src.clone().requires_grad_(True), edit.clone().requires_grad_(True)
        value = reward(["Add a bowl"], s, e)[0, 0]
        value.backward()
        results.append((float(value), s.grad, e.grad))
    (v0, s0, e0), (v1, s1, e1) = results
    assert v0 == pytest.approx(v1, abs=1e-6) and s0 is not None and s1 is None  # no gradient into a frozen source
    torch.testing.assert_close(e0, e1, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("source,edited,error,message", [
    ("not a tensor", None, ImageError, "torch tensor"),
    (torch.rand(1, 4, 64, 64), None, ImageError, r"\[B=1, 3, H, W\]"),
    (torch.rand(2, 3, 64, 64), None, ImageError, r"\[B=1, 3, H, W\]"),
    (torch.rand(1, 3, 64, 64) * 255, None, ImageError, r"in \[0, 1\]"),
    (torch.full((1, 3, 64, 64), float("nan")), None, ImageError, "NaN"),
    (torch.randint(0, 2, (1, 3, 64, 64)), None, ImageError, "float tensor"),
])
def test_bad_inputs_get_typed_errors(reward32, source, edited, error, message):
    edited = torch.rand(1, 3, 64, 64) if edited is None else edited
    with pytest.raises(error, match=message):
        reward32(["Add a bowl"], source, edited)
    with pytest.raises(InputError, match="non-empty list of strings"):
        reward32("Add a bowl", torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes (the quant extra) is not installed")
@pytest.mark.parametrize("scheme", ["bnb-int8", "bnb-nf4"])
def test_a_bitsandbytes_folder_passes_gradients(tiny, tmp_path, scheme):
    """bitsandbytes layers pass gradients to their inputs, so a quantized folder is a reward too."""
    from editreward_quant.cli import main as quantize_main

    out = tmp_path / scheme
    assert quantize_main(["--scheme", scheme, "--ckpt", str(tiny.checkpoint), "--prompts-from", str(tiny.prompts),
                          "--out", str(out)]) == 0
    reward = DifferentiableReward.load(out, dtype="float32")
    edit = as_tensor([pixels(10)]).float().requires_grad_(True)
    reward(["Add a bowl"], as_tensor([pixels(11)]).float(), edit)[0, 0].backward()
    assert edit.grad is not None and torch.isfinite(edit.grad).all() and edit.grad.abs().sum() > 0


def test_a_shared_source_is_encoded_once(reward32, monkeypatch):
    """A group's edits of one source (GRPO): the source goes through the vision tower once per call."""
    src = as_tensor([pixels(12)]).float().expand(3, -1, -1, -1)
    edits = as_tensor([pixels(13), pixels(14), pixels(15)]).float()
    calls = []
    inner = reward32.vision
    monkeypatch.setattr(reward32, "vision", lambda *feeds: calls.append(1) or inner(*feeds))
    grouped = reward32(["Add a bowl"] * 3, src, edits)
    assert len(calls) == 1 + 3
    singles = torch.cat([reward32(["Add a bowl"], src[:1], edits[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(grouped, singles, atol=1e-6, rtol=0)


def test_bicubic_resize_is_nearer_the_reference(tiny):
    """Shrinking a large photo-sized image: the antialiased bicubic option lands nearer the Scorer
    (PIL bicubic) than upstream's bilinear path."""
    from conftest import random_image

    image = np.asarray(random_image(21, 1080, 1440))
    source, edited = as_tensor([np.asarray(random_image(22, 1080, 1440))]).float(), as_tensor([image]).float()
    gaps = {}
    for mode in ("bilinear", "bicubic"):
        reward = DifferentiableReward.load(tiny.checkpoint, prompts_from=tiny.prompts, dtype="float32", resize=mode)
        want = reward.scorer.score("Add a bowl", np.asarray(random_image(22, 1080, 1440)), image).mu
        gaps[mode] = abs(float(reward(["Add a bowl"], source, edited)[0, 0]) - want)
    assert gaps["bicubic"] < gaps["bilinear"], gaps
    with pytest.raises(InputError, match="resize must be"):
        DifferentiableReward.load(tiny.checkpoint, prompts_from=tiny.prompts, resize="nearest")


def test_rotary_tables_stay_float32_for_bf16_images(reward32):
    """A bf16 image (a bf16 generator's output) gets the Scorer's float32 rotary tables, not tables
    rounded to bf16; a float64 image keeps float64 ones (the gradient checks)."""
    from editreward_families.qwen2_5_vl.torch_inputs import image_feeds

    image = as_tensor([pixels(3)])[0]
    (_, cos32, sin32, *_), _, _ = image_feeds(image.float(), reward32.spec)
    (_, cos16, sin16, *_), _, _ = image_feeds(image.bfloat16(), reward32.spec)
    assert cos16.dtype == sin16.dtype == torch.float32
    assert torch.equal(cos16, cos32) and torch.equal(sin16, sin32)
    (_, cos64, *_), _, _ = image_feeds(image, reward32.spec)
    assert cos64.dtype == torch.float64
