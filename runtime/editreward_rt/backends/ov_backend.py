"""OpenVINO backend: the fast path on an exported model folder, on the CPU, in fp32 or bf16.

OpenVINO reads the exported ONNX graphs as they are, and graphs stored as OpenVINO IR (a graph
file ``NAME.xml`` whose weights are ``NAME.bin``, hashed in the manifest like every file: what the
``ov-*`` quantization schemes write). Its CPU plugin computes in the precision it is hinted:
bf16 runs on AMX-BF16 or AVX512-BF16 units, which is where ``precision="auto"`` picks it
(``hardware.resolve_precision``). The host-array path, like ONNX Runtime's on a CPU: caches and
hidden states are numpy arrays, which is where a CPU engine's arrays live anyway.

Compiled models are cached outside the model folder (a folder holds only hashed files), keyed
by the manifest's hash and the precision, so an altered folder never reuses a stale blob.

``call_tokens`` bounds the tokens of one decoder call (``pipeline.level_cuts``; 0, the default:
each level in one call). The CPU plugin's activation memory grows with a call's tokens in every
layer (about 60-100 KB per token per layer at the 7B's widths) and stays allocated: at 256 tokens
a call the 7B's ``ov-int8`` peak fell from 11.3 to 10.35 GB; two timing pairs put its cost at 0%
and 6-17% (docs/full-size.md), so levels are whole unless asked.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..errors import BackendError
from ..extras import require
from ..families import family_for
from ..hardware import resolve_precision
from ..manifest import MANIFEST, open_exported, sha256_file
from ..pipeline import FastPipeline, PipelineBackend, check_graph_io, graph_keep, host_table
from . import BACKENDS

log = logging.getLogger(__name__)

# Our precision -> OpenVINO's INFERENCE_PRECISION_HINT, and OpenVINO's element type names back to ours.
HINTS = {"fp32": "f32", "bf16": "bf16"}
RAN = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "i64": "int64", "i32": "int32"}  # the manifest's names
CACHE_OFF = ("", "off")
CALL_TOKENS = 0  # tokens per decoder call; 0: whole levels (see the module docstring)


def _ov():
    return require("openvino", BACKENDS["openvino"].extra, "the openvino backend")


def load(path_or_id, *, mode: str = "fast", device: str = "cpu", threads=None, precision: str | None = None,
         cache_dir=None, call_tokens: int | None = None):
    """Registry entry: an exported model folder (ONNX graphs, or OpenVINO IR from an ``ov-*``
    scheme). ``precision``: fp32, bf16, or auto (bf16 where the CPU computes it natively; None:
    the default precision, ``hardware.default_precision``).
    ``cache_dir``: the root of the compiled-model cache (default ``$XDG_CACHE_HOME/editreward/openvino``,
    ``""`` or ``"off"``: no cache). ``call_tokens``: the most tokens a decoder call takes (0, the
    default: whole levels)."""
    backend = OvBackend(path_or_id, device=device, threads=threads, precision=precision, cache_dir=cache_dir,
                        call_tokens=call_tokens)
    return backend, backend.model


def default_cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores a relative value
    return base / "editreward" / "openvino"


def cache_folder(root: Path, precision: str, cache_dir) -> Path | None:
    """Where the compiled models of the folder ``root`` in ``precision`` are cached: ``<cache root>/
    <first 16 hex of sha256(manifest.json)>/<precision>``, or None when ``cache_dir`` turns it off.
    The manifest hashes every file, so its hash names exactly these graphs."""
    if cache_dir is not None and str(cache_dir) in CACHE_OFF:
        return None
    key = sha256_file(root / MANIFEST)[:16]
    try:
        folder = (Path(cache_dir) if cache_dir is not None else default_cache_root()) / key / precision
        if folder.resolve().is_relative_to(root.resolve()):
            raise BackendError(f"cache_dir {cache_dir} is inside the model folder {root}; a model folder holds only "
                               "the files its manifest hashes: cache elsewhere")
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError) as exc:  # no home (an arbitrary-UID container), a read-only one
        if cache_dir is not None:
            raise BackendError(f"cache_dir {cache_dir} cannot hold the compiled-model cache: {exc}") from None
        log.warning("no compiled-model cache for %s (%s): each load compiles the graphs", root, exc)
        return None
    return folder


def _port(port) -> tuple:
    """A compiled model's input or output -> (its tensor names, element type as the manifest names it,
    dims: None where dynamic; None for a dynamic rank)."""
    kind = port.get_element_type().get_type_name()
    shape = port.get_partial_shape()
    dims = None if shape.rank.is_dynamic else [None if d.is_dynamic else d.get_length() for d in shape]
    return set(port.get_names()), DTYPES.get(kind, kind), dims


class OvGraphs:
    """``pipeline.GraphRunner`` over three OpenVINO compiled models, host arrays in and out."""

    call_tokens: int | None = None  # set by OvBackend

    def __init__(self, model, threads: int | None, precision: str, cache: Path | None):
        ov = _ov()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": HINTS[precision]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache is not None:  # made by ``cache_folder``
            config["CACHE_DIR"] = str(cache)
        # One Core per backend: the configuration goes to each compile_model, so backends of other
        # precisions or thread counts in one process do not share settings.
        core = ov.Core()
        self.spec = model.spec
        self.kv_dtype = np.dtype(model.manifest.get("kv_dtype", "float32"))
        self.cache = family_for(model.spec).cache_layout(str(self.kv_dtype))
        self.compiled = {}
        for name in ("vision", "decoder", "heads"):
            path = model.graph_path(name)
            # The reward heads stay float32 in every precision, as upstream keeps them (a few
            # thousand FLOPs a triple); bf16 would round each reward to 8 significant bits.
            hint = {"INFERENCE_PRECISION_HINT": HINTS["fp32"]} if name == "heads" else {}
            try:  # from the path: with a cache hit OpenVINO skips reading and compiling the graph
                self.compiled[name] = core.compile_model(str(path), "CPU", {**config, **hint})
            except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
                raise BackendError(f"OpenVINO cannot load {path}: {exc}") from exc
        check_graph_io(model, {name: ([_port(p) for p in graph.inputs], [_port(p) for p in graph.outputs])
                               for name, graph in self.compiled.items()})
        self.requests = {name: graph.create_infer_request() for name, graph in self.compiled.items()}
        # The hint is a request OpenVINO may decline (it runs f32 where the CPU can neither compute nor
        # emulate bf16): the compiled decoder says what runs.
        ran = self.compiled["decoder"].get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.precision = RAN.get(ran, ran)
        self.threads = self.compiled["decoder"].get_property("INFERENCE_NUM_THREADS")  # what ran: all cores unless told

    def _run(self, name: str, arrays) -> list[np.ndarray]:
        """Arrays in the graph's input order -> its outputs (copies: a cache outlives the next run)."""
        result = self.requests[name].infer(list(arrays))
        return [result[port] for port in self.compiled[name].outputs]

    def vision(self, feeds):
        # One run per image: the exported graph's full-attention blocks attend over its one image.
        outs = [self._run("vision", [a.astype(np.float32, copy=False) if a.dtype.kind == "f" else a for a in arrays])[0]
                for arrays in feeds]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def table(self, parts, index):
        return host_table(parts, index)

    def decode(self, input_ids, image_embeds, image_index, position_ids, attention_mask, past, keep):
        # The graph's last layer computes only the rows kept: its hidden output is those rows.
        arrays = (input_ids, image_embeds, image_index, position_ids, attention_mask, graph_keep(keep), past)
        hidden, present = self._run("decoder", arrays)
        return (None if keep is None else hidden), present

    def heads(self, hidden):
        return self._run("heads", (np.ascontiguousarray(hidden, dtype=np.float32),))[0]

    def empty_cache(self, batch: int = 1):
        return np.zeros(self.cache.shape(batch), dtype=self.kv_dtype)

    def select(self, cache, rows):
        return np.take(cache, np.asarray(rows, dtype=np.int64), axis=self.cache.batch_axis)


class OvBackend(PipelineBackend):
    name = "openvino"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 precision: str | None = None, cache_dir=None, verify: bool = True, call_tokens: int | None = None):
        if device != "cpu":
            raise BackendError(f"the openvino backend runs on the cpu only, not {device!r}")
        call_tokens = CALL_TOKENS if call_tokens is None else call_tokens
        if isinstance(call_tokens, bool) or not isinstance(call_tokens, int) or call_tokens < 0:
            raise BackendError(f"call_tokens must be a whole number of tokens (0: whole levels), not {call_tokens!r}")
        resolved = resolve_precision(precision, device)
        self.model = open_exported(path, verify=verify)
        self.spec = self.model.spec
        self.cache_dir = cache_folder(self.model.root, resolved, cache_dir)
        self.graphs = OvGraphs(self.model, threads, resolved, self.cache_dir)
        self.graphs.call_tokens = call_tokens or None
        self.pipeline = FastPipeline(self.graphs)
        self.description = {"backend": "openvino", "mode": "fast", "device": "cpu", "precision": self.graphs.precision,
                            "threads": self.graphs.threads, "call_tokens": call_tokens, "openvino": _ov().get_version(),
                            "quantization": (self.model.manifest.get("quantization") or {}).get("scheme")}
