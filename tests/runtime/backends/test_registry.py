"""The backend registry: the one place that names the backends, read by the Scorer, the CLI,
serve and the benchmarks; and the hand-written ONNX bytes of the I/O-binding helper graph."""

from __future__ import annotations

import numpy as np
import pytest
from editreward_rt import Scorer, backends
from editreward_rt.errors import BackendError


def test_every_entry_names_a_module_with_load():
    import importlib

    for entry in backends.BACKENDS.values():
        assert set(entry.modes) <= set(backends.MODES) and entry.extra and entry.devices
        assert callable(importlib.import_module(entry.module).load)


def test_cli_and_serve_choices_come_from_the_registry():
    from editreward_rt.cli import build_parser

    parser = build_parser()
    score = parser._subparsers._group_actions[0].choices["score"]
    serve = parser._subparsers._group_actions[0].choices["serve"]
    for sub in (score, serve):
        backend = next(a for a in sub._actions if a.dest == "backend")
        assert tuple(backend.choices) == backends.names()


def test_a_new_entry_is_picked_up_everywhere(tiny_onnx, monkeypatch):
    """One line in BACKENDS makes a backend loadable by name (here an alias of onnxruntime)."""
    alias = backends.BackendEntry("ort-alias", ("fast",), "onnx", "editreward_rt.backends.ort_backend",
                                  ("exported",), ("cpu",))
    monkeypatch.setitem(backends.BACKENDS, alias.name, alias)
    scorer = Scorer.load(tiny_onnx, backend="ort-alias")
    assert scorer.description["backend"] == "onnxruntime"
    assert "ort-alias" in backends.names()
    with pytest.raises(BackendError, match="runs mode fast only; mode 'reference' is run by torch"):
        Scorer.load(tiny_onnx, backend="ort-alias", mode="reference")


def test_select_graph_bytes_equal_onnx_helper():
    """The hand-serialised Gather graph is byte-identical to what onnx.helper writes, and runs."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from editreward_rt.backends.ort_backend import _select_graph
    from onnx import TensorProto, helper

    for dtype, elem in ((np.float32, TensorProto.FLOAT), (np.float16, TensorProto.FLOAT16)):
        graph = helper.make_graph(
            [helper.make_node("Gather", ["cache", "rows"], ["selected"], axis=2)], "select_rows",
            [helper.make_tensor_value_info("cache", elem, ["L", 2, "B", "H", "T", "D"]),
             helper.make_tensor_value_info("rows", TensorProto.INT64, ["R"])],
            [helper.make_tensor_value_info("selected", elem, ["L", 2, "R", "H", "T", "D"])])
        expected = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        ours = _select_graph(np.dtype(dtype))
        assert ours == expected.SerializeToString()
        onnx.checker.check_model(onnx.load_from_string(ours))
        cache = np.random.default_rng(0).standard_normal((2, 2, 3, 1, 4, 2)).astype(dtype)
        rows = np.array([2, 0, 2], np.int64)
        session = ort.InferenceSession(ours, providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(session.run(None, {"cache": cache, "rows": rows})[0], np.take(cache, rows, axis=2))


def test_io_binding_path_runs_without_the_onnx_package(tiny_onnx, images):
    """The CUDA path's I/O binding (exercised on the CPU here) needs onnxruntime alone."""
    import subprocess
    import sys

    script = ("import sys; sys.modules['onnx'] = None\n"
              "import numpy as np\n"
              "from editreward_rt.backends.ort_backend import OrtBackend\n"
              "from editreward_rt import Scorer\n"
              f"b = OrtBackend({str(tiny_onnx)!r}, io_binding=True)\n"
              "s = Scorer(b, b.model)\n"
              "img = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)\n"
              "print(s.rank('Add a bowl', img, [img, img[::-1]])[0].mu)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
