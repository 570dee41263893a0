"""Resolve a checkpoint argument (hub id, alias or local folder) and read it.

Two layouts are accepted:
- upstream: the reward model's full state dict (``model.safetensors``, sharded safetensors with
  ``model.safetensors.index.json``, or ``model.pth``) plus, optionally, the upstream yaml that
  names the base model; the base model's config, tokenizer and chat template come from
  ``--base`` (hub id or folder), the yaml's ``model_name_or_path``, or the published
  checkpoint's known base.
- self-contained: one folder with ``config.json``, ``tokenizer.json``, chat template and weights.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, WeightMismatchError
from .prompts import load_tokenizer, read_chat_template, render_chat_template
from .spec import ModelSpec, TokenSpec, build_spec
from .templates import Templates, resolve_templates

# The paper's name is not a repository; it resolves to the checkpoint with the best
# EditReward-Bench overall score in the paper (MiMo-VL based: 38.42 vs 36.78).
ALIASES = {"TIGER-Lab/EditReward": "TIGER-Lab/EditReward-MiMo-VL-7B-SFT-2508"}
# Facts of the upstream yamls for the published checkpoints, used when the hub repo carries no yaml.
KNOWN = {
    "TIGER-Lab/EditReward-MiMo-VL-7B-SFT-2508": {"model_name_or_path": "XiaomiMiMo/MiMo-VL-7B-SFT-2508"},
    "TIGER-Lab/EditReward-Qwen2.5-VL-7B": {"model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"},
}
UPSTREAM_DEFAULTS = {
    "rm_head_type": "ranknet_multi_head",
    "pooling_strategy": "mean",
    "output_dim": 2,
    "use_special_tokens": True,
    "reward_token": "special",
    "min_pixels": 200704,
    "max_pixels": 200704,
}
WEIGHT_PATTERNS = ["*.safetensors", "model.safetensors.index.json", "model.pth", "*.yaml", "*.json", "*.jinja"]
BASE_PATTERNS = ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.json", "chat_template.jinja",
                 "preprocessor_config.json"]


def resolve_folder(name_or_path: str | os.PathLike, patterns: list[str]) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded (only the files we read)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name} is neither a folder nor a hub repository id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ALIASES.get(name, name), allow_patterns=patterns))
    except Exception as exc:  # hub errors come in many classes; all mean the same here
        raise CheckpointError(f"cannot fetch {name} from the hub: {exc}") from exc


def _read_yaml(folder: Path) -> tuple[dict, Path | None]:
    import yaml

    found = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    if not found:
        return {}, None
    try:
        data = yaml.safe_load(found[0].read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise CheckpointError(f"cannot parse {found[0]}: {exc}") from exc
    return data, found[0]


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"malformed {index}: {exc}") from exc
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names missing shards: {missing[:3]}")
        return files
    for name in ("model.safetensors", "model.pth"):
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json or model.pth")


def normalise_key(key: str) -> str:
    """Map pre-4.52 transformers names (``visual.``, ``model.layers.``) to the current layout."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + key[len("model."):]
    return key


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def load_state_dict(files: list[Path]) -> dict:
    """Full state dict as torch tensors. ``.pth`` is read with ``weights_only=True`` (no code runs)."""
    import torch

    state = {}
    for path in files:
        if path.suffix == ".pth":
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # pickle errors for anything but plain tensors
                raise CheckpointError(f"cannot load {path} safely (weights_only=True): {exc}") from exc
            loaded = loaded.get("model", loaded) if isinstance(loaded, dict) else loaded
            if not isinstance(loaded, dict):
                raise CheckpointError(f"{path} does not hold a state dict")
        else:
            from safetensors.torch import load_file

            try:
                loaded = load_file(str(path), device="cpu")
            except Exception as exc:  # safetensors raises its own error type for corrupt files
                raise CheckpointError(f"cannot read {path}: {exc}") from exc
        state.update({normalise_key(k): v for k, v in loaded.items()})
    return state


@dataclass
class Checkpoint:
    """Everything needed to build a backend from a checkpoint."""

    spec: ModelSpec
    files: list[Path]
    tokenizer: object
    chat_text: str
    templates: Templates
    config: dict
    origin: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        state = load_state_dict(self.files)
        check_state(state, expected_shapes(self.spec))
        return state


