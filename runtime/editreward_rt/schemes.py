"""Quantization schemes as data, registered with their functions (after torchao): one frozen
dataclass per scheme, validated on creation and serialised with its version into the output
model's manifest, and one registry line that ties it to its ``quantize`` function and, for the
schemes whose layers the torch backend rebuilds, its ``load`` function. Loading a folder
rebuilds its config through ``scheme_from_dict``, which refuses another version, except the
older versions a scheme lists in ``reads`` (whose stored configs mean the same, only a default
having changed since), with the values their missing options had. Nothing is ever guessed from a
file name.

The configs are data the runtime checks when it opens a quantized folder, so they live here; the
functions live in the build-time package ``editreward_quant`` (quantize) and its ``layers``
(load), named as ``module:function`` and imported only when called: reading a manifest never
imports torch, bitsandbytes, GPTQModel or ModelOpt. The thin runtime (ONNX Runtime, TensorRT)
never reaches build-time code; the torch backend, opening a torch-quantized folder, imports that
scheme's layers (torch-side code) through its ``load``.

A scheme also carries its own facts, as a torchao config does: its noise model (``matmul_noise``
and the token embedding's), from which ``tolerances.hidden_snr_floor_db`` derives its hidden-state
SNR floor, and its rows of the tolerance table, keyed by the backends that run its folders.

By default the vision tower and the reward heads keep their original precision: both are
small, and quantizing a VLM's vision tower costs accuracy for little gain.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from .errors import EditRewardError
from .tolerances import FP8_E4M3_NOISE, HEAVY_TAILS, TOKENS, Tolerance, absmax_noise

EMBEDDING_BLOCK = 32  # columns per scale of the torch schemes' 4-bit token embedding


class QuantizeError(EditRewardError):
    """A quantization request that cannot be carried out: unknown scheme, missing library, no GPU, bad data."""

    kind = "quantize_error"


@dataclass(frozen=True)
class Scheme:
    name: ClassVar[str]
    version: ClassVar[int] = 1
    reads: ClassVar[dict[int, dict]] = {}  # older versions still read: {version: values of options it lacked}
    target: ClassVar[str]  # "onnx" (an exported folder), "torch" (a checkpoint) or "trt" (Q/DQ ONNX for TensorRT)
    extra: ClassVar[str]  # the pip extra that brings the library
    modules: ClassVar[tuple[str, ...]] = ()  # importable modules the scheme needs
    # Its rows of the tolerance table against the PyTorch reference, by the backend that runs its folders.
    # Their |d| bounds are the worst per-head drift measured on the tiny and small random-weight
    # fixtures (benchmarks/cpu_suite.sh) times about 1.5.
    tolerances: ClassVar[dict[str, Tolerance]]
    emulation_db: ClassVar[float] = 0.0  # lowers the SNR floor where the checking runtime rounds less exactly

    include_vision: bool = False
    include_heads: bool = False

    def __post_init__(self):
        if self.include_heads:
            raise QuantizeError(f"{self.name}: quantizing the reward heads is not supported (they are 2 small float32 MLPs)")

    def to_dict(self) -> dict:
        return {"scheme": self.name, "version": self.version, "config": asdict(self)}

    @property
    def embedding_block(self) -> int:
        """Columns per scale of a 4-bit token embedding."""
        return EMBEDDING_BLOCK

    def matmul_noise(self, k: int) -> tuple[float, float]:
        """Relative noise power (noise variance / signal variance) that quantizing a matmul of fan-in
        ``k`` adds through its weights and through its activations."""
        raise NotImplementedError(f"{self.name} has no noise model: define its matmul_noise")

    def noise(self, spec) -> dict[str, float]:
        """Relative noise power per quantized matmul (weights, activations) and of the token
        embedding, for a model of ``spec``'s widths (``tolerances.hidden_snr_floor_db``)."""
        t = spec.text
        k = max(t.hidden_size, t.intermediate_size)  # fan-in of the widest matmuls: the largest absmax
        weights, activations = self.matmul_noise(k)
        # embedding_bits: an option of each scheme, or a ClassVar of 0 where the embedding stays float.
        levels = {0: None, 8: (127, t.hidden_size), 4: (7, self.embedding_block)}[self.embedding_bits]
        return {"weights": weights, "activations": activations, "embedding": absmax_noise(*levels) if levels else 0.0}


