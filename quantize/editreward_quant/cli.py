"""python quantize/quantize.py (--ckpt CKPT | --model-dir DIR) --scheme SCHEME --out DIR
[--calib FILE] [--calib-size N] [--option key=value ...] [--include-vision] [--device cpu|cuda]"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from editreward_rt.errors import EditRewardError

from .schemes import SCHEMES, QuantizeError, check_available, make_scheme


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise QuantizeError(f"--option takes key=value, got {pair!r}")
        out[key.replace("-", "_")] = value
    return out


def _exported_quantizer(scheme, args, out: Path):
    """Exported float32 folder -> quantized folder, for the schemes that rewrite ONNX graphs."""
    if scheme.target == "trt":
        from editreward_export.trt_quant import quantize_for_trt

        return lambda model_dir: quantize_for_trt(model_dir, scheme, out, calib=args.calib, calib_size=args.calib_size)
    from .ort_schemes import quantize_exported

    return lambda model_dir: quantize_exported(model_dir, scheme, out)


def run(args) -> Path:
    options = _options(args.option or [])
    if args.include_vision:
        options["include_vision"] = True
    scheme = make_scheme(args.scheme, options)
    check_available(scheme, args.device)
    out = Path(args.out)
    if scheme.target in ("onnx", "trt"):
        quantize = _exported_quantizer(scheme, args, out)
        if args.model_dir:
            return quantize(Path(args.model_dir))
        from editreward_export.onnx_export import export_onnx

        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
            return quantize(export_onnx(args.ckpt, Path(tmp) / "fp32", base=args.base, prompts_from=args.prompts_from))
    if args.model_dir and not args.ckpt:
        raise QuantizeError(f"{scheme.name} quantizes a checkpoint: pass --ckpt, not --model-dir")
    if scheme.target == "torch" and scheme.name.startswith("bnb-"):
        from .bnb_schemes import quantize_checkpoint_bnb

        return quantize_checkpoint_bnb(args.ckpt, scheme, out, base=args.base, prompts_from=args.prompts_from,
                                       device=args.device)
    if scheme.name == "gptq-int4":
        from .gptq_scheme import quantize_checkpoint_gptq

        return quantize_checkpoint_gptq(args.ckpt, scheme, out, base=args.base, prompts_from=args.prompts_from,
                                        calib=args.calib, calib_size=args.calib_size, device=args.device)
    raise QuantizeError(f"{scheme.name} is defined but its quantizer is not part of this build; "
                        "see the README's quantization table for the schemes that run here")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint: hub id or folder")
    source.add_argument("--model-dir", help="exported float32 model folder (ONNX and TensorRT schemes)")
    parser.add_argument("--scheme", required=True, choices=sorted(SCHEMES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--base")
    parser.add_argument("--prompts-from")
    parser.add_argument("--calib", help="JSONL of {instruction, source, edited} for calibrated schemes")
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--option", action="append", help="scheme option key=value (repeatable), e.g. block_size=128")
    parser.add_argument("--include-vision", action="store_true", help="quantize the vision tower too")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        run(args)
    except EditRewardError as exc:
        print(f"quantize: {exc.kind}: {exc}", file=sys.stderr)
        return 2
    return 0
