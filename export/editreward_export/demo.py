"""``editreward demo``: random-weight checkpoint -> ONNX export -> one scored triple, on the CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WARNING = ("NOTE: this demo model has RANDOM weights (generated locally, no download). "
           "Its scores show the pipeline working, not edit quality.")


def example_triple(folder: Path) -> tuple[str, Path, Path]:
    """A drawn scene and an edit of it: a green bowl added on the branch."""
    folder.mkdir(parents=True, exist_ok=True)
    source = Image.new("RGB", (640, 480), (135, 190, 235))
    draw = ImageDraw.Draw(source)
    draw.rectangle((0, 380, 640, 480), fill=(90, 150, 70))
    draw.line((40, 200, 600, 240), fill=(110, 70, 40), width=18)
    draw.ellipse((480, 40, 560, 120), fill=(250, 220, 90))
    edited = source.copy()
    ImageDraw.Draw(edited).pieslice((280, 150, 380, 250), 0, 180, fill=(40, 160, 60))
    src, edit = folder / "source.png", folder / "edited.png"
    source.save(src)
    edited.save(edit)
    return "Add a green bowl on the branch", src, edit


def run_demo(workdir: Path, size: str = "small", log=print) -> dict:
    from editreward_rt.families import DEFAULT_FAMILY, family
    from editreward_rt.scorer import Scorer

    from .onnx_export import export_onnx

    log(WARNING)
    fixture = family(DEFAULT_FAMILY).write_fixture(workdir / f"checkpoint-{size}", size=size, seed=0)
    exported = workdir / f"onnx-{size}"
    export_onnx(str(fixture.checkpoint), exported, prompts_from=str(fixture.prompts), log=log)
    instruction, source, edited = example_triple(workdir / "example")
    t0 = time.perf_counter()
    scorer = Scorer.load(exported)  # the default: the fastest CPU engine installed, at precision auto
    load_s = time.perf_counter() - t0
    scorer.score(instruction, source, edited)  # warm-up: first runs allocate
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        score = scorer.score(instruction, source, edited)
        runs.append(time.perf_counter() - t0)
    result = {**score.to_dict(), "instruction": instruction, "source": str(source), "edited": str(edited),
              "backend": scorer.engine, "engine": scorer.description, "load_seconds": round(load_s, 3),
              "latency_ms_median_of_3": round(1000 * float(np.median(runs)), 1)}
    log(json.dumps(result, indent=1))
    log(WARNING)
    return result
