"""Model families: everything specific to one VLM architecture sits in one folder behind one
interface, and the runtime, the backends, the exporter and the quantizers speak only to it.

A family is a package (``editreward_families.<name>``) exposing the names of ``ModelFamily``
at its top level. Families are found by the base config's ``model_type``; adding one is a
folder plus one line in ``FAMILIES``. Family packages are imported only when a model of
theirs is opened, and their torch parts only when a torch-side caller asks for them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from .errors import ArchitectureError, ManifestError

# model_type (as in the base model's config.json) -> the family package. MiMo-VL is a Qwen2.5-VL.
FAMILIES = {"qwen2_5_vl": "editreward_families.qwen2_5_vl"}
# The family of manifests written before manifests named one, and of fixtures when none is asked for.
DEFAULT_FAMILY = next(iter(FAMILIES))


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: its inputs and outputs as (name, dtype, shape); a shape entry is an int
    or a named dynamic axis. Backends feed inputs in this order and read outputs in this order."""

    name: str
    inputs: tuple[tuple[str, str, tuple], ...]
    outputs: tuple[tuple[str, str, tuple], ...]

    @property
    def input_names(self) -> list[str]:
        return [n for n, _, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [n for n, _, _ in self.outputs]

    def dynamic_axes(self) -> dict:
        return {n: {i: a for i, a in enumerate(axes) if isinstance(a, str)} for n, _, axes in self.inputs + self.outputs}

    def io(self) -> dict:
        as_list = lambda items: [{"name": n, "dtype": d, "shape": list(a)} for n, d, a in items]
        return {"inputs": as_list(self.inputs), "outputs": as_list(self.outputs)}


class ModelFamily(Protocol):
    """What a family package provides (module-level names). Roles, not names, cross the seam:
    the fast path calls the ``vision`` graph with ``vision_feeds``' arrays and the ``decoder``
    graph with (token ids, image rows, row index, positions, attention mask, cache)."""

    NAME: str
    PUBLISHED: Any  # full-size dimensions of the published checkpoints (``published.py``)
    UNUSED: tuple[str, ...]  # checkpoint tensors the reward never reads (may be present or not)
    FIXTURE_SIZES: tuple[str, ...]  # sizes ``write_fixture`` makes
    # matmul FLOPs from the spec (``flops.py``): vision_call(spec, *vision inputs),
    # decode_call(spec, attention_mask, seq), heads(spec, rows), reference_triple(spec, prepared triple)
    FLOPS: Any

    # spec, checkpoint keys and shapes
    def build_spec(self, config: dict, shapes: dict, tokenizer, base_dir, yaml_cfg: dict): ...
    def spec_from_dict(self, data: dict): ...
    def normalise_key(self, key: str) -> str: ...
    def expected_shapes(self, spec) -> dict[str, tuple[int, ...]]: ...
    def embedding_rows(self, shapes: dict) -> int | None: ...
    def is_embedding(self, name: str) -> bool: ...
    def decoder_parameters(self, spec) -> int: ...
    def split_state_dict(self, state: dict) -> dict[str, dict]: ...
    def check_module_state(self, spec, shapes: dict) -> None: ...

    # chat, prompts and vision inputs (numpy and tokenizers only)
    def render_chat_template(self, template: str) -> str: ...
    def prompt_builder(self, tokenizer, chat_text: str, templates, spec): ...
    def vision_feeds(self, image, spec) -> tuple[tuple, Any]: ...
    def image_rows(self, ids, spec, src_offset: int, edit_offset: int): ...

    # graphs
    def graph_specs(self, spec, kv_dtype: str) -> dict[str, GraphSpec]: ...
    def trt_profile_axes(self, spec, limits) -> dict[str, list[tuple[str, dict]]]: ...
    def fp16_fp32_pins(self, spec) -> dict[str, tuple[tuple[str, ...], int]]: ...

    # torch side, imported lazily. The family's decoder module also provides ``token_embedding()``,
    # ``set_token_embedding(module)`` and, on each of ``decoder.layers``, ``linear_groups()``: the
    # hooks quantizers use to reach its tables and linears.
    def torch_modules(self, spec, state, dtype): ...
    def reference_runner(self, spec, config: dict, state: dict, device, dtype): ...
    def export_wrappers(self, graphs, kv_dtype: str) -> dict: ...
    def dummy_inputs(self, spec, kv_dtype: str) -> dict: ...
    def torch_image_feeds(self, image, spec, resize: str = "bilinear") -> tuple[tuple, Any, int]: ...
    def write_fixture(self, out_dir, size: str = "tiny", seed: int = 0, **kw): ...


def family(name: str) -> ModuleType:
    """The family package for a ``model_type``."""
    try:
        path = FAMILIES[name]
    except KeyError:
        raise ArchitectureError(f"base model type {name!r} is not supported (supported: {', '.join(FAMILIES)})") from None
    return importlib.import_module(path)


def family_of_manifest(manifest: dict) -> ModuleType:
    name = manifest.get("family", DEFAULT_FAMILY)
    if name not in FAMILIES:
        raise ManifestError(f"the manifest names model family {name!r}, which this runtime does not know "
                            f"({', '.join(FAMILIES)}); upgrade editreward-deploy")
    return family(name)
