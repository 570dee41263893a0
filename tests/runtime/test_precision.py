"""``precision`` on every backend that honours it, its default, and the CPU's default engine.

The suite pins the default precision to fp32 (tests/conftest.py); these tests name theirs, or
unset the pin to test ``auto`` itself."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import hidden_at_reward, save

from editreward_rt import Scorer, backends
from editreward_rt.errors import BackendError
from editreward_rt.hardware import PRECISION_ENV, native_bf16, resolve_precision
from editreward_rt.scorer import _backend_name
from editreward_rt.tolerances import bf16_snr_floor_db, max_abs_diff, snr_db, tolerance

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


def _pairs_kept(reference, other) -> bool:
    """Every pair of edits of the first source (the fixture's first three triples) ordered alike."""
    ref, got = [s.mu for s in reference[:3]], [s.mu for s in other[:3]]
    return all((ref[i] > ref[j]) == (got[i] > got[j]) for i in range(3) for j in range(i + 1, 3))


def test_auto_is_bf16_exactly_where_the_cpu_has_bf16_units(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert resolve_precision(None, "cpu") == resolve_precision("auto", "cpu") == ("bf16" if native_bf16("cpu") else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cuda", cuda_capability=(9, 0)) == "bf16"
    assert resolve_precision("auto", "cuda", cuda_capability=(7, 5)) == "fp32"
    with pytest.raises(BackendError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_the_environment_sets_the_default_precision(monkeypatch, tiny):
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    assert resolve_precision(None, "cpu") == "fp32"
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    scorer = Scorer.load(tiny.checkpoint, backend="torch", prompts_from=tiny.prompts)
    assert scorer.description["dtype"] == "bfloat16" and scorer.engine == "torch bf16"
    monkeypatch.setenv(PRECISION_ENV, "half")
    with pytest.raises(BackendError, match="EDITREWARD_PRECISION='half'"):
        Scorer.load(tiny.checkpoint, backend="torch", prompts_from=tiny.prompts)


def test_the_reference_stays_float32_on_a_cpu_unless_asked(monkeypatch, tiny):
    """The reference is the yardstick: ``auto`` does not move it."""
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    reference = Scorer.load(tiny.checkpoint, backend="torch", mode="reference", prompts_from=tiny.prompts)
    assert reference.description["dtype"] == "float32"
    asked = Scorer.load(tiny.checkpoint, backend="torch", mode="reference", prompts_from=tiny.prompts, precision="bf16")
    assert asked.description["dtype"] == "bfloat16"


def test_torch_bf16_keeps_the_derived_snr_floor_and_the_pairs(tiny, triples):
    fp32 = Scorer.load(tiny.checkpoint, backend="torch", prompts_from=tiny.prompts, precision="fp32")
    bf16 = Scorer.load(tiny.checkpoint, backend="torch", prompts_from=tiny.prompts, precision="bf16")
    assert (fp32.engine, bf16.engine) == ("torch fp32", "torch bf16")
    h32, s32 = hidden_at_reward(fp32, triples)
    h16, s16 = hidden_at_reward(bf16, triples)
    floor = bf16_snr_floor_db(fp32.spec)
    assert snr_db(h32, h16) >= floor, (snr_db(h32, h16), floor)
    tol = tolerance("torch-fast", "bfloat16")
    diff = max_abs_diff(np.array([[s.mu, s.log_sigma] for s in s32]), np.array([[s.mu, s.log_sigma] for s in s16]))
    assert diff["mu"] <= tol.mu and diff["log_sigma"] <= tol.log_sigma, diff
    assert _pairs_kept(s32, s16)


def test_the_bf16_floor_lies_below_what_bf16_rounding_of_the_hidden_state_alone_costs(tiny):
    """The floor counts every block's roundings: never above the SNR of rounding the final state once."""
    spec = Scorer.load(tiny.checkpoint, backend="torch", prompts_from=tiny.prompts).spec
    once = -10 * np.log10(2.0**-16 / 12)
    assert 0 < bf16_snr_floor_db(spec) < once


def test_a_torch_dtype_and_a_precision_that_disagree_are_refused(tiny):
    with pytest.raises(BackendError, match="disagree"):
        Scorer.load(tiny.checkpoint, backend="torch", prompts_from=tiny.prompts, dtype="float32", precision="bf16")
    agreed = Scorer.load(tiny.checkpoint, backend="torch", prompts_from=tiny.prompts, dtype="bfloat16", precision="bf16")
    assert agreed.description["precision"] == "bf16"


def test_onnx_runtime_runs_its_graphs_precision_and_refuses_another(tiny_onnx):
    scorer = Scorer.load(tiny_onnx, backend="onnxruntime", precision="fp32")
    assert scorer.engine == "onnxruntime fp32"
    assert Scorer.load(tiny_onnx, backend="onnxruntime", precision="auto").engine == "onnxruntime fp32"
    with pytest.raises(BackendError, match="openvino"):
        Scorer.load(tiny_onnx, backend="onnxruntime", precision="bf16")


def test_a_backend_without_precision_refuses_it_by_name(tiny_onnx):
    with pytest.raises(BackendError, match="does not take option 'precision'"):
        backends.backend("tensorrt").load(tiny_onnx, precision="fp32")


def test_a_float_onnx_folder_on_a_cpu_loads_on_the_fastest_installed_engine(tiny_onnx, monkeypatch):
    expected = "openvino" if HAS_OPENVINO else "onnxruntime"
    assert backends.cpu_engine("fp32") == backends.cpu_engine("bf16") == expected
    assert _backend_name(tiny_onnx, None, "cpu") == expected
    assert Scorer.load(tiny_onnx).description["backend"] == expected
    # elsewhere, and for a folder that names its runtime, the folder's own runtime
    assert _backend_name(tiny_onnx, None, "cuda") == "onnxruntime"
    assert _backend_name(tiny_onnx, "onnxruntime", "cpu") == "onnxruntime"
    # options only ONNX Runtime takes name it; options neither takes go to the folder's runtime, which refuses them
    assert _backend_name(tiny_onnx, None, "cpu", None, ["threads", "io_binding"]) == "onnxruntime"
    assert _backend_name(tiny_onnx, None, "cpu", None, ["threads"]) == expected
    # without OpenVINO, ONNX Runtime
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert backends.cpu_engine("bf16") == "onnxruntime"


def test_each_scored_line_names_the_engine_and_precision_that_ran(tiny_onnx, images, tmp_path):
    source, edited = save(images[0], tmp_path, "s.png"), save(images[1], tmp_path, "e.png")
    run = subprocess.run([sys.executable, "-m", "editreward_rt.cli", "score", "--model", str(tiny_onnx),
                          "--backend", "onnxruntime", "--precision", "fp32", "--instruction", "Add a bowl",
                          "--source", str(source), "--edited", str(edited)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["backend"] == "onnxruntime fp32"


def test_a_float16_export_keeps_the_runtime_it_was_made_for(tiny_onnx, tmp_path):
    """The CPU default applies to float32 graphs: a float16 or bfloat16 export (made for a GPU) is
    not moved to another engine whose precision label would then misname what its graphs compute."""
    manifest = json.loads((tiny_onnx / "manifest.json").read_text())
    for precision in ("float16", "bfloat16"):
        folder = tmp_path / precision
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({**manifest, "precision": precision}))
        assert _backend_name(folder, None, "cpu") == "onnxruntime"


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed (the openvino extra)")
def test_openvino_loads_without_a_cache_where_none_can_be_made(tiny_onnx, tmp_path, monkeypatch, caplog):
    """No writable cache folder (no home, a read-only one) costs the cache, not the load; a
    cache_dir asked for that cannot be made is an error."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the default root lies under a file: mkdir fails
    scorer = Scorer.load(tiny_onnx, backend="openvino", precision="fp32")
    assert scorer.backend.cache_dir is None and "no compiled-model cache" in caplog.text
    with pytest.raises(BackendError, match="cannot hold the compiled-model cache"):
        Scorer.load(tiny_onnx, backend="openvino", precision="fp32", options={"cache_dir": str(blocker / "x")})
