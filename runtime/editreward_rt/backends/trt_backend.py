"""TensorRT backend: the shared fast path on engines built by ``export/build_trt.py``.

``TrtGraphs`` implements the pipeline's GraphRunner protocol on three deserialized TensorRT engines, so
vision runs once per distinct image, shared prefixes are decoded once and every level is one
padded batch, exactly as on the other backends. The key/value cache never leaves the GPU:
``select`` gathers cache rows with strided device copies, and the cache's type is whatever
the engine declares (bf16 for bf16 builds). Device buffers come from a pool keyed per
tensor and grown in size buckets, so repeated shapes allocate nothing. A decoder call is
matched to the engine's optimisation profiles (``prefix``: long sequences, small batch;
``suffix``: short sequences, twice the batch); a batch larger than the chosen profile, or
one gathering more image rows than it allows, is split into chunks that are run one after
another, their outputs stitched together on the device. With ``cuda_graphs=True`` a call
whose shapes and buffers repeat is replayed from a captured CUDA graph.

Engines are tied to the TensorRT version and the GPU they were built for: the manifest's
``trt.build`` records both, and loading elsewhere is refused with the reason.
Device memory goes through cuda-python (see ``cuda_memory`` for why not torch).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from ..errors import BackendError, InputError, ManifestError, PromptTooLongError
from ..extras import require
from ..families import family_for
from ..manifest import open_exported
from ..pipeline import FastPipeline, PipelineBackend, PreparedTriple, SharedPrefix, host_table
from . import BACKENDS, cuda_memory
from .cuda_memory import DeviceBuffer, DeviceTensor, gather_batch, place_batch

GRAPHS = ("vision", "decoder", "heads")
CACHE_KEYS = (("cache", 0), ("cache", 1))  # ping-pong: a select or decode never writes the cache it reads
MAX_CUDA_GRAPHS = 64
TRT_NOTE = ("(the tensorrt wheel fetches its libraries from NVIDIA's package index, https://pypi.nvidia.com), "
            "on a machine with an NVIDIA GPU")
REBUILD = "rebuild the engines on this machine: python export/build_trt.py --ckpt CKPT --precision P --out DIR"


def _trt():
    return require("tensorrt", BACKENDS["tensorrt"].extra, "the tensorrt backend", TRT_NOTE)


def load(path_or_id, *, mode: str = "fast", device: str = "cuda", cuda_graphs: bool = False):
    """Registry entry: an exported model folder whose engines ``export/build_trt.py`` built.
    ``cuda_graphs``: replay calls whose shapes repeat from captured CUDA graphs."""
    if not isinstance(cuda_graphs, bool):
        raise BackendError(f"cuda_graphs must be true or false, not {cuda_graphs!r}")
    trt = TrtBackend(path_or_id, device=device, cuda_graphs=cuda_graphs)
    return trt, trt.model


def parse_device(device: str) -> int:
    if device in ("cuda", "auto"):
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise BackendError(f"the tensorrt backend runs on an NVIDIA GPU: use device='cuda' or 'cuda:N', not {device!r}")


def trt_section(model) -> dict:
    """The manifest's ``trt`` section of a folder whose engines were built, checked for completeness."""
    section = model.manifest.get("trt")
    if not section:
        raise BackendError(f"{model.root} holds no TensorRT engines (its manifest has no 'trt' section); "
                           "build them with python export/build_trt.py")
    if section.get("status") != "built" or not section.get("engines") or not section.get("build"):
        raise BackendError(f"{model.root}: the TensorRT engines were never built (status {section.get('status')!r}); "
                           "run python export/build_trt.py where TensorRT and the target GPU are available")
    for name in GRAPHS:
        if name not in section["engines"] or name not in section.get("profiles", {}):
            raise ManifestError(f"{model.root}: the manifest's trt section lacks the {name} engine or its profiles")
    return section


