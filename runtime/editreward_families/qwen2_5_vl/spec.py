"""Architecture facts of one Qwen2.5-VL EditReward model, read from its config and its own tensors.

A ``ModelSpec`` is what every backend and exporter needs to know about the model; it is
serialised into an exported model's manifest, so nothing downstream re-reads configs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from typing import ClassVar

from editreward_rt.errors import ArchitectureError, WeightMismatchError
from editreward_rt.manifest_schema import array, child, fields, integer, number, obj, positive_int, string
from editreward_rt.preprocess import ImageSpec

SUPPORTED_HEAD_TYPES = ("ranknet_multi_head",)
SUPPORTED_FUSIONS = ("mean", "min", "sum")


@dataclass(frozen=True)
class TextSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int  # rows of the checkpoint's embedding, not the base config's padded vocab


@dataclass(frozen=True)
class VisionSpec:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    window_size: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    in_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class HeadSpec:
    num_heads: int
    layer_sizes: tuple[int, ...]  # (hidden, 1024, 16, 2) for the published heads
    fusion: str
    names: tuple[str, ...] = ("instruction_following", "visual_quality")


@dataclass(frozen=True)
class TokenSpec:
    image_pad: int
    vision_start: int
    vision_end: int
    reward: int
    pad: int


@dataclass(frozen=True)
class ModelSpec:
    family: ClassVar[str] = "qwen2_5_vl"  # the key of this family in editreward_rt.families.FAMILIES

    text: TextSpec
    vision: VisionSpec
    heads: HeadSpec
    tokens: TokenSpec
    image: ImageSpec = field(default_factory=ImageSpec)
    max_prompt_tokens: int = 8192

    def to_dict(self) -> dict:
        return {"text": asdict(self.text), "vision": asdict(self.vision), "heads": asdict(self.heads),
                "tokens": asdict(self.tokens), "image": self.image.to_dict(), "max_prompt_tokens": self.max_prompt_tokens}

    @classmethod
    def from_dict(cls, data: dict, at: str = "spec") -> "ModelSpec":
        """A manifest's spec (``at``: its JSON path), every field read through the manifest schema
        (a malformed field is a ``ManifestError`` naming it) and the whole checked (``validate``: an
        ``ArchitectureError`` naming the fields) before anything is sized from it."""
        section = fields(data, at, {**dict.fromkeys(("text", "vision", "heads", "tokens", "image"), obj),
                                    "max_prompt_tokens": positive_int})
        part = lambda key, optional=(): fields(section[key], child(at, key), READERS[key], optional)
        spec = cls(text=TextSpec(**part("text")), vision=VisionSpec(**part("vision", ("in_channels",))),
                   heads=HeadSpec(**part("heads", ("names",))), tokens=TokenSpec(**part("tokens")),
                   image=ImageSpec.from_dict(section["image"], child(at, "image")),
                   max_prompt_tokens=section["max_prompt_tokens"])
        validate(spec, at=f"{at}.")
        return spec


# How a manifest's spec sections are read (``manifest_schema`` readers, one per field).
_positive = partial(number, positive=True)
READERS = {
    "text": {**dict.fromkeys(("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                              "vocab_size"), positive_int), "rms_norm_eps": _positive, "rope_theta": _positive},
    "vision": {**dict.fromkeys(("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "window_size",
                                "patch_size", "spatial_merge_size", "temporal_patch_size", "in_channels"), positive_int),
               "fullatt_block_indexes": partial(array, item=partial(integer, lo=0))},
    "heads": {"num_heads": positive_int, "layer_sizes": partial(array, item=positive_int, min_length=2),
              "fusion": partial(string, choices=SUPPORTED_FUSIONS), "names": partial(array, item=string)},
    "tokens": dict.fromkeys(("image_pad", "vision_start", "vision_end", "reward", "pad"), partial(integer, lo=0)),
}


def _text_config(config: dict) -> dict:
    # Published Qwen2.5-VL configs keep text fields at the top level; transformers >= 4.52 nests them.
    nested = config.get("text_config") or {}
    return {**config, **nested}


def _rope_theta(text: dict) -> float:
    params = text.get("rope_parameters") or {}
    return float(params.get("rope_theta", text.get("rope_theta", 1000000.0)))


def build_spec(config: dict, shapes: dict[str, tuple[int, ...]], tokens: TokenSpec, yaml_cfg: dict) -> ModelSpec:
    """Combine the base config, the checkpoint's tensor shapes and the tokenizer's ids into a spec.
    The config's layer and block counts are checked against the tensors that exist before anything
    is sized from them, so an absurd config costs no time or memory; a malformed one is an
    ``ArchitectureError`` naming the field."""
    if not isinstance(config.get("vision_config"), dict):
        raise ArchitectureError("the base config has no vision_config object")
    check_counts(config, shapes)
    try:
        spec = _build_spec(config, shapes, tokens, yaml_cfg)
    except KeyError as exc:
        raise ArchitectureError(f"the base config lacks {exc}") from None
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise ArchitectureError(f"the base config has a malformed size ({type(exc).__name__}: {exc})") from None
    validate(spec)
    return spec


def _count(shapes: dict, prefix: str) -> int:
    """Number of distinct ``prefix<N>.`` indices among the tensor names."""
    found = {key[len(prefix):].split(".", 1)[0] for key in shapes if key.startswith(prefix)}
    return len({int(i) for i in found if i.isdigit()})


def check_counts(config: dict, shapes: dict) -> None:
    text, vision = _text_config(config), config["vision_config"]
    for what, value, prefix in (("num_hidden_layers", text.get("num_hidden_layers"), "model.language_model.layers."),
                                ("vision_config.depth", vision.get("depth"), "model.visual.blocks.")):
        present = _count(shapes, prefix)
        if not isinstance(value, int) or isinstance(value, bool) or value != present:
            raise WeightMismatchError(f"the config's {what} is {value!r} but the checkpoint holds {present} of them")


# Upper bounds far above any published model, so that no absurd size is ever allocated.
LIMITS = {"num_layers": 1024, "depth": 1024, "hidden_size": 65536, "intermediate_size": 262144,
          "num_heads": 1024, "num_kv_heads": 1024, "vocab_size": 1 << 23, "max_prompt_tokens": 1 << 20}
MAX_IMAGE_TOKENS = 16384  # per image: 64x the published 256; bounds max_pixels to 16384 * 28^2 (12.8 M)


def validate(spec: ModelSpec, at: str = "") -> None:
    """Refuse a spec no real model has (sizes that are not positive, inconsistent head widths,
    image limits beyond ``MAX_IMAGE_TOKENS``, special tokens that are not distinct rows of the
    embedding), before any graph or buffer is sized from it. ``at`` prefixes the field names
    (``spec.`` for a manifest's)."""
    t, v, h, im, tok = spec.text, spec.vision, spec.heads, spec.image, spec.tokens
    positive = {"text.hidden_size": t.hidden_size, "text.num_layers": t.num_layers, "text.num_heads": t.num_heads,
                "text.num_kv_heads": t.num_kv_heads, "text.head_dim": t.head_dim, "text.intermediate_size": t.intermediate_size,
                "text.vocab_size": t.vocab_size, "vision.depth": v.depth, "vision.hidden_size": v.hidden_size,
                "vision.num_heads": v.num_heads, "vision.intermediate_size": v.intermediate_size,
                "vision.out_hidden_size": v.out_hidden_size, "vision.patch_size": v.patch_size,
                "vision.spatial_merge_size": v.spatial_merge_size, "vision.temporal_patch_size": v.temporal_patch_size,
                "vision.window_size": v.window_size, "image.patch_size": im.patch_size, "image.merge_size": im.merge_size,
                "image.temporal_patch_size": im.temporal_patch_size, "image.min_pixels": im.min_pixels, "image.max_pixels": im.max_pixels,
                "image.max_input_pixels": im.max_input_pixels, "max_prompt_tokens": spec.max_prompt_tokens}
    bad = [f"{at}{k}={val!r}" for k, val in positive.items() if not isinstance(val, int) or isinstance(val, bool) or val < 1]
    bad += [f"{at}{k}={val!r} (at most {LIMITS[k.split('.')[-1]]})" for k, val in positive.items()
            if k.split(".")[-1] in LIMITS and isinstance(val, int) and val > LIMITS[k.split(".")[-1]]]
    if bad:  # the relations below need positive integers
        raise ArchitectureError("the model spec is not one of a real model: " + "; ".join(bad))
    if t.num_heads % t.num_kv_heads:
        bad.append(f"{at}text.num_heads={t.num_heads} is not a multiple of num_kv_heads={t.num_kv_heads}")
    if v.hidden_size % v.num_heads:
        bad.append(f"{at}vision.hidden_size={v.hidden_size} is not a multiple of num_heads={v.num_heads}")
    if (im.patch_size, im.merge_size, im.temporal_patch_size) != (v.patch_size, v.spatial_merge_size, v.temporal_patch_size):
        bad.append(f"{at}image and {at}vision patch geometry differ")
    if im.min_pixels > im.max_pixels or im.max_pixels > MAX_IMAGE_TOKENS * im.factor**2:
        bad.append(f"{at}image pixels min {im.min_pixels}, max {im.max_pixels} (at most {MAX_IMAGE_TOKENS * im.factor**2})")
    if any(not isinstance(i, int) or not 0 <= i < v.depth for i in v.fullatt_block_indexes):
        bad.append(f"{at}vision.fullatt_block_indexes {v.fullatt_block_indexes} outside depth {v.depth}")
    if h.num_heads != 2 or h.layer_sizes[0] != t.hidden_size or h.layer_sizes[-1] != 2:
        bad.append(f"{at}heads {h.num_heads} x {h.layer_sizes} do not read hidden size {t.hidden_size}")
    if len(h.names) != h.num_heads:
        bad.append(f"{at}heads.names {list(h.names)} do not name {h.num_heads} heads")
    # The prompt places images and reads the reward by these ids: one out of the embedding would
    # blame every input, and two equal ones would score a different prompt without an error.
    ids = asdict(tok)
    bad += [f"{at}tokens.{name}={i} is outside the vocabulary of {t.vocab_size} rows"
            for name, i in ids.items() if not 0 <= i < t.vocab_size]
    seen = {}
    for name, i in ids.items():
        if i in seen:
            bad.append(f"{at}tokens.{name}={i} is the same id as {at}tokens.{seen[i]}")
        seen.setdefault(i, name)
    if bad:
        raise ArchitectureError("the model spec is not one of a real model: " + "; ".join(bad))


def _build_spec(config: dict, shapes: dict[str, tuple[int, ...]], tokens: TokenSpec, yaml_cfg: dict) -> ModelSpec:
    head_type = yaml_cfg.get("rm_head_type", "ranknet_multi_head")
    if head_type not in SUPPORTED_HEAD_TYPES:
        raise ArchitectureError(f"rm_head_type {head_type!r} is not supported (supported: {SUPPORTED_HEAD_TYPES})")
    fusion = yaml_cfg.get("pooling_strategy", "mean")
    if fusion not in SUPPORTED_FUSIONS:
        raise ArchitectureError(f"pooling_strategy {fusion!r} is not supported (supported: {SUPPORTED_FUSIONS})")
    if yaml_cfg.get("reward_token", "special") != "special" or not yaml_cfg.get("use_special_tokens", True):
        raise ArchitectureError("only reward_token 'special' with use_special_tokens true is supported")

    text = _text_config(config)
    embed = shapes.get("model.language_model.embed_tokens.weight")
    if embed is None:
        raise WeightMismatchError("checkpoint has no model.language_model.embed_tokens.weight")
    heads = head_layout(shapes)
    hidden = int(text["hidden_size"])
    num_heads = int(text["num_attention_heads"])
    vcfg = config["vision_config"]
    image = ImageSpec(
        min_pixels=int(yaml_cfg.get("min_pixels", 200704)),
        max_pixels=int(yaml_cfg.get("max_pixels", 200704)),
        patch_size=int(vcfg.get("patch_size", 14)),
        temporal_patch_size=int(vcfg.get("temporal_patch_size", 2)),
        merge_size=int(vcfg.get("spatial_merge_size", 2)),
    )
    return ModelSpec(
        text=TextSpec(
            hidden_size=hidden,
            num_layers=int(text["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(text.get("num_key_value_heads", num_heads)),
            head_dim=int(text.get("head_dim") or hidden // num_heads),
            intermediate_size=int(text["intermediate_size"]),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(text),
            vocab_size=int(embed[0]),
        ),
        vision=VisionSpec(
            depth=int(vcfg["depth"]),
            hidden_size=int(vcfg.get("hidden_size", vcfg.get("embed_dim", 0))),
            num_heads=int(vcfg["num_heads"]),
            intermediate_size=int(vcfg["intermediate_size"]),
            out_hidden_size=int(vcfg.get("out_hidden_size", hidden)),
            fullatt_block_indexes=tuple(int(i) for i in vcfg.get("fullatt_block_indexes", ())),
            window_size=int(vcfg.get("window_size", 112)),
            patch_size=image.patch_size,
            spatial_merge_size=image.merge_size,
            temporal_patch_size=image.temporal_patch_size,
            in_channels=int(vcfg.get("in_chans", vcfg.get("in_channels", 3))),
        ),
        heads=HeadSpec(num_heads=len(heads), layer_sizes=heads[0], fusion=fusion),
        tokens=tokens,
        image=image,
    )


def head_layout(shapes: dict[str, tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Layer sizes of each ``rm_heads.head_k`` read from its Linear weights (indices 0, 3, 5)."""
    layouts = []
    k = 0
    while f"rm_heads.head_{k}.0.weight" in shapes:
        sizes = [shapes[f"rm_heads.head_{k}.0.weight"][1]]
        for idx in (0, 3, 5):
            key = f"rm_heads.head_{k}.{idx}.weight"
            if key not in shapes:
                raise ArchitectureError(f"reward head {k} lacks {key}: not the ranknet Linear-ReLU-Dropout-Linear-ReLU-Linear head")
            sizes.append(shapes[key][0])
        layouts.append(tuple(sizes))
        k += 1
    if k != 2:
        raise ArchitectureError(f"expected 2 reward heads rm_heads.head_0/1, found {k}")
    if layouts[0] != layouts[1] or layouts[0][-1] != 2:
        raise ArchitectureError(f"reward heads have unexpected shapes {layouts}")
    return layouts
