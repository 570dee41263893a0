"""One variant per process: a time cap, a result that survives the process, and the GPU memory
the device reports while it runs.

A variant runs in a spawned process so that its peak memory is its own and an out-of-memory
kill, a crash in a native library or a hang costs that variant only. The child writes its result
to a file; the parent reads it, or records why there is none (exit code, time cap). The parent
samples the device's used memory through the driver (NVML, else ``nvidia-smi``) while the child
runs, so every allocator counts: PyTorch's, ONNX Runtime's arena, TensorRT's, the CUDA context.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

SAMPLE_S = 0.1  # how often the device's memory is read while a child runs


def _nvml_reader():
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20


def _smi_reader():
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"]

    def read():
        try:
            return float(subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout.split()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):  # a driver that does not answer
            return None

    return read if read() is not None else None


def device_memory_reader():
    """A function returning MiB used on GPU 0 (device-wide, as the driver counts; None for a missed
    reading), or None where there is no GPU driver to ask."""
    try:
        return _nvml_reader()
    except Exception:  # pynvml missing, or no NVIDIA driver behind it
        return _smi_reader()


class PeakSampler:
    """The most device memory used above what was used when sampling started, in MiB."""

    def __init__(self, reader, interval_s: float = SAMPLE_S):
        self.reader, self.interval_s = reader, interval_s
        self.baseline = self.peak = reader()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        value = self.reader()  # None: one reading missed (the driver busy); the peak stands
        if value is not None:
            self.peak = value if self.peak is None else max(self.peak, value)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self._read()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self._read()
        peak = None if self.baseline is None else self.peak - self.baseline  # no baseline: nothing to measure against
        return {"peak_mb": peak, "baseline_mb": self.baseline, "source": "driver (device-wide used memory)"}


def _child(target, args, result_path: str) -> None:
    try:
        result = target(*args)
    except Exception as exc:  # any failure of the variant is its result; the parent decides what it means
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=-6)}
    with open(result_path + ".tmp", "wb") as fh:
        pickle.dump(result, fh)
    os.replace(result_path + ".tmp", result_path)


def _why_no_result(exitcode: int) -> str:
    if exitcode < 0:
        killed = " (killed: out of host memory?)" if exitcode == -9 else ""
        return f"the variant's process died on signal {-exitcode}{killed} before writing a result"
    return f"the variant's process exited with code {exitcode} before writing a result"


def run_isolated(target, args: tuple, timeout_s: float | None, reader=None) -> dict:
    """``target(*args)`` (a picklable, module-level function returning a picklable dict) in a
    spawned process, killed after ``timeout_s``. The dict gets ``process_s`` (its wall time) and, with a ``reader``,
    ``device_memory``; a process that ends without a result gives ``status: failed`` and why."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="editreward-variant-") as tmp:
        path = str(Path(tmp) / "result.pkl")
        sampler = PeakSampler(reader) if reader else None
        t0 = time.perf_counter()
        proc = ctx.Process(target=_child, args=(target, args, path))
        proc.start()
        proc.join(timeout_s)
        timed_out = proc.is_alive()
        if timed_out:
            proc.kill()
            proc.join()
        seconds = time.perf_counter() - t0
        memory = sampler.stop() if sampler else None
        if os.path.exists(path):
            with open(path, "rb") as fh:
                result = pickle.load(fh)
        elif timed_out:
            result = {"status": "failed", "error": f"timed out after {timeout_s:.0f} s (its time cap)"}
        else:
            result = {"status": "failed", "error": _why_no_result(proc.exitcode)}
    result["process_s"] = seconds
    if memory is not None:
        result["device_memory"] = memory
    return result


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
