"""python benchmarks/full_cpu.py --model DIR --examples DIR: the seconds per triple of a
full-size exported model (the float export, ``ort-int4`` / ``ort-int8`` / ``ov-int8`` / ``ov-int4``
folders of the 7B) on this CPU, on the engine the folder loads on by default (or ``--backend``,
``--precision``), with the fast path's stage split and the process's peak resident memory.
Against the FLOP floor: the matrix-multiply FLOPs of each stage (``FLOPS``, counted from the
tokens actually scored) and, measured in the same run, the GEMM peak of the kernel the folder's
matrix products run (``cpu_speed.gemm_peak``; ``--no-peaks`` skips it): the seconds per triple the
peak allows, and the decoder's weight GEMMs as a share of that peak (their FLOPs over the
decoder's whole time, attention and the rest included: a lower bound).

The triples of ``DIR/triples.json`` (the real photographs of ``../shared/fixtures``: one source,
three edits) are scored in one process ranked together (``Scorer.rank``: the source image and
the prompt prefix it starts are encoded once, also at one triple per call), then the first alone
(a 7B triple takes a minute or more on a desktop CPU, so only one). The first triple's two scores
must agree (within the scheme's tolerance for a quantized folder); the stage split (vision tower,
shared prefix, per-rubric suffixes, heads) is per triple.

Memory, from the load on: the peak resident set, and apart from it the peak of the process's
anonymous memory (``RssAnon``, sampled): what the process needs. (The GEMM peaks are measured
after the model is freed: what they allocate stays with the process and is not the model's.) The rest
of the resident set is file-backed, the memory-mapped weights (an OpenVINO IR's ``.bin``, ONNX
external data): clean pages the kernel takes back under pressure, so a memory limit squeezes them
first (``full_size.sh`` also scores the quantized 7B inside a memory cgroup of its bound).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
from editreward_rt.cli import backend_option


def _scored_with_stages(scorer, call, n: int) -> tuple[list, float, dict]:
    """``call()``'s scores, its seconds, and the pipeline's stage seconds per triple (``n`` triples)."""
    pipeline = scorer.backend.pipeline
    before = pipeline.times.as_dict()
    start = time.perf_counter()
    scores = call()
    seconds = time.perf_counter() - start
    stages = {k: round((v - before[k]) / n, 2) for k, v in pipeline.times.as_dict().items()}
    return scores, seconds, stages


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status (``RssAnon``, ``RssFile``), in KiB; 0 where Linux has none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def floor(flops: dict, stages: dict, seconds: float, peak) -> dict:
    """The run against the peak of the kernel it runs: the seconds per triple that peak allows
    (every counted FLOP at it), each stage's share of it, and the decoder's weight GEMMs' rate."""
    if peak is None:
        return {"kernel": None, "reason": "the kernel this folder runs was not measured here"}
    kernel, gflops = peak
    total = flops["vision"] + flops["decoder"] + flops["heads"]
    decoder_s = stages["prefix"] + stages["suffixes"]
    return {"kernel": kernel, "peak_gflops": round(gflops, 1), "floor_s_per_triple": round(total / gflops / 1e9, 2),
            "of_peak": round(total / seconds / gflops / 1e9, 3),
            "vision_of_peak": round(flops["vision"] / max(stages["vision"], 1e-9) / gflops / 1e9, 3),
            "decoder_weights_of_peak": round(flops["decoder_weights"] / max(decoder_s, 1e-9) / gflops / 1e9, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model folder (ort-int4 or ort-int8 of the 7B)")
    parser.add_argument("--examples", required=True, help="folder with triples.json and its images")
    parser.add_argument("--threads", type=int, help="the engine's threads (default: all cores)")
    parser.add_argument("--backend", help="default: the engine the folder loads on with no --backend")
    parser.add_argument("--precision", help="fp32, bf16 or auto (default: the default, auto or $EDITREWARD_PRECISION)")
    parser.add_argument("--no-peaks", action="store_true", help="skip the GEMM peaks (and so the floor)")
    parser.add_argument("--backend-option", type=backend_option, action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the backend's load, repeatable (e.g. call_tokens=0 for openvino)")
    parser.add_argument("--out", help="JSON results file")
    args = parser.parse_args(argv)

    from editreward_rt import Scorer
    from editreward_rt.families import family
    from editreward_rt.hardware import usable_cpus
    from editreward_rt.tolerances import tolerance
    from PIL import Image

    from .cpu_speed import FlopCounter, gemm_peak, peak_of
    from .isolated import PeakSampler
    from .common import tolerance_key

    threads = args.threads or usable_cpus()

    folder = Path(args.examples)
    rows = json.loads((folder / "triples.json").read_text())
    images = {name: np.asarray(Image.open(folder / name).convert("RGB")) for r in rows for name in (r["source"], r["edited"])}
    triples = [(r["instruction"], images[r["source"]], images[r["edited"]]) for r in rows]
    anon = PeakSampler(lambda: status_kib("RssAnon") / 2**20)  # GiB
    start = time.perf_counter()
    scorer = Scorer.load(args.model, backend=args.backend, precision=args.precision, threads=threads,
                         options=dict(args.backend_option))  # the default triples per call
    load_s = time.perf_counter() - start
    counter = scorer.backend.pipeline.graphs = FlopCounter(scorer.backend.pipeline.graphs, family(scorer.spec.family).FLOPS)
    prompt_tokens = [len(p.ids) for p in scorer.prepare(*triples[0]).prompts]
    instruction, source = triples[0][:2]
    if any(t[:2] != (instruction, source) for t in triples):
        raise SystemExit("the examples must be edits of one source under one instruction (a ranked set)")
    ranked, ranked_s, ranked_stages = _scored_with_stages(
        scorer, lambda: scorer.rank(instruction, source, [t[2] for t in triples]), len(triples))
    flops = {k: v / len(triples) for k, v in counter.take().items()}
    single = [_scored_with_stages(scorer, lambda: [scorer.score(*triples[0])], 1)]
    gap = abs(ranked[0].mu - single[0][0][0].mu)
    anon.stop()
    quantization = scorer.backend.model.manifest.get("quantization") or {}
    result = {
        "model": str(args.model), "quantization": quantization.get("scheme"), "engine": scorer.engine,
        "backend": scorer.description,
        "cpu": platform.processor() or platform.machine(), "threads": threads, "max_batch": scorer.max_batch,
        "load_s": round(load_s, 1),
        "prompt_tokens": prompt_tokens, "triples": len(triples),
        "ranked": {"s_per_triple": round(ranked_s / len(triples), 2), "stages_s_per_triple": ranked_stages},
        "alone": {"s_per_triple": round(sum(s[1] for s in single) / len(single), 2),
                       "stages_s_per_triple": {k: round(np.mean([s[2][k] for s in single]), 2) for k in ranked_stages}},
        "scores": [{"mu": round(s.mu, 4), "sigma": round(s.sigma, 4)} for s in ranked],
        "max_mu_gap_ranked_vs_single": gap,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_anon_gib": round(anon.peak, 2),
        "file_backed_at_end_gib": round(status_kib("RssFile") / 2**20, 2),
        "flops_per_triple": flops,
    }
    description, bound = scorer.description, tolerance(*tolerance_key(scorer.description)).mu
    if not args.no_peaks:  # after the model is gone: what the peaks allocate stays, and is not the model's
        del scorer, counter
        gc.collect()
        peaks = gemm_peak(threads, reps=3)
        result["floor"] = floor(flops, ranked_stages, result["ranked"]["s_per_triple"],
                                peak_of({"backend": description, "quant_config": quantization.get("config")}, peaks))
        result["gemm_peaks"] = peaks
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    # Dynamic int8 quantizes each call's activations with one scale, so a call of another shape
    # (a source's prefix decoded on its own) moves the score a little: within the scheme's tolerance.
    return 0 if gap <= bound else 1
