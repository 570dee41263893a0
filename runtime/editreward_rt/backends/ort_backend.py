"""ONNX Runtime backend: the fast path on an exported model folder (CPU or CUDA execution provider)."""

from __future__ import annotations

import os

import numpy as np

from ..errors import BackendError
from ..extras import require
from ..families import family_for
from ..hardware import precision_of, resolve_precision
from ..manifest import open_exported
from ..pipeline import FastPipeline, PipelineBackend, check_graph_io, graph_keep, host_table
from . import BACKENDS, onnx_proto

GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")


def _ort():
    return require("onnxruntime", BACKENDS["onnxruntime"].extra, "the onnxruntime backend")


def load(path_or_id, *, mode: str = "fast", device: str = "cpu", threads=None, optimization: str = "all",
         io_binding: bool | None = None, precision: str | None = None):
    """Registry entry: an exported model folder (float or ``ort-*``-quantized graphs). ``io_binding``:
    keep the key/value cache on the session's device (default: on a CUDA provider only).
    ``precision``: ONNX Runtime computes in the precision the graphs were exported in; ``auto``
    (and the default) runs them so, and a precision they do not have is refused (its CPU provider
    has no bfloat16 matrix kernels: bf16 on a CPU is the openvino or torch backend's)."""
    if io_binding not in (None, True, False):
        raise BackendError(f"io_binding must be true or false, not {io_binding!r}")
    ort = OrtBackend(path_or_id, device=device, threads=threads, optimization=optimization, io_binding=io_binding)
    graphs = ort.description["precision"]
    if precision not in (None, "auto") and resolve_precision(precision, ort.description["device"]) != graphs:
        raise BackendError(f"the onnxruntime backend runs {ort.model.root} in its graphs' precision, {graphs}; "
                           f"for {precision} on a CPU use the openvino backend (or torch on a checkpoint)")
    return ort, ort.model


def cuda_index(device: str) -> int:
    """N of ``cuda:N``; 0 for ``cuda`` and ``auto``."""
    if device in ("cuda", "auto"):
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise BackendError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


def providers_for(device: str) -> list:
    available = _ort().get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    # The GPU's index goes to the provider: without it every cuda:N session runs on GPU 0.
    cuda = [("CUDAExecutionProvider", {"device_id": cuda_index(device)}), "CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise BackendError(
                f"device {device!r} requested but ONNX Runtime has no CUDA execution provider "
                f"(available: {available}); install onnxruntime-gpu and check the GPU driver"
            )
        return cuda
    if device == "auto":
        return cuda if "CUDAExecutionProvider" in available else ["CPUExecutionProvider"]
    raise BackendError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


def device_of(providers: list[str], asked: str) -> str:
    """Where sessions made with ``providers_for(asked)`` run: ``cpu`` or ``cuda:N``."""
    return f"cuda:{cuda_index(asked)}" if providers[0] == "CUDAExecutionProvider" else "cpu"


def _helper_graph(nodes: list[bytes], name: str, inputs: list[tuple], outputs: list[tuple]) -> bytes:
    """A small ONNX model over (name, element type, shape) I/O, for work on the session's device
    with I/O binding. Serialised by hand (``onnx_proto``) so that the CUDA path needs onnxruntime alone."""
    info = lambda items: [onnx_proto.value_info(*item) for item in items]
    return onnx_proto.model(nodes, name, info(inputs), info(outputs), opset=17)


def _select_graph(layout, kv_dtype: np.dtype) -> bytes:
    """Gather(cache, rows) along the cache layout's batch axis."""
    elem = onnx_proto.FLOAT16 if kv_dtype == np.float16 else onnx_proto.FLOAT
    axes = [f"d{i}" for i in range(len(layout.axes))]
    picked = [("R" if i == layout.batch_axis else a) for i, a in enumerate(axes)]
    return _helper_graph([onnx_proto.node("Gather", ["cache", "rows"], ["selected"], axis=layout.batch_axis)], "select_rows",
                         [("cache", elem, axes), ("rows", onnx_proto.INT64, ["R"])], [("selected", elem, picked)])


def _table_graph(parts: int) -> bytes:
    """Gather(Concat(part_0, ..., part_n-1), index): the call's image-embedding table from the vision outputs."""
    names = [f"part_{i}" for i in range(parts)]
    return _helper_graph([onnx_proto.node("Concat", names, ["joined"], axis=0),
                          onnx_proto.node("Gather", ["joined", "index"], ["table"], axis=0)], "embedding_table",
                         [*[(n, onnx_proto.FLOAT, [f"n{i}", "H"]) for i, n in enumerate(names)],
                          ("index", onnx_proto.INT64, ["R"])], [("table", onnx_proto.FLOAT, ["R", "H"])])


# The element types a graph spec declares, by ONNX Runtime's names for them.
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int64)": "int64", "tensor(int32)": "int32"}


