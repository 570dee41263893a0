"""python benchmarks/quant_report.py: what each quantization scheme costs in fidelity and buys in
size, on a generated fixture, every number from this one run.

Per scheme variant (``NAME`` or ``NAME:key=value,key=value``): it quantizes the fixture, then
reports the decoder's hidden-state SNR at <|Reward|> against the float32 fast path, the floor
``editreward_rt.tolerances.hidden_snr_floor_db`` sets for it, pairwise agreement with the PyTorch
reference when ranking 8 edits of one source (28 pairs), the largest |d mu| there, and the
decoder's weight bytes against bf16 (``editreward_quant.sizes``). Schemes whose library lives in
an environment of its own (gptq-int4, trt-*) run in that environment.

    python benchmarks/quant_report.py --fixture small --workdir results/work --out results/quant-small.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from .common import ensure_fixture, synthetic_images

DEFAULT = ("ort-int8", "ort-int8:weight_type=uint8", "ort-int8:mode=weight_only", "ort-int8:embedding_bits=0",
           "ort-int4", "ort-int4:block_size=32", "ort-int4:block_size=128", "ort-int4:embedding_bits=4", "bnb-int8", "bnb-nf4",
           "bnb-nf4:embedding_bits=4")


def parse(variant: str) -> tuple[str, dict]:
    name, _, options = variant.partition(":")
    return name, dict(o.split("=", 1) for o in options.split(",") if o)


def quantize(variant: str, paths: dict, out: Path) -> Path:
    from editreward_quant.cli import main as quantize_main
    from editreward_rt.schemes import SCHEMES

    name, options = parse(variant)
    args = ["--scheme", name, "--out", str(out)] + [f"--option={k}={v}" for k, v in options.items()]
    if SCHEMES[name].target == "torch":
        args += ["--ckpt", paths["ckpt"], "--prompts-from", paths["prompts_from"]]
    else:
        args += ["--model-dir", paths["onnx"]]
    if quantize_main(args) != 0:
        raise SystemExit(f"quantizing {variant} failed")
    return out


def hidden_states(scorer, triples) -> np.ndarray:
    """The decoder states the heads read, captured on the way in."""
    graphs, seen = scorer.backend.graphs, []
    original = graphs.heads
    graphs.heads = lambda h: (seen.append(np.array(h)), original(h))[1]
    try:
        scorer.score_batch(triples)
    finally:
        graphs.heads = original
    return np.concatenate(seen)


def measure(variant: str, folder: Path, fast, reference, triples, ranking) -> dict:
    from editreward_quant.sizes import decoder_weight_bytes
    from editreward_rt import Scorer
    from editreward_rt.errors import BackendError
    from editreward_rt.tolerances import hidden_snr_floor_db, snr_db

    try:
        scorer = Scorer.load(folder)
    except BackendError:  # some Q/DQ graphs (trt-fp8) load on ONNX Runtime's CPU provider unoptimised only
        from editreward_rt.backends.ort_backend import OrtBackend

        backend = OrtBackend(folder, optimization="disable")
        scorer = Scorer(backend, backend.model)
    quantization = scorer.backend.model.manifest["quantization"]
    snr = snr_db(hidden_states(fast, triples), hidden_states(scorer, triples))
    instruction, source, edits = ranking
    want = np.array([s.mu for s in reference.rank(instruction, source, edits)])
    got = np.array([s.mu for s in scorer.rank(instruction, source, edits)])
    pairs = list(itertools.combinations(range(len(edits)), 2))
    agree = [np.sign(got[i] - got[j]) == np.sign(want[i] - want[j]) for i, j in pairs]
    return {"variant": variant, "scheme": quantization["scheme"], "config": quantization["config"],
            "hidden_snr_db": round(snr, 2), "floor_db": round(hidden_snr_floor_db(quantization, scorer.spec), 2),
            "agreement": round(float(np.mean(agree)), 3), "pairs": len(pairs),
            "max_abs_d_mu": round(float(np.abs(got - want).max()), 4),
            "bf16_ratio": round(decoder_weight_bytes(folder)["bf16_ratio"], 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", choices=("tiny", "small"), default="small")
    parser.add_argument("--workdir", default="results/work")
    parser.add_argument("--scheme", action="append", help=f"NAME[:key=value,...] (repeatable; default: {', '.join(DEFAULT)})")
    parser.add_argument("--out", default="results/quant.json")
    args = parser.parse_args(argv)

    from editreward_rt import Scorer

    work = Path(args.workdir)
    paths = ensure_fixture(work, args.fixture)
    fast = Scorer.load(paths["ckpt"], backend="torch", mode="fast", prompts_from=paths["prompts_from"], dtype="float32")
    reference = Scorer.load(paths["ckpt"], backend="torch", mode="reference", prompts_from=paths["prompts_from"],
                            dtype="float32")
    images = synthetic_images(15, seed=7)
    triples = [("Add a green bowl", images[0], e) for e in images[1:4]] + [("Make it snow", images[4], images[5])]
    ranking = ("Add a green bowl", images[6], images[7:15])
    rows = []
    for variant in args.scheme or DEFAULT:
        folder = quantize(variant, paths, work / f"quant-{args.fixture}-{variant.replace(':', '_').replace(',', '_')}")
        rows.append(measure(variant, folder, fast, reference, triples, ranking))
        r = rows[-1]
        print(f"{variant:<34} SNR {r['hidden_snr_db']:6.2f} dB (floor {r['floor_db']:6.2f})  agreement "
              f"{r['agreement']:.3f} of {r['pairs']}  max|d mu| {r['max_abs_d_mu']:.3f}  {r['bf16_ratio']:.3f} x bf16",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"schema": "editreward-quant-report/1", "fixture": args.fixture,
                                          "command": " ".join(["benchmarks/quant_report.py", *(argv or sys.argv[1:])]),
                                          "rows": rows}, indent=1))
    return 0
