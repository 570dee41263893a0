"""What a GPU script checks before it builds anything: the libraries each variant imports, the
GPU, and whether the chosen model fits the device memory, host memory and disk.

A variant whose prerequisite is missing is skipped, with the reason, before the first model is
built; every other failure happens while running and is reported as ``failed``.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30


@dataclass(frozen=True)
class Machine:
    """The facts the prerequisites are checked against."""

    device: str  # "cpu" or "cuda"
    gpu: str | None  # name of GPU 0, None without one
    gpu_total_gib: float | None
    ram_available_gib: float
    disk_free_gib: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def available_ram_gib() -> float:
    """MemAvailable (what can be allocated without swapping), from /proc/meminfo."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GiB
    raise OSError("/proc/meminfo has no MemAvailable")


def _gpu() -> tuple[str | None, float | None]:
    if importlib.util.find_spec("torch") is None:
        return None, None
    import torch

    if not torch.cuda.is_available():
        return None, None
    props = torch.cuda.get_device_properties(0)  # no allocation: the children get the whole device
    return props.name, props.total_memory / GiB


def machine(device: str, workdir: Path) -> Machine:
    workdir.mkdir(parents=True, exist_ok=True)
    name, total = _gpu() if device.startswith("cuda") else (None, None)
    return Machine("cuda" if device.startswith("cuda") else "cpu", name, total, available_ram_gib(),
                   shutil.disk_usage(workdir).free / GiB)


def missing_library(libraries) -> str | None:
    """``"NAME not installed"`` for the first library that cannot be imported, else None (nothing is imported)."""
    for name in libraries:
        if importlib.util.find_spec(name) is None:
            return f"{name} not installed"
    return None


def skip_reason(m: Machine, libraries=(), devices=("cpu", "cuda"), device_gib: float = 0.0, ram_gib: float = 0.0,
                disk_gib: float = 0.0) -> str | None:
    """Why a variant cannot run on ``m``, or None. ``device_gib``: memory it needs where it computes
    (the GPU, or host memory on a CPU run); ``ram_gib`` and ``disk_gib``: host memory and disk besides."""
    missing = missing_library(libraries)
    if missing:
        return missing
    if m.device not in devices:
        return f"runs on {' or '.join(devices)} only, this run is on {m.device}"
    if m.device == "cuda" and m.gpu is None:
        return "no CUDA GPU visible to PyTorch"
    if m.device == "cuda" and device_gib > m.gpu_total_gib:
        return f"needs ~{device_gib:.0f} GiB of GPU memory, {m.gpu} has {m.gpu_total_gib:.0f} GiB"
    host = ram_gib + (device_gib if m.device == "cpu" else 0.0)
    if host > m.ram_available_gib:
        return f"needs ~{host:.0f} GiB of host memory, {m.ram_available_gib:.0f} GiB available"
    if disk_gib > m.disk_free_gib:
        return f"needs ~{disk_gib:.0f} GiB of disk, {m.disk_free_gib:.0f} GiB free"
    return None
