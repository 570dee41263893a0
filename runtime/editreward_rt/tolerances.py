"""Tolerances of every backend and precision against the PyTorch reference, in one table.

Keys are (backend, precision or quantization scheme). ``mu`` and ``log_sigma`` bound the
absolute difference of the fused outputs and of each head's outputs; ``agreement`` is the
minimum fraction of pairs sharing a source on which the variant prefers the same edit as the
reference; ``hidden_snr_db`` is the floor on the signal-to-noise ratio of the decoder's hidden
state at <|Reward|> (what the heads read), the gate that tells quantization schemes apart.

The quantized rows were measured on the project's random-weight fixtures (``tiny``), with
margin. Random weights are a weaker test than the real checkpoint: their reward heads turn
small hidden-state errors into large mu errors, so 4-bit schemes keep a high hidden-state SNR
yet a loose mu bound here. On the real checkpoint, run benchmarks/parity.py (README).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    mu: float
    log_sigma: float
    agreement: float = 1.0
    hidden_snr_db: float = 60.0


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
    # random-weight fixtures (benchmarks/cpu_suite.sh) times about 1.5; the SNR floors come from tiny.
    # ort-int8 (U8U8 by default): its integer sums are exact on every x86-64 CPU (tested), so tiny's
    # 33.2 dB is the same on AVX2 and AVX-512/VNNI machines; U8S8 without VNNI gave 22 dB.
    ("onnxruntime", "ort-int8"): Tolerance(0.25, 0.25, 0.8, hidden_snr_db=28.0),
    ("onnxruntime", "ort-int4"): Tolerance(0.75, 0.75, 0.7, hidden_snr_db=12.0),
    ("torch", "bnb-int8"): Tolerance(0.15, 0.15, 0.8, hidden_snr_db=34.0),
    ("torch", "bnb-nf4"): Tolerance(0.75, 0.75, 0.7, hidden_snr_db=9.0),
    # GPTQ through GPTQModel, run by its torch kernel: measured 17.9-19.3 dB, |d mu| <= 0.25 on tiny
    # (8-64 synthetic calibration triples; group size 32 or 128, desc_act, asymmetric) and 17.1 dB,
    # |d mu| <= 0.27 on small.
    ("torch", "gptq-int4"): Tolerance(0.5, 0.5, 0.7, hidden_snr_db=14.0),
    # TensorRT Q/DQ graphs (editreward_quant.trt_schemes) emulated by ONNX Runtime's CPU kernels, measured
    # on tiny with ONNX Runtime 1.24 (ModelOpt's) and 1.32: int8-sq 29-36 dB, |d mu| <= 0.07; fp8 (3 mantissa
    # bits, per-tensor scales) 24-25 dB, |d mu| <= 0.20; int4-awq 18-20 dB, |d mu| <= 0.30. ONNX Runtime 1.24
    # quantizes fp16 inputs less exactly than 1.32 (6 dB less on one Q/DQ pair), hence the int8 spread.
    ("onnxruntime", "trt-int8-sq"): Tolerance(0.15, 0.15, 0.8, hidden_snr_db=25.0),
    ("onnxruntime", "trt-fp8"): Tolerance(0.4, 0.4, 0.7, hidden_snr_db=20.0),
    ("onnxruntime", "trt-int4-awq"): Tolerance(0.5, 0.5, 0.7, hidden_snr_db=14.0),
    # The same graphs built by TensorRT: not measured yet (no GPU here). TensorRT runs the same Q/DQ
    # arithmetic with int32/fp32 GEMM accumulation, so the emulated bounds are the starting point;
    # re-measure them on a GPU with benchmarks/parity.py.
    ("tensorrt", "trt-int8-sq"): Tolerance(0.15, 0.15, 0.8, hidden_snr_db=25.0),
    ("tensorrt", "trt-fp8"): Tolerance(0.4, 0.4, 0.7, hidden_snr_db=20.0),
    ("tensorrt", "trt-int4-awq"): Tolerance(0.5, 0.5, 0.7, hidden_snr_db=14.0),
}


def tolerance(backend: str, precision: str) -> Tolerance:
    try:
        return TOLERANCES[(backend, precision)]
    except KeyError as exc:
        raise KeyError(f"no tolerance stated for {backend}/{precision}: add it to editreward_rt.tolerances.TOLERANCES") from exc


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
