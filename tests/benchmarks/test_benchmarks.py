"""Benchmark scripts as smoke tests on the tiny checkpoint: schema, parity gate, report."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
from editreward_bench import latency, report
from editreward_bench import parity_bench as parity
from editreward_bench import rank_metrics as metrics
from editreward_bench.common import SCHEMA_VERSION, validate_document
from editreward_rt.manifest import write_manifest
from onnx import numpy_helper


@pytest.fixture(scope="module")
def perturbed(tiny_onnx, tmp_path_factory):
    """A copy of the export whose reward heads were nudged: a variant that must fail parity."""
    out = tmp_path_factory.mktemp("perturbed") / "model"
    shutil.copytree(tiny_onnx, out)
    graph = onnx.load(str(out / "heads.onnx"))
    for init in graph.graph.initializer:
        if init.name.endswith("5.bias") or init.dims == [2]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(0.01), init.name))
    onnx.save(graph, str(out / "heads.onnx"))
    manifest = json.loads((out / "manifest.json").read_text())
    write_manifest(out, {k: v for k, v in manifest.items() if k not in ("format", "manifest_version", "files")})
    return out


def test_latency_smoke(tiny, tiny_onnx, perturbed, tmp_path):
    out = tmp_path / "latency.json"
    code = latency.main(["--ckpt", str(tiny.checkpoint), "--prompts-from", str(tiny.prompts), "--variant", "torch-fast",
                         "--variant", f"model:{tiny_onnx}", "--variant", f"model:{perturbed}", "--reps", "2", "--warmup", "1",
                         "--batch-sizes", "1,2", "--scaling", "1,2", "--out", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    validate_document(doc)
    assert doc["schema_version"] == SCHEMA_VERSION and doc["kind"] == "latency"
    by = {r["variant"]: r for r in doc["results"]}
    assert by["torch-reference"]["status"] == "ok"
    assert by[f"model:{tiny_onnx}"]["status"] == "ok" and by[f"model:{tiny_onnx}"]["parity"]["passed"]
    assert by[f"model:{perturbed}"]["status"] == "failed-parity" and "batch1" not in by[f"model:{perturbed}"]
    fast = by["torch-fast"]
    assert set(fast["stages"]) == {"preprocess_ms", "vision_ms", "prefix_ms", "suffixes_ms", "heads_ms"}
    assert fast["vs_reference"]["throughput_ratio"] > 0 and fast["peak_rss_mb"] > 0
    assert [row["edits"] for row in fast["scaling"]] == [1, 2]
    assert doc["environment"]["libraries"]["onnxruntime"]
    page = report.render([out], tmp_path / "docs" / "performance.md")
    text = page.read_text()
    assert "torch-fast" in text and "failed-parity" in text and "![latency-latency](img/latency-latency.png)" in text
    assert 0 < (tmp_path / "docs" / "img" / "latency-latency.png").stat().st_size < 200_000
    fig = report.latency_plot(report._pyplot(), doc)
    onnx_line = next(line for line in fig.axes[0].lines if line.get_label().startswith(tiny_onnx.name))
    per_batch = by[f"model:{tiny_onnx}"]["throughput"]["per_batch"]
    assert list(onnx_line.get_ydata()) == [per_batch["1"]["triples_per_s"], per_batch["2"]["triples_per_s"]]
    _check_throughput_axes(fig, doc, xlabel="triples per call", ticks=["1", "2"])


def _check_throughput_axes(fig, doc, xlabel, ticks):
    """Throughput (not latency) on a linear axis with plain integer ticks; machine and dtype in the title."""
    import matplotlib.pyplot as plt

    tput = fig.axes[0]
    assert tput.get_ylabel().startswith("triples/s") and tput.get_xlabel() == xlabel and tput.get_xscale() == "linear"
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ticks
    assert doc["environment"]["cpu"] in fig.texts[0].get_text() and "float32" in fig.texts[0].get_text()
    assert tput.lines and all(y > 0 for line in tput.lines for y in line.get_ydata())
    plt.close(fig)


def test_parity_smoke(tiny, tiny_onnx, perturbed, tmp_path):
    out = tmp_path / "parity.json"
    code = parity.main(["--ckpt", str(tiny.checkpoint), "--prompts-from", str(tiny.prompts), "--variant", f"model:{tiny_onnx}",
                        "--variant", f"model:{perturbed}", "--groups", "2", "--edits", "3", "--out", str(out)])
    assert code == 1  # one variant failed its gate
    doc = json.loads(out.read_text())
    validate_document(doc)
    by = {r["variant"]: r for r in doc["results"]}
    good, bad = by[f"model:{tiny_onnx}"], by[f"model:{perturbed}"]
    assert good["status"] == "ok" and good["mu"]["max_abs_diff"] < 1e-4 and good["pairwise_agreement"] == 1.0
    assert bad["status"] == "failed-parity" and bad["mu"]["max_abs_diff"] > 1e-3
    assert good["n_pairs"] == 2 * 3 and len(good["heads"]) == 2
    report.render([out], tmp_path / "docs" / "performance.md")
    assert (tmp_path / "docs" / "img" / "parity-parity.png").is_file()


def test_parity_on_editreward_bench_format(tiny, tmp_path, images):
    folder = tmp_path / "bench"
    folder.mkdir()
    for i, image in enumerate(images[:4]):
        image.save(folder / f"{i}.png")
    items = [{"prompt": "Add a bowl", "path_src": "0.png", "paths_generated": ["1.png", "2.png"], "human_vote": {"ranking": "A>B"}},
             {"prompt": "Add a bowl", "path_src": "0.png", "paths_generated": ["1.png", "2.png", "3.png"],
              "human_vote": {"ranking": "C>A>B"}},
             {"prompt": "Add a bowl", "path_src": "0.png", "paths_generated": ["2.png", "3.png"], "human_vote": {"ranking": "A=B=Good"}}]
    (folder / "EditReward_Bench_2pair.json").write_text(json.dumps(items))
    out = tmp_path / "parity.json"
    assert parity.main(["--ckpt", str(tiny.checkpoint), "--prompts-from", str(tiny.prompts), "--variant", "torch-fast",
                        "--bench", str(folder), "--out", str(out)]) == 0
    human = json.loads(out.read_text())["results"][0]["human"]
    assert human["pairs"] == 1 + 3 + 1
    assert 0.0 <= human["accuracy_with_ties"] <= 1.0 and 0.0 <= human["strict_group_accuracy"] <= 1.0


def test_human_accuracy_follows_the_votes(tiny, fast, tmp_path, images):
    """Votes that agree with the model's own preferences score 1.0; the same votes with A and B
    swapped score 0.0. A flipped A/B (or edit order) mapping cannot pass both."""
    folder = tmp_path / "bench"
    folder.mkdir()
    for i, image in enumerate(images[:4]):
        image.save(folder / f"{i}.png")
    edits = ["1.png", "2.png", "3.png"]
    mu = {e: fast.score("Add a bowl", folder / "0.png", folder / e).mu for e in edits}
    best_first = sorted(edits, key=lambda e: -mu[e])
    letters = {e: "ABC"[i] for i, e in enumerate(edits)}
    agree = ">".join(letters[e] for e in best_first)
    results = {}
    for name, ranking in (("agree", agree), ("swapped", ">".join(reversed(agree.split(">"))))):
        (folder / "EditReward_Bench_3pair.json").write_text(json.dumps(
            [{"prompt": "Add a bowl", "path_src": "0.png", "paths_generated": edits, "human_vote": {"ranking": ranking}}]))
        out = tmp_path / f"{name}.json"
        assert parity.main(["--ckpt", str(tiny.checkpoint), "--prompts-from", str(tiny.prompts), "--variant", "torch-fast",
                            "--bench", str(folder), "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())["results"][0]["human"]
    assert results["agree"]["accuracy_without_ties"] == 1.0 and results["agree"]["strict_group_accuracy"] == 1.0
    assert results["swapped"]["accuracy_without_ties"] == 0.0 and results["swapped"]["strict_group_accuracy"] == 0.0


def test_metrics():
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert metrics.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert metrics.kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert metrics.preference_agreement(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0]), [(0, 1), (1, 2)]) == 0.5
    # Human: +1, -1, tie; model differences 0.5, -0.2, 0.05: best threshold 0.05 makes all three right.
    acc, eps = metrics.accuracy_with_ties([1, -1, 0], [0.5, -0.2, 0.05])
    assert acc == 1.0 and eps == pytest.approx(0.05)
    assert metrics.accuracy_without_ties([1, -1, 0], [0.5, 0.2, 0.0]) == 0.5
    assert metrics.parse_ranking("C>A>B", 3) == ([2, 0, 1], False)
    assert metrics.parse_ranking("A=B=Bad", 2) == (None, True)
    assert metrics.strict_group_accuracy([[2, 0, 1], [0, 1]], [np.array([0.2, 0.1, 0.9]), np.array([0.1, 0.5])]) == 0.5


def test_results_schema_is_enforced():
    with pytest.raises(ValueError, match="lacks"):
        validate_document({"schema": "editreward-bench-results"})


def test_quant_report_measures_each_scheme(tmp_path):
    from editreward_bench import quant_report

    out = tmp_path / "quant.json"
    assert quant_report.main(["--fixture", "tiny", "--workdir", str(tmp_path / "work"), "--scheme", "ort-int8",
                              "--scheme", "ort-int4:block_size=128", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["ort-int8", "ort-int4:block_size=128"]
    assert rows[1]["config"]["block_size"] == 128 and rows[0]["pairs"] == 28
    assert all(r["hidden_snr_db"] >= r["floor_db"] and 0 < r["bf16_ratio"] < 0.6 for r in rows)
    assert rows[0]["hidden_snr_db"] > rows[1]["hidden_snr_db"] + 10  # 8 bits against 4


def test_cpu_speed_smoke(tiny, tiny_onnx, perturbed, tmp_path):
    """One run: the reference and each variant at one thread count, every kernel's GEMM peak, FLOPs
    from the spec, % of the peak of the kernel each row runs, batching, the op profile, bf16 and
    OpenVINO rows (skipped, with why, where their library is missing), the default's whole
    process; a variant beyond its tolerance fails the run."""
    from editreward_bench import cpu_speed
    from editreward_bench.common import PRECISION_DTYPE
    from editreward_quant.cli import main as quantize_main
    from editreward_rt.backends import cpu_engine
    from editreward_rt.hardware import cpu_matrix_units, native_bf16

    openvino = importlib.util.find_spec("openvino") is not None
    nncf = openvino and importlib.util.find_spec("nncf") is not None
    ov_int8 = tmp_path / "tiny-ov-int8"
    if nncf:  # the ov-* folders need NNCF to be made at all
        assert quantize_main(["--model-dir", str(tiny_onnx), "--scheme", "ov-int8", "--out", str(ov_int8)]) == 0
    out = tmp_path / "cpu-speed.json"
    variants = [f"model:{tiny_onnx}", f"model:{perturbed}", "torch-fast@bf16", f"openvino:{tiny_onnx}@bf16",
                f"cli:{tiny_onnx}", f"cli:{tiny_onnx}@fp32", f"tensorrt:{tiny_onnx}"] + ([f"model:{ov_int8}"] if nncf else [])
    code = cpu_speed.main(["--ckpt", str(tiny.checkpoint), "--prompts-from", str(tiny.prompts), "--threads", "1", "--triples", "2",
                           "--parity-groups", "1", "--parity-edits", "3", "--reps", "1", "--profile", "--out", str(out)]
                          + [f"--variant={v}" for v in variants])
    assert code == 1  # the perturbed heads are beyond the float32 tolerance
    doc = json.loads(out.read_text())
    validate_document(doc)
    assert doc["config"]["cpu"]["matrix_units"] == cpu_matrix_units()
    peaks = doc["config"]["gemm_peaks"]["1"]
    assert {"float32_gflops", "u8u8_gflops", "u8s8_gflops", "int4_block32_gflops", "int4_block64_gflops", "int4_block128_gflops",
            "torch_float32_gflops", "torch_bfloat16_gflops"} <= set(peaks)
    assert ("openvino_float32_gflops" in peaks) == openvino and ("openvino" in peaks["skipped"]) == (not openvino)
    by = {r["variant"]: r for r in doc["results"]}
    reference, onnx_row, bad = by["torch-reference"], by[f"model:{tiny_onnx}"], by[f"model:{perturbed}"]
    assert onnx_row["parity"]["within"] and not bad["parity"]["within"]
    assert onnx_row["backend"]["backend"] == "onnxruntime"  # model:PATH runs the engine its manifest names, not the CPU default
    assert reference["flops_per_triple"] > 1.3 * onnx_row["flops_per_triple"] > 0  # two full passes against the fast path
    fp32_peak = max(peaks[f"{k}_gflops"] for k in ("float32", "torch_float32", "openvino_float32") if f"{k}_gflops" in peaks)
    assert 0 < onnx_row["pct_of_float32_peak"] == onnx_row["pct_of_peak"] == pytest.approx(
        100 * onnx_row["flops_per_triple"] * onnx_row["triples_per_s"]["1"] / 1e9 / fp32_peak)
    assert onnx_row["peak_kernel"].startswith("float32 ")
    assert onnx_row["default_batch"] == 1 and set(onnx_row["triples_per_s"]) == {"1", "8"}
    assert onnx_row["vs_reference"]["1"] > 0 and onnx_row["group_triples_per_s"]["1"] > 0
    assert "MatMul" in onnx_row["op_profile_ms_per_triple"]["decoder"]
    assert bad["agreement_vs_reference"]["pairs"] == 3 and "agreement_vs_reference" not in reference

    torch_bf16 = by["torch-fast@bf16"]  # bf16 rows: by the best bf16 kernel's peak
    bf16_peak = max(peaks[f"{k}_gflops"] for k in ("torch_bfloat16", "openvino_bfloat16") if f"{k}_gflops" in peaks)
    assert torch_bf16["backend"]["dtype"] == "bfloat16" and torch_bf16["tolerance_key"] == ["torch-fast", "bfloat16"]
    assert torch_bf16["peak_kernel"].startswith("bfloat16 ") and torch_bf16["pct_of_peak"] == pytest.approx(
        100 * torch_bf16["gflops_achieved"] / bf16_peak)
    assert torch_bf16["parity"]["within"] and torch_bf16["agreement_vs_reference"]["pairs"] == 3

    ov = by[f"openvino:{tiny_onnx}@bf16"]
    if not openvino:
        assert ov["status"] == "skipped" and "openvino is not installed" in ov["reason"]
    else:  # the bf16 hint where the CPU computes bf16, f32 where it does not: the row says which ran
        assert ov["backend"]["precision"] == ("bf16" if native_bf16("cpu") else "fp32") and ov["parity"]["within"]
        assert ov["tolerance_key"] == ["openvino", PRECISION_DTYPE[ov["backend"]["precision"]]]
    if nncf:
        int8 = by[f"model:{ov_int8}"]  # a quantized row: by its own kernel's peak, its flips and their margins
        hint = int8["backend"]["precision"]
        assert int8["backend"]["quantization"] == "ov-int8" and int8["tolerance_key"] == ["openvino", "ov-int8"]
        assert int8["peak_kernel"].startswith("int8 weights ") and int8["pct_of_peak"] == pytest.approx(
            100 * int8["gflops_achieved"] / peaks[f"openvino_int8_{hint}_gflops"])
        assert int8["parity"]["within"] and len(int8["agreement_vs_reference"]["flip_margins"]) == int8["agreement_vs_reference"]["flipped"]
    trt = by[f"tensorrt:{tiny_onnx}"]
    if importlib.util.find_spec("tensorrt") is None:
        assert trt["status"] == "skipped" and "tensorrt is not installed" in trt["reason"]

    default, fp32 = by[f"cli:{tiny_onnx}"], by[f"cli:{tiny_onnx}@fp32"]  # whole processes, no --backend
    assert default["whole_process"] and "--backend" not in default["command"] and "--precision" not in default["command"]
    assert "--precision fp32" in fp32["command"] and fp32["backend"]["precision"] == "fp32"
    assert default["backend"]["backend"] == fp32["backend"]["backend"] == cpu_engine("auto")
    # $EDITREWARD_PRECISION (fp32 in this suite) is cleared: the default is auto, bf16 where OpenVINO has bf16 units
    assert (default["backend"]["precision"] == "bf16") == (openvino and native_bf16("cpu"))
    for row in (default, fp32):
        assert row["parity"]["within"] and row["agreement_vs_reference"]["pairs"] == 3 and len(row["process_runs_s"]) == 1
        assert row["vs_reference"]["1"] == pytest.approx(2 / row["process_runs_s"][0] / reference["triples_per_s"]["1"])
    page = report.render([out], tmp_path / "docs" / "performance.md")
    text = page.read_text()
    assert "GEMM peak (1 thread" in text and "matrix units: " in text and (tmp_path / "docs" / "img" / "cpu-speed-threads.png").is_file()
    assert f"| cli:{tiny_onnx.name} | {default['backend']['backend']} " in text and "(whole process)" in text


def test_cpu_speed_divides_each_row_by_its_kernels_peak():
    """% of peak: a float32 row by the best float32 kernel, a bf16 row by the best bf16 one, a
    quantized row by its scheme's own kernel at the hint it ran; a kernel not measured, no figure."""
    from editreward_bench import cpu_speed

    peaks = {"threads": 1, "float32_gflops": 50.0, "torch_float32_gflops": 40.0, "openvino_float32_gflops": 60.0,
             "torch_bfloat16_gflops": 90.0, "openvino_bfloat16_gflops": 150.0, "u8s8_gflops": 200.0, "u8u8_gflops": 100.0,
             "openvino_int8_bf16_gflops": 120.0, "skipped": {"openvino_int4_bf16": "nncf is not installed"}}

    def row(variant, backend, **extra):  # 30 GFLOP a triple at 2 triples/s: 60 GFLOP/s each
        return {"variant": variant, "label": variant, "status": "ok", "threads": 1, "backend": backend, "default_batch": 1,
                "triples_per_s": {"1": 2.0}, "group_triples_per_s": {"1": 2.0}, "flops_per_triple": 30e9,
                "mu": [0.5, 0.25], "log_sigma": [0.0, 0.0], "tolerance_key": ["torch-fast", "float32"], **extra}

    rows = [row("torch-reference", {"backend": "torch", "dtype": "float32", "precision": "fp32"}),
            row("torch-fast@bf16", {"backend": "torch", "dtype": "bfloat16", "precision": "bf16"}),
            row("model:ort-int8", {"backend": "onnxruntime", "precision": "fp32", "quantization": "ort-int8"},
                quant_config={"mode": "dynamic", "weight_type": "uint8"}),
            row("model:ov-int8", {"backend": "openvino", "precision": "bf16", "quantization": "ov-int8"}),
            row("model:ov-int8@fp32", {"backend": "openvino", "precision": "fp32", "quantization": "ov-int8"})]
    cpu_speed.summarise(rows, peaks)
    assert [(r.get("peak_kernel"), r.get("pct_of_peak")) for r in rows] == [
        ("float32 openvino MatMul", pytest.approx(100)), ("bfloat16 openvino MatMul", pytest.approx(40)),
        ("int8 onnxruntime MatMulInteger U8U8", pytest.approx(60)), ("int8 weights openvino MatMul, bf16 hint", pytest.approx(50)),
        (None, None)]
    assert all(r["pct_of_float32_peak"] == pytest.approx(100) for r in rows)
    line = cpu_speed.peak_line(peaks)
    assert "float32 60 openvino MatMul, 50 onnxruntime MatMul, 40 torch matmul; bfloat16 150 openvino MatMul, 90 torch matmul" in line
    assert line.endswith("not measured: openvino_int4_bf16 (nncf is not installed)")


