"""The backend registry: one entry per backend, read by the Scorer, the CLI and serve choices,
the benchmarks and the parity test. Adding a backend is one module with a ``load`` function
plus one line in ``BACKENDS``.

A backend module's ``load(path_or_id, *, mode, <its options>)`` returns ``(backend, model)``:
the backend has ``head_outputs(prepared_triples) -> [T, K, 2]`` and ``description`` (with a
normalised ``device``: ``cpu`` or ``cuda:N``, where it really runs); the model has ``spec``,
``tokenizer``, ``chat_text``, ``templates``. The entry lists the options its ``load`` takes:
an option another backend takes is refused naming those backends, never silently dropped.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from ..errors import BackendError
from ..tolerances import Tolerance


@dataclass(frozen=True)
class BackendEntry:
    name: str
    modes: tuple[str, ...]  # "fast" (the shared fast path), "reference" (upstream's two full passes)
    extra: str  # the pip extra that brings its library
    module: str  # the module holding ``load``, imported only when this backend is asked for
    reads: tuple[str, ...]  # what it loads: "checkpoint" (hub id or folder) and/or "exported" (a model folder)
    devices: tuple[str, ...]  # where it runs: "cpu" and/or "cuda"
    options: tuple[str, ...]  # the keyword options its ``load`` takes besides ``mode``
    # Its fast path's bound against the float32 reference in each float precision it computes in
    # (quantization schemes state their own rows); ``editreward_rt.tolerances`` reads them all.
    tolerances: dict[str, Tolerance]

    @property
    def tolerance_key(self) -> str:
        """Its fast path's key in the tolerance table: a backend that also runs the reference is
        keyed ``NAME-fast``, the fast path being what is held to the tolerance."""
        return f"{self.name}-fast" if "reference" in self.modes else self.name

    def load(self, path_or_id, *, mode: str = "fast", **options):
        """``options`` whose value is None are not given (the backend's own default applies)."""
        if mode not in MODES:
            raise BackendError(f"unknown mode {mode!r}; use {' or '.join(MODES)}")
        if mode not in self.modes:
            others = [e.name for e in BACKENDS.values() if mode in e.modes]
            raise BackendError(f"the {self.name} backend runs mode {' or '.join(self.modes)} only; "
                               f"mode {mode!r} is run by {', '.join(others) or 'no backend'}")
        given = {k: v for k, v in options.items() if v is not None}
        for key in given:
            if key not in self.options:
                raise BackendError(_refused(self, key))
        return importlib.import_module(self.module).load(path_or_id, mode=mode, **given)


def _refused(entry: BackendEntry, key: str) -> str:
    takers = [e.name for e in BACKENDS.values() if key in e.options]
    where = (f"it is an option of the {', '.join(takers)} backend" if takers
             else f"no backend takes it (backends take {', '.join(option_names())})")
    return (f"the {entry.name} backend does not take option {key!r}: {where}; "
            f"{entry.name} takes {', '.join(entry.options)}")


BACKENDS = {e.name: e for e in (
    # bf16: bf16 on both sides (GPU), different kernels and summation order; not yet measured on a GPU here.
    BackendEntry("torch", ("fast", "reference"), "torch", "editreward_rt.backends.torch_backend",
                 ("checkpoint", "exported"), ("cpu", "cuda"),
                 ("device", "threads", "dtype", "precision", "memory", "compile", "base", "prompts_from"),
                 {"float32": Tolerance(1e-4, 1e-4), "bfloat16": Tolerance(5e-2, 5e-2, 0.95)}),
    BackendEntry("onnxruntime", ("fast",), "onnx", "editreward_rt.backends.ort_backend", ("exported",), ("cpu", "cuda"),
                 ("device", "threads", "precision", "optimization", "io_binding"),
                 {"float32": Tolerance(1e-4, 1e-4), "float16": Tolerance(5e-2, 5e-2, 0.9),
                  "bfloat16": Tolerance(1e-1, 1e-1, 0.9)}),
    # TensorRT engines (fp32 built with TF32 off) against the reference; not yet measured on a GPU
    # with TensorRT: benchmarks/gpu_trt_check.py reports the real margins.
    BackendEntry("tensorrt", ("fast",), "trt", "editreward_rt.backends.trt_backend", ("exported",), ("cuda",),
                 ("device", "cuda_graphs"),
                 {"float32": Tolerance(1e-3, 1e-3), "float16": Tolerance(5e-2, 5e-2, 0.9),
                  "bfloat16": Tolerance(1e-1, 1e-1, 0.9)}),
    # bf16, derived: the hidden state at <|Reward|> carries at most the relative error e of
    # tolerances.bf16_snr_floor_db's model before its margin (bf16's 8 bits, 16 roundings in each
    # block of both towers): e = 1.4e-2 on the 36M fixture's 10 blocks, 0.9e-2 on tiny's 4. The heads
    # are linear to first order, so a unit-sized reward moves by about e; 3 e = 4.3e-2 lies within 5e-2
    # (tested on the fixture's spec). A CPU without bf16 units ignores the hint (fp32) or emulates it
    # (the same roundings): within it too. The 7B's 60 blocks make e 2.4x; parity.py gates the checkpoint.
    BackendEntry("openvino", ("fast",), "openvino", "editreward_rt.backends.ov_backend", ("exported",), ("cpu",),
                 ("device", "threads", "precision", "cache_dir", "call_tokens"),
                 {"float32": Tolerance(1e-4, 1e-4), "bfloat16": Tolerance(5e-2, 5e-2, 0.95)}),
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


def option_names() -> list[str]:
    """Every option some backend takes, sorted."""
    return sorted({o for e in BACKENDS.values() for o in e.options})


# The engines a float ONNX folder may run on with no backend named, on a CPU, fastest first, by
# precision (the rule ``cpu_engine`` applies; docs/performance.md has the measurements behind it).
CPU_ENGINES = {"bf16": ("openvino", "onnxruntime"), "fp32": ("openvino", "onnxruntime")}


def cpu_engine(precision: str | None = None) -> str:
    """The backend a float ONNX folder loads on, on a CPU, with no backend named: the first of
    ``CPU_ENGINES`` for the precision ``precision`` resolves to here whose library is installed.
    OpenVINO reads the same graphs and computes bf16 on the CPU's bf16 units (ONNX Runtime has no
    bf16 CPU kernels): 1.8x ONNX Runtime's float32 on an AVX512-BF16 EPYC, 3.5x on an AMX Xeon; in
    float32 it was 1.03x and 1.28x, so it leads in both (docs/cpu.md)."""
    from ..hardware import resolve_precision

    for name in CPU_ENGINES[resolve_precision(precision, "cpu")]:
        if importlib.util.find_spec(name) is not None:  # these engines' libraries import by their backend's name
            return name
    return DEFAULT_EXPORTED


def default_max_batch(device: str) -> int:
    """Triples per fast-path call where ``device`` (a backend description's) runs: 8 on a GPU, 1
    on a CPU. On a CPU one triple's matmuls already have hundreds of rows (each rubric suffix is
    hundreds of tokens), so its kernels run near their peak alone; a batch only adds padding
    (images and rubrics differ in length) and cache copies: 8 per call was 11% slower than 1 on
    the small fixture (``benchmarks/cpu_speed.py``), and a 7B triple takes about 1.2 GB of
    activations. Edits of one source still share its encoding: ``Scorer.score_prepared`` gives
    them one prefix across calls."""
    return 1 if device == "cpu" else 8
