"""python quantize/quantize.py (--ckpt CKPT | --model-dir DIR) --scheme SCHEME --out DIR
[--calib FILE] [--calib-size N] [--option key=value ...] [--include-vision] [--device cpu|cuda]"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from editreward_rt.errors import EditRewardError
from editreward_rt.schemes import SCHEMES, QuantizeError, QuantizeRequest, check_available, entry, make_scheme


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise QuantizeError(f"--option takes key=value, got {pair!r}")
        out[key.replace("-", "_")] = value
    return out


def run(args) -> Path:
    options = _options(args.option or [])
    if args.include_vision:
        options["include_vision"] = True
    scheme = make_scheme(args.scheme, options)
    check_available(scheme)
    out = Path(args.out)
    quantize = entry(scheme.name).function("quantize")
    request = lambda source: QuantizeRequest(str(source), scheme, out, args.base, args.prompts_from, args.calib,
                                             args.calib_size, args.device)
    if scheme.target == "torch":
        if not args.ckpt:
            raise QuantizeError(f"{scheme.name} quantizes a checkpoint: pass --ckpt, not --model-dir")
        return quantize(request(args.ckpt))
    if args.model_dir:
        return quantize(request(args.model_dir))
    # A checkpoint for a graph scheme: export it to float32 ONNX first, into a folder removed afterwards.
    from editreward_export.onnx_export import export_onnx

    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        return quantize(request(export_onnx(args.ckpt, Path(tmp) / "fp32", base=args.base, prompts_from=args.prompts_from)))


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
