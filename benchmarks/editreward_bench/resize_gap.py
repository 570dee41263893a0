"""python benchmarks/resize_gap.py --examples DIR: how far the differentiable reward's bilinear
resize moves the score from the reference's PIL bicubic resize, on real photographs.

For each triple of ``DIR/triples.json`` ({instruction, source, edited}, paths relative to DIR) it
scores the images with ``Scorer.score`` (PIL bicubic to the target size) and with
``DifferentiableReward`` (bilinear ``F.interpolate`` to the same size), both float32 on the same
model, and reports |d mu| and |d log_sigma|. Without ``--ckpt`` the model is the generated
``--fixture`` (random weights): the gap then measures how much the two resizes change what the
model sees, not a trained model's sensitivity to it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .common import ensure_fixture


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", required=True, help="folder with triples.json and its images")
    parser.add_argument("--ckpt", help="checkpoint (default: the generated --fixture)")
    parser.add_argument("--prompts-from")
    parser.add_argument("--fixture", choices=("tiny", "small"), default="small")
    parser.add_argument("--workdir", default="results/work")
    parser.add_argument("--out", default="results/resize-gap.json")
    args = parser.parse_args(argv)

    import torch
    from editreward_rt.differentiable import DifferentiableReward
    from PIL import Image

    if args.ckpt is None:
        paths = ensure_fixture(Path(args.workdir), args.fixture, export=False)
        args.ckpt, args.prompts_from = paths["ckpt"], args.prompts_from or paths["prompts_from"]
    folder = Path(args.examples)
    items = json.loads((folder / "triples.json").read_text(encoding="utf-8"))
    tensor = lambda path: torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    rows, summary = [], {}
    for mode in ("bilinear", "bicubic"):  # upstream's differentiable resize, and the antialiased option
        reward = DifferentiableReward.load(args.ckpt, prompts_from=args.prompts_from, dtype="float32", resize=mode)
        for item in items:
            src, edit = folder / item["source"], folder / item["edited"]
            reference = reward.scorer.score(item["instruction"], src, edit)
            with torch.no_grad():
                got = reward([item["instruction"]], tensor(src), tensor(edit))[0]
            rows.append({"resize": mode, "source": item["source"], "edited": item["edited"],
                         "size": list(Image.open(edit).size), "mu_reference": reference.mu, "mu": float(got[0]),
                         "abs_d_mu": abs(float(got[0]) - reference.mu),
                         "abs_d_log_sigma": abs(float(got[1]) - reference.log_sigma)})
            r = rows[-1]
            print(f"{mode:<9} {r['edited']:<20} {r['size']}  mu reference (PIL bicubic) {r['mu_reference']:+.5f}  "
                  f"differentiable {r['mu']:+.5f}  |d mu| {r['abs_d_mu']:.5f}  |d log_sigma| {r['abs_d_log_sigma']:.5f}",
                  flush=True)
        gaps = [r["abs_d_mu"] for r in rows if r["resize"] == mode]
        summary[mode] = {"max_abs_d_mu": max(gaps), "mean_abs_d_mu": float(np.mean(gaps))}
        print(f"{mode}: max |d mu| {max(gaps):.5f}, mean {np.mean(gaps):.5f} over {len(gaps)} triples")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"schema": "editreward-resize-gap/2", "ckpt": str(args.ckpt), "rows": rows,
                                          "summary": summary}, indent=1))
    return 0
