"""Export an EditReward checkpoint to an exported model folder of three ONNX graphs.

The model family declares the graphs (``vision``, ``decoder``, ``heads``: I/O names, dynamic
axes), the torch wrappers to trace and their dummy inputs (``editreward_families.<name>.graphs``).

The graphs use only standard ONNX ops. Weights never sit in memory whole: each graph is traced
over placeholder parameters and the checkpoint's tensors are streamed in one at a time
(``streaming``), so a 7B exports in a few GB. The export validates itself: the fast path on ONNX
Runtime is compared with the PyTorch reference on triples of two different image shapes (at
full size, on the first layers: ``validate_subset``).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from editreward_rt.checkpoint import TensorSource, open_checkpoint
from editreward_rt.errors import ExportError
from editreward_rt.families import GraphSpec, family_for
from editreward_rt.manifest import EXTERNAL_DATA_BYTES, MANIFEST, staged_folder, write_manifest
from editreward_rt.tolerances import max_abs_diff, tolerance, within

from .streaming import attach_weights, trace

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
BF16_NOT_VALIDATED = ("ONNX Runtime's CPU provider has no bfloat16 kernels (MatMul, Gemm, ...), so bf16 graphs "
                      "cannot be self-validated here; validate the built TensorRT engines (benchmarks/gpu_trt_check.py)")


MODULES = ("vision", "decoder", "heads")  # TorchGraphs' modules, by the family's names for them
# float32 weight bytes up to which the self-validation runs the whole model: beyond, ONNX Runtime's
# copy and the reference's would not fit in a desktop's memory, so a subset runs (``validate_subset``).
FULL_VALIDATION_BYTES = 4 * 2**30


def _export_graph(wrapper, args, gspec: GraphSpec, path: Path, opset: int, keys: dict, source) -> dict:
    """Trace one graph over placeholder weights, then stream its weights in from ``source``."""
    params = dict(wrapper.named_parameters())  # graph input name -> placeholder parameter
    large = sum(p.numel() * p.element_size() for p in params.values()) > EXTERNAL_DATA_BYTES
    trace(wrapper, args, gspec, path, opset)

    def fetch(name: str):
        if name not in params:
            raise ExportError(f"{path.name}: the traced graph reads {name}, which is not a parameter of the module")
        return source.get(keys[id(params[name])]).to(params[name].dtype)

    attached = attach_weights(path, len(gspec.inputs), fetch, external=large)
    return {"tensors": attached.tensors, "bytes": attached.bytes, "folded_transposes": attached.folded_transposes,
            "external_data": large}


def _checkpoint_keys(fam, graphs) -> dict[int, str]:
    """id(placeholder parameter) -> the checkpoint key it stands for."""
    modules = (graphs.vision_module, graphs.decoder, graphs.head_module)
    return {id(p): fam.checkpoint_key(role, name) for role, module in zip(MODULES, modules)
            for name, p in module.named_parameters()}


def _versions() -> dict:
    import onnx
    import torch
    import transformers
    from editreward_rt import __version__

    return {"editreward_deploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def validation_triples(scorer, seed: int = 0) -> list:
    """Triples of two image shapes (plus a shared source) for self-validation."""
    rng = np.random.default_rng(seed)
    image = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    src = image(300, 420)
    return [scorer.prepare("Make the sky purple", src, image(360, 360)),
            scorer.prepare("Remove the red car", image(120, 640), src),
            scorer.prepare("Make the sky purple", src, image(500, 280))]


def validate(out_dir: Path, ckpt, reference_state: dict, precision: str, log) -> dict:
    """Run the exported graphs on ONNX Runtime against the torch reference; raise beyond tolerance."""
    import torch
    from editreward_rt.scorer import Scorer

    exported = Scorer.load(out_dir, backend="onnxruntime")
    triples = validation_triples(exported)
    reference = family_for(ckpt.spec).reference_runner(ckpt.config, reference_state, torch.device("cpu"), torch.float32)
    expected = reference.run(triples)
    actual = exported.backend.head_outputs(triples)
    del exported, reference
    diff = max_abs_diff(actual, expected)
    tol = tolerance("onnxruntime", precision)
    shapes = sorted({tuple(t.edited.grid_thw) for t in triples} | {tuple(t.source.grid_thw) for t in triples})
    log(f"validation vs torch reference: max |d mu| {diff['mu']:.2e}, max |d log_sigma| {diff['log_sigma']:.2e} "
        f"(tolerance {tol.mu:g}) over {len(triples)} triples, image grids {shapes}")
    if not within(diff, tol):
        raise ExportError(f"exported graphs drift from the PyTorch reference: {diff} exceeds {tol} for {precision}")
    return {"max_abs_diff": diff, "tolerance": {"mu": tol.mu, "log_sigma": tol.log_sigma},
            "triples": len(triples), "image_grids": [list(s) for s in shapes]}


@dataclass
class _Subset:
    """A checkpoint cut to ``validation_subset``'s layers, read from the full one's tensors."""

    spec: object
    config: dict
    tokenizer: object
    chat_text: str
    templates: object
    source: object
    origin: dict

    def state_dict(self) -> dict:
        return {key: self.source.get(key) for key in family_for(self.spec).expected_shapes()}


def validate_subset(ckpt, source, out: Path, dtype: str, kv_dtype: str, opset: int, log) -> dict:
    """Export the family's ``validation_subset`` of ``ckpt`` with this same exporter and validate it
    whole: every kind of tensor and op of the full graphs, and the first layers' real weights."""
    spec, config = family_for(ckpt.spec).validation_subset(ckpt.config)
    subset = _Subset(spec, config, ckpt.tokenizer, ckpt.chat_text, ckpt.templates, source, {})
    kept = {"decoder_layers": spec.text.num_layers, "vision_blocks": spec.vision.depth}
    log(f"validating a subset of the same checkpoint: {kept}")
    with tempfile.TemporaryDirectory(prefix=".validate-", dir=out.parent) as tmp:
        folder = export_onnx(subset, Path(tmp) / "subset", dtype=dtype, opset=opset, kv_dtype=kv_dtype,
                             log=lambda msg: log(f"  subset: {msg}"))
        result = json.loads((folder / MANIFEST).read_text())["validation"]
    reason = (f"float32 weights of {_float_bytes(ckpt.spec) / 2**30:.1f} GiB: ONNX Runtime and the PyTorch reference "
              f"would each hold a copy (over {FULL_VALIDATION_BYTES / 2**30:.0f} GiB), so the first layers are validated")
    return {**result, "subset": kept, "reason": reason}


