"""ONNX export and the ONNX Runtime backend: folder contents, self-validation, integrity checks."""

from __future__ import annotations

import json
import shutil

import onnx
import onnxruntime
import pytest
from editreward_export.onnx_export import export_onnx
from editreward_rt import Scorer
from editreward_rt.errors import BackendError, ExportError, ManifestError
from editreward_rt.manifest import MANIFEST_VERSION


def test_exported_folder_is_self_describing(tiny_onnx):
    manifest = json.loads((tiny_onnx / "manifest.json").read_text())
    assert manifest["manifest_version"] == MANIFEST_VERSION
    assert set(manifest["graphs"]) == {"vision", "decoder", "heads"}
    assert set(manifest["files"]) == {"vision.onnx", "decoder.onnx", "heads.onnx", "tokenizer.json"}
    assert manifest["validation"]["max_abs_diff"]["mu"] <= manifest["validation"]["tolerance"]["mu"]
    assert len(manifest["validation"]["image_grids"]) >= 2
    assert manifest["spec"]["heads"]["fusion"] == "mean"
    assert "<|Reward|>" in manifest["templates"]["reward_suffix"]
    decoder_inputs = {i["name"]: i["shape"] for i in manifest["graphs"]["decoder"]["inputs"]}
    assert decoder_inputs["input_ids"] == ["batch", "seq"] and decoder_inputs["past"][4] == "past"
    # Readable by other users (a serving account), not mkdtemp's 0700.
    assert tiny_onnx.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in tiny_onnx.iterdir())


def test_graphs_use_standard_onnx_ops_only(tiny_onnx):
    for name in ("vision", "decoder", "heads"):
        model = onnx.load(str(tiny_onnx / f"{name}.onnx"))
        assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}, name
        onnx.checker.check_model(model, full_check=True)


def test_lm_head_is_not_exported(tiny_onnx):
    model = onnx.load(str(tiny_onnx / "decoder.onnx"))
    vocab = json.loads((tiny_onnx / "manifest.json").read_text())["spec"]["text"]["vocab_size"]
    shapes = [tuple(t.dims) for t in model.graph.initializer]
    assert shapes.count((vocab, json.loads((tiny_onnx / "manifest.json").read_text())["spec"]["text"]["hidden_size"])) == 1


def test_tampered_graph_is_refused(tiny_onnx, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_onnx, copy)
    with open(copy / "heads.onnx", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ManifestError, match="heads.onnx"):
        Scorer.load(copy)
    (copy / "heads.onnx").unlink()
    with pytest.raises(ManifestError, match="missing"):
        Scorer.load(copy)


def test_unknown_manifest_version_is_refused(tiny_onnx, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_onnx, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["manifest_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="manifest_version 99"):
        Scorer.load(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest.json"):
        Scorer.load(copy, backend="onnxruntime")


def test_prompt_beyond_the_exported_limit(tiny_onnx, tmp_path, images):
    from editreward_rt.errors import PromptTooLongError

    copy = tmp_path / "copy"
    shutil.copytree(tiny_onnx, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["spec"]["max_prompt_tokens"] = 300
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PromptTooLongError, match="300"):
        Scorer.load(copy).score("Add a bowl", images[0], images[1])


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="checks the error where ONNX Runtime has no CUDA provider")
def test_cuda_requested_without_provider(tiny_onnx):
    with pytest.raises(BackendError, match="CUDA"):
        Scorer.load(tiny_onnx, device="cuda")


def test_session_options(tiny_onnx, images):
    base = Scorer.load(tiny_onnx).score("Add a bowl", images[0], images[1])
    tuned = Scorer.load(tiny_onnx, threads=1).score("Add a bowl", images[0], images[1])
    assert tuned.mu == pytest.approx(base.mu, abs=1e-5)
    from editreward_rt.backends.ort_backend import OrtBackend

    plain = OrtBackend(tiny_onnx, optimization="disable")
    assert plain.description["providers"] == ["CPUExecutionProvider"]
    with pytest.raises(BackendError, match="optimisation level"):
        OrtBackend(tiny_onnx, optimization="max")


def test_io_binding_path_matches(tiny_onnx, images):
    """The CUDA path keeps the cache on the device through I/O binding; the same code runs on the CPU."""
    from editreward_rt.backends.ort_backend import OrtBackend

    plain = Scorer.load(tiny_onnx, backend="onnxruntime")
    bound = Scorer(OrtBackend(tiny_onnx, io_binding=True), plain.backend.model)
    assert bound.description["io_binding"] is True and plain.description["io_binding"] is False
    triples = [("Add a bowl", images[0], images[1]), ("Add a bowl", images[0], images[2]), ("Make it red", images[3], images[4])]
    for a, b in zip(plain.score_batch(triples), bound.score_batch(triples)):
        assert a.mu == pytest.approx(b.mu, abs=1e-6) and a.log_sigma == pytest.approx(b.log_sigma, abs=1e-6)


def test_validation_fails_loudly_on_drift(tiny, tmp_path, monkeypatch):
    import editreward_export.onnx_export as exporter

    real = exporter.tolerance
    monkeypatch.setattr(exporter, "tolerance", lambda b, p: type(real(b, p))(0.0, 0.0))
    out = tmp_path / "drifted"
    with pytest.raises(ExportError, match="drift"):
        export_onnx(str(tiny.checkpoint), out, prompts_from=str(tiny.prompts), log=lambda *_: None)
    assert not out.exists()
    assert not list(tmp_path.glob(".export-*"))  # nothing half-written left behind


def test_refuses_to_overwrite_an_unrelated_folder(tiny, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ExportError, match="refusing"):
        export_onnx(str(tiny.checkpoint), tmp_path, prompts_from=str(tiny.prompts), log=lambda *_: None)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_fp16_export_runs_within_its_tolerance(tiny, tmp_path, images, reference):
    from editreward_rt.tolerances import max_abs_diff, tolerance, within

    out = export_onnx(str(tiny.checkpoint), tmp_path / "fp16", prompts_from=str(tiny.prompts), dtype="fp16",
                      log=lambda *_: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "float16" and manifest["kv_dtype"] == "float16"
    fp16 = Scorer.load(out)
    triples = [("Add a bowl", images[0], images[i]) for i in (1, 2, 3)] + [("Make it snow", images[4], images[5])]
    expected = reference.backend.head_outputs([reference.prepare(*t) for t in triples])
    actual = fp16.backend.head_outputs([fp16.prepare(*t) for t in triples])
    diff, tol = max_abs_diff(actual, expected), tolerance("onnxruntime", "float16")
    assert within(diff, tol), (diff, tol)
    assert diff["mu"] > 0  # really half precision: not the float32 graphs under another name