@dataclass(frozen=True)
class OrtInt8(Scheme):
    """int8 weights for ONNX Runtime: ``dynamic`` (per-channel int8 weights, activations quantized
    at run time: the fast CPU path) or ``weight_only`` (MatMulNBits with 8 bits, for CPU and CUDA)."""

    name: ClassVar[str] = "ort-int8"
    # 2: the token embedding is quantized too; 3: uint8 weights (U8U8) by default; 4: 7-bit signed
    # weights (U8S8, reduce_range) by default.
    version: ClassVar[int] = 4
    reads: ClassVar[dict[int, dict]] = {2: {"reduce_range": False}, 3: {"reduce_range": False}}
    target: ClassVar[str] = "onnx"
    extra: ClassVar[str] = "onnx"
    modules: ClassVar[tuple[str, ...]] = ("onnxruntime",)
    mode: str = "dynamic"
    # dynamic only. "int8" (U8S8, uint8 activations x int8 weights) runs ONNX Runtime's fastest CPU
    # kernels: VNNI's dot products where the CPU has them, else pairs of u8*s8 products added in
    # saturating 16-bit lanes (AVX2, AVX-512F). ``reduce_range`` keeps the weights in [-64, 64], so a
    # pair never exceeds 2 * 255 * 64 = 32640 < 2**15: the sums are exact, the same on every x86-64
    # CPU. Measured here (1 thread, AVX-512 VNNI): 3.5x float32 MatMul, where "uint8" (U8U8, also
    # exact everywhere, full 8-bit weights) is 1.5x. int8 weights without reduce_range saturate
    # without VNNI: 22 dB instead of 33 dB of hidden-state SNR on an AVX2 EPYC.
    weight_type: str = "int8"
    reduce_range: bool | None = None  # default: on for int8 weights (dynamic), off otherwise
    block_size: int = 128  # weight_only only
    embedding_bits: int = 8  # token embedding: 8 (int8 rows, a float scale each) or 0 (float32)
    # Its default (U8S8 with 7-bit weights) sums exactly on every x86-64 CPU (tested), so its numbers
    # do not depend on the CPU; full-range U8S8 without VNNI gave 22 dB of hidden-state SNR instead of
    # 33 on tiny.
    tolerances: ClassVar[dict[str, Tolerance]] = {"onnxruntime": Tolerance(0.25, 0.25, 0.8)}

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in ("dynamic", "weight_only"):
            raise QuantizeError(f"ort-int8 mode must be dynamic or weight_only, not {self.mode!r}")
        if self.weight_type not in ("uint8", "int8"):
            raise QuantizeError(f"ort-int8 weight_type must be uint8 or int8, not {self.weight_type!r}")
        applies = self.mode == "dynamic" and self.weight_type == "int8"
        if self.reduce_range is None:
            object.__setattr__(self, "reduce_range", applies)
        elif self.reduce_range and not applies:
            raise QuantizeError("ort-int8 reduce_range applies to mode=dynamic with weight_type=int8 only")
        _check_block(self.block_size)
        _check_embedding_bits(self.embedding_bits, (0, 8))

    @property
    def embedding_block(self) -> int:
        return self.block_size

    def matmul_noise(self, k: int) -> tuple[float, float]:
        if self.mode == "weight_only":
            return absmax_noise(127, min(self.block_size, k)), 0.0
        # Per-channel weights (reduce_range: within [-64, 64]); per-tensor asymmetric uint8 activations
        # over 255 steps, whose range is a heavy-tailed absmax over a call's tokens.
        weights = absmax_noise(64 if self.reduce_range else 127, k)
        return weights, (2 * HEAVY_TAILS * math.sqrt(2 * math.log(TOKENS * k)) / 255) ** 2 / 12