def _float_bytes(spec) -> int:
    return 4 * sum(math.prod(shape) for shape in family_for(spec).expected_shapes().values())


def export_onnx(ckpt_arg: str, out: str | Path, base: str | None = None, prompts_from: str | None = None,
                dtype: str = "fp32", opset: int = 17, validate_export: bool = True, log=print,
                kv_dtype: str | None = None) -> Path:
    """Export ``ckpt_arg`` into the folder ``out`` (written to a temporary folder, then moved into place).

    ``kv_dtype`` overrides the key/value cache I/O type (default: float16 for fp16, else float32);
    the TensorRT build keeps a bf16 cache for bf16 graphs, which never leaves the GPU."""
    import torch
    from editreward_rt.backends.torch_backend import TorchGraphs

    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ExportError(f"{out} exists and is not an exported model folder; refusing to overwrite it")
    precision = DTYPES[dtype]
    kv_dtype = kv_dtype or ("float16" if precision == "float16" else "float32")
    if kv_dtype not in DTYPES.values():
        raise ExportError(f"unknown kv_dtype {kv_dtype!r}; choose from {sorted(DTYPES.values())}")
    start = time.perf_counter()
    # A checkpoint object (anything with state_dict(), e.g. random weights made on a GPU) is exported as is.
    in_memory = hasattr(ckpt_arg, "state_dict")
    log(f"[1/4] reading checkpoint {type(ckpt_arg).__name__ + ' (in memory)' if in_memory else ckpt_arg}")
    ckpt = ckpt_arg if in_memory else open_checkpoint(ckpt_arg, base=base, prompts_from=prompts_from)
    source = TensorSource(state=ckpt.state_dict()) if in_memory else ckpt.tensors()
    fam = family_for(ckpt.spec)
    graphs = TorchGraphs(ckpt.spec, None, torch.device("cpu"), getattr(torch, precision),
                         modules=fam.placeholder_modules(getattr(torch, precision)))
    keys = _checkpoint_keys(fam, graphs)
    with staged_folder(out, ".export-") as tmp:
        specs = fam.graph_specs(kv_dtype)
        wrappers, dummies = fam.export_wrappers(graphs, kv_dtype), fam.dummy_inputs(kv_dtype)
        weights = {}
        for i, name in enumerate(specs, start=1):
            log(f"[2/4] exporting graph {name} ({i}/{len(specs)}), weights streamed from the checkpoint")
            weights[name] = _export_graph(wrappers[name], dummies[name], specs[name], tmp / f"{name}.onnx", opset, keys, source)
        del graphs, wrappers
        ckpt.tokenizer.save(str(tmp / "tokenizer.json"))
        manifest = {
            "family": ckpt.spec.family,
            "spec": ckpt.spec.to_dict(),
            "precision": precision,
            "kv_dtype": kv_dtype,
            "graphs": {n: {"file": f"{n}.onnx", **g.io()} for n, g in specs.items()},
            "tokenizer": "tokenizer.json",
            "chat_text": ckpt.chat_text,
            "templates": ckpt.templates.to_dict(),
            "origin": getattr(ckpt, "origin", {}),
            "exporter": {**_versions(), "opset": opset, "command": " ".join(sys.argv), "weights": weights},
        }
        write_manifest(tmp, manifest)
        if validate_export and "bfloat16" in (precision, kv_dtype):
            manifest["validation"] = {"skipped": BF16_NOT_VALIDATED}
            log(f"[3/4] validation skipped: {BF16_NOT_VALIDATED}")
            write_manifest(tmp, manifest)
        elif validate_export and _float_bytes(ckpt.spec) > FULL_VALIDATION_BYTES and not isinstance(ckpt, _Subset):
            log("[3/4] validating against the PyTorch reference")
            manifest["validation"] = validate_subset(ckpt, source, out, dtype, kv_dtype, opset, log)
            write_manifest(tmp, manifest)
        elif validate_export:
            log("[3/4] validating against the PyTorch reference")
            state = {key: source.get(key) for key in fam.expected_shapes()}
            manifest["validation"] = validate(tmp, ckpt, state, precision, log)
            del state
            write_manifest(tmp, manifest)
        log(f"[4/4] writing {out}")
    size = sum(p.stat().st_size for p in out.iterdir())
    log(f"exported {out} ({size / 1e6:.1f} MB, {precision}) in {time.perf_counter() - start:.1f}s")
    return out


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Export an EditReward checkpoint to ONNX graphs.")
    parser.add_argument("--ckpt", required=True, help="hub id (TIGER-Lab/EditReward, ...) or checkpoint folder")
    parser.add_argument("--out", required=True, help="exported model folder to write")
    parser.add_argument("--base", help="base model hub id or folder (default: from the checkpoint's yaml)")
    parser.add_argument("--prompts-from", help="local clone of the upstream repository (default: download pinned files)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--no-validate", action="store_true", help="skip the self-check against PyTorch")
    args = parser.parse_args(argv)
    export_onnx(args.ckpt, args.out, base=args.base, prompts_from=args.prompts_from, dtype=args.dtype,
                opset=args.opset, validate_export=not args.no_validate)
    return 0
