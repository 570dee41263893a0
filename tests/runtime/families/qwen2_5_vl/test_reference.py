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


def test_reference_equals_transformers_forward_called_as_upstream(reference, hf_pipeline, images):
    """``Qwen2_5_VLModel.forward(inputs_embeds=..., attention_mask=..., position_ids=None)`` on a
    right-padded batch, exactly the call upstream's reward model makes, against the project's
    reference runner (which states its 1-D positions explicitly)."""
    runner = reference.backend.runner
    model, heads, tokens = runner.model, runner.heads, reference.spec.tokens
    cases = [CASES[0], CASES[1], CASES[3]]
    expected = reference.backend.head_outputs([reference.prepare(c[0], images[c[1]], images[c[2]]) for c in cases])
    with torch.inference_mode():
        for head in range(2):
            built = [hf_inputs(hf_pipeline, c[0], images[c[1]], images[c[2]], head) for c in cases]
            length = max(len(ids) for ids, _, _ in built)
            ids = torch.full((len(built), length), tokens.pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (row, _, _) in enumerate(built):  # right padding, as upstream's processor
                ids[i, : len(row)], mask[i, : len(row)] = torch.as_tensor(row), 1
            assert (mask == 0).any()  # the batch really is padded
            pixels = torch.as_tensor(np.concatenate([p for _, p, _ in built]))
            grids = torch.as_tensor(np.concatenate([g for _, _, g in built]))
            embeds = model.get_input_embeddings()(ids)
            vision = model.get_image_features(pixels, grids)
            vision = torch.cat(list(getattr(vision, "pooler_output", vision)))
            embeds = embeds.masked_scatter((ids == tokens.image_pad)[..., None].expand_as(embeds), vision.to(embeds.dtype))
            hidden = model(inputs_embeds=embeds, attention_mask=mask, position_ids=None).last_hidden_state
            got = heads.heads[f"head_{head}"](hidden.float())[ids == tokens.reward].view(len(built), 2)
            np.testing.assert_allclose(got.numpy(), expected[:, head], atol=2e-5, rtol=1e-5)


def published_spec_and_config(tiny):
    from editreward_families.qwen2_5_vl import published
    from editreward_rt.checkpoint import open_checkpoint

    ckpt = open_checkpoint(tiny.checkpoint, prompts_from=tiny.prompts)
    spec = published.full_spec(ckpt.spec)
    return spec, published.full_config(ckpt.config, spec)


def test_reference_builds_the_published_size_on_meta(tiny):
    """The 7B's config through the reference's own construction (``Qwen2_5_VLConfig.from_dict`` of
    the flat config the GPU run passes, ``_from_config(dtype=)``) on the meta device: every checkpoint
    tensor of the published size loads by name and shape, in the dtype asked for (float16:
    not the config's ``torch_dtype``, so only the ``dtype`` argument can give it). A transformers release that
    renames, reshapes or drops an argument fails here, in CI, instead of on the lent GPU."""
    from editreward_families.qwen2_5_vl import reference
    from editreward_families.qwen2_5_vl.weights import expected_shapes

    spec, config = published_spec_and_config(tiny)
    assert "text_config" not in config and config["hidden_size"] == 3584  # flat, full size
    with torch.device("meta"):
        model = reference.hf_model(spec, config, torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}  # built in it (loading with assign would hide it)
    body = {name[len("model."):]: torch.empty(shape, dtype=torch.float16, device="meta")
            for name, shape in expected_shapes(spec).items() if name.startswith("model.")}
    model.load_state_dict(body, strict=True, assign=True)
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.vocab_size) == (3584, 28, 4, 151666)
    assert (vision.depth, list(vision.fullatt_block_indexes)) == (32, [7, 15, 23, 31])
    assert 7.6e9 < sum(p.numel() for p in model.parameters()) < 7.8e9


def test_reference_names_the_transformers_it_needs():
    from editreward_families.qwen2_5_vl import reference
    from editreward_rt.errors import BackendError

    reference.check_transformers(transformers.__version__)  # what CI has
    reference.check_transformers("5.17.0")  # what the lent GPU machines have
    with pytest.raises(BackendError, match=r"needs transformers >= 4\.57, found 4\.51\.3"):
        reference.check_transformers("4.51.3")
