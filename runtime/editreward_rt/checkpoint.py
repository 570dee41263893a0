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
from .extras import require
from .families import family, family_for
from .prompts import load_tokenizer, read_chat_template
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
    yaml = require("yaml", "torch", "reading the upstream yaml")

    found = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    if not found:
        return {}, None
    try:
        data = yaml.safe_load(found[0].read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, RecursionError) as exc:
        raise CheckpointError(f"cannot parse {found[0]}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{found[0]} holds a YAML {type(data).__name__}, not a mapping of settings")
    return data, found[0]


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise CheckpointError(f"malformed {index}: weight_map must map tensor names to shard file names")
        names = sorted(set(weight_map.values()))
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names missing shards: {missing[:3]}")
        return files
    for name in ("model.safetensors", "model.pth"):
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json or model.pth")


SAFETENSORS_MAX_HEADER = 100_000_000  # bytes; the safetensors library refuses larger headers too


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > min(SAFETENSORS_MAX_HEADER, os.path.getsize(path) - 8):
                raise ValueError(f"header length {size} exceeds the file or safetensors' {SAFETENSORS_MAX_HEADER}-byte limit")
            header = json.loads(f.read(size))
        return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, struct.error, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {type(exc).__name__}: {exc}") from None


def load_state_dict(files: list[Path], normalise_key=lambda key: key) -> dict:
    """Full state dict as torch tensors, keys through ``normalise_key``. ``.pth`` is read with
    ``weights_only=True`` (no code runs)."""
    torch = require("torch", "torch", "reading checkpoint weights")

    state = {}
    for path in files:
        if path.suffix == ".pth":
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch's UnpicklingError text is long and names its own internals
                what = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"{path} holds pickled objects other than tensors and is refused: it is read with "
                                      f"torch.load(weights_only=True), which never runs code ({what})") from None
            loaded = loaded.get("model", loaded) if isinstance(loaded, dict) else loaded
            if not isinstance(loaded, dict):
                raise CheckpointError(f"{path} does not hold a state dict")
        else:
            load_file = require("safetensors.torch", "torch", "reading checkpoint weights").load_file

            try:
                loaded = load_file(str(path), device="cpu")
            except Exception as exc:  # safetensors raises its own error type for corrupt files
                raise CheckpointError(f"cannot read {path}: {exc}") from exc
        state.update({normalise_key(k): v for k, v in loaded.items()})
    return state


class TensorSource:
    """A checkpoint's tensors read one at a time (normalised keys -> torch tensors): safetensors
    through ``safe_open``, so a 15 GB checkpoint never sits in memory whole. A ``.pth`` file (no
    random access) or an in-memory state dict is held."""

    def __init__(self, files: list[Path] = (), normalise_key=lambda key: key, state: dict | None = None):
        self._held = state
        self._where: dict[str, tuple[Path, str]] = {}
        for path in files:
            if path.suffix == ".safetensors":
                self._where.update({normalise_key(k): (path, k) for k in safetensors_shapes(path)})
            elif self._held is None:
                self._held = load_state_dict([path], normalise_key)

    def keys(self) -> list[str]:
        return list(self._where) + list(self._held or {})

    def get(self, key: str):
        if self._held is not None and key in self._held:
            return self._held[key]
        if key not in self._where:
            raise WeightMismatchError(f"the checkpoint has no tensor {key}")
        safe_open = require("safetensors", "torch", "reading checkpoint weights").safe_open
        path, stored = self._where[key]
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return f.get_tensor(stored)
        except Exception as exc:  # safetensors raises its own error type for corrupt files
            raise CheckpointError(f"cannot read {stored} from {path}: {exc}") from exc


@dataclass
class Checkpoint:
    """Everything needed to build a backend from a checkpoint."""

    spec: object  # the family's ModelSpec
    files: list[Path]
    tokenizer: object
    chat_text: str
    templates: Templates
    config: dict
    origin: dict = field(default_factory=dict)

    @property
    def family(self):
        return family_for(self.spec)

    def tensors(self) -> TensorSource:
        """The tensors, read one at a time (``state_dict`` reads them all)."""
        return TensorSource(self.files, self.family.normalise_key)

    def state_dict(self) -> dict:
        fam = self.family
        state = load_state_dict(self.files, fam.normalise_key)
        check_state(state, fam.expected_shapes(), fam.UNUSED)
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
    config = _read_json(base_dir / "config.json")
    fam = family(config.get("model_type"))
    shapes = {}
    for path in files:
        if path.suffix == ".safetensors":
            shapes.update({fam.normalise_key(k): v for k, v in safetensors_shapes(path).items()})
    if not shapes:  # model.pth: shapes only come from loading it
        shapes = {k: tuple(v.shape) for k, v in load_state_dict(files, fam.normalise_key).items()}
    tokenizer = load_tokenizer(base_dir / "tokenizer.json", expected_size=fam.embedding_rows(shapes))
    spec = fam.build_spec(config, shapes, tokenizer, base_dir, yaml_cfg)
    check_state(shapes, fam.expected_shapes(spec), fam.UNUSED)
    chat_text = fam.render_chat_template(read_chat_template(base_dir))
    templates = resolve_templates(prompts_from, folder)
    origin = {"checkpoint": ckpt_id, "base": str(base or yaml_cfg.get("model_name_or_path") or base_dir),
              "yaml": yaml_path.name if yaml_path else None}
    return Checkpoint(spec, files, tokenizer, chat_text, templates, config, origin)


def _read_json(path: Path) -> dict:
    """A JSON object file, or a ``CheckpointError``: missing, not JSON, nested past the parser's
    recursion limit (a model file, so untrusted), or not an object."""
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def check_state(state: dict, expected: dict[str, tuple[int, ...]], optional: tuple[str, ...] = ()) -> None:
    """Raise on missing, unexpected or mis-shaped tensors (``optional`` ones may be present or not)."""
    shape_of = lambda v: tuple(v) if isinstance(v, tuple) else tuple(v.shape)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - set(optional))
    wrong = [f"{k}: {shape_of(state[k])} != {expected[k]}" for k in sorted(set(expected) & set(state))
             if shape_of(state[k]) != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(items)}): {items[:4]}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
        raise WeightMismatchError("checkpoint tensors do not match the architecture; " + "; ".join(parts))
