"""Build TensorRT engines for an EditReward checkpoint: ONNX export, profiles, one engine per graph.

    python export/build_trt.py --ckpt TIGER-Lab/EditReward

The output is an exported model folder (graphs, tokenizer, manifest) plus ``vision.engine``,
``decoder.engine`` and ``heads.engine``; the manifest's ``trt`` section records the
precision, build settings, optimisation profiles, limits, the layers kept in fp32, and the
TensorRT version and GPU the engines were built for (engines only run there).

Precisions (``PRECISIONS``):

* ``bf16`` (default): bf16 graphs with a bf16 key/value cache, built *strongly typed*, so
  TensorRT keeps exactly the graph's types: the float32 islands the exporter writes (RMSNorm
  statistics, rotary tables, reward heads) stay float32. No BF16 builder flag is needed (and
  TensorRT refuses precision flags on strongly typed networks). The ONNX Runtime CPU
  self-check cannot run bf16; the GPU check script validates the engines instead.
* ``fp16``: float32 graphs, weakly typed, FP16 flag with OBEY_PRECISION_CONSTRAINTS; the
  vision tower's MLP down projections are pinned to fp32 (their activations overflow fp16).
* ``fp32``: float32 graphs with TF32 disabled, the parity baseline.
* ``fp8``/``int8``/``int4``: float32 graphs quantized by the ``trt-*`` scheme of that
  ``trt_precision`` (``trt-fp8``, ``trt-int8-sq``, ``trt-int4-awq``), reached through the scheme
  registry (``editreward_rt.schemes``, as the Scorer does) when its library is installed, and
  built strongly typed from their Q/DQ nodes.

Defaults, sized for a 24 GB card with bf16 (not yet measured on one; ``configure`` logs the
estimate, which lands in the manifest as ``trt.memory_estimate_gib``):

* ``--max-batch 8`` triples per call, so up to 16 decoder sequences (two rubric passes each);
* tokens per image: the most the checkpoint's preprocessing can produce, 454 for the published
  checkpoints (``spec_image_tokens``: most images are 256 tokens, since every image is resized to
  about 200704 pixels, but enlarging small elongated images rounds up; a lower bound would refuse
  images the other backends score). Asking for 1024 (4096 patches) would stretch the decoder's
  longest sequence to 3072 and, at full batch, need ~25 GiB: more than a 24 GB card holds;
* longest sequence ``min(spec.max_prompt_tokens, 2 x image tokens + 1024)`` = 1932 tokens, the
  1024 covering the chat text, rubric and instruction;
* two decoder profiles. ``suffix``: 16 sequences of up to 768 new tokens over a cache of up to
  1932, which takes the usual per-triple prefixes (two 256-token images and the instruction)
  and all rubric passes; ``prefix``: 4 sequences of up to 1932 new tokens, for the shared prefix
  and unusually long segments. The backend splits larger calls into chunks.
* Estimate at these limits: bf16 weights 14.4 GiB (the decoder without its unused lm_head, and the
  vision tower), two bf16 key/value buffers 3.3 GiB, activations at most 3.8 GiB if TensorRT
  materialises the attention scores (~1.3 GiB when it fuses attention, as it normally does on
  Ampere and later), plus ~0.5 GiB of CUDA context: 19.5-22 GiB of a 24 GB card's ~22.5 GiB.
  ``--max-batch 4`` (~18 GiB) leaves ample room.
"""

from __future__ import annotations

import math
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from editreward_rt.errors import EditRewardError, ExportError
from editreward_rt.families import family_for
from editreward_rt.manifest import open_exported, write_manifest
from editreward_rt.schemes import QuantizeError, QuantizeRequest, check_available, entry, make_scheme, trt_precisions

