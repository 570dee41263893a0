"""The RL benchmark on the tiny fixture (parity before timing, every method's row), its
``editreward bench rl`` subcommand, and its rows in the GPU matrix's CPU dry run."""

from __future__ import annotations

import json

from editreward_bench import gpu_matrix, rl_bench
from editreward_bench.common import validate_document
from editreward_rt.cli import main as cli


def test_rl_bench_cli_runs_every_method_after_parity(tmp_path):
    out = tmp_path / "rl.json"
    code = cli(["bench", "rl", "--fixture", "tiny", "--workdir", str(tmp_path / "work"), "--prompts", "2", "--edits", "3",
                "--producers", "2", "--image", "64x80", "--out", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    validate_document(doc)
    rows = {r["variant"]: r for r in doc["results"]}
    assert set(rows) == set(rl_bench.METHODS)
    for row in rows.values():
        assert row["status"] == "ok" and row["edits"] == 6 and row["parity"]["passed"]
        assert row["p99_ms"] >= row["p50_ms"] > 0 and row["edits_per_s"] > 0
    assert rows["score"]["mean_batch"] == 1 and rows["score-groups"]["mean_batch"] == 3  # one call per group of 3
    assert rows["reference-serial"]["parity"]["limit"] >= 1e-4


def test_a_method_off_parity_is_timed_and_labelled(tiny_onnx):
    from editreward_rt import Scorer

    fast = Scorer.load(tiny_onnx, threads=1)
    groups = rl_bench.workload(1, 2, size=(48, 64))
    original = fast.score_groups
    fast.score_groups = lambda g, errors="raise": [[s.__class__(s.mu + 0.1, s.log_sigma, s.heads) for s in r]
                                                   for r in original(g, errors)]
    rows = rl_bench.bench(fast, None, groups, 1, 1.0, methods=("score", "score-groups"))
    assert [r["status"] for r in rows] == ["ok", "failed-parity"]
    assert rows[1]["p50_ms"] > 0 and rows[1]["edits"] == 2 and not rows[1]["parity"]["passed"]


def test_gpu_matrix_dry_run_has_the_rl_rows(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu_matrix.main(["--dry-run", "--dtypes", "float32", "--reps", "1", "--only", "rl-float32", "--out", str(out),
                            "--workdir", str(tmp_path / "work")]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert {"rl-score", "rl-batching", "rl-score-groups"} <= set(rows)
    assert all(rows[v]["status"] == "ok" for v in ("rl-score", "rl-batching", "rl-score-groups"))


def test_batched_parity_is_held_to_the_precision_it_ran_in(tiny):
    """bf16 kernels block by batch shape (AMX, cuBLAS): batched bf16 scores are held to the bf16
    row of the tolerance table, float32 ones to the float32 batch-shape bound."""
    from editreward_rt import Scorer
    from editreward_rt.tolerances import BATCH_SHAPE_FLOAT32, tolerance

    groups = rl_bench.workload(1, 2, size=(48, 64))
    for dtype, want in (("float32", BATCH_SHAPE_FLOAT32), ("bfloat16", tolerance("torch-fast", "bfloat16").mu)):
        fast = Scorer.load(tiny.checkpoint, backend="torch", dtype=dtype, prompts_from=tiny.prompts, threads=1)
        checks = rl_bench.parity(fast, None, groups, 1e-4)
        assert {c["limit"] for c in checks.values()} == {want}, dtype
        assert all(c["passed"] for c in checks.values()), checks


def test_http_mode_times_each_trainer_protocol_after_parity(tiny_onnx):
    """``--http``: UniRL's and Edit-R1's requests against a local editreward serve, on Ray Serve and
    in one process (the real CLI in a child process), each edit's mu checked against in-process
    scoring before its row counts, batched by the service; each row's ratio to score-groups."""
    import pytest

    pytest.importorskip("ray")
    from editreward_rt import Scorer

    fast = Scorer.load(tiny_onnx, threads=1)
    groups = rl_bench.workload(2, 3, size=(48, 64))
    rows = rl_bench.http_rows(fast, str(tiny_onnx), groups, 2, 8, 20.0, 1, 1e-4)
    assert [r["variant"] for r in rows] == [*rl_bench.HTTP_METHODS, *(m + "@single-process" for m in rl_bench.HTTP_METHODS)]
    for row in rows:
        assert row["status"] == "ok" and row["parity"]["passed"] and row["edits"] == 6
        assert row["p99_ms"] >= row["p50_ms"] > 0 and row["mean_batch"] > 1  # a prompt's edits scored together
    in_process = {"variant": "score-groups", "edits_per_s": 2 * rows[0]["edits_per_s"]}
    ratios = [r.get("vs_score_groups") for r in rl_bench.with_ratios([in_process, *rows])]
    assert ratios[0] is None and ratios[1:] == pytest.approx([r["edits_per_s"] / in_process["edits_per_s"] for r in rows])
