"""What the machine computes natively: the CPU's matrix units and whether a device has bfloat16
arithmetic, which decides what ``precision="auto"`` means.

bf16 pays only where the hardware multiplies in it: on a CPU with AMX-BF16 or AVX512-BF16 a bf16
GEMM runs several times a float32 one (issue 22's measurements), while elsewhere an engine either
emulates it (converting every operand, slower than float32) or ignores the hint. So ``auto`` is
bf16 exactly where the hardware has it, and fp32 elsewhere. Thin: no torch, no engine import.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import BackendError

CPUINFO = Path("/proc/cpuinfo")
# The /proc/cpuinfo flags of the CPU's matrix and vector units, fastest kind first.
MATRIX_UNITS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")
BF16_CPU_UNITS = ("amx_bf16", "avx512_bf16")
BF16_CUDA_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bf16 tensor cores

PRECISIONS = ("fp32", "bf16", "auto")  # what a caller may ask for
PRECISION_ENV = "EDITREWARD_PRECISION"  # the default precision, where set (``default_precision``)
# A resolved precision -> the dtype it computes in (the tolerance table's key), and back.
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
DTYPE_PRECISIONS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}  # fp64: gradient checks


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags as Linux reports them; empty where there is no /proc/cpuinfo (other
    systems), which reads as "no bf16 units": fp32, the precision every CPU computes."""
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    # Every core repeats its flags, the same set on each; the first line speaks for all.
    line = next((ln for ln in text.splitlines() if ln.split(":")[0].strip() == "flags"), "")
    return frozenset(line.partition(":")[2].split())


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_matrix_units() -> dict[str, bool]:
    """Which of ``MATRIX_UNITS`` this CPU has (what the CPU benchmark records beside its numbers)."""
    flags = cpu_flags()
    return {unit: unit in flags for unit in MATRIX_UNITS}


def native_bf16(device: str, cuda_capability: tuple[int, int] | None = None) -> bool:
    """Whether ``device`` (``cpu``, ``cuda`` or ``cuda:N``) multiplies bf16 in hardware. On a GPU
    that is compute capability 8.0 or later: ``cuda_capability`` as the caller knows it, else torch's
    answer when torch is already imported (this module never imports it), else False."""
    if device == "cpu":
        return any(unit in cpu_flags() for unit in BF16_CPU_UNITS)
    if device == "cuda" or device.startswith("cuda:"):
        if cuda_capability is None and "torch" in sys.modules:
            torch = sys.modules["torch"]
            if torch.cuda.is_available():
                index = int(device[5:]) if device[5:].isdigit() else torch.cuda.current_device()
                cuda_capability = torch.cuda.get_device_capability(index)
        return cuda_capability is not None and tuple(cuda_capability) >= BF16_CUDA_CAPABILITY
    raise BackendError(f"unknown device {device!r}; use cpu, cuda or cuda:N")


def default_precision() -> str:
    """The precision asked for when none is: $EDITREWARD_PRECISION where set (a deployment pins
    fp32 for exactness checks, as the test suite does), else ``auto``."""
    value = os.environ.get(PRECISION_ENV, "").strip() or "auto"
    if value not in PRECISIONS:
        raise BackendError(f"${PRECISION_ENV}={value!r} is not a precision; use {', '.join(PRECISIONS)}")
    return value


def resolve_precision(precision: str | None, device: str, cuda_capability: tuple[int, int] | None = None) -> str:
    """``fp32``, ``bf16`` or ``auto`` (None: auto) -> the precision to run on ``device``: ``auto``
    is bf16 where ``native_bf16`` says the device computes it, fp32 elsewhere."""
    if precision is None:
        precision = default_precision()
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device, cuda_capability) else "fp32"


def dtype_of(precision: str) -> str:
    """A precision's short name (``fp32``, ``bf16``, ``fp16``) -> its dtype name, the tolerance table's key."""
    for dtype, name in DTYPE_PRECISIONS.items():
        if name == precision:
            return dtype
    raise BackendError(f"unknown precision {precision!r}; known: {', '.join(DTYPE_PRECISIONS.values())}")


def precision_of(dtype: str) -> str:
    """A dtype name (``float32``, ``bfloat16``, ``float16``) -> its precision's short name (``fp32``, ...)."""
    try:
        return DTYPE_PRECISIONS[dtype]
    except KeyError:
        raise BackendError(f"no precision computes in dtype {dtype!r}; known: {', '.join(DTYPE_PRECISIONS)}") from None
