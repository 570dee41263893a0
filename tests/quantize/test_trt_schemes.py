"""TensorRT-targeted schemes (Q/DQ decoder graphs). The quantization itself needs NVIDIA ModelOpt,
which lives in its own environment (the ``trt-quant`` extra; absent from the main one and CI):
those tests skip without it. Calibration windows, SmoothQuant, the graph rewrites, the
missing-library error and the CLI wiring are tested everywhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import hidden_at_reward, save
from editreward_quant import cli
from editreward_quant import trt_schemes as trt_quant
from editreward_quant.calib import synthetic_triples
from editreward_rt import Scorer
from editreward_rt.backends.ort_backend import OrtBackend
from editreward_rt.schemes import (QuantizeError, TrtFp8, TrtInt4Awq, TrtInt8Sq, check_available, make_scheme, scheme_from_dict,
                                   trt_precisions)
from editreward_rt.tolerances import hidden_snr_floor_db, max_abs_diff, snr_db, tolerance

WINDOW = 8


def _session(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString() if hasattr(model, "SerializeToString") else str(model),
                                providers=["CPUExecutionProvider"])


def named(window: dict, folder) -> dict:
    """A role-keyed window feed -> keyed by the exported decoder's input names."""
    names = trt_quant.decoder_inputs(json.loads((folder / "manifest.json").read_text()))
    return {names[role]: value for role, value in window.items()}


@pytest.fixture(scope="module")
def recorded(tiny_onnx):
    """Decoder calls (feed, hidden, present) of the float export scoring two synthetic triples."""
    scorer = Scorer.load(tiny_onnx, backend="onnxruntime")
    graphs, calls = scorer.backend.graphs, []
    decode = graphs.decode

    def recording(*args):
        # Ask for every row's hidden state (the pipeline asks for a few), and hand the pipeline its own.
        *feeds, keep = args
        batch, steps = feeds[0].shape
        every = np.stack(np.meshgrid(np.arange(batch), np.arange(steps), indexing="ij"), axis=-1)  # [B, S, 2]
        hidden, present = decode(*feeds, every)
        calls.append((dict(zip(trt_quant.ROLES, feeds)), hidden, present))
        return (None if keep is None else hidden[keep[..., 0], keep[..., 1]]), present

    graphs.decode = recording
    scorer.score_batch(synthetic_triples(2, seed=3))
    del graphs.decode
    return calls


@pytest.fixture(scope="module")
def float_decoder(tiny_onnx):
    import onnx

    return onnx.load(str(tiny_onnx / "decoder.onnx"))


