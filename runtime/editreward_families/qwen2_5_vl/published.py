"""The published full-size dimensions: Qwen2.5-VL-7B (and MiMo-VL-7B, the same shapes) with the
EditReward heads, and a spec, config and random weights of that size for benchmarks and fixtures."""

from __future__ import annotations

import dataclasses

import numpy as np

from .weights import HEADS, expected_shapes, is_embedding

# Qwen2.5-VL-7B-Instruct's published sizes.
FULL_TEXT = dict(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18944)
FULL_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                   fullatt_block_indexes=(7, 15, 23, 31))
FULL_VOCAB = 151666  # Qwen2.5 tokenizer (151665) plus <|Reward|>


def full_spec(spec, vocab_size: int = FULL_VOCAB):
    """``spec`` at the published 7B's sizes (``vocab_size``: embedding rows, to match a small tokenizer)."""
    text = dataclasses.replace(spec.text, vocab_size=vocab_size, **FULL_TEXT)
    vision = dataclasses.replace(spec.vision, **FULL_VISION)
    heads = dataclasses.replace(spec.heads, layer_sizes=(FULL_TEXT["hidden_size"],) + spec.heads.layer_sizes[1:])
    return dataclasses.replace(spec, text=text, vision=vision, heads=heads)


def full_text_spec(spec, layers: int):
    """The 7B's text widths and full embedding with ``layers`` decoder layers; ``spec``'s vision tower,
    projecting into the 7B's width (for measuring per-layer sizes at the real shapes)."""
    text = dataclasses.replace(spec.text, vocab_size=FULL_VOCAB, **{**FULL_TEXT, "num_layers": layers})
    vision = dataclasses.replace(spec.vision, out_hidden_size=FULL_TEXT["hidden_size"])
    heads = dataclasses.replace(spec.heads, layer_sizes=(FULL_TEXT["hidden_size"],) + spec.heads.layer_sizes[1:])
    return dataclasses.replace(spec, text=text, vision=vision, heads=heads)


def subset(spec, config: dict, layers: int):
    """(spec, config) with the first ``layers`` decoder layers and the vision blocks up to the first
    full-attention block (``validation_subset``)."""
    v = spec.vision
    depth = min(v.depth, min(v.fullatt_block_indexes, default=v.depth - 1) + 1)
    text = dataclasses.replace(spec.text, num_layers=min(layers, spec.text.num_layers))
    vision = dataclasses.replace(v, depth=depth, fullatt_block_indexes=tuple(i for i in v.fullatt_block_indexes if i < depth))
    out = {**config, "num_hidden_layers": text.num_layers,
           "vision_config": {**config["vision_config"], "depth": depth, "fullatt_block_indexes": list(vision.fullatt_block_indexes)}}
    if "text_config" in config:  # configs saved by transformers >= 4.52 nest the text sizes
        out["text_config"] = {**config["text_config"], "num_hidden_layers": text.num_layers}
    return dataclasses.replace(spec, text=text, vision=vision), out


def full_config(config: dict, spec) -> dict:
    t, v = spec.text, spec.vision
    out = {k: val for k, val in config.items() if k != "text_config"}
    out.update(hidden_size=t.hidden_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
               num_key_value_heads=t.num_kv_heads, intermediate_size=t.intermediate_size, vocab_size=t.vocab_size,
               rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    out["vision_config"] = {**config["vision_config"], "depth": v.depth, "hidden_size": v.hidden_size,
                            "num_heads": v.num_heads, "intermediate_size": v.intermediate_size,
                            "out_hidden_size": v.out_hidden_size, "fullatt_block_indexes": list(v.fullatt_block_indexes)}
    return out


def random_state(spec, device, dtype, seed: int = 0) -> dict:
    """Random weights with the checkpoint's names and shapes; heads in float32 as upstream."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(spec).items():
        head = name.startswith(HEADS)
        if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight") \
                or name.endswith("layernorm.weight") or name.endswith("ln_q.weight"):
            tensor = torch.ones(shape, device=device)
        elif name.endswith(".bias"):
            tensor = torch.zeros(shape, device=device)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            std = 1.0 if is_embedding(name) else fan_in**-0.5
            tensor = torch.randn(shape, device=device, generator=gen) * std
        state[name] = tensor.float() if head else tensor.to(dtype)
    return state
