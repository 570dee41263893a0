"""The runtime's torch-free inputs against the reference pipeline built from transformers.

Reference: upstream's image handling (convert RGB, smart_resize to 200704 pixels, PIL bicubic)
followed by transformers' Qwen2-VL image processor, and the base tokenizer (with <|Reward|>
added) applying the chat template, image pads expanded per image, right padding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from editreward_rt.preprocess import smart_resize
from editreward_rt.templates import templates_from_folder
from PIL import Image

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_pipeline(tiny):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny.base))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(str(tiny.base))
    return tokenizer, processor, templates_from_folder(tiny.prompts)


def hf_inputs(hf_pipeline, instruction, source, edited, head):
    tokenizer, processor, templates = hf_pipeline
    images = []
    for image in (source, edited):
        image = image.convert("RGB")
        h, w = smart_resize(image.height, image.width, 28, 200704, 200704)
        images.append(image.resize((w, h), Image.BICUBIC))
    batch = processor(images=images, return_tensors="np")
    text = templates.rubric_text(head, instruction)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for grid in batch["image_grid_thw"]:  # the processor's placeholder expansion, one image at a time
        rendered = rendered.replace("<|image_pad|>", "<|placeholder|>" * (int(np.prod(grid)) // 4), 1)
    ids = tokenizer(rendered.replace("<|placeholder|>", "<|image_pad|>"))["input_ids"]
    return np.asarray(ids), batch["pixel_values"], batch["image_grid_thw"]


CASES = [("Add a green bowl on the branch", 0, 1), ("naïve café — “quotes”, 3 apples & 12 pears!", 2, 3),
         ("  leading and trailing spaces  ", 4, 5), ("Zoom\nout\tplease", 6, 0), ("emoji 🎉 and 中文 text", 3, 4)]


@pytest.mark.parametrize("instruction,a,b", CASES)
def test_token_ids_and_pixels_match_transformers(fast, hf_pipeline, images, instruction, a, b):
    triple = fast.prepare(instruction, images[a], images[b])
    for head, prompt in enumerate(triple.prompts):
        ids, pixels, grids = hf_inputs(hf_pipeline, instruction, images[a], images[b], head)
        np.testing.assert_array_equal(prompt.ids, ids)
    ours = np.concatenate([triple.source.pixel_values, triple.edited.pixel_values])
    assert [tuple(g) for g in grids] == [tuple(triple.source.grid_thw), tuple(triple.edited.grid_thw)]
    assert np.abs(ours - pixels).max() <= 1e-5


def test_reference_scores_from_transformers_inputs(reference, hf_pipeline, images):
    """Upstream's forward, written out with transformers calls on transformers-built inputs."""
    runner = reference.backend.runner
    model, heads, tokens = runner.model, runner.heads, reference.spec.tokens
    instruction, src, edit = CASES[0][0], images[0], images[1]
    outputs = []
    with torch.inference_mode():
        for head in range(2):
            ids, pixels, grids = hf_inputs(hf_pipeline, instruction, src, edit, head)
            ids = torch.as_tensor(ids)[None]
            mask = torch.ones_like(ids)
            embeds = model.language_model.embed_tokens(ids)
            vision = model.visual(torch.as_tensor(pixels), grid_thw=torch.as_tensor(grids))
            vision = getattr(vision, "pooler_output", vision)
            embeds = embeds.masked_scatter((ids == tokens.image_pad)[..., None].expand_as(embeds), vision)
            # Upstream passes no position ids; under transformers 4.57 that gives cumsum(mask) - 1 on all 3 sections.
            positions = (mask.cumsum(-1) - 1)[None].expand(3, -1, -1)
            hidden = model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
            outputs.append(heads.heads[f"head_{head}"](hidden.float())[ids == tokens.reward][0])
    expected = torch.stack(outputs).mean(0)
    score = reference.score(instruction, src, edit)
    assert abs(score.mu - float(expected[0])) <= 1e-5
    assert abs(score.log_sigma - float(expected[1])) <= 1e-5