def _cpu_speed_document():
    """A cpu_speed.py results document at 1 and 2 threads, the reference and one ONNX variant, with
    the derived columns computed by cpu_speed.summarise as the script does."""
    from editreward_bench import cpu_speed
    from editreward_bench.common import results_document

    peaks, rows = {}, []
    for threads, (ref_tps, fp32_tps) in {1: (0.75, 2.25), 2: (1.5, 3.75)}.items():
        peaks[str(threads)] = {"threads": threads, "float32_gflops": 250.0 * threads, "u8s8_gflops": 900.0 * threads,
                               "u8u8_gflops": 400.0 * threads, "int4_block32_gflops": 270.0, "int4_block128_gflops": 390.0}
        block = [{"variant": "torch-reference", "label": "torch-reference", "status": "ok", "threads": threads,
                  "backend": {"backend": "torch", "dtype": "float32", "precision": "fp32"}, "triples_per_s": {"1": ref_tps},
                  "group_triples_per_s": {"1": ref_tps}, "default_batch": 1, "flops_per_triple": 109e9,
                  "mu": [0.5, 0.25], "log_sigma": [0.0, 0.0], "tolerance_key": ["torch-fast", "float32"]},
                 {"variant": "model:w/onnx-fp32", "label": "onnx-fp32", "status": "ok", "threads": threads,
                  "backend": {"backend": "onnxruntime", "precision": "fp32"}, "triples_per_s": {"1": fp32_tps, "8": fp32_tps / 2},
                  "group_triples_per_s": {"1": fp32_tps, "8": fp32_tps}, "default_batch": 1, "flops_per_triple": 69e9,
                  "mu": [0.5, 0.25], "log_sigma": [0.0, 0.0], "tolerance_key": ["onnxruntime", "float32"]}]
        cpu_speed.summarise(block, peaks[str(threads)])
        rows += block
    cpu = {"model": "Test CPU", "matrix_units": {"avx512_bf16": True, "amx_bf16": False}}
    return results_document("cpu-speed", {"ckpt": "fixtures/fixture-small/checkpoint", "gemm_peaks": peaks, "cpu": cpu}, rows, "cpu")


