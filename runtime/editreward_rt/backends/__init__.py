"""The backend registry: one entry per backend, read by the Scorer, the CLI and serve choices,
the benchmarks and the parity test. Adding a backend is one module with a ``load`` function
plus one line in ``BACKENDS``.

A backend module's ``load(path_or_id, *, mode, base, prompts_from, device, threads, dtype)``
returns ``(backend, model)``: the backend has ``head_outputs(prepared_triples) -> [T, K, 2]``
and ``description``; the model has ``spec``, ``tokenizer``, ``chat_text``, ``templates``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import BackendError


@dataclass(frozen=True)
class BackendEntry:
    name: str
    modes: tuple[str, ...]  # "fast" (the shared fast path), "reference" (upstream's two full passes)
    extra: str  # the pip extra that brings its library
    module: str  # the module holding ``load``, imported only when this backend is asked for
    reads: tuple[str, ...]  # what it loads: "checkpoint" (hub id or folder) and/or "exported" (a model folder)
    devices: tuple[str, ...]  # where it runs: "cpu" and/or "cuda"

    def load(self, path_or_id, *, mode: str = "fast", **kwargs):
        if mode not in MODES:
            raise BackendError(f"unknown mode {mode!r}; use {' or '.join(MODES)}")
        if mode not in self.modes:
            others = [e.name for e in BACKENDS.values() if mode in e.modes]
            raise BackendError(f"the {self.name} backend runs mode {' or '.join(self.modes)} only; "
                               f"mode {mode!r} is run by {', '.join(others) or 'no backend'}")
        return importlib.import_module(self.module).load(path_or_id, mode=mode, **kwargs)


BACKENDS = {e.name: e for e in (
    BackendEntry("torch", ("fast", "reference"), "torch", "editreward_rt.backends.torch_backend",
                 ("checkpoint", "exported"), ("cpu", "cuda")),
    BackendEntry("onnxruntime", ("fast",), "onnx", "editreward_rt.backends.ort_backend", ("exported",), ("cpu", "cuda")),
    BackendEntry("tensorrt", ("fast",), "trt", "editreward_rt.backends.trt_backend", ("exported",), ("cuda",)),
)}
MODES = ("fast", "reference")
# An exported folder whose manifest names no runtime holds ONNX graphs; a checkpoint is read by torch.
DEFAULT_EXPORTED, DEFAULT_CHECKPOINT = "onnxruntime", "torch"


def backend(name: str) -> BackendEntry:
    try:
        return BACKENDS[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}") from None


def names() -> tuple[str, ...]:
    return tuple(BACKENDS)
