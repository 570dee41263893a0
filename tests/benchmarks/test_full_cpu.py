"""benchmarks/full_cpu.py on the tiny export: a ranked set and one triple alone agree, and the
stage split and memory are reported (the full-size run is a developer's benchmark)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, random_image
from editreward_bench.full_cpu import floor, main


def test_full_cpu_reports_seconds_stages_and_memory(tiny_onnx, tmp_path):
    for i in range(3):
        random_image(40 + i, 64, 80).save(tmp_path / f"{i}.png")
    rows = [{"instruction": "add a hat", "source": "0.png", "edited": f"{e}.png"} for e in (1, 2)]
    (tmp_path / "triples.json").write_text(json.dumps(rows))
    assert main(["--model", str(tiny_onnx), "--examples", str(tmp_path), "--threads", "1", "--no-peaks",
                 "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["triples"] == 2 and result["max_batch"] == 1 and result["max_mu_gap_ranked_vs_single"] < 1e-3
    assert set(result["ranked"]["stages_s_per_triple"]) == {"vision", "prefix", "suffixes", "heads"}
    assert result["peak_rss_gib"] > 0 and len(result["prompt_tokens"]) == 2
    # The anonymous part of the resident set, sampled from the load on: the interpreter and the
    # session at least (over 20 MiB), never more than the whole resident set.
    assert 0.02 < result["peak_anon_gib"] <= result["peak_rss_gib"] and result["file_backed_at_end_gib"] >= 0
    flops = result["flops_per_triple"]
    assert 0 < flops["decoder_weights"] < flops["decoder"] and flops["vision"] > 0 and flops["heads"] > 0
    assert result["engine"] and "floor" not in result  # --no-peaks: no peak, no floor


def test_floor_divides_each_stage_by_the_peak():
    """1 GFLOP of vision in 0.5 s and 6 of decoder (4 of them weight GEMMs) in 2 s, at a 10 GFLOP/s
    peak: the floor is 0.7 s for the 7 GFLOPs; vision ran at 20% of peak, the weights at 20%."""
    flops = {"vision": 1e9, "decoder": 6e9, "decoder_weights": 4e9, "heads": 0.0}
    out = floor(flops, {"vision": 0.5, "prefix": 0.5, "suffixes": 1.5, "heads": 0.0}, 3.5, ("f32 kernel", 10.0))
    assert out == {"kernel": "f32 kernel", "peak_gflops": 10.0, "floor_s_per_triple": 0.7, "of_peak": 0.2,
                   "vision_of_peak": 0.2, "decoder_weights_of_peak": 0.2}
    assert floor(flops, {"vision": 1, "prefix": 1, "suffixes": 1, "heads": 0}, 3, None)["kernel"] is None


def _cgroup_writable() -> bool:
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.is_file() and "memory" in v2.read_text().split():
        return os.access("/sys/fs/cgroup", os.W_OK)
    return os.access("/sys/fs/cgroup/memory", os.W_OK)


@pytest.mark.skipif(not _cgroup_writable(), reason="needs a writable memory cgroup (root and a memory controller)")
def test_memory_cap_lets_what_fits_run_and_kills_what_does_not(tmp_path):
    """benchmarks/memory_cap.sh, which full_size.sh scores the 7B under: a process that allocates
    0.2 GB of its own runs under a 1 GB cap; one that allocates 2 GB is killed (137)."""
    def run(gb_allocated: float):
        code = f"b = bytearray({int(gb_allocated * 1e9)}); b[::4096] = b'x' * len(b[::4096]); print('done')"
        return subprocess.run(["bash", str(ROOT / "benchmarks" / "memory_cap.sh"), "1", str(tmp_path), sys.executable,
                               "-c", code], capture_output=True, text=True, timeout=120)

    fits = run(0.2)
    assert fits.returncode == 0 and fits.stdout.strip() == "done", fits.stderr
    assert "memory_cap: cap 1 GB" in fits.stderr
    over = run(2.0)
    assert over.returncode == 137 and "done" not in over.stdout, over.stderr


def test_memory_cap_refuses_a_cap_it_cannot_apply(tmp_path):
    """A cap that is not a whole number of GB is refused (exit 3) before the command runs: a
    command that ran uncapped would report a bound it never had."""
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "memory_cap.sh"), "1.5", str(tmp_path), sys.executable,
                           "-c", "print('ran')"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "ran" not in proc.stdout and "whole number of GB" in proc.stderr
