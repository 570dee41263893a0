"""Decoder weight bytes of the ONNX Runtime schemes at the 7B's real shapes, measured, on a CPU.

A full 7B float32 decoder graph is 28 GB, more than this kind of machine holds, but every decoder
layer has the same shapes. So this builds a random-weight model with the 7B's text widths
(hidden 3584, 28 query / 4 key-value heads, MLP 18944, the full 151,666-row embedding) and ONE
decoder layer, exports its decoder to ONNX (3.1 GB of float32: the external-data path runs for
real), quantizes it with each ONNX Runtime scheme, splits the stored bytes into embedding and
layer, and reports both the measured graph and ``embedding + 28 x layer`` against the 7B's decoder
in bf16. The vision tower is the tiny fixture's (only its output width matters here).

    python benchmarks/sizes_7b.py --workdir /tmp/sizes-7b [--scheme ort-int8 ...]

About 12 GB of RAM, 10 GB of disk and a quarter of an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from editreward_rt.manifest import MANIFEST

DEFAULT_SCHEMES = ("ort-int8", "ort-int8:mode=weight_only", "ort-int4", "ort-int4:block_size=128",
                   "ort-int4:embedding_bits=4", "ort-int4:block_size=128,embedding_bits=4")


def one_layer_7b(workdir: Path):
    import torch
    from editreward_rt.checkpoint import open_checkpoint
    from editreward_rt.families import DEFAULT_FAMILY, family

    from editreward_bench.workload import InMemoryCheckpoint

    fam = family(DEFAULT_FAMILY)
    paths = fam.write_fixture(workdir / "tiny", size="tiny")
    base = open_checkpoint(paths.checkpoint, prompts_from=paths.prompts)
    spec = fam.PUBLISHED.full_text_spec(base.spec, layers=1)
    return InMemoryCheckpoint(base, spec, base.config, fam.PUBLISHED.random_state(spec, "cpu", torch.float32)), spec


def split_bytes(graph_path: Path) -> dict:
    """Stored bytes of the embedding's tensors and of everything else."""
    import onnx
    from editreward_quant.ort_schemes import _initializer_bytes
    from editreward_rt.families import DEFAULT_FAMILY, family

    is_embedding = family(DEFAULT_FAMILY).is_embedding
    parts = {"embedding": 0, "rest": 0}
    for tensor in onnx.load(str(graph_path), load_external_data=False).graph.initializer:
        parts["embedding" if is_embedding(tensor.name) else "rest"] += _initializer_bytes(tensor)
    return parts


def parse_scheme(text: str):
    from editreward_rt.schemes import make_scheme

    name, _, options = text.partition(":")
    return make_scheme(name, dict(item.split("=", 1) for item in options.split(",") if item))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--scheme", action="append", help="NAME[:key=value,...]; default: " + " ".join(DEFAULT_SCHEMES))
    parser.add_argument("--out", default="results/sizes-7b.json")
    args = parser.parse_args(argv)

    import gc

    from editreward_export.onnx_export import export_onnx
    from editreward_quant.ort_schemes import _quantize_graph
    from editreward_quant.sizes import decoder_parameters
    from editreward_rt.families import family

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, spec = one_layer_7b(work)
    published = family(spec.family).PUBLISHED
    layers = published.FULL_TEXT["num_layers"]
    full = published.full_text_spec(spec, layers=layers)
    params_1, params_28 = decoder_parameters(spec), decoder_parameters(full)
    export = work / "onnx-fp32"
    if not (export / MANIFEST).is_file():
        t0 = time.perf_counter()
        export_onnx(ckpt, export, validate_export=False, log=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"exported in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    del ckpt
    gc.collect()
    rows = []
    fp32 = split_bytes(export / "decoder.onnx")
    rows.append({"scheme": "float32 export", **fp32})
    for text in args.scheme or DEFAULT_SCHEMES:
        scheme = parse_scheme(text)
        folder = work / text.replace(":", "_").replace(",", "_").replace("=", "-")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        t0 = time.perf_counter()
        info = _quantize_graph(export / "decoder.onnx", folder / "decoder.onnx", scheme)
        parts = split_bytes(folder / "decoder.onnx")
        files = sorted(p.name for p in folder.iterdir())
        rows.append({"scheme": text, **parts, "files": files, "embedding_tables": info["tables"],
                     "quantize_s": time.perf_counter() - t0})
        shutil.rmtree(folder)
        gc.collect()
    for row in rows:
        measured = row["embedding"] + row["rest"]
        projected = row["embedding"] + layers * row["rest"]  # the final norm (7 KB) counted 28 times: negligible
        row.update(measured_bf16_ratio=measured / (2 * params_1), projected_7b_bf16_ratio=projected / (2 * params_28),
                   projected_7b_gb=projected / 1e9)
        print(f"{row['scheme']:<42} embedding {row['embedding'] / 1e6:9.1f} MB  layer {row['rest'] / 1e6:8.1f} MB  "
              f"1-layer graph {row['measured_bf16_ratio']:.3f} x bf16  7B decoder {row['projected_7b_bf16_ratio']:.3f} x bf16 "
              f"({row['projected_7b_gb']:.2f} GB)")
    doc = {"schema": "editreward-sizes-7b/1", "decoder_parameters": {"one_layer": params_1, "7b": params_28},
           "vocab_rows": spec.text.vocab_size, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
