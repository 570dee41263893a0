"""The trainer adapters, each called exactly as its trainer calls a reward function: flow_grpo's
``reward_fn(images, prompts, metadata[, ref_images, only_strict=...])`` and TRL's GRPOTrainer
(its real ``_calculate_rewards``), on the tiny ONNX export."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import random_image
from editreward_rt import BatchingScorer, Scorer
from editreward_rt.errors import InputError
from editreward_rt.rl import FlowGrpoReward, TrlReward


@pytest.fixture(scope="module")
def scorer(tiny_onnx):
    return Scorer.load(tiny_onnx, threads=1, max_batch=4)


@pytest.fixture(scope="module")
def batch():
    """2 prompts x 3 edits, as a GRPO step sees them: sources repeated per generation, images 64 x 48."""
    sources = [np.asarray(random_image(400 + p, 48, 64)) for p in range(2)]
    edits = [np.asarray(random_image(410 + i, 48, 64)) for i in range(6)]
    prompts = ["add a cat"] * 3 + ["make it snow"] * 3
    return prompts, [sources[i // 3] for i in range(6)], edits


def _want(scorer, prompts, sources, edits):
    return np.array([scorer.score(p, s, e).mu for p, s, e in zip(prompts, sources, edits)], dtype=np.float32)


def test_flow_grpo_tensor_images_and_metadata_sources(scorer, batch):
    """flow_grpo samples with output_type="pt": images are a float tensor [B, C, H, W] in [0, 1]."""
    torch = pytest.importorskip("torch")
    prompts, sources, edits = batch
    images = torch.from_numpy(np.stack(edits)).permute(0, 3, 1, 2).float() / 255.0
    metadata = [{"source": s} for s in sources]
    scores, info = FlowGrpoReward(scorer)(images, prompts, metadata)
    assert isinstance(scores, np.ndarray) and scores.shape == (6,) and info == {"errors": {}}
    # x / 255 rounds back to the same bytes, so the numbers are those of the uint8 images.
    np.testing.assert_allclose(scores, _want(scorer, prompts, sources, edits), atol=1e-5)


def test_flow_grpo_edit_script_call_with_ref_images_and_numpy(scorer, batch):
    """The edit scripts call ``reward_fn(images, prompts, prompt_metadata, ref_images, only_strict=False)``;
    numpy images are NHWC (uint8 here, floats in [0, 1] too); the instruction may come from metadata."""
    from PIL import Image

    prompts, sources, edits = batch
    ref_images = [Image.fromarray(s) for s in sources]
    metadata = [{"instruction": "remove the sky"} for _ in prompts]
    scores, _ = FlowGrpoReward(scorer)(np.stack(edits), prompts, metadata, ref_images, only_strict=False)
    np.testing.assert_allclose(scores, _want(scorer, ["remove the sky"] * 6, sources, edits), atol=1e-5)
    floats, _ = FlowGrpoReward(scorer)(np.stack(edits).astype(np.float32) / 255.0, prompts, [{"source": s} for s in sources])
    np.testing.assert_allclose(floats, _want(scorer, prompts, sources, edits), atol=1e-5)


def test_flow_grpo_bad_image_costs_its_reward_only(scorer, batch):
    prompts, sources, edits = batch
    bad = [e.astype(np.float32) / 255.0 for e in edits]
    bad[2] = np.full_like(bad[2], np.nan)
    scores, info = FlowGrpoReward(scorer)(bad, prompts, [{"source": s} for s in sources])
    assert np.isnan(scores[2]) and set(info["errors"]) == {2} and info["errors"][2]["type"] == "image_error"
    keep = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(scores[keep], _want(scorer, prompts, sources, edits)[keep], atol=1e-5)
    with pytest.raises(InputError, match="ref_images"):
        FlowGrpoReward(scorer)(np.stack(edits), prompts, [{}] * 6)


def _grpo_trainer(reward):
    """A GRPOTrainer with just what its ``_calculate_rewards`` reads (the real method runs)."""
    from accelerate import Accelerator
    from transformers import TrainerState, TrainingArguments
    from trl import GRPOTrainer

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)  # before the Accelerator: it resets its state
    trainer.accelerator, trainer.state = Accelerator(cpu=True), TrainerState()
    trainer.reward_funcs, trainer.reward_processing_classes, trainer.reward_func_names = [reward], [None], ["editreward"]
    trainer._log_completion_extra = trainer._log_metric = lambda *a, **k: None
    trainer.environments = None
    return trainer


def test_trl_grpo_trainer_calls_the_reward_with_its_columns(scorer, batch, tmp_path, monkeypatch):
    """GRPOTrainer passes every dataset column but prompt/completion as kwargs, one value per
    completion: here ``source`` and ``edited`` images; None marks a triple it could not score."""
    pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)
    prompts, sources, edits = batch
    buf = io.BytesIO()
    random_image(1, 20, 20).save(buf, "PNG")
    broken = list(edits)
    broken[4] = buf.getvalue()[:60]
    inputs = [{"prompt": p, "source": s, "edited": e} for p, s, e in zip(prompts, sources, broken)]
    completions = ["<image>"] * 6
    with BatchingScorer(scorer, max_wait_ms=5) as batcher:
        trainer = _grpo_trainer(TrlReward(batcher))
        rewards = trainer._calculate_rewards(inputs, prompts, completions, [[0]] * 6)
    assert tuple(rewards.shape) == (6, 1)
    got = rewards[:, 0].numpy()
    assert np.isnan(got[4])
    keep = [0, 1, 2, 3, 5]
    np.testing.assert_allclose(got[keep], _want(scorer, prompts, sources, edits)[keep], atol=1e-5)


def test_trl_conversational_prompts_and_missing_columns(scorer, batch):
    prompts, sources, edits = batch
    chat = [[{"role": "system", "content": "be kind"}, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]
            for p in prompts]
    got = TrlReward(scorer)(prompts=chat, completions=edits, source=sources)
    np.testing.assert_allclose(got, _want(scorer, prompts, sources, edits), atol=1e-5)
    with pytest.raises(InputError, match="'source' column"):
        TrlReward(scorer)(prompts=prompts, completions=edits)
    with pytest.raises(InputError, match="completions are text"):
        TrlReward(scorer)(prompts=prompts, completions=["a"] * 6, source=sources)
