"""Tolerances of every backend and precision against the PyTorch reference, in one table.

Keys are (backend, precision or quantization scheme). ``mu`` and ``log_sigma`` bound the
absolute difference of the fused outputs and of each head's outputs; ``agreement`` is the
minimum fraction of pairs sharing a source on which the variant prefers the same edit as the
reference (the task-level gate).

The floor on the signal-to-noise ratio of the decoder's hidden state at <|Reward|> (what the
heads read), the gate that tells quantization schemes apart, is not a table entry: it follows
from the scheme's bits, block sizes and the model's widths and depth (``hidden_snr_floor_db``).

The quantized rows' |d| bounds are empirical (the random fixtures' reward heads turn small
hidden-state errors into large mu errors, so 4-bit schemes keep a fair hidden-state SNR yet a
loose mu bound here). On the real checkpoint, run benchmarks/parity.py (README).
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


TOLERANCES = {
    ("torch-fast", "float32"): Tolerance(1e-4, 1e-4),
    # bf16 on both sides (GPU), different kernels and summation order; not yet measured on a GPU here.
    ("torch-fast", "bfloat16"): Tolerance(5e-2, 5e-2, 0.95),
    ("onnxruntime", "float32"): Tolerance(1e-4, 1e-4),
    ("onnxruntime", "float16"): Tolerance(5e-2, 5e-2, 0.9),
    ("onnxruntime", "bfloat16"): Tolerance(1e-1, 1e-1, 0.9),
    # TensorRT engines (fp32 built with TF32 off) against the reference; not yet measured on a GPU
    # with TensorRT: benchmarks/gpu_trt_check.py reports the real margins.
    ("tensorrt", "float32"): Tolerance(1e-3, 1e-3),
    ("tensorrt", "float16"): Tolerance(5e-2, 5e-2, 0.9),
    ("tensorrt", "bfloat16"): Tolerance(1e-1, 1e-1, 0.9),
    # Quantized schemes: |d| bounds are the worst per-head drift measured on the tiny and small
    # random-weight fixtures (benchmarks/cpu_suite.sh) times about 1.5. ort-int8's default (U8S8
    # with 7-bit weights) sums exactly on every x86-64 CPU (tested), so its numbers do not depend on
    # the CPU; full-range U8S8 without VNNI gave 22 dB of hidden-state SNR instead of 33 on tiny.
    ("onnxruntime", "ort-int8"): Tolerance(0.25, 0.25, 0.8),
    ("onnxruntime", "ort-int4"): Tolerance(0.75, 0.75, 0.7),
    ("torch", "bnb-int8"): Tolerance(0.15, 0.15, 0.8),
    ("torch", "bnb-nf4"): Tolerance(0.75, 0.75, 0.7),
    # GPTQ through GPTQModel, run by its torch kernel: measured 17.9-19.3 dB, |d mu| <= 0.25 on tiny
    # (8-64 synthetic calibration triples; group size 32 or 128, desc_act, asymmetric) and 17.1 dB,
    # |d mu| <= 0.27 on small.
    ("torch", "gptq-int4"): Tolerance(0.5, 0.5, 0.7),
    # TensorRT Q/DQ graphs (editreward_quant.trt_schemes) emulated by ONNX Runtime's CPU kernels, measured
    # on tiny with ONNX Runtime 1.24 (ModelOpt's) and 1.32: int8-sq 29-36 dB, |d mu| <= 0.07; fp8 (3 mantissa
    # bits, per-tensor scales) 24-25 dB, |d mu| <= 0.20; int4-awq 18-20 dB, |d mu| <= 0.30. ONNX Runtime 1.24
    # quantizes fp16 inputs less exactly than 1.32 (6 dB less on one Q/DQ pair), hence the int8 spread.
    ("onnxruntime", "trt-int8-sq"): Tolerance(0.15, 0.15, 0.8),
    ("onnxruntime", "trt-fp8"): Tolerance(0.4, 0.4, 0.7),
    ("onnxruntime", "trt-int4-awq"): Tolerance(0.5, 0.5, 0.7),
    # The same graphs built by TensorRT: not measured yet (no GPU here). TensorRT runs the same Q/DQ
    # arithmetic with int32/fp32 GEMM accumulation, so the emulated bounds are the starting point;
    # re-measure them on a GPU with benchmarks/parity.py.
    ("tensorrt", "trt-int8-sq"): Tolerance(0.15, 0.15, 0.8),
    ("tensorrt", "trt-fp8"): Tolerance(0.4, 0.4, 0.7),
    ("tensorrt", "trt-int4-awq"): Tolerance(0.5, 0.5, 0.7),
}


def tolerance(backend: str, precision: str) -> Tolerance:
    try:
        return TOLERANCES[(backend, precision)]
    except KeyError as exc:
        raise KeyError(f"no tolerance stated for {backend}/{precision}: add it to editreward_rt.tolerances.TOLERANCES") from exc


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

MARGIN_DB = 3.0  # below the model's prediction; the model itself is conservative (measurements lie above it, README)
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


def quantization_noise(quantization: dict, spec) -> dict[str, float]:
    """A scheme's relative noise power per quantized matmul (weights, activations) and of the token
    embedding, for a model of ``spec``'s widths. ``quantization``: a manifest's entry."""
    name, config = quantization["scheme"], quantization.get("config", {})
    t = spec.text
    k = max(t.hidden_size, t.intermediate_size)  # fan-in of the widest matmuls: the largest absmax
    per_channel = absmax_noise(127, k)
    weights = activations = 0.0
    if name == "ort-int8" and config.get("mode", "dynamic") == "weight_only":
        weights = absmax_noise(127, min(config.get("block_size", 128), k))
    elif name == "ort-int8":  # per-tensor asymmetric uint8 activations over 255 steps; reduce_range: weights in [-64, 64]
        weights = absmax_noise(64, k) if config.get("reduce_range") else per_channel
        activations = (2 * HEAVY_TAILS * math.sqrt(2 * math.log(TOKENS * k)) / 255) ** 2 / 12
    elif name in ("ort-int4", "gptq-int4", "trt-int4-awq"):  # GPTQ's error is at most round-to-nearest's
        weights = absmax_noise(7, min(config.get("block_size", config.get("group_size", 128)), k))
    elif name == "bnb-int8":  # LLM.int8: per-row weights and per-token activations, outliers kept in fp16
        weights = activations = per_channel
    elif name == "bnb-nf4":  # 16 NF4 levels over each block's absmax: no worse than a 15-level uniform grid
        weights = absmax_noise(7, config.get("block_size", 64))
    elif name == "trt-int8-sq":  # per-channel weights, per-tensor symmetric int8 activations
        weights, activations = per_channel, HEAVY_TAILS**2 * absmax_noise(127, TOKENS * k)
    elif name == "trt-fp8":
        weights = activations = FP8_E4M3_NOISE
    else:
        raise KeyError(f"no noise model for scheme {name!r}: add it to editreward_rt.tolerances.quantization_noise")
    bits = config.get("embedding_bits", 0)
    block = config.get("block_size", 32) if name.startswith("ort-") else 32  # torch schemes: EMBEDDING_BLOCK
    embedding = {0: 0.0, 8: absmax_noise(127, t.hidden_size), 4: absmax_noise(7, block)}[bits]
    return {"weights": weights, "activations": activations, "embedding": embedding}


# ONNX Runtime 1.24 (ModelOpt's) rounds fp16 Q/DQ inputs less exactly than 1.32: 6 dB lower SNR
# measured on one Q/DQ pair. The trt-* graphs are checked on that ONNX Runtime.
EMULATION_DB = {"trt-int8-sq": 6.0}


def hidden_snr_floor_db(quantization: dict, spec, margin_db: float = MARGIN_DB) -> float:
    """Floor on the hidden-state SNR at <|Reward|> of a quantized model. Each decoder layer adds
    one matmul's relative noise to the residual stream (its two branches' outputs are each about
    as large as the stream and their errors partly cancel); embedding noise enters the stream
    before the first layer and is re-amplified by every layer's input, counted twice. So
    noise = L (weights + activations) + 2 embedding, and the floor is its SNR less ``margin_db``."""
    noise = quantization_noise(quantization, spec)
    total = spec.text.num_layers * (noise["weights"] + noise["activations"]) + 2 * noise["embedding"]
    return -10 * math.log10(total) - margin_db - EMULATION_DB.get(quantization["scheme"], 0.0)