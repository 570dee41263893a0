"""ONNX Runtime backend: the fast path on an exported model folder (CPU or CUDA execution provider)."""

from __future__ import annotations

import os

import numpy as np

from ..errors import BackendError, InputError
from ..manifest import open_exported
from ..pipeline import FastPipeline, PreparedTriple

GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendError("the onnxruntime backend needs ONNX Runtime: pip install 'editreward-deploy[onnx]'") from exc
    return onnxruntime


def providers_for(device: str) -> list[str]:
    available = _ort().get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise BackendError(
                f"device {device!r} requested but ONNX Runtime has no CUDA execution provider "
                f"(available: {available}); install onnxruntime-gpu and check the GPU driver"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available else ["CPUExecutionProvider"]
    raise BackendError(f"unknown device {device!r}; use cpu, cuda or auto")


class OrtEngine:
    def __init__(self, model, device: str, threads: int | None, optimization: str):
        ort = _ort()
        if optimization not in GRAPH_OPT_LEVELS:
            raise BackendError(f"unknown graph optimisation level {optimization!r}; choose from {GRAPH_OPT_LEVELS}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                                         "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}[optimization])
        providers = providers_for(device)
        self.spec = model.spec
        self.kv_dtype = np.dtype(model.manifest.get("kv_dtype", "float32"))
        self.sessions = {}
        for name in ("vision", "decoder", "heads"):
            path = model.graph_path(name)
            try:
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception classes
                raise BackendError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        self.providers = self.sessions["decoder"].get_providers()

    def vision(self, patches, cos, sin, window_segments, image_segments):
        return self.sessions["vision"].run(None, {
            "patches": patches.astype(np.float32, copy=False), "cos": cos, "sin": sin,
            "window_segments": window_segments, "image_segments": image_segments})[0]

    def decode(self, input_ids, image_embeds, image_index, position_ids, attention_mask, past):
        hidden, present = self.sessions["decoder"].run(None, {
            "input_ids": input_ids, "image_embeds": image_embeds.astype(np.float32, copy=False),
            "image_index": image_index, "position_ids": position_ids, "attention_mask": attention_mask, "past": past})
        return hidden, present

    def heads(self, hidden):
        return self.sessions["heads"].run(None, {"hidden": hidden.astype(np.float32, copy=False)})[0]

    def empty_cache(self, batch: int = 1):
        t = self.spec.text
        return np.zeros((t.num_layers, 2, batch, t.num_kv_heads, 0, t.head_dim), dtype=self.kv_dtype)

    def select(self, cache, rows):
        return np.take(cache, rows, axis=2)


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 optimization: str = "all", verify: bool = True):
        self.model = open_exported(path, verify=verify)
        self.spec = self.model.spec
        self.engine = OrtEngine(self.model, device, threads, optimization)
        self.pipeline = FastPipeline(self.engine)
        self.description = {"backend": "onnxruntime", "mode": "fast", "providers": self.engine.providers,
                            "precision": self.model.manifest.get("precision")}

    def head_outputs(self, triples: list[PreparedTriple]) -> np.ndarray:
        limit = self.spec.max_prompt_tokens
        for t in triples:
            longest = max(len(p.ids) for p in t.prompts)
            if longest > limit:
                raise InputError(f"prompt of {longest} tokens exceeds the exported limit of {limit}")
        return self.pipeline.run(triples)
