"""Model families: everything specific to one VLM architecture sits in one folder behind one
interface, and the runtime, the backends, the exporter and the quantizers speak only to it.

A family is a package (``editreward_families.<name>``) exposing the names of ``ModelFamily``
at its top level. Families are found by the base config's ``model_type``; adding one is a
folder plus one line in ``FAMILIES``. Family packages are imported only when a model of
theirs is opened, and their torch parts only when a torch-side caller asks for them.
"""

from __future__ import annotations

import functools
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


@dataclass(frozen=True)
class CacheLayout:
    """The key/value cache's layout, declared once by the family beside its decoder graph's I/O
    (``cache_layout``): every backend builds and indexes its caches from it. ``axes`` is the
    decoder's cache input shape (ints and named dynamic axes); ``batch_axis`` holds one row per
    sequence and ``length_axis`` the cached positions."""

    dtype: str
    axes: tuple
    batch_axis: int
    length_axis: int

    def shape(self, batch: int, length: int = 0) -> tuple[int, ...]:
        """The concrete shape of a cache of ``batch`` rows holding ``length`` positions."""
        named = {self.batch_axis: batch, self.length_axis: length}
        return tuple(named.get(i, a) for i, a in enumerate(self.axes))


class ModelFamily(Protocol):
    """What a family package provides (module-level names). Roles, not names, cross the seam:
    the fast path calls the ``vision`` graph with ``vision_feeds``' arrays and the ``decoder``
    graph with (token ids, image rows, row index, positions, attention mask, cache). Functions
    whose first parameter is ``spec`` are reached through ``family_for(spec)`` (``BoundFamily``),
    the others through ``family(name)``: every caller of a family uses one of these two."""

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
    def checkpoint_key(self, module: str, name: str) -> str: ...
    def embedding_rows(self, shapes: dict) -> int | None: ...
    def is_embedding(self, name: str) -> bool: ...
    def split_state_dict(self, state: dict) -> dict[str, dict]: ...
    def expected_shapes(self, spec) -> dict[str, tuple[int, ...]]: ...
    def decoder_parameters(self, spec) -> int: ...
    def check_module_state(self, spec, shapes: dict) -> None: ...
    def validation_subset(self, spec, config: dict, layers: int = 2): ...

    # chat, prompts and vision inputs (numpy and tokenizers only)
    def render_chat_template(self, template: str) -> str: ...
    def prompt_builder(self, spec, tokenizer, chat_text: str, templates): ...
    def vision_feeds(self, spec, image) -> tuple[tuple, Any]: ...
    def join_vision_feeds(self, spec, feeds: list) -> tuple: ...

    # graphs
    def graph_specs(self, spec, kv_dtype: str) -> dict[str, GraphSpec]: ...
    def cache_layout(self, spec, kv_dtype: str) -> CacheLayout: ...
    def trt_profile_axes(self, spec, limits) -> dict[str, list[tuple[str, dict]]]: ...
    def fp16_fp32_pins(self, spec) -> dict[str, tuple[tuple[str, ...], int]]: ...

    # torch side, imported lazily. The family's decoder module also provides ``token_embedding()``,
    # ``set_token_embedding(module)`` and, on each of ``decoder.layers``, ``linear_groups()``: the
    # hooks quantizers use to reach its tables and linears.
    def torch_modules(self, spec, state, dtype): ...
    def placeholder_modules(self, spec, dtype): ...
    def reference_runner(self, spec, config: dict, state: dict, device, dtype): ...
    def export_wrappers(self, graphs, kv_dtype: str) -> dict: ...
    def dummy_inputs(self, spec, kv_dtype: str) -> dict: ...
    def torch_image_feeds(self, spec, image, resize: str = "bilinear") -> tuple[tuple, Any, int]: ...
    def write_fixture(self, out_dir, size: str = "tiny", seed: int = 0, **kw): ...


def spec_bound_names() -> tuple[str, ...]:
    """The interface's functions that take the model's spec first: what ``BoundFamily`` binds."""
    import inspect

    return tuple(name for name, fn in inspect.getmembers(ModelFamily, inspect.isfunction)
                 if not name.startswith("_") and list(inspect.signature(fn).parameters)[1:2] == ["spec"])


class BoundFamily:
    """A family bound to one model's spec, as optimum's ``OnnxConfig`` is bound to its config:
    ``fam = family_for(spec)``, then ``fam.vision_feeds(image)``, ``fam.graph_specs(kv_dtype)``.
    Each function of the interface that takes ``spec`` first is an attribute here without it; the
    interface's other names are the package's own."""

    def __init__(self, module: ModuleType, spec):
        self.module, self.spec = module, spec
        for name in spec_bound_names():
            setattr(self, name, functools.partial(getattr(module, name), spec))

    def __getattr__(self, name: str):
        """The interface's spec-free names (``FLOPS``, ``checkpoint_key``, ``export_wrappers``...), as the package has them."""
        if name.startswith("_") or not hasattr(ModelFamily, name) and name not in ModelFamily.__annotations__:
            raise AttributeError(f"{name!r} is not part of the model-family interface (editreward_rt.families.ModelFamily)")
        return getattr(self.module, name)

    def __repr__(self) -> str:
        return f"BoundFamily({self.module.NAME})"


def family_for(spec) -> BoundFamily:
    """The family of ``spec``'s model, bound to it."""
    return BoundFamily(family(spec.family), spec)


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