@dataclass(frozen=True)
class OrtInt4(Scheme):
    """4-bit symmetric block-wise weights (MatMulNBits). ``accuracy_level`` 4 computes in int8 on CPU,
    the only level that is faster than float32 there; 0 keeps float compute."""

    name: ClassVar[str] = "ort-int4"
    # 2: the token embedding is quantized too. 3: blocks of 64 by default, not 32. ONNX Runtime
    # prepacks a float scale and (for its int8-compute kernel) a block sum per block: at 32 that is a
    # quarter byte per weight, and the 7B peaked at 10.7 GB scoring on a CPU; at 64 it is 9.5 GB
    # (128: 8.9 GB, 1 dB less hidden-state SNR than 64, and below the ranking gate on random weights).
    version: ClassVar[int] = 3
    reads: ClassVar[dict[int, dict]] = {2: {}}  # blocks of 32 were the default; every config stores its block size
    target: ClassVar[str] = "onnx"
    extra: ClassVar[str] = "onnx"
    modules: ClassVar[tuple[str, ...]] = ("onnxruntime",)
    block_size: int = 64
    symmetric: bool = True
    accuracy_level: int = 4
    embedding_bits: int = 8  # token embedding: 8 (int8 rows), 4 (GatherBlockQuantized, same block size) or 0 (float32)
    tolerances: ClassVar[dict[str, Tolerance]] = {"onnxruntime": Tolerance(0.75, 0.75, 0.7)}

    def __post_init__(self):
        super().__post_init__()
        _check_block(self.block_size)
        _check_embedding_bits(self.embedding_bits, (0, 4, 8))
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise QuantizeError(f"accuracy_level must be 0-4, not {self.accuracy_level}")

    @property
    def embedding_block(self) -> int:
        return self.block_size

    def matmul_noise(self, k: int) -> tuple[float, float]:
        return absmax_noise(7, min(self.block_size, k)), 0.0


@dataclass(frozen=True)
class BnbInt8(Scheme):
    """bitsandbytes LLM.int8 on the decoder's linear layers (outlier threshold 6.0)."""

    name: ClassVar[str] = "bnb-int8"
    version: ClassVar[int] = 2  # 2: the token embedding is quantized too
    target: ClassVar[str] = "torch"
    extra: ClassVar[str] = "quant"
    modules: ClassVar[tuple[str, ...]] = ("bitsandbytes", "torch")
    threshold: float = 6.0
    embedding_bits: int = 8  # token embedding: 8 (int8 rows) or 0 (compute dtype)
    tolerances: ClassVar[dict[str, Tolerance]] = {"torch": Tolerance(0.15, 0.15, 0.8)}

    def __post_init__(self):
        super().__post_init__()
        _check_embedding_bits(self.embedding_bits, (0, 8))
        if self.threshold < 0:
            raise QuantizeError("threshold must be >= 0")

    def matmul_noise(self, k: int) -> tuple[float, float]:
        # LLM.int8: per-row weights and per-token activations, outliers kept in 16 bits.
        return absmax_noise(127, k), absmax_noise(127, k)


@dataclass(frozen=True)
class BnbNf4(Scheme):
    """bitsandbytes NF4 with double quantization and bf16 compute on the decoder's linear layers."""

    name: ClassVar[str] = "bnb-nf4"
    version: ClassVar[int] = 2  # 2: the token embedding is quantized too
    target: ClassVar[str] = "torch"
    extra: ClassVar[str] = "quant"
    modules: ClassVar[tuple[str, ...]] = ("bitsandbytes", "torch")
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    block_size: int = 64
    embedding_bits: int = 8  # token embedding: 8 (int8 rows), 4 (blocks of EMBEDDING_BLOCK) or 0 (compute dtype)
    tolerances: ClassVar[dict[str, Tolerance]] = {"torch": Tolerance(0.75, 0.75, 0.7)}

    def __post_init__(self):
        super().__post_init__()
        _check_embedding_bits(self.embedding_bits, (0, 4, 8))
        if self.compute_dtype not in ("bfloat16", "float16", "float32"):
            raise QuantizeError(f"compute_dtype {self.compute_dtype!r} is not bfloat16, float16 or float32")
        if self.block_size not in (64, 128, 256):
            raise QuantizeError("block_size must be 64, 128 or 256")

    def matmul_noise(self, k: int) -> tuple[float, float]:
        # 16 NF4 levels over each block's absmax: no worse than a 15-level uniform grid.
        return absmax_noise(7, self.block_size), 0.0


