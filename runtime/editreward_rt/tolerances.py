"""Tolerances of every backend and precision against the PyTorch reference, in one table.

Keys are (backend, precision). Each row is stated where its variant is registered, a backend's
float rows on its registry entry (``BackendEntry.tolerances``) and a quantization scheme's rows on
its config (``Scheme.tolerances``, by backend), and ``TOLERANCES`` and ``tolerance`` read them all. ``mu`` and ``log_sigma``
bound the absolute difference of the fused outputs and of each head's outputs; ``agreement`` is the
minimum fraction of pairs sharing a source on which the variant prefers the same edit as the
reference (the task-level gate).

The floor on the signal-to-noise ratio of the decoder's hidden state at <|Reward|> (what the
heads read), the gate that tells quantization schemes apart, is not a table entry: it follows
from the scheme's noise model (its bits and block sizes) and the model's widths and depth
(``hidden_snr_floor_db``).

The quantized rows' |d| bounds are empirical (the random fixtures' reward heads turn small
hidden-state errors into large mu errors, so 4-bit schemes keep a fair hidden-state SNR yet a
loose mu bound). On the real checkpoint, run benchmarks/parity.py (docs/fidelity.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    mu: float
    log_sigma: float
    agreement: float = 1.0


def table() -> dict[tuple[str, str], Tolerance]:
    """Every row: (backend's tolerance key, float precision) from the backend registry and
    (backend, scheme) from the quantization schemes."""
    from .backends import BACKENDS  # both registries build their rows from this module's Tolerance
    from .schemes import SCHEMES

    rows = {(e.tolerance_key, p): t for e in BACKENDS.values() for p, t in e.tolerances.items()}
    rows.update({(b, name): t for name, scheme in SCHEMES.items() for b, t in scheme.tolerances.items()})
    return rows


def __getattr__(name: str):
    if name == "TOLERANCES":  # built on first use: the registries import this module
        return table()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tolerance(backend: str, precision: str) -> Tolerance:
    """The row of ``backend`` (a backend's tolerance key) in ``precision``, a dtype or a scheme's name."""
    from .schemes import SCHEMES

    row = table().get((backend, precision))
    if row is None:
        where = f"the tolerances of scheme {precision}" if precision in SCHEMES else "the backend's registry entry"
        raise KeyError(f"no tolerance stated for {backend}/{precision}: add it to {where}")
    return row


# Two runs in one precision that differ only in batch shape (batched against one by one). Kernels
# choose their blocking, and so their summation order, by shape: AMX and cuBLAS do in bf16, where
# |d mu| 0.0045 was measured between batched and lone scores on an AMX Xeon. Each run lies within
# its precision's tolerance of the float32 reference, so nothing tighter than that tolerance holds
# on every CPU and GPU. float32 kernels reorder too, but a reordering moves a float32 sum by a few
# ulps (2^-24 each) of its operands, far below 1e-5 on unit-sized rewards.
BATCH_SHAPE_FLOAT32 = 1e-5


def batch_shape_tolerance(backend: str, precision: str) -> float:
    """The |d mu| and |d log_sigma| bound between two runs of ``backend`` in ``precision`` that differ
    only in batch shape (see ``BATCH_SHAPE_FLOAT32``)."""
    if precision == "float32":
        return BATCH_SHAPE_FLOAT32
    tol = tolerance(backend, precision)
    return max(tol.mu, tol.log_sigma)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-head outputs [T, K, 2] of two runs -> the largest |difference| of mu and log_sigma."""
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return {"mu": float(d[..., 0].max()), "log_sigma": float(d[..., 1].max())}


def snr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """10 log10(signal variance / mean squared error); infinite when identical."""
    reference, actual = np.asarray(reference, np.float64), np.asarray(actual, np.float64)
    mse = np.mean((actual - reference) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(reference.var() / mse))


def within(diff: dict, tol: Tolerance) -> bool:
    return diff["mu"] <= tol.mu and diff["log_sigma"] <= tol.log_sigma


# ---------------------------------------------------------------- hidden-state SNR floors from first principles

MARGIN_DB = 3.0  # below the model's prediction; the model itself is conservative (measurements lie above it, docs/quantization.md)
TOKENS = 1024  # tokens in a decoder call, for per-tensor activation ranges (enters through a logarithm)
# A whole activation tensor's range against a Gaussian's absmax: SwiGLU products and attention
# outputs are heavier-tailed than Gaussian, so the range is taken as twice the Gaussian one.
HEAVY_TAILS = 2.0


def absmax_noise(levels: float, group: int) -> float:
    """Relative noise power (noise variance / signal variance) of rounding Gaussian values to a
    grid of ``levels`` steps per side scaled to the absolute maximum of each ``group`` values:
    E[max|x|^2] ~ 2 ln(group) sigma^2, and uniform rounding error has variance step^2 / 12."""
    return 2 * math.log(max(group, 2)) / (12 * levels**2)


FP8_E4M3_NOISE = 2.0**-8 / 3  # 3 mantissa bits: relative rounding error uniform within +-2^-4


def hidden_snr_floor_db(quantization: dict, spec, margin_db: float = MARGIN_DB) -> float:
    """Floor on the hidden-state SNR at <|Reward|> of a quantized model. Each decoder layer adds
    one matmul's relative noise to the residual stream (its two branches' outputs are each about
    as large as the stream and their errors partly cancel); embedding noise enters the stream
    before the first layer and is re-amplified by every layer's input, counted twice. So
    noise = L (weights + activations) + 2 embedding, the scheme's noise model giving each
    (``Scheme.noise``), and the floor is its SNR less ``margin_db`` and the scheme's ``emulation_db``.
    ``quantization``: a manifest's entry."""
    from .schemes import scheme_from_dict  # schemes builds its noise models from this module's primitives

    scheme = scheme_from_dict(quantization)
    noise = scheme.noise(spec)
    total = spec.text.num_layers * (noise["weights"] + noise["activations"]) + 2 * noise["embedding"]
    return -10 * math.log10(total) - margin_db - scheme.emulation_db

# ---------------------------------------------------------------- bfloat16 against float32, from first principles

# bfloat16 keeps 8 significant bits: rounding to it is a relative error uniform within +-2^-9,
# a noise power of (2^-8)^2 / 12 of the value's.
BF16_NOISE = 2.0**-16 / 12
# Tensors of the stream's size rounded to bf16 in one transformer block (decoder or vision) of a
# bf16 run: the 7 weight matrices, the 4 matmul inputs (two norm outputs, the attention output,
# the gated product), the 2 residual sums, the attention scores and probabilities and the norm's
# scale. Measured on the random fixtures (torch, tiny and small): 11 and 13 such roundings'
# worth of noise per block, so 16 bounds it before the margin.
BF16_ROUNDINGS_PER_BLOCK = 16


def bf16_snr_floor_db(spec, margin_db: float = MARGIN_DB) -> float:
    """Floor on the hidden-state SNR at <|Reward|> of a bf16 run against the float32 reference.
    The vision tower runs in bf16 too (unlike the quantized schemes, which keep it), so every
    block of both towers adds ``BF16_ROUNDINGS_PER_BLOCK`` roundings of relative noise
    ``BF16_NOISE`` to what the heads read. It holds where an engine computes fp32 instead (a CPU
    without bf16 units, where a bf16 hint may be ignored): less noise, a higher SNR."""
    blocks = spec.text.num_layers + spec.vision.depth
    return -10 * math.log10(blocks * BF16_ROUNDINGS_PER_BLOCK * BF16_NOISE) - margin_db
