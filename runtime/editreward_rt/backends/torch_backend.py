"""PyTorch backend: ``reference`` (two full transformers passes per triple, as upstream) and
``fast`` (the model family's torch modules on the shared fast path), from a checkpoint or from a
torch-quantized model folder (whose layers its scheme's ``load`` rebuilds). Needs the ``torch`` extra.

GPU memory (``memory``): ``resident`` keeps the weights on the device; ``per-call`` keeps them in
host memory and copies them to the device for each call, freeing that copy (and the allocator's
cache) after it, so a trainer sharing the GPU gets the memory back between reward calls.

``compile`` (fast path, resident weights): the decoder through ``torch.compile`` in one of its
modes (``true`` is ``default``). Each decode level's shape is compiled once, the first calls of a
new shape pay for it (tens of seconds), and a workload whose shapes repeat, an RL step's, runs
from the compiled code after; ``reduce-overhead`` also replays each shape from a captured CUDA
graph on a GPU, which removes the per-kernel launch cost of a decode level. Outputs are copied out
of the graph's memory before the next replay can overwrite them (a source prefix is kept across
calls). The benchmark measures each workload with and without it (``benchmarks/gpu_check.py``)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import BackendError
from ..extras import require
from ..families import family_for
from ..hardware import PRECISION_DTYPES, precision_of, resolve_precision
from ..manifest import MANIFEST
from ..pipeline import FastPipeline, PipelineBackend, PreparedTriple, SharedPrefix
from . import BACKENDS


def _torch():
    return require("torch", BACKENDS["torch"].extra, "the torch backend")


MEMORY_MODES = ("resident", "per-call")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that capture CUDA graphs on a GPU


def compile_mode(value) -> str | None:
    """The ``compile`` option -> a ``torch.compile`` mode, or None for eager."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if value not in COMPILE_MODES:
        raise BackendError(f"compile must be true, false or one of {', '.join(COMPILE_MODES)}, not {value!r}")
    return value


def load(path_or_id, *, mode: str = "fast", base=None, prompts_from=None, device: str = "cpu", threads=None, dtype=None,
         memory: str = "resident", precision: str | None = None, compile=None):
    """Registry entry: a checkpoint (hub id or folder), or a quantized model folder written by the quantize tool."""
    folder = Path(str(path_or_id))
    if folder.is_dir() and (folder / MANIFEST).is_file():
        from ..manifest import open_exported

        if memory != "resident":  # quantized layers pack their weights when moved; a per-call copy would repack them
            raise BackendError(f"memory {memory!r} needs float weights; a quantized folder stays resident")
        if compile_mode(compile):  # its layers are the scheme's own kernels, not traced ones
            raise BackendError("compile applies to float weights; a quantized folder runs eagerly")
        model = open_exported(folder)
        computes = precision_of(model.manifest.get("compute_dtype", "float32"))
        if precision is not None and precision != "auto" and resolve_precision(precision, device) != computes:
            raise BackendError(f"{folder} is quantized to compute in {computes}; precision {precision!r} is not "
                               "available for it (quantize again from the float checkpoint for another)")
        return TorchBackend.from_quantized(model, mode=mode, device=device, threads=threads), model
    from ..checkpoint import open_checkpoint

    ckpt = open_checkpoint(path_or_id, base=base, prompts_from=prompts_from)
    return TorchBackend(ckpt, mode=mode, device=device, dtype=dtype, threads=threads, memory=memory,
                        precision=precision, compile=compile), ckpt


def pick_device(device: str):
    torch = _torch()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} requested but PyTorch sees no CUDA GPU")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise BackendError(f"unknown device {device!r}; use cpu or cuda")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BackendError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    # ``cuda`` means the current GPU: named by its index, so the description says which one it is.
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


def pick_dtype(dtype: str | None, device, precision: str | None = None, mode: str = "fast"):
    """The compute dtype: ``dtype`` (a torch dtype name) if given, else ``precision`` (fp32, bf16 or
    auto; ``hardware.resolve_precision``): auto is bfloat16 where ``device`` computes it natively.
    With neither, the fast path runs the default precision (auto, or $EDITREWARD_PRECISION), and
    the reference, the yardstick every other path is checked against, float32 on a CPU and
    bfloat16 on a GPU (upstream's own)."""
    torch = _torch()
    if dtype is not None and precision is not None:
        if PRECISION_DTYPES.get(resolve_precision(precision, str(device))) != dtype:
            raise BackendError(f"dtype {dtype!r} and precision {precision!r} disagree; give one of them")
    if dtype is None:
        if precision is None and mode == "reference":
            dtype = "bfloat16" if device.type == "cuda" else "float32"
        else:
            dtype = PRECISION_DTYPES[resolve_precision(precision, str(device))]
    try:
        return getattr(torch, dtype)
    except AttributeError as exc:
        raise BackendError(f"unknown dtype {dtype!r}") from exc