TEXT_TOKENS = 1024  # chat text + rubric + instruction budget on top of the two images
CALIB_TRIPLES = 32  # synthetic calibration triples of the quantized precisions
SUFFIX_TOKENS = 768  # new tokens per sequence in the batch-heavy "suffix" profile
ENGINE_FILES = {"vision": "vision.engine", "decoder": "decoder.engine", "heads": "heads.engine"}


@dataclass(frozen=True)
class Settings:
    precision: str
    onnx_dtype: str  # export_onnx dtype of the graphs the engines are built from
    kv_dtype: str | None = None  # export_onnx kv_dtype override
    strongly_typed: bool = False
    flags: tuple[str, ...] = ()  # trt.BuilderFlag names set
    cleared_flags: tuple[str, ...] = ()  # trt.BuilderFlag names cleared
    keep_fp32: bool = False  # pin the layers the model family names (fp16_fp32_pins) to fp32
    scheme: str | None = None  # the quantization scheme that writes the Q/DQ graphs

    @property
    def quantized(self) -> bool:
        return self.scheme is not None


PRECISIONS = {
    "bf16": Settings("bf16", "bf16", kv_dtype="bfloat16", strongly_typed=True),
    "fp16": Settings("fp16", "fp32", flags=("FP16", "OBEY_PRECISION_CONSTRAINTS"), keep_fp32=True),
    "fp32": Settings("fp32", "fp32", cleared_flags=("TF32",)),
    **{q: Settings(q, "fp32", strongly_typed=True, scheme=name) for q, name in trt_precisions().items()},
}


