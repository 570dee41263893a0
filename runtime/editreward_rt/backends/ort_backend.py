"""ONNX Runtime backend: the fast path on an exported model folder (CPU or CUDA execution provider)."""

from __future__ import annotations

import os

import numpy as np

from ..errors import BackendError
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


def _select_graph(kv_dtype: np.dtype) -> bytes:
    """A one-node graph that gathers cache rows on the session's device (used with I/O binding)."""
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT16 if kv_dtype == np.float16 else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Gather", ["cache", "rows"], ["selected"], axis=2)], "select_rows",
        [helper.make_tensor_value_info("cache", elem, ["L", 2, "B", "H", "T", "D"]),
         helper.make_tensor_value_info("rows", TensorProto.INT64, ["R"])],
        [helper.make_tensor_value_info("selected", elem, ["L", 2, "R", "H", "T", "D"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


class OrtEngine:
    def __init__(self, model, device: str, threads: int | None, optimization: str, io_binding: bool | None = None):
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
        self.ort, self.spec = ort, model.spec
        self.kv_dtype = np.dtype(model.manifest.get("kv_dtype", "float32"))
        self.sessions = {}
        for name in ("vision", "decoder", "heads"):
            path = model.graph_path(name)
            try:
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception classes
                raise BackendError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        self.providers = self.sessions["decoder"].get_providers()
        on_gpu = self.providers[0] == "CUDAExecutionProvider"
        # With I/O binding the key/value cache stays on the device between decoder calls.
        self.binding = on_gpu if io_binding is None else io_binding
        self.cache_device = "cuda" if on_gpu else "cpu"
        if self.binding:
            self.sessions["select"] = ort.InferenceSession(_select_graph(self.kv_dtype), options, providers=providers)

    def vision(self, patches, cos, sin, window_segments, image_segments):
        return self.sessions["vision"].run(None, {
            "patches": patches.astype(np.float32, copy=False), "cos": cos, "sin": sin,
            "window_segments": window_segments, "image_segments": image_segments})[0]

    def decode(self, input_ids, image_embeds, image_index, position_ids, attention_mask, past):
        feeds = {"input_ids": input_ids, "image_embeds": image_embeds.astype(np.float32, copy=False),
                 "image_index": image_index, "position_ids": position_ids, "attention_mask": attention_mask}
        if not self.binding:
            hidden, present = self.sessions["decoder"].run(None, {**feeds, "past": past})
            return hidden, present
        binding = self.sessions["decoder"].io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        binding.bind_ortvalue_input("past", past)
        binding.bind_output("hidden", "cpu")
        binding.bind_output("present", self.cache_device)
        self.sessions["decoder"].run_with_iobinding(binding)
        hidden, present = binding.get_outputs()
        return hidden.numpy(), present

    def heads(self, hidden):
        return self.sessions["heads"].run(None, {"hidden": hidden.astype(np.float32, copy=False)})[0]

    def empty_cache(self, batch: int = 1):
        t = self.spec.text
        empty = np.zeros((t.num_layers, 2, batch, t.num_kv_heads, 0, t.head_dim), dtype=self.kv_dtype)
        return self.ort.OrtValue.ortvalue_from_numpy(empty, self.cache_device) if self.binding else empty

    def select(self, cache, rows):
        if not self.binding:
            return np.take(cache, rows, axis=2)
        binding = self.sessions["select"].io_binding()
        binding.bind_ortvalue_input("cache", cache)
        binding.bind_cpu_input("rows", np.ascontiguousarray(rows, dtype=np.int64))
        binding.bind_output("selected", self.cache_device)
        self.sessions["select"].run_with_iobinding(binding)
        return binding.get_outputs()[0]


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 optimization: str = "all", verify: bool = True, io_binding: bool | None = None):
        self.model = open_exported(path, verify=verify)
        self.spec = self.model.spec
        self.engine = OrtEngine(self.model, device, threads, optimization, io_binding)
        self.pipeline = FastPipeline(self.engine)
        self.description = {"backend": "onnxruntime", "mode": "fast", "providers": self.engine.providers,
                            "precision": self.model.manifest.get("precision"), "io_binding": self.engine.binding}

    def head_outputs(self, triples: list[PreparedTriple]) -> np.ndarray:
        # Prompt length limits are enforced per triple when prompts are built (spec.max_prompt_tokens).
        return self.pipeline.run(triples)
