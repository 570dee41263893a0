"""Benchmark scripts as smoke tests on the tiny checkpoint: schema, parity gate, report."""

from __future__ import annotations

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
    """One run: the reference and each variant at one thread count, the GEMM peaks, FLOPs from the
    spec, % of peak, batching, the op profile; a variant beyond its tolerance fails the run."""
    from editreward_bench import cpu_speed

    out = tmp_path / "cpu-speed.json"
    code = cpu_speed.main(["--ckpt", str(tiny.checkpoint), "--prompts-from", str(tiny.prompts), "--variant", f"model:{tiny_onnx}",
                           "--variant", f"model:{perturbed}", "--threads", "1", "--triples", "2", "--parity-groups", "1",
                           "--parity-edits", "3", "--reps", "1", "--profile", "--out", str(out)])
    assert code == 1  # the perturbed heads are beyond the float32 tolerance
    doc = json.loads(out.read_text())
    validate_document(doc)
    peaks = doc["config"]["gemm_peaks"]["1"]
    assert {"float32_gflops", "u8u8_gflops", "u8s8_gflops", "int4_block32_gflops", "int4_block128_gflops"} <= set(peaks)
    by = {r["variant"]: r for r in doc["results"]}
    reference, onnx_row, bad = by["torch-reference"], by[f"model:{tiny_onnx}"], by[f"model:{perturbed}"]
    assert onnx_row["parity"]["within"] and not bad["parity"]["within"]
    assert reference["flops_per_triple"] > 1.3 * onnx_row["flops_per_triple"] > 0  # two full passes against the fast path
    assert 0 < onnx_row["pct_of_float32_peak"] == pytest.approx(
        100 * onnx_row["flops_per_triple"] * onnx_row["triples_per_s"]["1"] / 1e9 / peaks["float32_gflops"])
    assert onnx_row["default_batch"] == 1 and set(onnx_row["triples_per_s"]) == {"1", "8"}
    assert onnx_row["vs_reference"]["1"] > 0 and onnx_row["group_triples_per_s"]["1"] > 0
    assert "MatMul" in onnx_row["op_profile_ms_per_triple"]["decoder"]
    assert bad["agreement_vs_float32"]["pairs"] == 3
    page = report.render([out], tmp_path / "docs" / "performance.md")
    assert "GEMM peak (1 thread" in page.read_text() and (tmp_path / "docs" / "img" / "cpu-speed-threads.png").is_file()


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
                  "backend": {"backend": "torch", "dtype": "float32"}, "triples_per_s": {"1": ref_tps},
                  "group_triples_per_s": {"1": ref_tps}, "default_batch": 1, "flops_per_triple": 109e9,
                  "mu": [0.5, 0.25], "log_sigma": [0.0, 0.0], "tolerance_key": ["torch-fast", "float32"]},
                 {"variant": "model:w/onnx-fp32", "label": "onnx-fp32", "status": "ok", "threads": threads,
                  "backend": {"backend": "onnxruntime", "precision": "float32"}, "triples_per_s": {"1": fp32_tps, "8": fp32_tps / 2},
                  "group_triples_per_s": {"1": fp32_tps, "8": fp32_tps}, "default_batch": 1, "flops_per_triple": 69e9,
                  "mu": [0.5, 0.25], "log_sigma": [0.0, 0.0], "tolerance_key": ["onnxruntime", "float32"]}]
        cpu_speed.summarise(block, peaks[str(threads)])
        rows += block
    return results_document("cpu-speed", {"ckpt": "fixtures/fixture-small/checkpoint", "gemm_peaks": peaks}, rows, "cpu")


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
    assert "GEMM peak (1 thread," in text and "GEMM peak (2 threads," in text and "| onnx-fp32 | 3.75 |" in text
    assert "![cpu-speed-small-threads](img/cpu-speed-small-threads.png)" in text

    fig = report.threads_plot(report._pyplot(), doc)
    tput, speedup, peak = fig.axes
    assert "fixture-small" in fig.texts[0].get_text()
    fp32 = next(line for line in tput.lines if line.get_label().startswith("onnx-fp32 (onnxruntime float32)"))
    assert list(fp32.get_xdata()) == [1, 2] and list(fp32.get_ydata()) == [2.25, 3.75]
    assert [list(line.get_ydata()) for line in speedup.lines][1] == pytest.approx([3.0, 2.5])
    assert peak.get_ylabel() == "% of float32 GEMM peak"
    _check_throughput_axes(fig, doc, xlabel="threads", ticks=["1", "2"])
    fig = report.batch_plot(report._pyplot(), doc)
    _check_throughput_axes(fig, doc, xlabel="triples per call", ticks=["1", "8"])
    path.write_text(json.dumps({**doc, "kind": "rl"}))
    with pytest.raises(ValueError, match="reads latency, parity and cpu-speed"):
        report.render([path], page)