def test_windows_continue_the_recorded_cache_exactly(recorded, tiny_onnx):
    session = _session(tiny_onnx / "decoder.onnx")
    checked, zero_past = 0, 0
    for feed, hidden, present in recorded:
        for b, s in trt_quant.window_spans(feed, WINDOW)[::3]:
            window = trt_quant.window_feed(feed, present, b, s, WINDOW)
            assert window["ids"].shape == (1, WINDOW)
            assert window["cache"].shape[4] + WINDOW == window["mask"].shape[1]
            zero_past += window["cache"].shape[4] == 0
            got = session.run(["hidden"], named(window, tiny_onnx))[0][0]
            np.testing.assert_allclose(got, hidden[b, s : s + WINDOW], atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked >= 5 and zero_past >= 1  # the shared-prefix call starts from an empty cache


def test_recorded_windows_share_one_shape(tiny_onnx):
    windows = trt_quant.record_windows(tiny_onnx, synthetic_triples(2), window=WINDOW, limit=12)
    assert 1 <= len(windows) <= 12
    assert {w["input_ids"].shape for w in windows} == {(1, WINDOW)}
    assert {w["past"].shape[4] for w in windows} != {0}


def test_smoothquant_keeps_the_float_function(recorded, float_decoder, tmp_path, tiny_onnx):
    import onnx

    feeds = [named(trt_quant.window_feed(f, p, *trt_quant.window_spans(f, WINDOW)[-1], WINDOW), tiny_onnx)
             for f, _, p in recorded]
    layers = trt_quant.weight_matmuls(float_decoder.graph)
    tensors = sorted({n.input[0] for n in layers})
    maxima = trt_quant.activation_maxima(float_decoder, feeds, tensors, tmp_path)
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(float_decoder)
    assert trt_quant.smooth(smoothed, maxima, alpha=0.8) == len(tensors)
    onnx.checker.check_model(smoothed)
    inserted = {n.name for n in smoothed.graph.node if n.name.endswith("/smooth/Mul")}
    outer = {n.name.rsplit("/", 1)[0] + "/smooth/Mul" for n in layers if n.name.endswith(("o_proj/MatMul", "down_proj/MatMul"))}
    # The rest fold into norms, but in the last layer: its normed input also feeds the gather of the
    # rows kept (the only rows its queries are computed at), so a Mul smooths there too.
    final = max(int(n.name.split("/layers.")[1].split("/")[0]) for n in layers)
    last = {n for n in inserted - outer if f"/layers.{final}/self_attn/" in n}
    assert outer <= inserted and inserted == outer | last and len(last) >= 1
    before, after = _session(float_decoder), _session(smoothed)
    for feed in feeds:
        np.testing.assert_allclose(after.run(None, feed)[0], before.run(None, feed)[0], atol=2e-4, rtol=1e-3)
    # What smoothing is for: the activations the quantizer sees have flatter channel maxima.
    inputs = [n.input[0] for n in trt_quant.weight_matmuls(smoothed.graph)]
    flat = trt_quant.activation_maxima(smoothed, feeds, inputs, tmp_path)
    spread = lambda m: np.mean([v.max() / np.median(v) for v in m.values()])
    assert spread(flat) < spread(maxima)


def test_float32_islands_and_fp16_range(float_decoder):
    import onnx
    from onnx import numpy_helper

    keep = set(trt_quant.float32_nodes(float_decoder.graph, "position_ids"))
    assert {"/inner/Cos", "/inner/Sin", "/inner/Mul"} <= keep  # rotary angles
    for norm in ("/inner/layers.0/input_layernorm", "/inner/layers.1/post_attention_layernorm", "/inner/norm"):
        assert {f"{norm}/{op}" for op in ("Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul")} <= keep
        assert f"{norm}/Mul_1" not in keep  # the weight multiply runs in the low precision
    assert not any("proj" in name for name in keep)
    model = onnx.ModelProto()
    model.CopyFrom(float_decoder)
    assert trt_quant.clip_to_fp16_range(model) >= 1  # the attention mask's fill value
    values = [numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
              if a.name == "value"]
    assert max(np.abs(v).max() for v in values if v.dtype == np.float32 and v.size) <= trt_quant.FP16_MAX


def test_precision_names_and_configs():
    assert isinstance(trt_quant.resolve_scheme("fp8"), TrtFp8)
    assert isinstance(trt_quant.resolve_scheme("int8"), TrtInt8Sq)
    assert trt_quant.resolve_scheme("int4") == TrtInt4Awq()
    assert trt_quant.resolve_scheme("trt-int8-sq").alpha == 0.5
    for wrong in ("ort-int8", make_scheme("ort-int4")):
        with pytest.raises(QuantizeError, match="not a TensorRT scheme"):
            trt_quant.resolve_scheme(wrong)
    with pytest.raises(QuantizeError, match="unknown scheme"):
        trt_quant.resolve_scheme("fp4")
    for name, bad in (("trt-int8-sq", {"alpha": "1.5"}), ("trt-int4-awq", {"calibration_method": "max"}),
                      ("trt-fp8", {"high_precision_dtype": "fp64"}), ("trt-fp8", {"include_vision": "true"}),
                      ("trt-int4-awq", {"block_size": "100"})):
        with pytest.raises(QuantizeError):
            make_scheme(name, bad)
    assert make_scheme("trt-fp8", {"high_precision_dtype": "bf16"}).to_dict()["config"]["high_precision_dtype"] == "bf16"


def test_missing_modelopt_names_the_extra_and_its_own_environment(tiny_onnx, tmp_path, monkeypatch, capsys):
    import importlib.util

    for module in ("modelopt", "modelopt.onnx", "modelopt.onnx.quantization", "modelopt.onnx.autocast"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    with pytest.raises(QuantizeError, match=r"editreward-deploy\[trt-quant\]'.*of its own"):
        trt_quant.quantize_for_trt(tiny_onnx, "fp8", tmp_path / "o")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "modelopt" else real(name, *a))
    with pytest.raises(QuantizeError, match=r"editreward-deploy\[trt-quant\]'.*of its own"):
        check_available(make_scheme("trt-int4-awq"))
    assert cli.main(["--model-dir", str(tiny_onnx), "--scheme", "trt-fp8", "--out", str(tmp_path / "o")]) == 2
    assert "trt-quant" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_dispatches_trt_schemes(tiny, tmp_path, monkeypatch):
    from editreward_export import onnx_export

    calls = []
    monkeypatch.setattr(cli, "check_available", lambda scheme: None)
    monkeypatch.setattr(trt_quant, "quantize_for_trt", lambda *a, **k: calls.append((a, k)) or a[2])
    monkeypatch.setattr(onnx_export, "export_onnx", lambda ckpt, out, **k: Path(out))
    out = tmp_path / "q"
    assert cli.main(["--model-dir", str(tmp_path), "--scheme", "trt-int4-awq", "--out", str(out), "--calib-size", "3",
                     "--option", "block_size=64"]) == 0
    assert calls[-1] == ((tmp_path, TrtInt4Awq(block_size=64), out), {"calib": None, "calib_size": 3})
    assert cli.main(["--ckpt", str(tiny.checkpoint), "--scheme", "trt-fp8", "--out", str(out), "--calib", "c.jsonl"]) == 0
    (exported, scheme, _), options = calls[-1]
    assert exported.name == "fp32" and scheme == TrtFp8() and options == {"calib": "c.jsonl", "calib_size": 64}


# --- with ModelOpt ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def modelopt():
    return pytest.importorskip("modelopt")


@pytest.fixture(scope="module")
def trt_folders(modelopt, tiny_onnx, images, tmp_path_factory):
    """The three schemes on the tiny export: int8 through the CLI with a JSONL calibration file."""
    root = tmp_path_factory.mktemp("trt")
    for i in range(4):
        save(images[i], root, f"{i}.png")
    calib = root / "calib.jsonl"
    records = [{"instruction": f"Make it brighter {i}", "source": "0.png", "edited": f"{i}.png"} for i in (1, 2, 3)]
    calib.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli.main(["--model-dir", str(tiny_onnx), "--scheme", "trt-int8-sq", "--out", str(root / "trt-int8-sq"),
                     "--calib", str(calib)]) == 0
    out = {"trt-int8-sq": root / "trt-int8-sq"}
    for precision in ("fp8", "int4"):
        name = trt_precisions()[precision]
        out[name] = trt_quant.quantize_for_trt(tiny_onnx, precision, root / name, calib_size=4, log=lambda *_: None)
    return out


SCHEMES = ["trt-int8-sq", "trt-fp8", "trt-int4-awq"]
WEIGHT_TYPE = {"trt-int8-sq": "int8", "trt-fp8": "float8e4m3fn", "trt-int4-awq": "int4"}


@pytest.mark.parametrize("name", SCHEMES)
def test_folder_manifest_and_qdq_structure(name, trt_folders, tiny_onnx, float_decoder):
    import onnx
    from editreward_quant.ort_schemes import weight_bytes

    folder = trt_folders[name]
    entry = json.loads((folder / "manifest.json").read_text())["quantization"]
    assert entry["scheme"] == name and entry["strongly_typed"] is True and entry["graphs"] == ["decoder"]
    assert scheme_from_dict(entry).to_dict()["config"] == entry["config"]
    float_files = json.loads((tiny_onnx / "manifest.json").read_text())["files"]
    assert entry["source"]["decoder_sha256"] == float_files["decoder.onnx"]
    assert entry["calibration"]["windows"] >= 4
    for graph in ("vision", "heads"):
        assert (folder / f"{graph}.onnx").read_bytes() == (tiny_onnx / f"{graph}.onnx").read_bytes()
    onnx.checker.check_model(str(folder / "decoder.onnx"))
    decoder = onnx.load(str(folder / "decoder.onnx"))
    io = lambda g: [(v.name, v.type.tensor_type.elem_type) for v in list(g.input) + list(g.output)]
    assert io(decoder.graph) == io(float_decoder.graph)  # the runtime feeds it exactly as before

    qdq, layers = entry["qdq"], len(trt_quant.weight_matmuls(float_decoder.graph))
    assert qdq == trt_quant.qdq_summary(folder / "decoder.onnx")
    assert qdq["quantized_matmuls"] == layers == 14 and qdq["matmuls"] == 18  # attention's two MatMuls stay fp16
    # one quantized input per smoothing group (qkv, o, gate/up, down), and one more in the last layer,
    # whose q reads the kept rows where k and v read every row
    activations = 0 if name == "trt-int4-awq" else 4 * 2 + 1
    assert (qdq["quantize_linear"], qdq["dequantize_linear"]) == (activations, layers + activations)
    assert WEIGHT_TYPE[name] in qdq["weight_bytes"] and "float" not in qdq["weight_bytes"]
    ratio = weight_bytes(folder) / weight_bytes(tiny_onnx)
    assert ratio < (0.3 if name == "trt-int4-awq" else 0.4), ratio


def _ort_scorer(folder):
    """ONNX Runtime on CPU; its graph optimiser pushes FP8 Q/DQ through a Transpose in some versions."""
    from editreward_rt.errors import BackendError

    try:
        backend = OrtBackend(folder, optimization="all")
    except BackendError:
        backend = OrtBackend(folder, optimization="disable")
    return Scorer(backend, backend.model)


@pytest.mark.parametrize("name", SCHEMES)
def test_scheme_runs_on_onnx_runtime_cpu_within_its_floors(name, trt_folders, fast, reference, images):
    triples = [("Add a green bowl", images[0], e) for e in images[1:4]] + [("Make it snow", images[4], images[5])]
    scorer = _ort_scorer(trt_folders[name])
    tol = tolerance("onnxruntime", name)
    hidden, scores = hidden_at_reward(scorer, triples)
    expected_hidden, _ = hidden_at_reward(fast, triples)
    floor = hidden_snr_floor_db(scorer.backend.model.manifest["quantization"], scorer.spec)
    assert snr_db(expected_hidden, hidden) >= floor
    expected = reference.backend.head_outputs([reference.prepare(*t) for t in triples])
    diff = max_abs_diff(scorer.backend.head_outputs([scorer.prepare(*t) for t in triples]), expected)
    assert diff["mu"] <= tol.mu and diff["log_sigma"] <= tol.log_sigma, diff
    assert all(np.isfinite(s.mu) for s in scores)
    check = json.loads((trt_folders[name] / "manifest.json").read_text())["quantization"]["check"]
    assert check["ran"] and check["hidden_snr_db"] > 0


def test_quantized_or_busy_outputs_are_refused(trt_folders, tiny_onnx, tmp_path):
    with pytest.raises(QuantizeError, match="already quantized"):
        trt_quant.quantize_for_trt(trt_folders["trt-fp8"], "int8", tmp_path / "x", log=lambda *_: None)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(QuantizeError, match="already holds"):
        trt_quant.quantize_for_trt(tiny_onnx, "int4", busy, calib_size=1, log=lambda *_: None)
    assert (busy / "keep.txt").read_text() == "mine"