@dataclass(frozen=True)
class GptqInt4(Scheme):
    """GPTQ 4-bit through GPTQModel (auto-gptq is end-of-life), calibrated on image triples with the real
    prompts, on the decoder's linear layers. It runs on GPTQModel's torch kernel (CPU or GPU); ``sym``:
    symmetric 4-bit codes; ``desc_act``: quantize columns by decreasing activation energy."""

    name: ClassVar[str] = "gptq-int4"
    version: ClassVar[int] = 2  # 2: the token embedding is quantized too
    target: ClassVar[str] = "torch"
    extra: ClassVar[str] = "gptq"
    modules: ClassVar[tuple[str, ...]] = ("gptqmodel", "torch")
    install_note: ClassVar[str] = "(gptqmodel==7.6.0, in a virtual environment of its own: it pins numpy 2.2.6)"
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    embedding_bits: int = 8  # token embedding (round to nearest: a lookup has nothing to calibrate): 8, 4 or 0
    # Run by GPTQModel's torch kernel: measured 17.9-19.3 dB, |d mu| <= 0.25 on tiny (8-64 synthetic
    # calibration triples; group size 32 or 128, desc_act, asymmetric) and 17.1 dB, |d mu| <= 0.27 on small.
    tolerances: ClassVar[dict[str, Tolerance]] = {"torch": Tolerance(0.5, 0.5, 0.7)}

    def __post_init__(self):
        super().__post_init__()
        _check_embedding_bits(self.embedding_bits, (0, 4, 8))
        _check_block(self.group_size)
        if self.group_size > 1024:
            raise QuantizeError(f"gptq-int4 group_size must be at most 1024 (GPTQModel's torch kernel), not {self.group_size}")
        if self.include_vision:
            raise QuantizeError("gptq-int4 quantizes the decoder only; the vision tower keeps its precision")

    def matmul_noise(self, k: int) -> tuple[float, float]:
        return absmax_noise(7, min(self.group_size, k)), 0.0  # GPTQ's error is at most round to nearest's


@dataclass(frozen=True)
class _OvScheme(Scheme):
    """NNCF's weight compression of an exported float32 folder's decoder (and vision tower if opted
    in), written as OpenVINO IR for the openvino backend. Weights only: activations stay in the
    compute precision (the backend's bf16 or f32 hint). NNCF compresses the token-embedding
    ``Gather`` too, with one 8-bit scale per row (its backup precision under 4-bit modes)."""

    target: ClassVar[str] = "onnx"
    extra: ClassVar[str] = "ov-quant"
    # onnxruntime: the self-check's validation windows are recorded from the float export on it
    modules: ClassVar[tuple[str, ...]] = ("openvino", "nncf", "onnxruntime")
    embedding_bits: ClassVar[int] = 8


@dataclass(frozen=True)
class OvInt8(_OvScheme):
    """8-bit symmetric per-channel weights (NNCF INT8_SYM, data-free). Asymmetric 8-bit kept 27 of 28
    pairs on the small fixture where symmetric kept 28 (issue 22, a Sapphire Rapids Xeon, bf16 hint)."""

    name: ClassVar[str] = "ov-int8"
    # Per-head |d mu| <= 0.042 (tiny) and 0.055 (small), |d log_sigma| <= 0.04, in f32 and bf16 compute
    # alike (bf16 adds ~0.02 to int8's ~0.04); x1.5, rounded up. Pairs: 0.82 on tiny's 8-edit group
    # (flipped gaps <= 0.026), 26/28 on small's (gaps 0.002-0.009).
    tolerances: ClassVar[dict[str, Tolerance]] = {"openvino": Tolerance(0.1, 0.1, 0.8)}

    def matmul_noise(self, k: int) -> tuple[float, float]:
        # Per output channel over its fan-in; NNCF's float16 scales add 2^-11 relative, 1e-7 of power.
        return absmax_noise(127, k), 0.0


