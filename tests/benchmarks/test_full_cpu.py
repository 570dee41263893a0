"""benchmarks/full_cpu.py on the tiny export: a ranked set and one triple alone agree, and the
stage split and memory are reported (the full-size run is a developer's benchmark)."""

from __future__ import annotations

import json

from conftest import random_image
from editreward_bench.full_cpu import main


def test_full_cpu_reports_seconds_stages_and_memory(tiny_onnx, tmp_path):
    for i in range(3):
        random_image(40 + i, 64, 80).save(tmp_path / f"{i}.png")
    rows = [{"instruction": "add a hat", "source": "0.png", "edited": f"{e}.png"} for e in (1, 2)]
    (tmp_path / "triples.json").write_text(json.dumps(rows))
    assert main(["--model", str(tiny_onnx), "--examples", str(tmp_path), "--threads", "1", "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["triples"] == 2 and result["max_batch"] == 1 and result["max_mu_gap_ranked_vs_single"] < 1e-3
    assert set(result["ranked"]["stages_s_per_triple"]) == {"vision", "prefix", "suffixes", "heads"}
    assert result["peak_rss_gib"] > 0 and len(result["prompt_tokens"]) == 2