@dataclass(frozen=True)
class Limits:
    max_batch: int  # triples per call
    max_image_tokens: int  # merged tokens per image (patches = 4x)
    max_seq: int  # longest prompt (decoder "total")
    max_suffix: int  # longest new segment in the suffix profile
    heads: int  # reward heads = sequences per triple

    @property
    def prefix_batch(self) -> int:  # sequences in the long-sequence profile (rarely needed at full batch)
        return -(-self.max_batch // 2)

    @property
    def max_rows(self) -> int:
        return 2 * self.max_batch * self.max_image_tokens  # image rows one decoder call can gather


def spec_image_tokens(spec) -> int:
    """Most merged tokens any image the preprocessor accepts can have (a bound ``smart_resize`` attains).

    Shrinking keeps an image within max_pixels, but enlarging a small image to min_pixels rounds
    both sides *up* to the 28-pixel grid, so an elongated image ends above it: with the published
    200704/200704 pixels and the 200:1 aspect limit, a 1x200 image becomes 56x6356 = 454 tokens.
    Enlarged, the grid is ceil(a/x) x ceil(a*x) cells (a = sqrt(min_pixels)/28, x = sqrt(aspect)),
    constant between the points where either factor steps; its largest value is the bound.
    """
    image = spec.image
    factor = image.patch_size * image.merge_size
    a, limit = math.sqrt(image.min_pixels) / factor, math.sqrt(image.max_aspect_ratio)
    points = sorted({1 / limit, limit} | {k / a for k in range(1, math.ceil(a * limit) + 1) if 1 / limit < k / a < limit}
                    | {a / k for k in range(1, math.ceil(a * limit) + 1) if 1 / limit < a / k < limit})
    enlarged = max(math.ceil(a / x) * math.ceil(a * x) for x in ((p + q) / 2 for p, q in zip(points, points[1:])))
    shrunk = math.sqrt(image.max_pixels) / factor  # shrinking floors, but never below one cell a side:
    thin = math.floor(shrunk * limit) if shrunk < limit else 0  # then one row of floor(b*x) cells
    return max(1, image.max_pixels // factor**2, enlarged, thin)


def estimate_memory_gib(spec, limits: "Limits", precision: str, kv_bytes: int) -> dict:
    """Rough device memory at the largest profiles (weights, key/value buffers, unfused attention + MLP)."""
    t, v = spec.text, spec.vision
    width = 4 if precision == "fp32" else 2
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    text = t.vocab_size * t.hidden_size + t.num_layers * (t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size)
    merged = v.hidden_size * v.spatial_merge_size**2
    vision = v.depth * (4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size) + merged**2 + merged * v.out_hidden_size
    cache = 2 * t.num_layers * 2 * limits.heads * limits.max_batch * kv * limits.max_seq * kv_bytes  # two ping-pong buffers
    shapes = [(limits.prefix_batch, limits.max_seq, limits.max_seq), (limits.heads * limits.max_batch, limits.max_suffix, limits.max_seq)]
    act = max(b * (2 * t.num_heads * s * total + 3 * s * t.intermediate_size) * width for b, s, total in shapes)
    out = {"weights": (text + vision) * width, "kv_cache": cache, "activations": act}
    return {k: round(val / 2**30, 2) for k, val in {**out, "total": sum(out.values())}.items()}


def compute_limits(spec, max_batch: int = 8, max_image_tokens: int | None = None, max_seq: int | None = None,
                   log=print) -> Limits:
    if max_batch < 1:
        raise ExportError(f"--max-batch must be at least 1, got {max_batch}")
    natural = spec_image_tokens(spec)
    tokens = max_image_tokens or natural
    if tokens < 1:
        raise ExportError(f"--max-image-tokens must be at least 1, got {tokens}")
    if tokens < natural:
        log(f"warning: --max-image-tokens {tokens} is below this checkpoint's {natural} tokens per image "
            f"(max_pixels {spec.image.max_pixels}); larger images will be refused at run time")
    seq = max_seq or min(spec.max_prompt_tokens, 2 * tokens + TEXT_TOKENS)
    if seq > spec.max_prompt_tokens:
        raise ExportError(f"--max-seq {seq} exceeds the model's max_prompt_tokens {spec.max_prompt_tokens}")
    if seq < 2 * tokens + 16:
        raise ExportError(f"a longest sequence of {seq} tokens cannot hold two images of {tokens} tokens")
    return Limits(max_batch, tokens, seq, min(seq, SUFFIX_TOKENS), spec.heads.num_heads)


def compute_profiles(manifest: dict, spec, limits: Limits) -> dict[str, list[dict]]:
    """Optimisation profiles for each graph's inputs, from its declared shapes (ints or axis names)."""
    out = {}
    for graph, profiles in family_for(spec).trt_profile_axes(limits).items():
        out[graph] = []
        for name, axes in profiles:
            shapes = {}
            for item in manifest["graphs"][graph]["inputs"]:
                dims = item["shape"]
                unknown = [d for d in dims if isinstance(d, str) and d not in axes]
                if unknown:
                    raise ExportError(f"{graph} input {item['name']} has axes {unknown} with no profile range")
                shapes[item["name"]] = {key: [axes[d][i] if isinstance(d, str) else int(d) for d in dims]
                                        for i, key in enumerate(("min", "opt", "max"))}
            out[graph].append({"name": name, "axes": {a: list(r) for a, r in axes.items()}, "shapes": shapes})
    return out


def keep_fp32_nodes(onnx_path: Path, patterns: tuple[str, ...], blocks: int) -> list[str]:
    """Node names matching ``patterns`` (the exporter names nodes after module paths); every block must match."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    found, matched = [], set()
    for node in graph.node:
        for pattern in patterns:
            m = re.search(pattern, node.name)
            if m:
                found.append(node.name)
                matched.add(int(m.group(1)))
    if patterns and matched != set(range(blocks)):
        missing = sorted(set(range(blocks)) - matched)
        raise ExportError(f"{onnx_path.name}: no node matches {patterns} for blocks {missing}; "
                          "the exporter's node naming changed - update the family's fp16_fp32_pins")
    return found


def _scheme(settings: Settings):
    """The scheme that quantizes ``settings``' graphs, checked before the long export: its library must be installed."""
    scheme = make_scheme(settings.scheme)
    try:
        check_available(scheme)
    except QuantizeError as exc:
        raise ExportError(f"precision {settings.precision} needs TensorRT quantization: {exc}") from exc
    return scheme


def prepare_onnx(ckpt: str, settings: Settings, out: Path, base=None, prompts_from=None, log=print) -> Path:
    """Write the exported model folder the engines are built from (quantized when asked)."""
    from editreward_export.onnx_export import export_onnx

    if not settings.quantized:
        return export_onnx(ckpt, out, base=base, prompts_from=prompts_from, dtype=settings.onnx_dtype,
                           kv_dtype=settings.kv_dtype, log=log)
    scheme = _scheme(settings)  # before the long export
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".onnx-", dir=out.parent) as tmp:
        source = export_onnx(ckpt, Path(tmp) / "onnx", base=base, prompts_from=prompts_from,
                             dtype=settings.onnx_dtype, kv_dtype=settings.kv_dtype, log=log)
        log(f"quantizing to {settings.precision} with scheme {scheme.name}")
        request = QuantizeRequest(str(source), scheme, out, calib_size=CALIB_TRIPLES)
        return Path(entry(scheme.name).function("quantize")(request))


def configure(folder: Path, precision: str, max_batch: int = 8, max_image_tokens: int | None = None,
              max_seq: int | None = None, workspace_gb: float = 4.0, log=print) -> dict:
    """Write the manifest's ``trt`` section (profiles, settings, limits); -> the manifest."""
    settings = PRECISIONS[precision]
    model = open_exported(folder, verify=False)
    limits = compute_limits(model.spec, max_batch, max_image_tokens, max_seq, log)
    fp32_layers = {}
    if settings.keep_fp32:
        for graph, (patterns, blocks) in family_for(model.spec).fp16_fp32_pins().items():
            fp32_layers[graph] = keep_fp32_nodes(model.graph_path(graph), patterns, blocks)
    manifest = dict(model.manifest)
    manifest["trt"] = {
        "status": "configured; engines not built",
        "precision": precision,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
        "strongly_typed": settings.strongly_typed,
        "fp32_layers": fp32_layers,
        "limits": {**asdict(limits), "max_rows": limits.max_rows},
        "profiles": compute_profiles(manifest, model.spec, limits),
        "workspace_gb": workspace_gb,
    }
    write_manifest(folder, manifest)
    log(f"TensorRT {precision} profiles: batch <= {limits.max_batch} triples, <= {limits.max_image_tokens} tokens per image, "
        f"sequences <= {limits.max_seq} tokens")
    if not settings.quantized:
        kv_bytes = {"float32": 4}.get(manifest.get("kv_dtype"), 2)
        memory = manifest["trt"]["memory_estimate_gib"] = estimate_memory_gib(model.spec, limits, precision, kv_bytes)
        log(f"estimated GPU memory at the largest shapes: {memory['total']} GiB (weights {memory['weights']}, key/value "
            f"buffers {memory['kv_cache']}, activations <= {memory['activations']} before TensorRT's fused attention)")
        write_manifest(folder, manifest)
    return manifest


def build_engines(folder: Path, timing_cache: str | None = None, log=print) -> dict:
    """Build one engine per graph as the manifest's ``trt`` section says; record TensorRT and GPU."""
    from editreward_rt.manifest import read_manifest

    from . import tensorrt_api

    manifest = read_manifest(folder)
    section = manifest["trt"]
    trt = tensorrt_api.import_tensorrt()
    start, engines = time.perf_counter(), {}
    for name, file in ENGINE_FILES.items():
        log(f"building {file} ({section['precision']}, {len(section['profiles'][name])} profile(s))")
        tensorrt_api.build_engine(trt, folder / manifest["graphs"][name]["file"], folder / file, section,
                                 section["fp32_layers"].get(name, []), timing_cache, log)
        engines[name] = {"file": file, "profiles": [p["name"] for p in section["profiles"][name]]}
    manifest["runtime"] = "tensorrt"  # Scorer.load(folder) picks this backend
    section.update(status="built", engines=engines,
                   build={"tensorrt_version": trt.__version__, "gpu": tensorrt_api.gpu_info(),
                          "seconds": round(time.perf_counter() - start, 1)})
    write_manifest(folder, manifest)
    return manifest


def check_ops(folder: Path, log=print) -> dict:
    """TensorRT's ONNX-parser support list against the graphs (``ops``), recorded in the manifest's
    ``trt`` section; raises on any unsupported node, before a build would fail on it."""
    from editreward_rt.manifest import read_manifest

    from .ops import check_exported

    report = check_exported(folder)
    manifest = read_manifest(folder)
    manifest["trt"]["op_check"] = {"tensorrt_version": report.tensorrt_version, "nodes": report.nodes,
                                   "violations": [str(v) for v in report.violations]}
    write_manifest(folder, manifest)
    log(f"TensorRT {report.tensorrt_version} op check: {report.nodes} nodes, {len(report.violations)} unsupported")
    if report.violations:
        raise ExportError(f"{len(report.violations)} node(s) TensorRT's parser rejects, e.g. {report.violations[0]}")
    return manifest


def build_trt(ckpt: str, precision: str = "bf16", max_batch: int = 8, max_image_tokens: int | None = None,
              out=None, workspace_gb: float = 4.0, timing_cache: str | None = None, base: str | None = None,
              prompts_from: str | None = None, max_seq: int | None = None, onnx_only: bool = False, log=print) -> Path:
    """Export, configure the profiles, check the ops, then build the engines (``onnx_only``: stop
    before the build, which needs TensorRT and a GPU; everything before it runs anywhere)."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose from {sorted(PRECISIONS)}")
    settings = PRECISIONS[precision]
    out = Path(out or f"{Path(str(ckpt)).name}-trt-{precision}")
    folder = prepare_onnx(ckpt, settings, out, base=base, prompts_from=prompts_from, log=log)
    configure(folder, precision, max_batch, max_image_tokens, max_seq, workspace_gb, log)
    check_ops(folder, log)
    if onnx_only:
        log(f"ONNX graphs, profiles and manifest written to {folder}; build the engines there with TensorRT")
        return folder
    build_engines(folder, timing_cache, log)  # raises ExportError without tensorrt, after the above is on disk
    log(f"TensorRT engines written to {folder}")
    return folder


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Export an EditReward checkpoint and build TensorRT engines.")
    parser.add_argument("--ckpt", required=True, help="hub id (TIGER-Lab/EditReward, ...) or checkpoint folder")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    parser.add_argument("--max-batch", type=int, default=8, help="triples per call (default 8)")
    parser.add_argument("--max-image-tokens", type=int, help="tokens per image (default: the checkpoint's max_pixels / 784)")
    parser.add_argument("--max-seq", type=int, help="longest prompt in tokens (default: 2 x image tokens + 1024)")
    parser.add_argument("--out", help="output folder (default: ./<checkpoint name>-trt-<precision>)")
    parser.add_argument("--workspace", type=float, default=4.0, help="builder workspace in GB (default 4)")
    parser.add_argument("--timing-cache", help="TensorRT timing cache file, read if present and written back")
    parser.add_argument("--base", help="base model hub id or folder (default: from the checkpoint's yaml)")
    parser.add_argument("--prompts-from", help="local clone of the upstream repository (default: download pinned files)")
    parser.add_argument("--onnx-only", action="store_true",
                        help="stop before the engine build: ONNX graphs, profiles, manifest and TensorRT op check")
    args = parser.parse_args(argv)
    try:
        build_trt(args.ckpt, args.precision, args.max_batch, args.max_image_tokens, args.out, args.workspace,
                  args.timing_cache, args.base, args.prompts_from, args.max_seq, onnx_only=args.onnx_only)
    except EditRewardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
