"""Checkpoint key names and tensor shapes of a Qwen2.5-VL EditReward checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from editreward_rt.errors import CheckpointError, WeightMismatchError

from .spec import ModelSpec, TokenSpec

VISION, DECODER, HEADS = "model.visual.", "model.language_model.", "rm_heads."
# Checkpoint prefix of each of the three modules (``modeling``); ``lm_head`` belongs to none.
PREFIXES = {"vision": VISION, "decoder": DECODER, "heads": HEADS}
EMBEDDING = DECODER + "embed_tokens.weight"
UNUSED = ("lm_head.weight",)  # loaded by the reference, never read by the reward


def normalise_key(key: str) -> str:
    """Map pre-4.52 transformers names (``visual.``, ``model.layers.``) to the current layout."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith((VISION, DECODER)):
        return DECODER + key[len("model."):]
    return key


def embedding_rows(shapes: dict) -> int | None:
    """Rows of the checkpoint's token embedding (the vocabulary, ``<|Reward|>`` included)."""
    return shapes.get(EMBEDDING, (None,))[0]


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor the reward model reads, with its shape (``lm_head`` is optional: never read)."""
    t, v, h = spec.text, spec.vision, spec.heads
    out = {
        VISION + "patch_embed.proj.weight": (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
        VISION + "merger.ln_q.weight": (v.hidden_size,),
        VISION + "merger.mlp.0.weight": (4 * v.hidden_size, 4 * v.hidden_size),
        VISION + "merger.mlp.0.bias": (4 * v.hidden_size,),
        VISION + "merger.mlp.2.weight": (v.out_hidden_size, 4 * v.hidden_size),
        VISION + "merger.mlp.2.bias": (v.out_hidden_size,),
        EMBEDDING: (t.vocab_size, t.hidden_size),
        DECODER + "norm.weight": (t.hidden_size,),
    }
    for i in range(v.depth):
        p = f"{VISION}blocks.{i}."
        out |= {p + "norm1.weight": (v.hidden_size,), p + "norm2.weight": (v.hidden_size,),
                p + "attn.qkv.weight": (3 * v.hidden_size, v.hidden_size), p + "attn.qkv.bias": (3 * v.hidden_size,),
                p + "attn.proj.weight": (v.hidden_size, v.hidden_size), p + "attn.proj.bias": (v.hidden_size,)}
        for name, shape in (("gate_proj", (v.intermediate_size, v.hidden_size)), ("up_proj", (v.intermediate_size, v.hidden_size)),
                            ("down_proj", (v.hidden_size, v.intermediate_size))):
            out |= {p + f"mlp.{name}.weight": shape, p + f"mlp.{name}.bias": (shape[0],)}
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    for i in range(t.num_layers):
        p = f"{DECODER}layers.{i}."
        out |= {p + "self_attn.q_proj.weight": (q, t.hidden_size), p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.weight": (kv, t.hidden_size), p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, t.hidden_size), p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (t.hidden_size, q),
                p + "mlp.gate_proj.weight": (t.intermediate_size, t.hidden_size),
                p + "mlp.up_proj.weight": (t.intermediate_size, t.hidden_size),
                p + "mlp.down_proj.weight": (t.hidden_size, t.intermediate_size),
                p + "input_layernorm.weight": (t.hidden_size,), p + "post_attention_layernorm.weight": (t.hidden_size,)}
    sizes = h.layer_sizes
    for k in range(h.num_heads):
        for idx, (fan_in, fan_out) in zip((0, 3, 5), zip(sizes, sizes[1:])):
            out |= {f"{HEADS}head_{k}.{idx}.weight": (fan_out, fan_in), f"{HEADS}head_{k}.{idx}.bias": (fan_out,)}
    return out


def decoder_parameters(spec: ModelSpec) -> int:
    """Parameters of the decoder (token embedding included, ``lm_head`` excluded)."""
    import math

    return sum(math.prod(shape) for name, shape in expected_shapes(spec).items() if name.startswith(DECODER))


def is_embedding(name: str) -> bool:
    """Whether a parameter or exported initializer name is the token embedding table."""
    return "embed_tokens" in name


def checkpoint_key(module: str, name: str) -> str:
    """The checkpoint key of parameter ``name`` of module ``module`` (vision, decoder or heads):
    the inverse of ``split_state_dict``."""
    return PREFIXES[module] + (name[len("heads."):] if module == "heads" else name)


def split_state_dict(state: dict) -> dict[str, dict]:
    """Checkpoint keys -> one state dict per module (vision, decoder, heads); ``lm_head`` is dropped."""
    parts: dict[str, dict] = {name: {} for name in PREFIXES}
    for key, value in state.items():
        for name, prefix in PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = value
    parts["heads"] = {f"heads.{k}": v for k, v in parts["heads"].items()}
    return parts


def token_spec(tokenizer, config: dict, base_dir: Path) -> TokenSpec:
    """The special token ids, checked against the base config where it states them."""
    def token_id(text: str, config_key: str | None = None) -> int:
        value = tokenizer.token_to_id(text)
        if value is None:
            raise CheckpointError(f"tokenizer in {base_dir} lacks {text}")
        if config_key and config.get(config_key) not in (None, value):
            raise CheckpointError(f"{config_key}={config[config_key]} in config.json but the tokenizer has {text}={value}")
        return value

    pad_text = "<|endoftext|>"
    tok_cfg = base_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        pad = json.loads(tok_cfg.read_text(encoding="utf-8")).get("pad_token")
        pad_text = pad.get("content") if isinstance(pad, dict) else (pad or pad_text)
    return TokenSpec(
        image_pad=token_id("<|image_pad|>", "image_token_id"),
        vision_start=token_id("<|vision_start|>", "vision_start_token_id"),
        vision_end=token_id("<|vision_end|>", "vision_end_token_id"),
        reward=token_id("<|Reward|>"),
        pad=token_id(pad_text),
    )


def check_module_state(spec: ModelSpec, shapes: dict) -> None:
    """A saved module state (keys ``vision.``, ``decoder.``, ``heads.`` as a quantized torch folder
    stores them) holds exactly the layers and blocks the spec says, checked before modules are built."""
    for what, expected, prefix in (("decoder layers", spec.text.num_layers, "decoder.layers."),
                                   ("vision blocks", spec.vision.depth, "vision.blocks.")):
        found = {key[len(prefix):].split(".", 1)[0] for key in shapes if key.startswith(prefix)}
        if len({i for i in found if i.isdigit()}) != expected:
            raise WeightMismatchError(f"the spec says {expected} {what} but the saved state holds {len(found)}")