def _port(arg) -> tuple:
    """An ONNX Runtime input or output -> ({name}, element type as the manifest names it, dims: None where symbolic)."""
    dims = None if arg.shape is None else [d if isinstance(d, int) else None for d in arg.shape]
    return {arg.name}, ORT_DTYPES.get(arg.type, arg.type), dims


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
        self.cache = family_for(model.spec).cache_layout(str(self.kv_dtype))
        self.sessions = {}
        for name in ("vision", "decoder", "heads"):
            path = model.graph_path(name)
            try:
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception classes
                raise BackendError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        check_graph_io(model, {name: ([_port(a) for a in session.get_inputs()], [_port(a) for a in session.get_outputs()])
                               for name, session in self.sessions.items()})
        self.inputs = {n: [i.name for i in sess.get_inputs()] for n, sess in self.sessions.items()}
        self.outputs = {n: [o.name for o in sess.get_outputs()] for n, sess in self.sessions.items()}
        self.providers = self.sessions["decoder"].get_providers()
        on_gpu = self.providers[0] == "CUDAExecutionProvider"
        # With I/O binding the key/value cache stays on the device between decoder calls.
        self.binding = on_gpu if io_binding is None else io_binding
        self.cache_device = "cuda" if on_gpu else "cpu"

    def _feeds(self, graph: str, arrays) -> dict:
        """Arrays in the graph's input order -> {input name: array}; float inputs as float32."""
        return {name: (a.astype(np.float32, copy=False) if a.dtype.kind == "f" else a)
                for name, a in zip(self.inputs[graph], arrays)}

    def _bound(self, session: str, inputs: dict, outputs: dict) -> list:
        """One run with I/O binding: OrtValue inputs stay where they are, numpy ones are copied in;
        ``outputs`` maps each output to the device it is left on. -> the outputs, as OrtValues."""
        binding = self.sessions[session].io_binding()
        for name, value in inputs.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name, where in outputs.items():
            binding.bind_output(name, where)
        self.sessions[session].run_with_iobinding(binding)
        return binding.get_outputs()

    def _helper(self, name: str, make) -> str:
        if name not in self.sessions:
            self.sessions[name] = self.ort.InferenceSession(make(), self.options, providers=self.providers_asked)
        return name

    def vision(self, feeds):
        # One run per image: the exported graph's full-attention blocks attend over all of a call's
        # patches, so a call is one image.
        out_name = self.outputs["vision"][0]
        if not self.binding:
            outs = [self.sessions["vision"].run(None, self._feeds("vision", arrays))[0] for arrays in feeds]
            return outs[0] if len(outs) == 1 else np.concatenate(outs)
        return [self._bound("vision", self._feeds("vision", arrays), {out_name: self.cache_device})[0] for arrays in feeds]

    def table(self, parts, index):
        if not self.binding:
            return host_table(parts, index)
        flat = [v for p in parts for v in (p if isinstance(p, list) else [p])]
        session = self._helper(f"table{len(flat)}", lambda: _table_graph(len(flat)))
        feeds = {**{f"part_{i}": v for i, v in enumerate(flat)}, "index": np.asarray(index, np.int64)}
        return self._bound(session, feeds, {"table": self.cache_device})[0]

    def decode(self, input_ids, image_embeds, image_index, position_ids, attention_mask, past, keep):
        # The cache is the decoder's last input and its second output (the first is the hidden
        # states at the rows kept, all the graph's last layer computes).
        names = self.inputs["decoder"]
        feeds = {**self._feeds("decoder", (input_ids,)), names[1]: image_embeds,
                 **dict(zip(names[2:6], (image_index, position_ids, attention_mask, graph_keep(keep)))), names[-1]: past}
        hidden_out, cache_out = self.outputs["decoder"]
        if not self.binding:
            hidden, present = self.sessions["decoder"].run(None, feeds)
        else:
            hidden, present = self._bound("decoder", feeds, {hidden_out: self.cache_device, cache_out: self.cache_device})
        return (None if keep is None else hidden), present

    def heads(self, hidden):
        name, out = self.inputs["heads"][0], self.outputs["heads"][0]
        if not self.binding:
            return self.sessions["heads"].run(None, {name: hidden})[0]
        return self._bound("heads", {name: hidden}, {out: "cpu"})[0].numpy()  # the call's one copy to the host

    def empty_cache(self, batch: int = 1):
        empty = np.zeros(self.cache.shape(batch), dtype=self.kv_dtype)
        return self.ort.OrtValue.ortvalue_from_numpy(empty, self.cache_device) if self.binding else empty

    def select(self, cache, rows):
        rows = np.asarray(rows, dtype=np.int64)
        if not self.binding:
            return np.take(cache, rows, axis=self.cache.batch_axis)
        session = self._helper("select", lambda: _select_graph(self.cache, self.kv_dtype))
        return self._bound(session, {"cache": cache, "rows": rows}, {"selected": self.cache_device})[0]


class OrtBackend(PipelineBackend):
    # Prompt length limits are enforced per triple when prompts are built (spec.max_prompt_tokens).
    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 optimization: str = "all", verify: bool = True, io_binding: bool | None = None):
        self.model = open_exported(path, verify=verify)
        self.spec = self.model.spec
        self.graphs = OrtGraphs(self.model, device, threads, optimization, io_binding)
        self.pipeline = FastPipeline(self.graphs)
        self.description = {"backend": "onnxruntime", "mode": "fast", "device": device_of(self.graphs.providers, device),
                            "providers": self.graphs.providers,
                            "precision": precision_of(self.model.manifest.get("precision", "float32")),
                            "io_binding": self.graphs.binding,
                            "quantization": (self.model.manifest.get("quantization") or {}).get("scheme")}
