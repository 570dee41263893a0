"""gptq-int4: GPTQ through GPTQModel on the tiny fixture, end to end on a CPU (quantize, save, load
through Scorer.load, score, parity floors). The tests that quantize need gptqmodel and are skipped
without it; the scheme's validation and the missing-library errors run everywhere."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import hidden_at_reward, save
from editreward_quant.cli import main as quantize_main
from editreward_rt import Scorer
from editreward_rt.errors import BackendError
from editreward_rt.schemes import QuantizeError, make_scheme, scheme_from_dict
from editreward_rt.tolerances import hidden_snr_floor_db, max_abs_diff, snr_db, tolerance

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantize(tiny, out, *extra):
    assert quantize_main(["--ckpt", str(tiny.checkpoint), "--prompts-from", str(tiny.prompts),
                          "--scheme", "gptq-int4", "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def gptq_default(tiny, tmp_path_factory):
    pytest.importorskip("gptqmodel")
    return _quantize(tiny, tmp_path_factory.mktemp("gptq") / "default", "--calib-size", "8")


@pytest.fixture(scope="module")
def gptq_jsonl(tiny, images, tmp_path_factory):
    """Calibration from a user's JSONL, with act-order, 32-column groups (two groups per row on tiny)
    and a 4-bit token embedding."""
    pytest.importorskip("gptqmodel")
    root = tmp_path_factory.mktemp("gptq-jsonl")
    names = [save(images[i], root, f"{i}.png").name for i in range(4)]
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"instruction": text, "source": names[0], "edited": edited}) + "\n"
                             for text, edited in (("Add a green bowl", names[1]), ("Make it snow", names[2]),
                                                  ("Remove the lamp", names[3]))))
    return _quantize(tiny, root / "out", "--calib", str(calib), "--option", "desc_act=true",
                     "--option", "group_size=32", "--option", "embedding_bits=4")


@pytest.mark.parametrize("which", ["gptq_default", "gptq_jsonl"])
def test_gptq_meets_its_floors(which, request, fast, reference, triples):
    folder = request.getfixturevalue(which)
    scorer = Scorer.load(folder)
    assert scorer.description["backend"] == "torch" and scorer.description["quantization"] == "gptq-int4"
    tol = tolerance("torch", "gptq-int4")
    hidden, scores = hidden_at_reward(scorer, triples)
    expected_hidden, _ = hidden_at_reward(fast, triples)
    floor = hidden_snr_floor_db(scorer.backend.model.manifest["quantization"], scorer.spec)
    assert snr_db(expected_hidden, hidden) >= floor
    assert snr_db(expected_hidden, hidden) < 60  # the decoder really runs quantized
    expected = reference.backend.head_outputs([reference.prepare(*t) for t in triples])
    actual = scorer.backend.head_outputs([scorer.prepare(*t) for t in triples])
    diff = max_abs_diff(actual, expected)
    assert diff["mu"] <= tol.mu and diff["log_sigma"] <= tol.log_sigma, diff
    assert all(np.isfinite(s.mu) and np.isfinite(s.log_sigma) for s in scores)


def test_folder_holds_packed_decoder_linears_only(gptq_default, tiny):
    from editreward_families.qwen2_5_vl.weights import split_state_dict
    from editreward_rt.checkpoint import open_checkpoint
    from safetensors.numpy import load_file

    manifest = json.loads((gptq_default / "manifest.json").read_text())
    quant = manifest["quantization"]
    assert manifest["runtime"] == "torch" and manifest["weights"] == "model.safetensors"
    assert scheme_from_dict(quant) == make_scheme("gptq-int4")
    assert quant["kernel"]["layout"] == "gptq_v2" and quant["kernel"]["bits"] == 4
    assert quant["calibration"]["triples"] == "synthetic:8" and quant["calibration"]["count"] == 8
    assert quant["calibration"]["tokens"] > 0
    state = load_file(str(gptq_default / "model.safetensors"))
    assert {k.split(".")[0] for k in state} == {"vision", "decoder", "heads"}
    float_parts = split_state_dict(open_checkpoint(str(tiny.checkpoint), prompts_from=str(tiny.prompts)).state_dict())
    packed = float_bytes = 0
    for key, value in float_parts["decoder"].items():
        linear = key.rsplit(".", 2)[-2] if key.endswith((".weight", ".bias")) else None
        if linear in LINEARS:
            prefix = f"decoder.{key.rsplit('.', 1)[0]}"
            assert f"{prefix}.weight" not in state
            assert state[f"{prefix}.qweight"].dtype == np.int32 and state[f"{prefix}.scales"].dtype == np.float16
            if key.endswith(".weight"):
                float_bytes += value.numel() * value.element_size()
                packed += sum(state[f"{prefix}.{n}"].nbytes for n in ("qweight", "qzeros", "scales", "g_idx"))
        elif key == "embed_tokens.weight":  # int8 rows, a float scale each
            rows, width = value.shape
            assert f"decoder.{key}" not in state
            assert state["decoder.embed_tokens.qweight"].dtype == np.int8
            assert state["decoder.embed_tokens.qweight"].shape == (rows, width)
            assert state["decoder.embed_tokens.scales"].shape == (rows, 1)
            assert quant["embedding"] == {"bits": 8, "block_size": width, "shape": [rows, width]}
            float_bytes += value.numel() * value.element_size()
            packed += sum(state[f"decoder.embed_tokens.{n}"].nbytes for n in ("qweight", "scales"))
        else:  # norms keep their values
            assert np.array_equal(state[f"decoder.{key}"], value.numpy())
    assert packed < 0.3 * float_bytes
    for part in ("vision", "heads"):  # vision tower and reward heads are not quantized
        for key, value in float_parts[part].items():
            assert np.array_equal(state[f"{part}.{key}"], value.numpy()), key


def test_packed_weights_stay_close_to_the_float_ones(gptq_jsonl, tiny):
    from editreward_rt.checkpoint import open_checkpoint

    scorer = Scorer.load(gptq_jsonl)
    quant = scorer.backend.model.manifest["quantization"]
    assert quant["config"]["desc_act"] is True and quant["config"]["group_size"] == 32
    assert quant["calibration"]["count"] == 3 and quant["calibration"]["triples"].endswith("calib.jsonl")
    float_state = open_checkpoint(str(tiny.checkpoint), prompts_from=str(tiny.prompts)).state_dict()
    layer = scorer.backend.graphs.decoder.layers[0]
    for parent, name in ((layer.self_attn, "q_proj"), (layer.mlp, "down_proj")):
        module = getattr(parent, name)
        assert type(module).__name__ == "TorchLinear"
        kind = "self_attn" if parent is layer.self_attn else "mlp"
        original = float_state[f"model.language_model.layers.0.{kind}.{name}.weight"].float()
        dequantized = module.dequantize_weight().T.float()
        assert dequantized.shape == original.shape
        error = ((dequantized - original).norm() / original.norm()).item()
        assert 0 < error < 0.2, (name, error)
        # 4-bit codes: at most 16 distinct values per row within a group
        group = module.g_idx.long() == module.g_idx[0].long()
        assert len(np.unique(dequantized[0, group].numpy())) <= 16


def test_gptq_folder_runs_fast_mode_only(gptq_default):
    with pytest.raises(BackendError, match="fast mode"):
        Scorer.load(gptq_default, mode="reference")


def test_gptq_options_validate():
    scheme = make_scheme("gptq-int4", {"group_size": "64", "desc_act": "true", "sym": "false"})
    assert scheme.to_dict() == {"scheme": "gptq-int4", "version": 2, "config": {
        "include_vision": False, "include_heads": False, "group_size": 64, "desc_act": True, "sym": False,
        "embedding_bits": 8}}
    assert scheme_from_dict(scheme.to_dict()) == scheme
    for bad in ({"group_size": "2048"}, {"group_size": "100"}, {"include_vision": "true"}, {"embedding_bits": "2"}):
        with pytest.raises(QuantizeError):
            make_scheme("gptq-int4", bad)


def test_loading_without_gptqmodel_names_the_extra(monkeypatch):
    from editreward_quant.layers.gptq import quant_linear_class

    monkeypatch.setitem(sys.modules, "gptqmodel.nn_modules.qlinear.torch", None)
    with pytest.raises(BackendError, match=r"editreward-deploy\[gptq\]"):
        quant_linear_class()


def test_gpu_matrix_script_covers_gptq(tmp_path):
    """benchmarks/gpu_check.py's matrix includes gptq-int4, quantized in the run and parity-checked
    before it is timed; where gptqmodel is missing the row says so instead of the script failing.
    Dry run of the same code on the tiny fixture on the CPU."""
    import importlib.util

    from editreward_bench.gpu_matrix import main as gpu_check

    out = tmp_path / "gpu-check.json"
    assert gpu_check(["--dry-run", "--dtypes", "float32", "--reps", "1", "--gptq-calib", "4", "--workdir", str(tmp_path / "work"),
                      "--only", "torch-fast-float32", "gptq-int4", "differentiable-backward-float32", "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["torch-reference-float32", "torch-fast-float32", "differentiable-backward-b1",
                          "differentiable-backward-b4", "gptq-int4", "onnxruntime-cuda"]
    assert all(rows[f"differentiable-backward-b{b}"]["grad_finite"] for b in (1, 4))
    assert rows["torch-fast-float32"]["status"] == "ok"
    row = rows["gptq-int4"]
    if importlib.util.find_spec("gptqmodel") is None:
        assert row["status"] == "skipped" and "gptqmodel" in row["reason"]
        return
    assert row["status"] == "ok", row
    assert row["backend"]["quantization"] == "gptq-int4" and row["backend"]["quantize"]["calibration"]["count"] == 4
    tol = tolerance("torch", "gptq-int4")
    assert row["parity"]["max_abs_diff"]["mu"] <= tol.mu
    assert row["batch1"]["p50_ms"] > 0


def test_a_gptq_folder_passes_gradients(gptq_default):
    """GPTQModel's torch kernel dequantizes and multiplies with torch ops: gradients reach the image."""
    import torch
    from editreward_rt.differentiable import DifferentiableReward

    reward = DifferentiableReward.load(gptq_default, dtype="float32")
    edit = torch.rand(1, 3, 448, 448, requires_grad=True)
    reward(["Add a bowl"], torch.rand(1, 3, 448, 448), edit)[0, 0].backward()
    assert edit.grad is not None and torch.isfinite(edit.grad).all() and edit.grad.abs().sum() > 0
