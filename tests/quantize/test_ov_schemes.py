"""OpenVINO schemes end to end: quantize the tiny export into IR, open it through its manifest, count
the compressed weights in the IR, and score it on the openvino backend against the float32 reference."""

from __future__ import annotations

import importlib.util
import itertools
import json
import shutil

import numpy as np
import pytest
from conftest import hidden_at_reward, random_image
from editreward_quant.cli import main as quantize_main
from editreward_rt import Scorer
from editreward_rt.errors import ManifestError
from editreward_rt.manifest import open_exported
from editreward_rt.schemes import QuantizeError, make_scheme, scheme_from_dict
from editreward_rt.tolerances import hidden_snr_floor_db, max_abs_diff, snr_db, tolerance

MISSING = [m for m in ("openvino", "nncf") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} (the openvino extra) not installed")

# label -> (scheme, options); the calibrated variant calibrates on 4 synthetic triples.
VARIANTS = {"ov-int8": ("ov-int8", {}), "ov-int4": ("ov-int4", {}),
            "ov-int4-awq": ("ov-int4", {"awq": "true", "scale_estimation": "true", "symmetric": "false"}),
            "ov-int8-vision": ("ov-int8", {"include_vision": "true"})}


@pytest.fixture(scope="module")
def ov_quantized(tiny_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp("ov-quantized")
    for label, (name, options) in VARIANTS.items():
        args = ["--model-dir", str(tiny_onnx), "--scheme", name, "--out", str(root / label), "--calib-size", "4"]
        assert quantize_main(args + [f"--option={k}={v}" for k, v in options.items()]) == 0
    return {label: root / label for label in VARIANTS}


def _weight_layers(onnx_folder) -> int:
    """Weight MatMuls and embedding lookups of the float decoder: what NNCF compresses."""
    import onnx
    from editreward_quant.ort_schemes import _embedding_gathers, _weight_matmuls

    model = onnx.load(str(onnx_folder / "decoder.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    return sum(map(len, _weight_matmuls(list(model.graph.node), inits).values())) + len(_embedding_gathers(model))


@pytest.mark.parametrize("label", VARIANTS)
def test_folder_is_ir_every_file_hashed(label, ov_quantized):
    folder = ov_quantized[label]
    model = open_exported(folder)
    manifest = model.manifest
    assert manifest["runtime"] == "openvino"
    assert manifest["quantization"]["graphs"] == ["decoder"] + (["vision"] if label.endswith("vision") else [])
    for name, graph in manifest["graphs"].items():
        assert graph["file"] == f"{name}.xml" and {f"{name}.xml", f"{name}.bin"} <= set(manifest["files"])
    assert not list(folder.glob("*.onnx*"))
    assert scheme_from_dict(manifest["quantization"]) == make_scheme(*VARIANTS[label])
    check = manifest["quantization"]["check"]
    assert check["kind"] == "decoder" and check["decoder_check_bytes"] <= check["budget_bytes"]  # tiny fits anywhere
    assert check["hidden_snr_db"] >= check["floor_db"] == round(hidden_snr_floor_db(manifest["quantization"], model.spec), 2)
    assert ("calibration" in manifest["quantization"]) == label.endswith("awq")


def test_a_tampered_bin_is_refused(ov_quantized, tmp_path):
    folder = tmp_path / "tampered"
    shutil.copytree(ov_quantized["ov-int8"], folder)
    data = bytearray((folder / "decoder.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "decoder.bin").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="decoder.bin fails its hash check"):
        open_exported(folder)
    with pytest.raises(ManifestError, match="decoder.bin"):
        Scorer.load(folder, backend="openvino", precision="fp32")


@pytest.mark.parametrize("label, low_bit", [("ov-int8", {"i8"}), ("ov-int4", {"i4", "u8"}), ("ov-int4-awq", {"u4", "u8"}),
                                            ("ov-int8-vision", {"i8"})])
def test_decoder_weights_are_low_bit_in_the_ir(label, low_bit, ov_quantized, tiny_onnx):
    """Every weight MatMul and the embedding lookup holds a low-bit constant (int8: i8; int4: i4 or
    u4, with NNCF's 8-bit asymmetric u8 for the embedding and the last layer); no float32 constant
    larger than a scale tensor is left; the heads, and the vision tower unless opted in, stay float
    (the manifest agrees)."""
    import openvino as ov
    from editreward_quant.ov_schemes import compressed_constants

    core = ov.Core()
    decoder = core.read_model(str(ov_quantized[label] / "decoder.xml"))
    counts = compressed_constants(decoder)
    assert set(counts) == low_bit and sum(counts.values()) == _weight_layers(tiny_onnx)
    if "i4" in counts or "u4" in counts:
        assert counts.get("i4", 0) + counts.get("u4", 0) > counts["u8"]  # 4 bits are the rule, 8 the exception
    floats = [int(np.prod(op.get_output_shape(0))) for op in decoder.get_ops()
              if op.get_type_name() == "Constant" and op.get_element_type().get_type_name() == "f32"]
    hidden = json.loads((tiny_onnx / "manifest.json").read_text())["spec"]["text"]["hidden_size"]
    assert max(floats) < hidden * hidden  # norms, rotary tables, scales: no weight matrix stays float
    manifest = json.loads((ov_quantized[label] / "manifest.json").read_text())
    recorded = manifest["quantization"]["compressed_constants"]
    assert recorded["decoder"] == counts
    for graph in ("vision", "heads"):
        found = compressed_constants(core.read_model(str(ov_quantized[label] / f"{graph}.xml")))
        assert found == recorded.get(graph, {}) and bool(found) == (graph == "vision" and label.endswith("vision"))


@pytest.mark.parametrize("label", VARIANTS)
def test_scores_within_the_schemes_row(label, ov_quantized, fast, reference, triples):
    """On the openvino backend in float32: the hidden-state SNR floor, the scheme's |d| row against
    the PyTorch reference, and its pair agreement ranking 8 edits of one source (28 pairs)."""
    scorer = Scorer.load(ov_quantized[label], backend="openvino", precision="fp32")
    assert scorer.description["precision"] == "fp32"
    quantization = scorer.backend.model.manifest["quantization"]
    tol = tolerance("openvino", quantization["scheme"])
    hidden, _ = hidden_at_reward(scorer, triples)
    expected_hidden, _ = hidden_at_reward(fast, triples)
    assert snr_db(expected_hidden, hidden) >= hidden_snr_floor_db(quantization, scorer.spec)
    expected = reference.backend.head_outputs([reference.prepare(*t) for t in triples])
    diff = max_abs_diff(scorer.backend.head_outputs([scorer.prepare(*t) for t in triples]), expected)
    assert diff["mu"] <= tol.mu and diff["log_sigma"] <= tol.log_sigma, diff
    source, edits = random_image(100, 300, 400), [random_image(200 + i, 240 + 30 * i, 320) for i in range(8)]
    want = [s.mu for s in reference.rank("Add a green bowl", source, edits)]
    got = [s.mu for s in scorer.rank("Add a green bowl", source, edits)]
    pairs = itertools.combinations(range(len(edits)), 2)
    agreement = np.mean([np.sign(got[i] - got[j]) == np.sign(want[i] - want[j]) for i, j in pairs])
    assert agreement >= tol.agreement, agreement


@pytest.mark.parametrize("label", ["ov-int8", "ov-int4", "ov-int4-asym", "ov-int8-vision"])
def test_the_streaming_check_checks_every_compressed_weight(label, tiny_onnx, tmp_path):
    """Beyond the budget (forced with a budget of 0 bytes) each compressed weight is checked against its
    float32 original alone: every one of them, within its floor, and the manifest says so."""
    from editreward_quant.ov_schemes import quantize_exported

    name, options = {**VARIANTS, "ov-int4-asym": ("ov-int4", {"symmetric": "false"})}[label]
    out = quantize_exported(tiny_onnx, make_scheme(name, options), tmp_path / "q", log=lambda *_: None, check_budget=0)
    quantization = json.loads((out / "manifest.json").read_text())["quantization"]
    check = quantization["check"]
    assert check["kind"] == "weights" and check["budget_bytes"] == 0 < check["decoder_check_bytes"]
    assert set(check["graphs"]) == set(quantization["graphs"])
    for graph, result in check["graphs"].items():
        assert result["weights"] == sum(quantization["compressed_constants"][graph].values())
        assert result["worst"]["snr_db"] >= result["worst"]["floor_db"]


def test_the_check_follows_the_budget(tiny_onnx):
    """The whole-decoder check where its estimate fits the budget, the streaming one a byte below; a
    calibrated ov-int4 below it is refused before any work."""
    from editreward_quant.ov_schemes import _check_plan, decoder_check_bytes

    model = open_exported(tiny_onnx)
    needs = decoder_check_bytes(model)
    assert needs > 2 * sum((tiny_onnx / n).stat().st_size for n in model.manifest["files"] if n.startswith("decoder."))
    def plan(budget, scheme="ov-int8", **options):
        return _check_plan(model, make_scheme(scheme, options), budget, lambda *_: None)

    assert plan(needs)["kind"] == "decoder" and plan(needs - 1)["kind"] == "weights"
    assert plan(needs - 1, "ov-int4")["kind"] == "weights"
    for options in ({"awq": "true"}, {"scale_estimation": "true"}):  # they run the float decoder to calibrate
        with pytest.raises(QuantizeError, match="calibrates on the float32 decoder"):
            plan(needs - 1, "ov-int4", **options)


@pytest.mark.parametrize("budget", [None, 0], ids=["decoder", "weights"])
def test_a_folder_beyond_the_noise_model_is_not_written(budget, tiny_onnx, tmp_path, monkeypatch):
    """4-bit weights under the int8 scheme (a broken compression): the decoder check (default budget)
    and the streaming check (none) both refuse it, and nothing is published."""
    import editreward_quant.ov_schemes as ov_schemes

    real = ov_schemes._nncf_options
    monkeypatch.setattr(ov_schemes, "_nncf_options", lambda scheme: real(make_scheme("ov-int4")))
    match = "below the scheme's floor" if budget is None else "below the scheme's per-weight floor"
    with pytest.raises(QuantizeError, match=match):
        ov_schemes.quantize_exported(tiny_onnx, make_scheme("ov-int8"), tmp_path / "out", log=lambda *_: None,
                                     check_budget=budget)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, options", [("ov-int8", {}), ("ov-int4", {"symmetric": "false", "group_size": "32"})])
def test_the_streaming_check_is_the_same_in_chunks(name, options, tiny_onnx, tmp_path, monkeypatch):
    """A weight compared a few rows at a time (per-row or per-group scales and zero points sliced with
    it) gives the numbers it gives whole."""
    import openvino as ov
    import editreward_quant.ov_schemes as ov_schemes

    scheme, spec = make_scheme(name, options), open_exported(tiny_onnx).spec
    out = ov_schemes.quantize_exported(tiny_onnx, scheme, tmp_path / "q", log=lambda *_: None, check_budget=0)
    check = lambda: ov_schemes.weight_check(ov.Core(), tiny_onnx / "decoder.onnx", out / "decoder.xml", scheme, spec)
    whole = check()
    monkeypatch.setattr(ov_schemes, "WEIGHT_CHUNK", 100)  # a row (or a group of 32 rows) at a time
    chunked = check()
    assert chunked["worst"]["weight"] == whole["worst"]["weight"]
    assert chunked["worst"]["snr_db"] == pytest.approx(whole["worst"]["snr_db"], abs=0.01)


@pytest.mark.parametrize("kind", ["i4", "u4", "i8", "u8"])
def test_low_bit_constants_read_back(kind):
    """``_values`` reads a packed 4-bit (or 8-bit) constant as OpenVINO's own Convert does, at any offset."""
    import openvino as ov
    from editreward_quant.ov_schemes import _values
    from openvino import opset13 as ops

    low, high = {"i4": (-8, 7), "u4": (0, 15), "i8": (-128, 127), "u8": (0, 255)}[kind]
    values = np.random.default_rng(0).integers(low, high + 1, 37)
    constant = ops.constant(values.astype(np.int8 if kind[0] == "i" else np.uint8), dtype=getattr(ov.Type, kind))
    converted = ov.Tensor(ov.Type.f32, [37])
    assert ops.convert(constant, ov.Type.f32).evaluate([converted], [constant.get_tensor_view()])
    np.testing.assert_array_equal(converted.data, values)
    for start, stop in [(0, 37), (1, 36), (3, 4), (10, 10)]:
        np.testing.assert_array_equal(_values(constant, start, stop), values[start:stop])


def test_options_validate():
    with pytest.raises(QuantizeError, match="ratio"):
        make_scheme("ov-int4", {"ratio": "0"})
    with pytest.raises(QuantizeError, match="power of two"):
        make_scheme("ov-int4", {"group_size": "100"})
    with pytest.raises(QuantizeError, match="no option"):
        make_scheme("ov-int8", {"group_size": "64"})
    scheme = make_scheme("ov-int4", {"ratio": "0.8", "awq": "true"})
    assert scheme.calibrated and scheme_from_dict(scheme.to_dict()) == scheme


def test_a_missing_nncf_names_the_extra(tiny_onnx, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    assert quantize_main(["--model-dir", str(tiny_onnx), "--scheme", "ov-int4", "--out", str(tmp_path / "q")]) == 2
    assert "editreward-deploy[ov-quant]" in capsys.readouterr().err and not (tmp_path / "q").exists()
