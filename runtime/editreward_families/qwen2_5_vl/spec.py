"""Architecture facts of one Qwen2.5-VL EditReward model, read from its config and its own tensors.

A ``ModelSpec`` is what every backend and exporter needs to know about the model; it is
serialised into an exported model's manifest, so nothing downstream re-reads configs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

from editreward_rt.errors import ArchitectureError, WeightMismatchError
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
    def from_dict(cls, data: dict) -> "ModelSpec":
        vision = dict(data["vision"])
        vision["fullatt_block_indexes"] = tuple(vision["fullatt_block_indexes"])
        heads = dict(data["heads"])
        heads["layer_sizes"], heads["names"] = tuple(heads["layer_sizes"]), tuple(heads["names"])
        return cls(
            text=TextSpec(**data["text"]),
            vision=VisionSpec(**vision),
            heads=HeadSpec(**heads),
            tokens=TokenSpec(**data["tokens"]),
            image=ImageSpec.from_dict(data["image"]),
            max_prompt_tokens=int(data["max_prompt_tokens"]),
        )


def _text_config(config: dict) -> dict:
    # Published Qwen2.5-VL configs keep text fields at the top level; transformers >= 4.52 nests them.
    nested = config.get("text_config") or {}
    return {**config, **nested}


def _rope_theta(text: dict) -> float:
    params = text.get("rope_parameters") or {}
    return float(params.get("rope_theta", text.get("rope_theta", 1000000.0)))


def build_spec(config: dict, shapes: dict[str, tuple[int, ...]], tokens: TokenSpec, yaml_cfg: dict) -> ModelSpec:
    """Combine the base config, the checkpoint's tensor shapes and the tokenizer's ids into a spec."""
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
