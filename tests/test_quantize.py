"""Quantization schemes that run on a CPU, end to end: quantize, load, score, parity floors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from editreward_quant.calib import load_triples, synthetic_triples
from editreward_quant.cli import main as quantize_main
from editreward_quant.ort_schemes import quantize_exported, weight_bytes
from editreward_quant.schemes import SCHEMES, QuantizeError, check_available, make_scheme, scheme_from_dict
from editreward_rt import Scorer
from editreward_rt.parity import max_abs_diff, snr_db, tolerance

from conftest import hidden_at_reward, save

pytest.importorskip("bitsandbytes")

CPU_SCHEMES = [("ort-int8", {}), ("ort-int8", {"mode": "weight_only"}), ("ort-int4", {}),
               ("bnb-int8", {}), ("bnb-nf4", {})]


@pytest.fixture(scope="module")
def quantized(tiny, tiny_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for name, options in CPU_SCHEMES:
        label = name + "".join(f"-{v}" for v in options.values())
        args = ["--scheme", name, "--out", str(root / label)] + [f"--option={k}={v}" for k, v in options.items()]
        if name.startswith("ort"):
            args += ["--model-dir", str(tiny_onnx)]
        else:
            args += ["--ckpt", str(tiny.checkpoint), "--prompts-from", str(tiny.prompts)]
        assert quantize_main(args) == 0
        out[label] = root / label
    return out


@pytest.mark.parametrize("label", ["ort-int8", "ort-int8-weight_only", "ort-int4", "bnb-int8", "bnb-nf4"])
def test_scheme_meets_its_floors(label, quantized, fast, reference, triples):
    scorer = Scorer.load(quantized[label])
    manifest = scorer.backend.model.manifest
    scheme = manifest["quantization"]["scheme"]
    assert scheme == label.split("-weight")[0]
    assert scheme_from_dict(manifest["quantization"]).to_dict()["config"] == manifest["quantization"]["config"]
    tol = tolerance(scorer.description["backend"], scheme)
    hidden, scores = hidden_at_reward(scorer, triples)
    expected_hidden, _ = hidden_at_reward(fast, triples)
    assert snr_db(expected_hidden, hidden) >= tol.hidden_snr_db
    expected = reference.backend.head_outputs([reference.prepare(*t) for t in triples])
    actual = scorer.backend.head_outputs([scorer.prepare(*t) for t in triples])
    diff = max_abs_diff(actual, expected)
    assert diff["mu"] <= tol.mu and diff["log_sigma"] <= tol.log_sigma, diff
    assert all(np.isfinite(s.mu) for s in scores)


def test_vision_and_heads_keep_their_precision(quantized, tiny_onnx):
    manifest = json.loads((quantized["ort-int4"] / "manifest.json").read_text())
    assert manifest["quantization"]["graphs"] == ["decoder"]
    for graph in ("vision", "heads"):
        assert (quantized["ort-int4"] / f"{graph}.onnx").read_bytes() == (tiny_onnx / f"{graph}.onnx").read_bytes()
    assert weight_bytes(quantized["ort-int4"]) < 0.5 * weight_bytes(tiny_onnx)
    assert weight_bytes(quantized["ort-int8"]) < 0.6 * weight_bytes(tiny_onnx)


def test_include_vision_quantizes_the_vision_graph(tiny_onnx, tmp_path):
    out = quantize_exported(tiny_onnx, make_scheme("ort-int8", {"include_vision": "true"}), tmp_path / "v", log=lambda *_: None)
    assert json.loads((out / "manifest.json").read_text())["quantization"]["graphs"] == ["decoder", "vision"]
    assert (out / "vision.onnx").read_bytes() != (tiny_onnx / "vision.onnx").read_bytes()


def test_configs_validate_and_serialise():
    assert set(SCHEMES) >= {"ort-int8", "ort-int4", "bnb-int8", "bnb-nf4", "gptq-int4", "trt-int8-sq", "trt-fp8", "trt-int4-awq"}
    scheme = make_scheme("ort-int4", {"block_size": "128", "accuracy_level": "0"})
    assert scheme.to_dict() == {"scheme": "ort-int4", "version": 1, "config": {
        "include_vision": False, "include_heads": False, "block_size": 128, "symmetric": True, "accuracy_level": 0}}
    for bad in ({"block_size": "48"}, {"accuracy_level": "9"}, {"nonsense": "1"}, {"include_heads": "true"}):
        with pytest.raises(QuantizeError):
            make_scheme("ort-int4", bad)
    with pytest.raises(QuantizeError, match="unknown scheme"):
        make_scheme("awq-int3")
    with pytest.raises(QuantizeError, match="version"):
        scheme_from_dict({"scheme": "ort-int8", "version": 7, "config": {}})


def test_missing_library_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else real(name, *a))
    with pytest.raises(QuantizeError, match=r"editreward-deploy\[gptq\]"):
        check_available(make_scheme("gptq-int4"), "cpu")


def test_scheme_without_its_library_says_so(tiny, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "modelopt" else real(name, *a))
    code = quantize_main(["--ckpt", str(tiny.checkpoint), "--scheme", "trt-fp8", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "trt-fp8" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_calibration_data(tmp_path, images):
    triples = synthetic_triples(3, seed=1)
    assert len(triples) == 3 and triples[0][1].dtype == np.uint8
    assert synthetic_triples(3, seed=1)[2][2].tobytes() == triples[2][2].tobytes()
    save(images[0], tmp_path, "a.png")
    save(images[1], tmp_path, "b.png")
    good = tmp_path / "calib.jsonl"
    good.write_text(json.dumps({"instruction": "x", "source": "a.png", "edited": "b.png"}) + "\n\n")
    assert load_triples(good)[0][1] == tmp_path / "a.png"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(QuantizeError, match="no triples"):
        load_triples(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "x"}\n')
    with pytest.raises(QuantizeError, match="broken.jsonl:1"):
        load_triples(broken)
    with pytest.raises(QuantizeError, match="cannot read"):
        load_triples(tmp_path / "missing.jsonl")
    with pytest.raises(QuantizeError, match="positive"):
        synthetic_triples(0)


def test_output_folder_guard(tiny_onnx, quantized, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert quantize_main(["--model-dir", str(tiny_onnx), "--scheme", "ort-int8", "--out", str(other)]) == 2
    assert "already holds" in capsys.readouterr().err and (other / "keep.txt").read_text() == "mine"
    # Re-quantizing the same source into its own earlier output replaces it.
    again = tmp_path / "again"
    shutil.copytree(quantized["ort-int8"], again)
    assert quantize_main(["--model-dir", str(tiny_onnx), "--scheme", "ort-int8", "--out", str(again)]) == 0
    assert not list(tmp_path.glob(".quantize-*"))


def test_quantized_input_is_refused(quantized, tmp_path):
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_exported(quantized["ort-int8"], make_scheme("ort-int4"), tmp_path / "x", log=lambda *_: None)


def test_bnb_folder_needs_fast_mode(quantized):
    from editreward_rt.errors import BackendError

    with pytest.raises(BackendError, match="fast mode"):
        Scorer.load(quantized["bnb-int8"], mode="reference")
