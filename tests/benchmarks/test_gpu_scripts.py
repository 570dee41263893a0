"""The GPU scripts, dry-run as CI runs them: benchmarks/gpu_check.py and benchmarks/gpu_trt_check.py
as subprocesses on the tiny fixture and the CPU, through the same code the GPU run takes (plan,
one process per variant, parity in the variant's own dtype, timing, results after every variant),
so the first GPU run measures instead of crashing on the script itself."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import types

import pytest
from conftest import ROOT
from editreward_bench.common import Variant, gate_tolerance, validate_document
from editreward_bench.isolated import PeakSampler
from editreward_bench import gpu_matrix
from editreward_bench.workload import long_rubrics, workload_triples
from editreward_rt.tolerances import TOLERANCES


def run_script(script: str, *args: str, timeout: int = 900, env: dict | None = None,
               paths: tuple = ("runtime", "export", "quantize", "benchmarks")) -> subprocess.CompletedProcess:
    """The script as a user runs it offline: PYTHONPATH over ``paths`` (the repository's source folders), ``env`` added."""
    paths = [str(ROOT / d) for d in paths]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def results(path) -> dict:
    doc = json.loads(path.read_text())
    validate_document(doc)
    return doc


def by_variant(doc: dict) -> dict:
    return {r["variant"]: r for r in doc["results"]}


def tol(key) -> dict:
    return {"mu": TOLERANCES[key].mu, "log_sigma": TOLERANCES[key].log_sigma}


@pytest.fixture(scope="module")
def gpu_check_dry_run(tmp_path_factory):
    """The dry run as the device machine runs it: with ``$OUT`` set, which is where its JSON and log must land
    (only ``$OUT`` comes back), whatever folder ``--out`` names."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    proc = run_script("gpu_check.py", "--dry-run", "--reps", "1", "--workdir", str(tmp / "work"), "--out",
                      str(tmp / "elsewhere" / "gpu.json"), env={"OUT": str(tmp / "out")}, paths=())
    return proc, tmp / "out" / "gpu.json"


def test_gpu_check_dry_run(gpu_check_dry_run):
    proc, out = gpu_check_dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out.parent.parent / "elsewhere").exists()
    log = out.with_suffix(".log").read_text()
    assert "plan: torch-reference-bfloat16" in log and "exit code 0" in log  # stderr and stdout both copied
    doc = results(out)
    rows = by_variant(doc)
    for dtype, key in (("bfloat16", ("torch-fast", "bfloat16")), ("float32", ("torch-fast", "float32"))):
        ref, fast = rows[f"torch-reference-{dtype}"], rows[f"torch-fast-{dtype}"]
        assert ref["status"] == "ok" and ref["batch1"]["p50_ms"] > 0 and set(ref["throughput"]) == {"1", "2", "4", "8"}
        # Judged by the dtype it ran in, against the reference of that dtype.
        assert fast["status"] == "ok" and fast["backend"]["dtype"] == dtype and fast["parity"]["passed"]
        assert fast["parity"]["tolerance"] == tol(key) and fast["parity"]["reference"] == f"torch-reference-{dtype}"
        assert fast["batch1"]["p50_ms"] > 0 and fast["peak_rss_mb"] > 0 and fast["process_s"] > 0
        # n beside every figure: --reps 1 for the percentiles (and batch 1), at least 3 calls behind each larger batch.
        assert fast["batch1"]["n"] == fast["throughput_n"]["1"] == 1 and set(fast["throughput_n"]) == set(fast["throughput"])
        assert all(n >= gpu_matrix.MIN_THROUGHPUT_CALLS for size, n in fast["throughput_n"].items() if size != "1")
        assert fast["load_memory"]["peak_rss_mb"] > 0  # the load-time peak, apart from serving's
    # bf16 rows also report their drift from the float32 reference.
    assert rows["torch-fast-bfloat16"]["vs_float32_reference"]["max_abs_diff"]["mu"] > 0
    assert "vs_float32_reference" not in rows["torch-fast-float32"]
    for batch in (1, 4):
        row = rows[f"differentiable-backward-b{batch}"]
        assert row["status"] == "ok" and row["grad_finite"] and row["estimate_gib"]["total"] > 0
        assert row["n"] == gpu_matrix.BACKWARD_REPS
    prompts, edits = gpu_matrix.RL_WORKLOAD["tiny"]
    for method in ("score", "batching", "score-groups"):
        for prefix in ("rl", "rl-compiled"):  # the eager and the compiled decoder, side by side
            row = rows[f"{prefix}-{method}"]
            assert row["status"] == "ok" and row["edits"] == row["n_latencies"] == prompts * edits and row["n_runs"] == 1
            assert (row["graphs_compiled_while_timed"] >= 0) if prefix == "rl-compiled" else "graphs_compiled_while_timed" not in row
    compiled = rows["torch-fast-bfloat16-compiled"]
    assert compiled["status"] == "ok" and compiled["parity"]["passed"] and compiled["batch1"]["p50_ms"] > 0
    assert compiled["parity_replayed"]["passed"]  # after the warm-up calls, not only the first (compiling) one
    assert compiled["backend"]["compile"] == gpu_matrix.COMPILE_MODE and rows["torch-fast-bfloat16"]["backend"]["compile"] is None
    assert rows["bnb-int8"]["status"] == rows["bnb-nf4"]["status"] == "skipped"
    assert rows["bnb-int8"]["reason"] == ("bitsandbytes not installed" if importlib.util.find_spec("bitsandbytes") is None
                                          else "runs on cuda only, this run is on cpu")
    if importlib.util.find_spec("gptqmodel") is None:
        assert rows["gptq-int4"] == {"variant": "gptq-int4", "status": "skipped", "reason": "gptqmodel not installed"}
    assert rows["onnxruntime-cuda"]["status"] == "skipped"
    assert doc["config"]["plan"]["bnb-nf4"] == rows["bnb-nf4"]["reason"]


def test_gpu_check_workload_is_realistic(gpu_check_dry_run):
    """Two 256-token images shared by both rubric passes, then ~400 tokens of rubric each."""
    tokens = by_variant(results(gpu_check_dry_run[1]))["torch-fast-float32"]["prompt_tokens"]
    assert 2 * 256 < tokens["shared"] < 2 * 256 + 80
    assert all(400 <= n - tokens["shared"] <= 460 for n in tokens["per_pass"])


def test_gpu_check_reports_skips_before_it_builds(gpu_check_dry_run):
    stderr = gpu_check_dry_run[0].stderr
    assert stderr.index("plan: bnb-int8") < stderr.index("plan: onnxruntime-cuda") < stderr.index("== torch-reference-bfloat16")


def test_gpu_check_names_a_missing_library_before_importing_the_project(tmp_path):
    """A library every row needs (here Pillow, hidden by a package that fails to import) is named
    with what to install, before any project code is imported (which would die on it with a traceback)."""
    shadow = tmp_path / "shadow" / "PIL"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    proc = run_script("gpu_check.py", "--dry-run", "--out", str(tmp_path / "gpu.json"), paths=(),
                      env={"PYTHONPATH": str(shadow.parent), "OUT": ""})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "ABORT: missing what every row needs" in proc.stderr and "PIL (pip install pillow" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "PIL (pip install pillow" in (tmp_path / "gpu.log").read_text()


def test_a_gpu_run_times_at_least_twenty_calls(tmp_path):
    assert gpu_matrix.build_parser().parse_args([]).reps == gpu_matrix.MIN_REPS >= 20
    with pytest.raises(SystemExit):
        gpu_matrix.main(["--reps", "5", "--out", str(tmp_path / "gpu.json")])  # a cuda run: refused before anything runs
    assert not (tmp_path / "gpu.json").exists()


def test_gpu_workload_batches_mix_sources():
    sources = [id(source) for _, source, _ in workload_triples()]
    assert len(sources) == 8 and len(set(sources)) == 4
    assert all(len(set(sources[:n])) == min(n, 4) for n in gpu_matrix.BATCH_SIZES)


def test_a_variant_off_parity_is_timed_and_labelled(tmp_path):
    """measure_variant against a reference it cannot meet: still timed, labelled failed-parity."""
    request = {"size": "tiny", "device": "cpu", "dtype": "float32", "workdir": str(tmp_path), "ckpt": None,
               "prompts_from": None, "reps": 1, "gptq_calib": 0}
    variant = gpu_matrix.MatrixVariant("torch-fast-float32", "fast", "float32")
    first = gpu_matrix.measure_variant(variant, request, None)
    row = gpu_matrix.measure_variant(variant, request, first["outputs"] + 1.0)["rows"][0]
    assert row["status"] == "failed-parity" and not row["parity"]["passed"]
    assert row["batch1"]["n"] == 1 and set(row["throughput"]) == {"1", "2", "4", "8"}


def corrupt_checkpoint(tiny, tmp_path):
    """A copy of the tiny checkpoint whose weights file was cut short: its header (shapes) reads, its weights do not."""
    bad = tmp_path / "corrupt"
    shutil.copytree(tiny.root, bad)
    weights = bad / "checkpoint" / "model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    with open(weights, "r+b") as fh:
        fh.truncate(header + (weights.stat().st_size - header) // 2)
    return bad


def test_gpu_check_aborts_when_the_reference_fails(tiny, tmp_path):
    bad = corrupt_checkpoint(tiny, tmp_path)
    out = tmp_path / "gpu.json"
    proc = run_script("gpu_check.py", "--dry-run", "--reps", "1", "--ckpt", str(bad / "checkpoint"), "--prompts-from",
                      str(bad / "prompts"), "--only", "torch-fast-bfloat16", "--workdir", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 2 and "ABORT: the reference torch-reference-bfloat16 failed" in proc.stderr
    rows = by_variant(results(out))
    assert rows["torch-reference-bfloat16"]["status"] == "failed"
    assert "CheckpointError" in rows["torch-reference-bfloat16"]["error"]
    assert "torch-fast-bfloat16" not in rows  # never run, let alone judged against another reference


def test_gpu_check_keeps_results_past_a_failed_variant(tmp_path):
    """A variant over its time cap is killed and reported ``failed``; what ran before it stays in the file."""
    out = tmp_path / "gpu.json"
    proc = run_script("gpu_check.py", "--dry-run", "--reps", "1", "--dtypes", "float32", "--only", "torch-fast-float32",
                      "--cap-s", "torch-fast-float32=1", "--workdir", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = by_variant(results(out))
    assert rows["torch-reference-float32"]["status"] == "ok" and rows["torch-reference-float32"]["batch1"]
    assert rows["torch-fast-float32"]["status"] == "failed" and "timed out after 1 s" in rows["torch-fast-float32"]["error"]


def test_gpu_trt_check_dry_run(tmp_path):
    out = tmp_path / "trt.json"
    proc = run_script("gpu_trt_check.py", "--dry-run", "--reps", "1", "--workdir", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = results(out)
    rows = {(r["size"], r["variant"]): r for r in doc["results"]}
    assert set(rows) == {("tiny", v) for v in ("torch-reference-bfloat16", "torch-reference-float32", "tensorrt-bf16",
                                               "tensorrt-fp16", "tensorrt-fp32")}
    for dtype in ("bfloat16", "float32"):
        ref = rows[("tiny", f"torch-reference-{dtype}")]
        assert ref["status"] == "ok" and ref["dtype"] == dtype and ref["batch1"]["p50_ms"] > 0
    missing = "tensorrt not installed" if importlib.util.find_spec("tensorrt") is None else "runs on cuda only, this run is on cpu"
    for precision in ("bf16", "fp16", "fp32"):
        assert rows[("tiny", f"tensorrt-{precision}")]["status"] == "skipped"
        assert rows[("tiny", f"tensorrt-{precision}")]["reason"] == missing
    assert missing in proc.stdout  # the table says why


def test_gpu_trt_check_refuses_float32_graphs_at_full_size(tiny):
    """At full size only half-width graphs are exported; fp32 is refused in the plan, before any export."""
    from editreward_bench import gpu_trt
    from editreward_bench.prereqs import Machine
    from editreward_bench.workload import workload_spec
    from editreward_rt.checkpoint import open_checkpoint

    spec = workload_spec(open_checkpoint(tiny.checkpoint, prompts_from=tiny.prompts), "full", small_vocab=True)
    m = Machine("cuda", "H200", 139.0, 120.0, 60.0)
    args = types.SimpleNamespace(max_batch=8, workspace=4.0)
    reason = gpu_trt.engine_reason(gpu_trt.Engine("full", "fp32"), m, spec, args, 0.0, {})
    assert "not built at full size here (~27 GiB of graphs" in reason
    assert gpu_trt.Engine("full", "bf16").graph_dtype() == "bf16" and gpu_trt.Engine("full", "fp16").graph_dtype() == "fp16"
    assert gpu_trt.Engine("tiny", "fp16").graph_dtype() == "fp32"  # tiny keeps the exporter's own choice, validated


def test_latency_keeps_results_past_a_variant_that_fails_to_load(tiny, tiny_onnx, tmp_path):
    from editreward_bench import latency

    broken = tmp_path / "broken"
    shutil.copytree(tiny_onnx, broken)
    (broken / "heads.onnx").unlink()
    out = tmp_path / "latency.json"
    code = latency.main(["--ckpt", str(tiny.checkpoint), "--prompts-from", str(tiny.prompts), "--variant", f"model:{broken}",
                         "--variant", "torch-fast", "--reps", "1", "--warmup", "1", "--batch-sizes", "1", "--scaling", "1",
                         "--out", str(out)])
    assert code == 1
    rows = by_variant(results(out))
    assert rows[f"model:{broken}"]["status"] == "failed" and rows[f"model:{broken}"]["error"]
    assert rows["torch-reference"]["status"] == "ok" and rows["torch-fast"]["status"] == "ok"
    assert rows["torch-fast"]["parity"]["tolerance_key"] == ["torch-fast", "float32"]


def test_latency_aborts_when_the_reference_fails(tiny, tmp_path):
    from editreward_bench import latency

    bad = corrupt_checkpoint(tiny, tmp_path)
    out = tmp_path / "latency.json"
    code = latency.main(["--ckpt", str(bad / "checkpoint"), "--prompts-from", str(bad / "prompts"), "--variant", "torch-fast",
                         "--reps", "1", "--warmup", "1", "--batch-sizes", "1", "--scaling", "1", "--out", str(out)])
    assert code == 2
    assert [(r["variant"], r["status"]) for r in results(out)["results"]] == [("torch-reference", "failed")]


def test_tolerance_follows_the_dtype_run():
    bf16 = types.SimpleNamespace(description={"dtype": "bfloat16"})
    assert Variant("torch-fast").tolerance_key(bf16) == ("torch-fast", "bfloat16")
    widened = gate_tolerance("onnxruntime", "float32", "bfloat16")  # a float32 graph against a bf16 reference
    assert widened.mu == TOLERANCES[("torch-fast", "bfloat16")].mu > TOLERANCES[("onnxruntime", "float32")].mu
    assert gate_tolerance("onnxruntime", "float32") == TOLERANCES[("onnxruntime", "float32")]


def test_long_rubrics_have_the_length_asked_for(tiny):
    from editreward_rt.prompts import load_tokenizer

    tokenizer = load_tokenizer(tiny.base / "tokenizer.json")
    templates = long_rubrics(tokenizer, 300)
    lengths = [len(tokenizer.encode(templates.rubric_text(h, "Add a green bowl on the branch")).ids) for h in range(2)]
    assert all(300 <= n < 330 for n in lengths)
    a, b = (tokenizer.encode(templates.rubric_text(h, "x")).ids for h in range(2))
    assert next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) <= 1  # the passes part right after the chat turn and images


def test_peak_sampler_counts_above_the_baseline():
    readings = iter([1000.0, 1500.0, 4000.0, 2500.0])
    sampler = PeakSampler(lambda: next(readings, 1200.0), interval_s=0.01)
    time.sleep(0.2)
    memory = sampler.stop()
    assert memory["baseline_mb"] == 1000.0 and memory["peak_mb"] == 3000.0


def test_gpu_check_aborts_when_no_reference_can_run(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the cuda run would run, not abort")
    out = tmp_path / "gpu.json"
    proc = run_script("gpu_check.py", "--device", "cuda", "--size", "tiny", "--workdir", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 2 and "ABORT: no reference can run here" in proc.stderr
    rows = by_variant(results(out))
    assert rows["torch-reference-bfloat16"] == {"variant": "torch-reference-bfloat16", "status": "skipped",
                                                "reason": "no CUDA GPU visible to PyTorch"}
