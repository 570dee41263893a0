"""Qwen2.5-VL (and MiMo-VL, the same architecture) with EditReward's two reward heads.

The family interface (``editreward_rt.families.ModelFamily``). Importing this package loads
numpy, pillow and tokenizers only; the torch parts (``modeling``, ``reference``, the
exporter's wrappers) are imported when a torch-side caller asks for them.
"""

from __future__ import annotations

from . import flops as FLOPS
from . import published as PUBLISHED
from .chat import PromptBuilder, render_chat_template
from .fixture import SIZES as _FIXTURE_SIZES
from .graphs import cache_layout, fp16_fp32_pins, graph_specs, trt_profile_axes
from .spec import ModelSpec
from .spec import build_spec as _build_spec
from .vision import join_feeds
from .vision import vision_feeds as _vision_feeds
from .weights import (
    UNUSED,
    check_module_state,
    checkpoint_key,
    decoder_parameters,
    embedding_rows,
    expected_shapes,
    is_embedding,
    normalise_key,
    split_state_dict,
    token_spec,
)

NAME = ModelSpec.family
FIXTURE_SIZES = tuple(_FIXTURE_SIZES)  # random-weight checkpoints ``write_fixture`` makes


def build_spec(config: dict, shapes: dict, tokenizer, base_dir, yaml_cfg: dict) -> ModelSpec:
    """Base config + the checkpoint's tensor shapes + the tokenizer's special ids -> the spec."""
    return _build_spec(config, shapes, token_spec(tokenizer, config, base_dir), yaml_cfg)


def spec_from_dict(data: dict) -> ModelSpec:
    return ModelSpec.from_dict(data)


def prompt_builder(spec: ModelSpec, tokenizer, chat_text: str, templates) -> PromptBuilder:
    return PromptBuilder(tokenizer, chat_text, templates, spec)


def vision_feeds(spec: ModelSpec, image):
    """One preprocessed image -> the vision graph's inputs and the index back to processor order (``vision``)."""
    return _vision_feeds(image, spec)


def join_vision_feeds(spec: ModelSpec, feeds: list) -> tuple:
    """Several images' ``vision_feeds`` as one vision call's inputs (``vision.join_feeds``)."""
    return join_feeds(feeds)


def torch_modules(spec: ModelSpec, state, dtype):
    """(vision encoder, decoder, reward heads) as torch modules, loaded strictly from ``state``."""
    from .modeling import build_modules

    return build_modules(spec, state, dtype)


def placeholder_modules(spec: ModelSpec, dtype):
    """``torch_modules`` at full shape without weights (``modeling.placeholder_modules``), for tracing."""
    from .modeling import placeholder_modules as placeholders

    return placeholders(spec, dtype)


def validation_subset(spec: ModelSpec, config: dict, layers: int = 2) -> tuple[ModelSpec, dict]:
    """``spec`` and ``config`` cut to the first ``layers`` decoder layers and the vision blocks up to
    and including the first full-attention one (window and full attention both run): what an
    export's self-validation runs when the whole model would not fit in memory twice."""
    return PUBLISHED.subset(spec, config, layers)


def reference_runner(spec: ModelSpec, config: dict, state: dict, device, dtype):
    """Upstream's two full transformers passes per triple (``reference.ReferenceRunner``)."""
    from .reference import ReferenceRunner

    return ReferenceRunner(spec, config, state, device, dtype)


def export_wrappers(graphs, kv_dtype: str) -> dict:
    from .graphs import export_wrappers as wrappers

    return wrappers(graphs, kv_dtype)


def dummy_inputs(spec: ModelSpec, kv_dtype: str) -> dict:
    from .graphs import dummy_inputs as dummies

    return dummies(spec, kv_dtype)


def torch_image_feeds(spec: ModelSpec, image, resize: str = "bilinear"):
    """A [3, H, W] image in [0, 1] carrying gradients -> vision inputs, output order, token count
    (``torch_inputs``: resize to the reference's size, bilinear or bicubic, then the processor's arithmetic)."""
    from .torch_inputs import image_feeds

    return image_feeds(image, spec, resize)


def write_fixture(out_dir, size: str = "tiny", seed: int = 0, **kw):
    """A random-weight checkpoint of this family in the published upstream layout (``fixture``)."""
    from .fixture import write_fixture as write

    return write(out_dir, size=size, seed=seed, **kw)


__all__ = ["NAME", "PUBLISHED", "FLOPS", "FIXTURE_SIZES", "UNUSED", "build_spec", "spec_from_dict", "normalise_key", "expected_shapes",
           "embedding_rows", "decoder_parameters", "check_module_state", "checkpoint_key",
           "placeholder_modules", "validation_subset", "is_embedding", "split_state_dict", "render_chat_template",
           "prompt_builder", "vision_feeds", "join_vision_feeds", "graph_specs", "cache_layout", "trt_profile_axes", "fp16_fp32_pins", "torch_modules",
           "reference_runner", "export_wrappers", "dummy_inputs", "torch_image_feeds", "write_fixture"]
