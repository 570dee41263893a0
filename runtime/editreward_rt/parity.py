"""Tolerances of every backend and precision against the PyTorch reference, in one table.

Keys are (backend, precision). ``mu`` and ``log_sigma`` bound the absolute difference of the
fused outputs and of each head's outputs; ``agreement`` is the minimum fraction of pairs
sharing a source on which the variant prefers the same edit as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    mu: float
    log_sigma: float
    agreement: float = 1.0


TOLERANCES = {
    ("torch-fast", "float32"): Tolerance(1e-4, 1e-4),
    ("onnxruntime", "float32"): Tolerance(1e-4, 1e-4),
    ("onnxruntime", "float16"): Tolerance(5e-2, 5e-2, 0.9),
    ("onnxruntime", "bfloat16"): Tolerance(1e-1, 1e-1, 0.9),
}


def tolerance(backend: str, precision: str) -> Tolerance:
    try:
        return TOLERANCES[(backend, precision)]
    except KeyError as exc:
        raise KeyError(f"no tolerance stated for {backend}/{precision}: add it to editreward_rt.parity.TOLERANCES") from exc


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-head outputs [T, K, 2] of two runs -> the largest |difference| of mu and log_sigma."""
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return {"mu": float(d[..., 0].max()), "log_sigma": float(d[..., 1].max())}


def within(diff: dict, tol: Tolerance) -> bool:
    return diff["mu"] <= tol.mu and diff["log_sigma"] <= tol.log_sigma