class TorchGraphs:
    """The fast-path primitives on this project's torch modules (also what ONNX export traces).
    Embeddings, caches and hidden rows stay tensors on ``device``; ``heads`` returns the one host array."""

    def __init__(self, spec, state: dict | None, device, dtype, modules: tuple | None = None):
        torch = _torch()
        self.torch, self.spec, self.device, self.dtype = torch, spec, device, dtype
        fam = self.family = family_for(spec)
        if modules is None:
            with torch.device(device):  # built on meta, each weight moved to ``device`` in ``dtype`` as it is loaded
                modules = fam.torch_modules(state, dtype)
        self.vision_module, self.decoder, self.head_module = (m.to(device) for m in modules)
        self.run_decoder = self.decoder  # or its compiled form (``compile_decoder``)
        self.cache = fam.cache_layout(str(dtype).replace("torch.", ""))
        # The load's peak, kept; then the peak is reset, so that the next reading is what serving needs.
        self.load_peak_mb = None
        if torch.device(device).type == "cuda":
            self.load_peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
            torch.cuda.reset_peak_memory_stats(device)

    @classmethod
    def empty(cls, spec, device, dtype) -> "TorchGraphs":
        """Modules with uninitialised weights, to be filled from a quantized state."""
        return cls(spec, None, device, dtype)

    def _t(self, array, dtype=None):
        return self.torch.as_tensor(np.ascontiguousarray(array), device=self.device, dtype=dtype)

    def vision(self, feeds):
        # All images in one call: the tower attends per window and per image, so joining them
        # adds no attention work, and their merged outputs come back concatenated in order.
        patches, *tables = self.family.join_vision_feeds(feeds)
        with self.torch.inference_mode():
            return self.vision_module(self._t(patches, self.dtype), *map(self._t, tables),
                                      layout=self.vision_module.layout(feeds))

    def table(self, parts, index):
        return (parts[0] if len(parts) == 1 else self.torch.cat(parts))[self._t(index)]

    def decode(self, input_ids, image_embeds, image_index, position_ids, attention_mask, past, keep):
        with self.torch.inference_mode():
            hidden, present = self.run_decoder(self._t(input_ids), image_embeds, self._t(image_index), self._t(position_ids),
                                           self._t(attention_mask), past, None if keep is None else self._t(keep))
            return (None if keep is None else hidden), present

    def compile_decoder(self, mode: str) -> None:
        """Decode through ``torch.compile(decoder, mode=mode)`` (see the module docstring)."""
        torch = self.torch
        compiled = torch.compile(self.decoder, mode=mode)
        if mode not in CUDA_GRAPH_MODES or torch.device(self.device).type != "cuda":
            self.run_decoder = compiled
            return
        self.run_decoder = GraphReplayer(torch, compiled, self.device)

    def heads(self, hidden):
        with self.torch.inference_mode():
            return self.head_module(hidden.float()).cpu().numpy()

    def empty_cache(self, batch: int = 1):
        return self.torch.zeros(self.cache.shape(batch), dtype=self.dtype, device=self.device)

    def select(self, cache, rows):
        return cache.index_select(self.cache.batch_axis, self._t(rows))


class GraphReplayer:
    """A decoder compiled with CUDA graphs, called from any thread: each call runs on one thread of
    its own (PyTorch keeps its CUDA-graph trees per thread, and a scorer is called from batching
    workers, producer threads and HTTP handlers alike), in inference mode, as a step of its own;
    the outputs the caller keeps are copied out of the graph's memory, which the next replay reuses
    (a kept source prefix outlives it)."""

    def __init__(self, torch, compiled, device):
        from concurrent.futures import ThreadPoolExecutor

        self.torch, self.compiled = torch, compiled
        init = (lambda: torch.cuda.set_device(device)) if torch.device(device).type == "cuda" else None
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="editreward-cuda-graphs", initializer=init)

    def _step(self, args):
        torch = self.torch
        with torch.inference_mode():
            torch.compiler.cudagraph_mark_step_begin()  # each decode level is a step of its own
            hidden, present = self.compiled(*args)
            keep = args[-1]  # without rows to keep, the caller drops the hidden states
            return (None if keep is None else hidden.clone()), present.clone()

    def __call__(self, *args):
        return self.thread.submit(self._step, args).result()


class Residency:
    """Where the weights of ``modules`` are between calls (see the module docstring). ``per-call``
    keeps each tensor's host copy; a call points the tensors at fresh device copies and back at the
    host copies after it (the weights are frozen, so nothing is copied back), freeing the device copies."""

    def __init__(self, torch, modules, device, mode: str):
        if mode not in MEMORY_MODES:
            raise BackendError(f"unknown memory mode {mode!r}; use {' or '.join(MEMORY_MODES)}")
        self.torch, self.device, self.mode = torch, device, mode
        self.tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        self.host = []
        if mode == "per-call":
            pin = device.type == "cuda"  # page-locked host memory makes each call's copy to the GPU faster
            self.host = [t.data.to("cpu").pin_memory() if pin else t.data.to("cpu") for t in self.tensors]
            self._point(self.host)

    def _point(self, data) -> None:
        for tensor, value in zip(self.tensors, data):
            tensor.data = value

    @contextmanager
    def on_device(self):
        """The weights on the device for the body of the ``with``; released after, even on an error."""
        if self.mode == "resident":
            yield
            return
        self._point([h.to(self.device, copy=True, non_blocking=True) for h in self.host])
        try:
            yield
        finally:
            self._point(self.host)
            if self.device.type == "cuda":
                self.torch.cuda.synchronize(self.device)
                self.torch.cuda.empty_cache()


