"""ONNX Runtime backend: the fast path on an exported model folder (CPU or CUDA execution provider)."""

from __future__ import annotations

import os

import numpy as np

from ..errors import BackendError, ManifestError
from ..extras import require
from ..families import family
from ..manifest import open_exported
from ..pipeline import FastPipeline, PipelineBackend
from . import BACKENDS, onnx_proto

GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")


def _ort():
    return require("onnxruntime", BACKENDS["onnxruntime"].extra, "the onnxruntime backend")


def load(path_or_id, *, mode: str = "fast", device: str = "cpu", threads=None, **_ignored):
    """Registry entry: an exported model folder (float or ``ort-*``-quantized graphs)."""
    ort = OrtBackend(path_or_id, device=device, threads=threads)
    return ort, ort.model


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
    """A one-node ONNX model, Gather(cache, rows, axis=2), that gathers cache rows on the session's
    device (used with I/O binding). Serialised by hand (``onnx_proto``) so that the CUDA path needs
    onnxruntime alone."""
    elem = onnx_proto.FLOAT16 if kv_dtype == np.float16 else onnx_proto.FLOAT
    return onnx_proto.model(
        onnx_proto.node("Gather", ["cache", "rows"], ["selected"], axis=2), "select_rows",
        [onnx_proto.value_info("cache", elem, ["L", 2, "B", "H", "T", "D"]),
         onnx_proto.value_info("rows", onnx_proto.INT64, ["R"])],
        [onnx_proto.value_info("selected", elem, ["L", 2, "R", "H", "T", "D"])], opset=17)


def check_graphs(model, sessions: dict) -> None:
    """The graphs' own I/O against what the manifest's spec implies (the family's graph specs):
    names in order and every fixed dimension. A folder whose spec and graphs disagree (a swapped
    graph, an edited spec) is refused at load, not at the first score."""
    declared = family(model.spec.family).graph_specs(model.spec, model.manifest.get("kv_dtype", "float32"))
    for name, session in sessions.items():
        for kind, actual, expected in (("input", session.get_inputs(), declared[name].inputs),
                                       ("output", session.get_outputs(), declared[name].outputs)):
            got = [(a.name, list(a.shape)) for a in actual]
            want = [(n, list(shape)) for n, _, shape in expected]
            fixed_mismatch = len(got) != len(want) or any(
                gn != wn or len(gs) != len(ws) or any(isinstance(w, int) and g != w for g, w in zip(gs, ws))
                for (gn, gs), (wn, ws) in zip(got, want))
            if fixed_mismatch:
                raise ManifestError(f"{model.graph_path(name)}: the graph's {kind}s {got} do not match what the "
                                    f"manifest's model spec implies, {want}: the graph or the spec was changed")


class OrtGraphs:
    def __init__(self, model, device: str, threads: int | None, optimization: str, io_binding: bool | None = None):
        ort = _ort()
        if optimization not in GRAPH_OPT_LEVELS:
            raise BackendError(f"unknown graph optimisation level {optimization!r}; choose from {GRAPH_OPT_LEVELS}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Each session has its own intra-op pool, and the fast path alternates between three
        # sessions: a pool left spinning after its run takes a core from the next session's. Off,
        # 2 threads gave 4.26 triples/s on the small fixture instead of 3.39 (1 thread: 2.45 / 2.38).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                                         "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}[optimization])
        providers = providers_for(device)
        self.options, self.providers_asked = options, providers  # what every session of these graphs is made with
        self.ort, self.spec = ort, model.spec
        self.kv_dtype = np.dtype(model.manifest.get("kv_dtype", "float32"))
        self.sessions = {}
        for name in ("vision", "decoder", "heads"):
            path = model.graph_path(name)
            try:
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception classes
                raise BackendError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        check_graphs(model, self.sessions)
        self.inputs = {n: [i.name for i in sess.get_inputs()] for n, sess in self.sessions.items()}
        self.outputs = {n: [o.name for o in sess.get_outputs()] for n, sess in self.sessions.items()}
        self.providers = self.sessions["decoder"].get_providers()
        on_gpu = self.providers[0] == "CUDAExecutionProvider"
        # With I/O binding the key/value cache stays on the device between decoder calls.
        self.binding = on_gpu if io_binding is None else io_binding
        self.cache_device = "cuda" if on_gpu else "cpu"
        if self.binding:
            self.sessions["select"] = ort.InferenceSession(_select_graph(self.kv_dtype), options, providers=providers)

    def _feeds(self, graph: str, arrays) -> dict:
        """Arrays in the graph's input order -> {input name: array}; float inputs as float32."""
        return {name: (a.astype(np.float32, copy=False) if a.dtype.kind == "f" else a)
                for name, a in zip(self.inputs[graph], arrays)}

    def vision(self, *inputs):
        return self.sessions["vision"].run(None, self._feeds("vision", inputs))[0]

    def decode(self, input_ids, image_embeds, image_index, position_ids, attention_mask, past):
        # The cache is the decoder's last input and its second output (the first is the hidden states).
        feeds = self._feeds("decoder", (input_ids, image_embeds, image_index, position_ids, attention_mask))
        cache_in = self.inputs["decoder"][-1]
        if not self.binding:
            hidden, present = self.sessions["decoder"].run(None, {**feeds, cache_in: past})
            return hidden, present
        binding = self.sessions["decoder"].io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        binding.bind_ortvalue_input(cache_in, past)
        hidden_out, cache_out = self.outputs["decoder"]
        binding.bind_output(hidden_out, "cpu")
        binding.bind_output(cache_out, self.cache_device)
        self.sessions["decoder"].run_with_iobinding(binding)
        hidden, present = binding.get_outputs()
        return hidden.numpy(), present

    def heads(self, hidden):
        return self.sessions["heads"].run(None, self._feeds("heads", (hidden,)))[0]

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


class OrtBackend(PipelineBackend):
    # Prompt length limits are enforced per triple when prompts are built (spec.max_prompt_tokens).
    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 optimization: str = "all", verify: bool = True, io_binding: bool | None = None):
        self.model = open_exported(path, verify=verify)
        self.spec = self.model.spec
        self.graphs = OrtGraphs(self.model, device, threads, optimization, io_binding)
        self.pipeline = FastPipeline(self.graphs)
        self.description = {"backend": "onnxruntime", "mode": "fast", "providers": self.graphs.providers,
                            "precision": self.model.manifest.get("precision"), "io_binding": self.graphs.binding,
                            "quantization": (self.model.manifest.get("quantization") or {}).get("scheme")}