def _base_folder(arg: str | None, yaml_cfg: dict, yaml_path: Path | None, ckpt: Path, ckpt_id: str) -> Path:
    if arg is not None:
        return resolve_folder(arg, BASE_PATTERNS)
    if (ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file():
        return ckpt  # self-contained layout
    name = yaml_cfg.get("model_name_or_path")
    if name and yaml_path is not None and (yaml_path.parent / name).is_dir():
        return (yaml_path.parent / name).resolve()
    if name:
        return resolve_folder(name, BASE_PATTERNS)
    raise CheckpointError(f"{ckpt_id}: cannot tell the base model; pass --base (hub id or folder)")


def open_checkpoint(name_or_path: str | os.PathLike, base: str | None = None,
                    prompts_from: str | os.PathLike | None = None) -> Checkpoint:
    ckpt_id = ALIASES.get(str(name_or_path), str(name_or_path))
    folder = resolve_folder(ckpt_id, WEIGHT_PATTERNS)
    yaml_cfg, yaml_path = _read_yaml(folder)
    yaml_cfg = {**UPSTREAM_DEFAULTS, **KNOWN.get(ckpt_id, {}), **yaml_cfg}
    base_dir = _base_folder(base, yaml_cfg, yaml_path, folder, ckpt_id)
    files = weight_files(folder)
    shapes = {}
    for path in files:
        if path.suffix == ".safetensors":
            shapes.update({normalise_key(k): v for k, v in _safetensors_shapes(path).items()})
    if not shapes:  # model.pth: shapes only come from loading it
        shapes = {k: tuple(v.shape) for k, v in load_state_dict(files).items()}
    config = _read_json(base_dir / "config.json")
    embed_rows = shapes.get("model.language_model.embed_tokens.weight", (None,))[0]
    tokenizer = load_tokenizer(base_dir / "tokenizer.json", expected_size=embed_rows)
    tokens = _token_spec(tokenizer, config, base_dir)
    spec = build_spec(config, shapes, tokens, yaml_cfg)
    check_state(shapes, expected_shapes(spec))
    chat_text = render_chat_template(read_chat_template(base_dir))
    templates = resolve_templates(prompts_from, folder)
    origin = {"checkpoint": ckpt_id, "base": str(base or yaml_cfg.get("model_name_or_path") or base_dir),
              "yaml": yaml_path.name if yaml_path else None}
    return Checkpoint(spec, files, tokenizer, chat_text, templates, config, origin)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def _token_spec(tokenizer, config: dict, base_dir: Path) -> TokenSpec:
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


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor the reward model reads, with its shape (``lm_head`` is optional: never read)."""
    t, v, h = spec.text, spec.vision, spec.heads
    out = {
        "model.visual.patch_embed.proj.weight": (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
        "model.visual.merger.ln_q.weight": (v.hidden_size,),
        "model.visual.merger.mlp.0.weight": (4 * v.hidden_size, 4 * v.hidden_size),
        "model.visual.merger.mlp.0.bias": (4 * v.hidden_size,),
        "model.visual.merger.mlp.2.weight": (v.out_hidden_size, 4 * v.hidden_size),
        "model.visual.merger.mlp.2.bias": (v.out_hidden_size,),
        "model.language_model.embed_tokens.weight": (t.vocab_size, t.hidden_size),
        "model.language_model.norm.weight": (t.hidden_size,),
    }
    for i in range(v.depth):
        p = f"model.visual.blocks.{i}."
        out |= {p + "norm1.weight": (v.hidden_size,), p + "norm2.weight": (v.hidden_size,),
                p + "attn.qkv.weight": (3 * v.hidden_size, v.hidden_size), p + "attn.qkv.bias": (3 * v.hidden_size,),
                p + "attn.proj.weight": (v.hidden_size, v.hidden_size), p + "attn.proj.bias": (v.hidden_size,)}
        for name, shape in (("gate_proj", (v.intermediate_size, v.hidden_size)), ("up_proj", (v.intermediate_size, v.hidden_size)),
                            ("down_proj", (v.hidden_size, v.intermediate_size))):
            out |= {p + f"mlp.{name}.weight": shape, p + f"mlp.{name}.bias": (shape[0],)}
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    for i in range(t.num_layers):
        p = f"model.language_model.layers.{i}."
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
            out |= {f"rm_heads.head_{k}.{idx}.weight": (fan_out, fan_in), f"rm_heads.head_{k}.{idx}.bias": (fan_out,)}
    return out


def check_state(state: dict, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise on missing, unexpected or mis-shaped tensors (``lm_head.weight`` may be present or not)."""
    shape_of = lambda v: tuple(v) if isinstance(v, tuple) else tuple(v.shape)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - {"lm_head.weight"})
    wrong = [f"{k}: {shape_of(state[k])} != {expected[k]}" for k in sorted(set(expected) & set(state))
             if shape_of(state[k]) != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(items)}): {items[:4]}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
        raise WeightMismatchError("checkpoint tensors do not match the architecture; " + "; ".join(parts))
