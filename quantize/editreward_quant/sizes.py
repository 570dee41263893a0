"""Weights on disk of a model folder's decoder, against the same parameters in bf16: the one
size figure every scheme reports, whatever it writes (an ONNX graph, or a torch folder).

The decoder is the text model: token embedding, layers, final norm (Qwen2.5-VL-7B: 7.07B
parameters, 544M of them the embedding). Bytes are counted as stored: quantized codes, their
scales and zero points, and whatever stays float (norms, biases; float32 on a CPU export).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from editreward_rt.families import family_for, family_of_manifest
from editreward_rt.manifest import MANIFEST, read_manifest


def decoder_parameters(spec) -> int:
    return family_for(spec).decoder_parameters()


def decoder_weight_bytes(folder) -> dict:
    """{"bytes", "parameters", "bf16_ratio", "format"} for an exported ONNX folder (its decoder
    graph) or a quantized torch folder (its ``decoder.*`` tensors)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    params = decoder_parameters(family_of_manifest(manifest).spec_from_dict(manifest["spec"]))
    if manifest.get("graphs", {}).get("decoder"):
        from .ort_schemes import weight_bytes

        stored, fmt = weight_bytes(folder), "onnx"
    else:
        from safetensors import safe_open

        with safe_open(str(folder / manifest["weights"]), "np") as f:
            stored = sum(_nbytes(f.get_slice(k)) for k in f.keys() if k.startswith("decoder."))
        fmt = "torch"
    quant = manifest.get("quantization") or {}
    return {"scheme": quant.get("scheme", manifest.get("precision")), "format": fmt, "bytes": stored,
            "parameters": params, "bf16_ratio": stored / (2 * params)}


def _nbytes(tensor_slice) -> int:
    dtype = tensor_slice.get_dtype()
    size = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}[dtype]
    return int(np.prod(tensor_slice.get_shape(), dtype=np.int64)) * size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="decoder weight bytes of model folders, relative to bf16")
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for folder in args.folders:
        if not (Path(folder) / MANIFEST).is_file():
            print(f"{folder}: not a model folder", file=sys.stderr)
            return 2
        row = {"folder": folder, **decoder_weight_bytes(folder)}
        rows.append(row)
        print(f"{folder:<48} {row['scheme'] or '-':<14} {row['bytes'] / 2**20:9.2f} MiB  {row['bf16_ratio']:.3f} x bf16")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