def check_compatible(section: dict, trt_version: str, gpu: dict) -> None:
    """Refuse engines built by another TensorRT version or for another GPU."""
    built = section["build"]
    if built["tensorrt_version"] != trt_version:
        raise BackendError(f"these engines were built with TensorRT {built['tensorrt_version']} and this is TensorRT "
                           f"{trt_version}; a serialized engine loads only in the version that built it. Install "
                           f"tensorrt=={built['tensorrt_version']} or {REBUILD}")
    want, have = built["gpu"], gpu
    if list(want["compute_capability"]) != list(have["compute_capability"]):
        raise BackendError(f"these engines were built for {want['name']} (compute capability "
                           f"{'.'.join(map(str, want['compute_capability']))}); this GPU is {have['name']} "
                           f"({'.'.join(map(str, have['compute_capability']))}), whose kernels differ; {REBUILD}")
    if want["name"] != have["name"]:
        raise BackendError(f"these engines were built and timed on {want['name']}; this GPU is {have['name']} "
                           f"(same compute capability, different kernels' timings and memory); {REBUILD}")


def check_inputs(triples: list[PreparedTriple], spec, limits: dict) -> None:
    """Refuse, before any GPU work, what the engines' profiles cannot take."""
    limit = min(spec.max_prompt_tokens, limits["max_seq"])
    for t in triples:
        longest = max(len(p.ids) for p in t.prompts)
        if longest > limit:
            raise PromptTooLongError(f"prompt of {longest} tokens exceeds the engines' limit of {limit} "
                                     "(rebuild with a larger --max-seq)")
        for image in (t.source, t.edited):
            if image.n_tokens > limits["max_image_tokens"]:
                raise InputError(f"an image of {image.n_tokens} tokens exceeds the engines' limit of "
                                 f"{limits['max_image_tokens']} (rebuild with a larger --max-image-tokens)")


def plan(profiles: list[dict], batch: int | None, dims: dict, batch_axis: str = "batch") -> tuple[int, int] | None:
    """(profile index, batch chunk size) of the profile that takes ``dims`` with the largest batch; None if none."""
    fits = [(i, p["axes"][batch_axis][2] if batch is not None else 1) for i, p in enumerate(profiles)
            if all(p["axes"][a][0] <= v <= p["axes"][a][2] for a, v in dims.items())]
    return max(fits, key=lambda f: (f[1], -f[0])) if fits else None


def keep_in_chunk(keep: np.ndarray | None, sl: slice) -> tuple[np.ndarray, np.ndarray]:
    """(indices into ``keep`` [R, 2] of its pairs in batch rows ``sl``, those pairs as the decoder
    engine's ``keep`` input [n, 1, 2], rows counted from the chunk's first). A chunk keeping nothing
    keeps its first row's first position, discarded: the engine's ``keep`` is never empty."""
    picked = np.zeros(0, np.int64) if keep is None else np.flatnonzero((keep[:, 0] >= sl.start) & (keep[:, 0] < sl.stop))
    if not len(picked):
        return picked, np.zeros((1, 1, 2), np.int64)
    return picked, (keep[picked] - [sl.start, 0])[:, None, :]


def batch_chunks(image_index: np.ndarray, size: int, max_rows: int) -> list[slice]:
    """Consecutive batch slices of at most ``size`` rows, halved until each gathers <= ``max_rows`` image rows."""
    b = len(image_index)
    todo, out = [slice(lo, min(lo + size, b)) for lo in range(0, b, size)], []
    while todo:
        sl = todo.pop(0)
        part = image_index[sl]
        rows = len(np.unique(part[part >= 0]))
        if rows <= max_rows:
            out.append(sl)
        elif sl.stop - sl.start == 1:
            raise InputError(f"one sequence gathers {rows} image rows; the engine allows {max_rows}")
        else:
            mid = (sl.start + sl.stop) // 2
            todo[:0] = [slice(sl.start, mid), slice(mid, sl.stop)]
    return out