class TorchBackend(PipelineBackend):
    name = "torch"

    def __init__(self, checkpoint, mode: str = "fast", device: str = "cpu", dtype: str | None = None,
                 threads: int | None = None, memory: str = "resident", precision: str | None = None, compile=None):
        torch = _torch()
        if threads:
            torch.set_num_threads(threads)
        if mode not in ("fast", "reference"):
            raise BackendError(f"unknown mode {mode!r}; use fast or reference")
        if memory != "resident" and mode == "reference":
            raise BackendError(f"memory {memory!r} applies to the fast path; the reference stays resident")
        compiled = compile_mode(compile)
        if compiled and (mode == "reference" or memory != "resident"):
            raise BackendError("compile applies to the fast path with resident weights (memory 'resident')")
        self.spec, self.mode = checkpoint.spec, mode
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev, precision, mode)
        state = checkpoint.state_dict()
        if mode == "reference":
            self.runner = family_for(self.spec).reference_runner(checkpoint.config, state, dev, dt)
            self.pipeline = None
            self.residency = Residency(torch, [], dev, "resident")
        else:
            # Per-call weights are built in host memory: the device never holds them outside a call.
            graphs = self.graphs = TorchGraphs(self.spec, state, dev if memory == "resident" else torch.device("cpu"), dt)
            graphs.device = dev
            self.pipeline = FastPipeline(graphs)
            self.residency = Residency(torch, [graphs.vision_module, graphs.decoder, graphs.head_module], dev, memory)
            if compiled:
                graphs.compile_decoder(compiled)
        name = str(dt).replace("torch.", "")
        self.description = {"backend": "torch", "mode": mode, "device": str(dev), "dtype": name,
                            "precision": precision_of(name), "memory": memory, "compile": compiled}

    @classmethod
    def from_quantized(cls, model, mode: str = "fast", device: str = "cpu", threads: int | None = None):
        """A torch-quantized model folder (its scheme's name and version were checked when it was
        opened): the scheme's registered ``load`` rebuilds the quantized layers and loads the saved state."""
        from ..schemes import SCHEMES, entry

        torch = _torch()
        quant = model.manifest.get("quantization") or {}
        known = quant.get("scheme") in SCHEMES
        if not known or entry(quant["scheme"]).load is None:
            raise BackendError(f"{model.root} is not a torch-quantized model folder (scheme {quant.get('scheme')!r})")
        if mode != "fast":
            raise BackendError("a quantized model runs in fast mode; the reference is the float checkpoint")
        if threads:
            torch.set_num_threads(threads)
        self = cls.__new__(cls)
        self.model, self.spec, self.mode, self.runner = model, model.spec, mode, None
        self.residency = Residency(torch, [], pick_device(device), "resident")
        dev = pick_device(device)
        dt = getattr(torch, model.manifest.get("compute_dtype", "float32"))
        weights = model.root / model.manifest["weights"]
        from ..checkpoint import safetensors_shapes
        from ..errors import ManifestError, WeightMismatchError

        try:  # before any module is built: a spec that does not fit the saved state costs no time
            family_for(self.spec).check_module_state(safetensors_shapes(weights))
        except WeightMismatchError as exc:
            raise ManifestError(f"{model.root}: {exc}") from None
        self.graphs = TorchGraphs.empty(self.spec, dev, dt)
        modules = {"vision": self.graphs.vision_module, "decoder": self.graphs.decoder, "heads": self.graphs.head_module}
        load_file = require("safetensors.torch", "torch", "a torch-quantized model folder").load_file
        state = load_file(str(weights))
        entry(quant["scheme"]).function("load")(modules, quant, state, dev, dt)
        self.pipeline = FastPipeline(self.graphs)
        name = str(dt).replace("torch.", "")
        self.description = {"backend": "torch", "mode": mode, "device": str(dev), "dtype": name,
                            "precision": precision_of(name), "quantization": quant["scheme"]}
        return self

    def head_outputs(self, triples: list[PreparedTriple], prefix: SharedPrefix | None = None) -> np.ndarray:
        with self.residency.on_device():
            if self.pipeline is None:
                return self.runner.run(triples)
            return self.pipeline.run(triples, prefix)

    def encode_prefix(self, triples: list[PreparedTriple]) -> SharedPrefix | None:
        """None in reference mode, which decodes every triple in full."""
        if self.pipeline is None:
            return None
        with self.residency.on_device():
            return self.pipeline.encode_prefix(triples)