@dataclass(frozen=True)
class OvInt4(_OvScheme):
    """4-bit group-wise weights (NNCF INT4_SYM, or INT4_ASYM with ``symmetric=False``). ``ratio``: the
    share of the ratio-defining weights put in 4 bits, the rest (NNCF picks them by quantization
    error) in 8-bit asymmetric; NNCF keeps the embedding and the last linear layer in 8 bits too.
    ``awq`` and ``scale_estimation`` are NNCF's activation-aware steps: they calibrate on decoder
    windows of calibration triples (``--calib``, or synthetic ones), with which NNCF also ranks the
    layers for ``ratio`` by their activations. A group wider than a matrix's fan-in shrinks to it
    (tiny's 64)."""

    name: ClassVar[str] = "ov-int4"
    # Per-head |d mu| <= 0.26 (tiny) and 0.55 (small), |d log_sigma| <= 0.32 and 0.63, f32 or bf16
    # compute; x1.5. Pairs: 0.79-0.96 on tiny's test group, 0.86-0.93 on small's, but 0.61 on tiny's
    # benchmark group, whose gaps are small against the 2-layer random model's 17 dB at 4 bits.
    tolerances: ClassVar[dict[str, Tolerance]] = {"openvino": Tolerance(0.85, 0.95, 0.6)}
    group_size: int = 128
    symmetric: bool = True
    ratio: float = 1.0
    awq: bool = False
    scale_estimation: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_block(self.group_size)
        if not 0.0 < self.ratio <= 1.0:
            raise QuantizeError(f"ov-int4 ratio must be within (0, 1], not {self.ratio}")

    @property
    def calibrated(self) -> bool:
        return self.awq or self.scale_estimation

    def matmul_noise(self, k: int) -> tuple[float, float]:
        # 16 levels over a group: asymmetric spans [min, max] in 15 steps, no coarser than symmetric's
        # absmax / 7; 8-bit layers (ratio < 1) and AWQ's rescaling add less than round to nearest.
        return absmax_noise(7, min(self.group_size, k)), 0.0


def _trt_rows(row: Tolerance) -> dict[str, Tolerance]:
    """A trt-* scheme's rows. Its bounds were measured on tiny with the graphs emulated by ONNX Runtime's
    CPU kernels (1.24, ModelOpt's, and 1.32). TensorRT runs the same Q/DQ arithmetic with int32/fp32
    GEMM accumulation, so the emulated bound is its starting point too; not yet measured on a GPU
    (benchmarks/parity.py re-measures it)."""
    return {"onnxruntime": row, "tensorrt": row}


@dataclass(frozen=True)
class _TrtScheme(Scheme):
    """Q/DQ ONNX for a strongly typed TensorRT network, made with NVIDIA ModelOpt. ``high_precision_dtype``
    is the type of everything that is not quantized (RMSNorm statistics and rotary angles stay float32)."""

    target: ClassVar[str] = "trt"
    trt_precision: ClassVar[str]  # its name among the TensorRT build's precisions (build_trt --precision)
    extra: ClassVar[str] = "trt-quant"
    modules: ClassVar[tuple[str, ...]] = ("modelopt",)
    install_note: ClassVar[str] = ("in a virtual environment of its own: ModelOpt brings onnxruntime-gpu and cupy, "
                                   "which replace the CPU onnxruntime")
    calibration_methods: ClassVar[tuple[str, ...]] = ("max", "entropy")
    embedding_bits: ClassVar[int] = 0  # the graphs keep a float token embedding
    calibration_method: str = "max"
    high_precision_dtype: str = "fp16"

    def __post_init__(self):
        super().__post_init__()
        if self.include_vision:
            raise QuantizeError(f"{self.name} quantizes the decoder only; the vision graph keeps float32")
        if self.calibration_method not in self.calibration_methods:
            raise QuantizeError(f"{self.name} calibration_method must be one of {self.calibration_methods}, "
                                f"not {self.calibration_method!r}")
        if self.high_precision_dtype not in ("fp16", "bf16", "fp32"):
            raise QuantizeError(f"high_precision_dtype must be fp16, bf16 or fp32, not {self.high_precision_dtype!r}")