def local_rows(image_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the embedding table a chunk uses, and its index into that sub-table (-1 stays -1)."""
    used = np.unique(image_index[image_index >= 0])
    return used, np.where(image_index >= 0, np.searchsorted(used, image_index), -1)


def _io_types(trt, dt) -> tuple[int, np.dtype | None]:
    """(itemsize, numpy dtype or None for bf16/fp8, which never cross to the host here)."""
    try:
        npdt = np.dtype(trt.nptype(dt))
    except (TypeError, KeyError):  # no numpy type for bf16 / fp8
        npdt = None
    size = getattr(dt, "itemsize", None) or (npdt.itemsize if npdt is not None else 2)
    return int(size), npdt


class EngineRunner:
    """One deserialized engine with its execution context; binds device tensors and runs."""

    def __init__(self, trt, runtime, path, name: str, profiles: list[dict], mem, pool, cuda_graphs: bool):
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT cannot deserialize {path} (see the TensorRT log above)")
        self.name, self.mem, self.pool = name, mem, pool
        self.io = {}
        for i in range(self.engine.num_io_tensors):
            tensor = self.engine.get_tensor_name(i)
            dt = self.engine.get_tensor_dtype(tensor)
            self.io[tensor] = (self.engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT, *_io_types(trt, dt))
        if self.engine.num_optimization_profiles != len(profiles):
            raise BackendError(f"{path} has {self.engine.num_optimization_profiles} optimisation profiles; "
                               f"the manifest lists {len(profiles)}")
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        # Activation memory per selected profile; a captured CUDA graph needs it to stay put, hence STATIC then.
        if strategy is not None and not cuda_graphs:
            self.context = self.engine.create_execution_context(strategy.ON_PROFILE_CHANGE)
        else:
            self.context = self.engine.create_execution_context()
        self.profile = 0
        self.graphs, self.seen = (OrderedDict() if cuda_graphs else None), set()

    def run(self, profile: int, inputs: dict, outputs: dict | None = None) -> dict[str, DeviceTensor]:
        """``inputs``: name -> host array (copied over) or DeviceTensor; ``outputs``: preallocated DeviceTensors."""
        ctx, bound = self.context, []
        if profile != self.profile:
            ctx.set_optimization_profile_async(profile, self.mem.handle)
            self.profile = profile
        for name, value in inputs.items():
            _, size, npdt = self.io[name]
            if not isinstance(value, DeviceTensor):
                if npdt is None:
                    raise BackendError(f"{self.name} input {name} has a device-only type; pass a device tensor")
                array = np.ascontiguousarray(value, dtype=npdt)
                value = self.pool.tensor((self.name, name), array.shape, size)
                if array.nbytes:
                    self.mem.h2d(value.ptr, array)
            ctx.set_input_shape(name, value.shape)
            ctx.set_tensor_address(name, value.ptr)
            bound.append((name, value.shape, value.ptr))
        result = {}
        for name, (is_input, size, _) in self.io.items():
            if is_input:
                continue
            shape = tuple(ctx.get_tensor_shape(name))
            given = (outputs or {}).get(name)
            if given is not None and given.shape != shape:
                raise BackendError(f"{self.name} output {name} has shape {shape}, expected {given.shape}")
            tensor = given if given is not None else self.pool.tensor((self.name, name), shape, size)
            ctx.set_tensor_address(name, tensor.ptr)
            result[name] = tensor
            bound.append((name, shape, tensor.ptr))
        self._execute((profile, tuple(bound)))
        return result

    def _execute(self, key) -> None:
        enqueue = lambda: self.context.execute_async_v3(self.mem.handle)
        if self.graphs is not None:
            graph = self.graphs.get(key)
            if graph is None and key in self.seen:  # second time with these shapes and buffers: capture
                try:
                    graph = self.mem.capture(enqueue)
                except BackendError:
                    self.graphs = None  # this engine cannot be captured; run it directly from now on
                else:
                    self.graphs[key] = graph
                    if len(self.graphs) > MAX_CUDA_GRAPHS:
                        self.mem.destroy_graph(self.graphs.popitem(last=False)[1])
            if graph is not None:
                self.graphs.move_to_end(key)
                self.mem.launch(graph)
                return
            if len(self.seen) > 4 * MAX_CUDA_GRAPHS:
                self.seen.clear()
            self.seen.add(key)
        if not enqueue():
            raise BackendError(f"TensorRT failed to run the {self.name} engine (see the TensorRT log above)")


class TrtGraphs:
    """The pipeline's Engine protocol on TensorRT engines; caches are DeviceTensors on the GPU."""

    def __init__(self, model, section: dict, device: int = 0, cuda_graphs: bool = False):
        trt = _trt()
        self.spec, self.profiles = model.spec, section["profiles"]
        self.mem = cuda_memory.CudaMemory(device)
        self.pool = cuda_memory.BufferPool(self.mem)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = runtime = trt.Runtime(self.logger)  # outlives the engines it deserialized
        self.runners = {name: EngineRunner(trt, runtime, model.root / section["engines"][name]["file"], name,
                                           self.profiles[name], self.mem, self.pool, cuda_graphs) for name in GRAPHS}
        for name, runner in self.runners.items():
            declared = model.manifest["graphs"][name]
            expected = {i["name"] for i in declared["inputs"] + declared["outputs"]}
            if set(runner.io) != expected:
                raise BackendError(f"the {name} engine's tensors {sorted(runner.io)} differ from the manifest's {sorted(expected)}")
        # I/O names and shapes in the graphs' role order (the manifest's): the cache is the decoder's last
        # input and its second output, after the hidden states; its batch axis is the first dimension of
        # the token ids, its image-row axis the first of the image rows.
        self.declared = {n: model.manifest["graphs"][n]["inputs"] for n in GRAPHS}
        self.inputs = {n: [i["name"] for i in self.declared[n]] for n in GRAPHS}
        self.outputs = {n: [o["name"] for o in model.manifest["graphs"][n]["outputs"]] for n in GRAPHS}
        self.batch_axis, self.rows_axis = (self.declared["decoder"][i]["shape"][0] for i in (0, 1))
        self.kv_itemsize = self.runners["decoder"].io[self.inputs["decoder"][-1]][1]
        self.cache = family_for(self.spec).cache_layout(model.manifest.get("kv_dtype", "float32"))
        self.empty = DeviceBuffer(self.mem.malloc(256), 256)  # bound for zero-length caches

    def _host(self, tensor: DeviceTensor, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(tensor.shape, np.float32) if out is None else out
        if out.nbytes:
            self.mem.d2h(out, tensor.ptr)
        return out

    def dims(self, graph: str, arrays) -> dict[str, int]:
        """Each named dynamic axis of ``graph``'s inputs -> its size in ``arrays``."""
        out = {}
        for item, array in zip(self.declared[graph], arrays):
            out.update({d: int(n) for d, n in zip(item["shape"], array.shape) if isinstance(d, str)})
        return out

    def vision(self, feeds):
        return np.concatenate([self._vision_one(arrays) for arrays in feeds])

    def _vision_one(self, inputs):
        dims = self.dims("vision", inputs)
        chosen = plan(self.profiles["vision"], None, dims, self.batch_axis)
        if chosen is None:
            raise InputError(f"an image of {len(inputs[0])} patches ({dims}) is outside the vision engine's profile")
        out = self.runners["vision"].run(chosen[0], dict(zip(self.inputs["vision"], inputs)))
        result = self._host(out[self.outputs["vision"][0]])
        self.mem.synchronize()
        return result

    def table(self, parts, index):
        return host_table(parts, index)

    def decode(self, input_ids, image_embeds, image_index, position_ids, attention_mask, past, keep):
        b, s = input_ids.shape
        total = attention_mask.shape[1]
        # Batch and image rows are split into chunks below; every other axis must fit a profile.
        one = np.zeros((1, 1, 2), np.int64)  # each chunk keeps [kept, 1, 2] rows, at least one (``chunk_keep``)
        dims = self.dims("decoder", (input_ids, image_embeds, image_index, position_ids, attention_mask, one, past))
        fixed = {a: v for a, v in dims.items() if a not in (self.batch_axis, self.rows_axis)}
        chosen = plan(self.profiles["decoder"], b, fixed, self.batch_axis)
        if chosen is None:
            raise PromptTooLongError(f"a decoder step of {s} new tokens over {past.shape[self.cache.length_axis]} cached ones fits none of the "
                                     "engine's profiles (rebuild with a larger --max-seq)")
        index, size = chosen
        max_rows = self.profiles["decoder"][index]["axes"][self.rows_axis][2]
        present = self.pool.tensor(self.pool.other(CACHE_KEYS, past.buffer), self.cache.shape(b, total), self.kv_itemsize)
        # Only the levels whose hidden rows are kept copy hidden states to the host.
        flat = None if keep is None else np.asarray(keep, np.int64).reshape(-1, 2)
        hidden = None if keep is None else np.empty((len(flat), self.spec.text.hidden_size), np.float32)
        runner = self.runners["decoder"]
        for sl in batch_chunks(image_index, size, max_rows):
            whole = sl.stop - sl.start == b and len(image_embeds) <= max_rows
            if whole:
                table, rows, chunk_past = image_embeds, image_index, past
            else:
                used, rows = local_rows(image_index[sl])
                table = image_embeds[used] if len(used) else np.zeros((1, image_embeds.shape[1]), np.float32)
                chunk_past = gather_batch(self.mem, past, np.arange(sl.start, sl.stop), self.pool.tensor(
                    ("decoder", "past-chunk"), self.cache.shape(sl.stop - sl.start, past.shape[self.cache.length_axis]),
                    self.kv_itemsize), self.cache.batch_axis)
            picked, chunk_keep = keep_in_chunk(flat, sl)
            feeds = (input_ids[sl], table, rows, position_ids[sl], attention_mask[sl], chunk_keep, chunk_past)
            hidden_out, cache_out = self.outputs["decoder"]
            out = runner.run(index, dict(zip(self.inputs["decoder"], feeds)), {cache_out: present} if whole else None)
            if not whole:
                place_batch(self.mem, out[cache_out], present, sl.start, self.cache.batch_axis)
            if len(picked):
                hidden[picked] = self._host(out[hidden_out])[:, 0]
        self.mem.synchronize()
        return (None if keep is None else hidden.reshape(*keep.shape[:-1], hidden.shape[-1])), present

    def heads(self, hidden):
        chosen = plan(self.profiles["heads"], len(hidden), {}, self.batch_axis)
        out = np.empty((len(hidden), self.spec.heads.num_heads, 2), np.float32)
        for lo in range(0, len(hidden), chosen[1]):
            sl = slice(lo, lo + chosen[1])
            feeds = dict(zip(self.inputs["heads"], (hidden[sl],)))
            self._host(self.runners["heads"].run(chosen[0], feeds)[self.outputs["heads"][0]], out[sl])
        self.mem.synchronize()
        return out

    def empty_cache(self, batch: int = 1):
        return DeviceTensor(self.empty, self.cache.shape(batch), self.kv_itemsize, self.empty.generation)

    def select(self, cache, rows):
        dst = self.pool.tensor(self.pool.other(CACHE_KEYS, cache.buffer),
                               self.cache.shape(len(rows), cache.shape[self.cache.length_axis]), cache.itemsize)
        return gather_batch(self.mem, cache, rows, dst, self.cache.batch_axis)

    def close(self) -> None:
        self.mem.synchronize()
        self.pool.close()
        self.mem.free(self.empty.ptr)


class TrtBackend(PipelineBackend):
    name = "tensorrt"

    def __init__(self, path: str | os.PathLike, device: str = "cuda", verify: bool = True, cuda_graphs: bool = False):
        index = parse_device(device)
        self.model = open_exported(path, verify=verify)
        self.spec = self.model.spec
        self.section = trt_section(self.model)
        trt = _trt()
        gpu = cuda_memory.gpu_properties(index)
        check_compatible(self.section, trt.__version__, gpu)
        self.graphs = TrtGraphs(self.model, self.section, index, cuda_graphs)
        self.pipeline = FastPipeline(self.graphs)
        self.description = {"backend": "tensorrt", "mode": "fast", "device": f"cuda:{index}", "gpu": gpu["name"],
                            "precision": self.section["precision"], "tensorrt": trt.__version__,
                            "cuda_graphs": cuda_graphs}

    def head_outputs(self, triples: list[PreparedTriple], prefix: SharedPrefix | None = None) -> np.ndarray:
        check_inputs(triples, self.spec, self.section["limits"])
        return self.pipeline.run(triples, prefix)

    def encode_prefix(self, triples: list[PreparedTriple]) -> SharedPrefix:
        check_inputs(triples, self.spec, self.section["limits"])
        return self.pipeline.encode_prefix(triples)

    def close(self) -> None:
        self.graphs.close()