def test_report_plots_throughput_against_threads_and_batch(tmp_path):
    """cpu_speed.py's results as docs/: both thread counts' tables between markers (the page's prose
    kept, a rerun replacing the block), throughput and speed-up plotted against integer threads."""
    doc = _cpu_speed_document()
    path = tmp_path / "cpu-speed-small.json"
    path.write_text(json.dumps(doc))
    page = tmp_path / "docs" / "performance.md"
    page.parent.mkdir()
    page.write_text("# Performance\n\nProse before.\n\n<!-- report.py: begin cpu-speed-small -->\nstale\n"
                    "<!-- report.py: end cpu-speed-small -->\n\nProse after.\n")
    for _ in range(2):
        report.render([path], page)
    text = page.read_text()
    assert text.startswith("# Performance\n\nProse before.") and text.rstrip().endswith("Prose after.")
    assert "stale" not in text and text.count("<!-- report.py: begin cpu-speed-small -->") == 1
    assert "GEMM peak (1 thread," in text and "GEMM peak (2 threads," in text and "| onnx-fp32 | onnxruntime fp32 | 3.75 |" in text
    assert text.count("CPU: Test CPU; matrix units: avx512_bf16 (not: amx_bf16)\n\nGEMM peak") == 2
    assert "![cpu-speed-small-threads](img/cpu-speed-small-threads.png)" in text

    fig = report.threads_plot(report._pyplot(), doc)
    tput, speedup, peak = fig.axes
    assert "fixture-small" in fig.texts[0].get_text()
    fp32 = next(line for line in tput.lines if line.get_label().startswith("onnx-fp32 (onnxruntime fp32)"))
    assert list(fp32.get_xdata()) == [1, 2] and list(fp32.get_ydata()) == [2.25, 3.75]
    assert [list(line.get_ydata()) for line in speedup.lines][1] == pytest.approx([3.0, 2.5])
    assert peak.get_ylabel() == "% of float32 GEMM peak"
    _check_throughput_axes(fig, doc, xlabel="threads", ticks=["1", "2"])
    fig = report.batch_plot(report._pyplot(), doc)
    _check_throughput_axes(fig, doc, xlabel="triples per call", ticks=["1", "8"])
    path.write_text(json.dumps({**doc, "kind": "rl"}))
    with pytest.raises(ValueError, match="reads latency, parity and cpu-speed"):
        report.render([path], page)