@dataclass(frozen=True)
class TrtInt8Sq(_TrtScheme):
    """INT8 SmoothQuant Q/DQ graph: per-channel int8 weights, per-tensor int8 activations, with
    activation outliers moved into the weights by ``alpha`` (0: none, 1: all)."""

    name: ClassVar[str] = "trt-int8-sq"
    trt_precision: ClassVar[str] = "int8"
    # Measured 29-36 dB, |d mu| <= 0.07 (the spread: ONNX Runtime 1.24 against 1.32, below).
    tolerances: ClassVar[dict[str, Tolerance]] = _trt_rows(Tolerance(0.15, 0.15, 0.8))
    # ONNX Runtime 1.24 (ModelOpt's), which checks these graphs, rounds fp16 Q/DQ inputs less exactly
    # than 1.32: 6 dB lower SNR measured on one Q/DQ pair.
    emulation_db: ClassVar[float] = 6.0
    alpha: float = 0.5  # the SmoothQuant paper's balance; 0.8 measured worse than 0.5 and than none on fixtures

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise QuantizeError(f"alpha must be within [0, 1], not {self.alpha}")

    def matmul_noise(self, k: int) -> tuple[float, float]:
        # Per-channel weights; per-tensor symmetric int8 activations, heavy-tailed over a call's tokens.
        return absmax_noise(127, k), HEAVY_TAILS**2 * absmax_noise(127, TOKENS * k)


@dataclass(frozen=True)
class TrtFp8(_TrtScheme):
    """FP8 (E4M3) Q/DQ graph; TensorRT runs it on Ada/Hopper GPUs."""

    name: ClassVar[str] = "trt-fp8"
    trt_precision: ClassVar[str] = "fp8"
    # 3 mantissa bits and per-tensor scales: measured 24-25 dB, |d mu| <= 0.20.
    tolerances: ClassVar[dict[str, Tolerance]] = _trt_rows(Tolerance(0.4, 0.4, 0.7))

    def matmul_noise(self, k: int) -> tuple[float, float]:
        return FP8_E4M3_NOISE, FP8_E4M3_NOISE


@dataclass(frozen=True)
class TrtInt4Awq(_TrtScheme):
    """INT4 block-wise weight-only AWQ Q/DQ graph."""

    name: ClassVar[str] = "trt-int4-awq"
    trt_precision: ClassVar[str] = "int4"
    calibration_methods: ClassVar[tuple[str, ...]] = ("awq_clip", "awq_lite")
    tolerances: ClassVar[dict[str, Tolerance]] = _trt_rows(Tolerance(0.5, 0.5, 0.7))  # measured 18-20 dB, |d mu| <= 0.30
    block_size: int = 128
    calibration_method: str = "awq_clip"

    def __post_init__(self):
        super().__post_init__()
        _check_block(self.block_size)

    def matmul_noise(self, k: int) -> tuple[float, float]:
        return absmax_noise(7, min(self.block_size, k)), 0.0



def _check_embedding_bits(bits: int, allowed: tuple[int, ...]) -> None:
    if bits not in allowed:
        raise QuantizeError(f"embedding_bits must be one of {', '.join(map(str, allowed))} (0 keeps float32), not {bits}")


def _check_block(size: int) -> None:
    if size < 16 or size & (size - 1):
        raise QuantizeError(f"block size must be a power of two >= 16, not {size}")


@dataclass(frozen=True)
class SchemeEntry:
    """A scheme's config class with its functions. ``quantize(request) -> Path`` writes the quantized
    folder; ``load(modules, quantization, state, device, dtype)`` rebuilds a torch-backend folder's layers
    (None: the backend reads the quantized graphs as they are); ``quantize_backend(backend, ckpt, scheme,
    triples, log) -> dict`` quantizes a loaded fast-mode torch backend in place, calibrating on ``triples``
    where the scheme calibrates (the GPU matrix measures torch schemes so, without a folder round trip)."""

    config: type[Scheme]
    quantize: str
    load: str | None = None
    quantize_backend: str | None = None

    def function(self, which: str):
        import importlib

        module, _, name = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), name)


