"""The runtime is thin by construction: importing it and scoring an exported folder on ONNX
Runtime loads numpy, pillow, tokenizers and onnxruntime, and none of the torch side, the
build-time packages or the other backends' libraries. Each check runs in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from editreward_rt import backends

# Top-level modules that must stay out of a process that scores exported folders on ONNX Runtime.
FORBIDDEN = ("torch", "transformers", "safetensors", "onnx", "onnx_ir", "bitsandbytes", "gptqmodel", "modelopt",
             "tensorrt", "cuda", "ray", "fastapi", "pydantic", "jinja2", "yaml", "ml_dtypes", "matplotlib",
             "editreward_export", "editreward_trt", "editreward_quant", "editreward_bench")

SCRIPT = """
import json, sys
import numpy as np
import editreward_rt
import editreward_rt.cli
from editreward_rt import Scorer

scorer = Scorer.load(sys.argv[1])
rng = np.random.default_rng(0)
src, edit = (rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(2))
score = scorer.score("Add a green bowl", src, edit)
loaded = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps({"mu": score.mu, "loaded": loaded, "backend": scorer.description["backend"]}))
"""


def run_isolated(folder) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_scoring_an_exported_folder_loads_no_torch(tiny_onnx):
    result = run_isolated(tiny_onnx)
    engine = backends.cpu_engine()  # the default engine for a float ONNX folder on a CPU: its library is the one loaded
    assert result["backend"] == engine
    assert engine in result["loaded"] and "tokenizers" in result["loaded"]
    assert not set(FORBIDDEN) & set(result["loaded"]), sorted(set(FORBIDDEN) & set(result["loaded"]))


def test_scoring_a_quantized_folder_loads_no_quantizer(tiny_onnx, tmp_path):
    from editreward_quant.ort_schemes import quantize_exported
    from editreward_rt.schemes import make_scheme

    folder = quantize_exported(tiny_onnx, make_scheme("ort-int8"), tmp_path / "int8", log=lambda *_: None)
    result = run_isolated(folder)
    assert not set(FORBIDDEN) & set(result["loaded"]), sorted(set(FORBIDDEN) & set(result["loaded"]))


def test_the_check_sees_a_heavy_import():
    """The guard itself: a runtime module that pulled torch in would be caught."""
    script = "import sys, json; import editreward_rt, torch; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert "torch" in loaded


@pytest.mark.parametrize("command", [["make-fixture", "--out", "{tmp}"], ["demo", "--workdir", "{tmp}"]])
def test_a_command_whose_extra_is_missing_names_it(command, tmp_path):
    """With the torch side absent (imports of torch, safetensors and the exporter fail), the base
    CLI's commands that need it say which extra to install instead of a traceback."""
    blocked = ["torch", "safetensors", "editreward_export", "editreward_export.demo"]
    script = ("import sys\n"
              f"for name in {blocked!r}: sys.modules[name] = None\n"
              "from editreward_rt.cli import main\n"
              f"sys.exit(main({[a.replace('{tmp}', str(tmp_path / 'x')) for a in command]!r}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "pip install 'editreward-deploy[" in out.stderr and "Traceback" not in out.stderr