REGISTRY: dict[str, SchemeEntry] = {e.config.name: e for e in (
    SchemeEntry(OrtInt8, "editreward_quant.ort_schemes:quantize"),
    SchemeEntry(OrtInt4, "editreward_quant.ort_schemes:quantize"),
    SchemeEntry(BnbInt8, "editreward_quant.bnb_schemes:quantize", "editreward_quant.layers.bnb:load_bnb_modules",
                "editreward_quant.bnb_schemes:quantize_backend"),
    SchemeEntry(BnbNf4, "editreward_quant.bnb_schemes:quantize", "editreward_quant.layers.bnb:load_bnb_modules",
                "editreward_quant.bnb_schemes:quantize_backend"),
    SchemeEntry(GptqInt4, "editreward_quant.gptq_scheme:quantize", "editreward_quant.layers.gptq:load_gptq_modules",
                "editreward_quant.gptq_scheme:quantize_backend"),
    SchemeEntry(TrtInt8Sq, "editreward_quant.trt_schemes:quantize"),
    SchemeEntry(TrtFp8, "editreward_quant.trt_schemes:quantize"),
    SchemeEntry(TrtInt4Awq, "editreward_quant.trt_schemes:quantize"),
    SchemeEntry(OvInt8, "editreward_quant.ov_schemes:quantize"),
    SchemeEntry(OvInt4, "editreward_quant.ov_schemes:quantize"),
)}
SCHEMES: dict[str, type[Scheme]] = {name: e.config for name, e in REGISTRY.items()}


@dataclass(frozen=True)
class QuantizeRequest:
    """What every ``quantize`` function takes: the source (a checkpoint for ``target == "torch"``, an
    exported float32 folder otherwise), the scheme, the output folder and the calibration options."""

    source: str
    scheme: Scheme
    out: object
    base: str | None = None
    prompts_from: str | None = None
    calib: str | None = None
    calib_size: int = 64
    device: str = "cpu"


def entry(name: str) -> SchemeEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise QuantizeError(f"unknown scheme {name!r}; known: {', '.join(REGISTRY)}") from None


def trt_precisions() -> dict[str, str]:
    """The TensorRT build's quantized precisions: ``trt_precision`` -> the scheme that writes its Q/DQ graphs."""
    return {cls.trt_precision: name for name, cls in SCHEMES.items() if cls.target == "trt"}


def make_scheme(name: str, options: dict | None = None) -> Scheme:
    """``name`` plus ``key=value`` options (strings are converted to the field's type)."""
    cls = entry(name).config
    types = {f.name: f.type for f in fields(cls)}
    kwargs = {}
    for key, value in (options or {}).items():
        if key not in types:
            raise QuantizeError(f"{name} has no option {key!r}; options: {', '.join(types)}")
        kwargs[key] = _convert(value, types[key])
    return cls(**kwargs)


def _convert(value, type_name):
    if not isinstance(value, str):
        return value
    if type_name in ("bool", bool, "bool | None"):
        if value.lower() not in ("true", "false", "1", "0"):
            raise QuantizeError(f"not a boolean: {value!r}")
        return value.lower() in ("true", "1")
    if type_name in ("int", int):
        return int(value)
    if type_name in ("float", float):
        return float(value)
    return value


def scheme_from_dict(data: dict) -> Scheme:
    """Rebuild a scheme from a manifest's ``quantization`` entry, refusing unknown versions."""
    cls = SCHEMES.get(data.get("scheme"))
    if cls is None:
        raise QuantizeError(f"unknown scheme in manifest: {data.get('scheme')!r}")
    older = cls.reads.get(data.get("version"))
    if data.get("version") != cls.version and older is None:
        raise QuantizeError(f"{cls.name} config version {data.get('version')} is not {cls.version}: "
                            "written by another editreward-deploy; re-quantize the model with this one")
    names = {f.name for f in fields(cls)}
    config = data.get("config", {})
    if not isinstance(config, dict) or set(config) - names:
        raise QuantizeError(f"{cls.name} config in manifest has unknown options {sorted(set(config) - names)}")
    return cls(**{**(older or {}), **config})


def check_available(scheme: Scheme) -> None:
    """A clear error for a missing library, naming the extra."""
    from editreward_rt.extras import missing

    missing(scheme.modules, scheme.extra, f"scheme {scheme.name}", getattr(scheme, "install_note", ""), QuantizeError)
