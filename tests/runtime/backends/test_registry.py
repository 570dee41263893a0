"""The backend registry: the one place that names the backends, read by the Scorer, the CLI,
serve and the benchmarks; and the hand-written ONNX bytes of the I/O-binding helper graph."""

from __future__ import annotations

import numpy as np
import pytest
from editreward_rt import Scorer, backends
from editreward_rt.errors import BackendError


def test_every_entry_names_a_module_with_load():
    """... whose keyword options are exactly the ones the entry declares (none swallowed by ``**``)."""
    import importlib
    import inspect

    for entry in backends.BACKENDS.values():
        assert set(entry.modes) <= set(backends.MODES) and entry.extra and entry.devices
        load = importlib.import_module(entry.module).load
        params = inspect.signature(load).parameters.values()
        assert not [p for p in params if p.kind is p.VAR_KEYWORD], entry.name
        keywords = {p.name for p in params if p.kind is p.KEYWORD_ONLY} - {"mode"}
        assert keywords == set(entry.options), entry.name


def test_cli_and_serve_choices_come_from_the_registry():
    from editreward_rt.cli import build_parser

    parser = build_parser()
    score = parser._subparsers._group_actions[0].choices["score"]
    serve = parser._subparsers._group_actions[0].choices["serve"]
    for sub in (score, serve):
        backend = next(a for a in sub._actions if a.dest == "backend")
        assert tuple(backend.choices) == backends.names()


def test_a_new_entry_is_picked_up_everywhere(tiny_onnx, monkeypatch):
    """One line in BACKENDS makes a backend loadable by name (here an alias of onnxruntime), with
    its tolerance rows in the one table."""
    from editreward_rt.tolerances import Tolerance, tolerance

    alias = backends.BackendEntry("ort-alias", ("fast",), "onnx", "editreward_rt.backends.ort_backend",
                                  ("exported",), ("cpu",), ("device", "threads", "optimization", "io_binding"),
                                  {"float32": Tolerance(2e-4, 3e-4)})
    monkeypatch.setitem(backends.BACKENDS, alias.name, alias)
    scorer = Scorer.load(tiny_onnx, backend="ort-alias")
    assert scorer.description["backend"] == "onnxruntime"
    assert "ort-alias" in backends.names()
    assert tolerance("ort-alias", "float32") == Tolerance(2e-4, 3e-4)
    assert tolerance("torch-fast", "float32") == backends.BACKENDS["torch"].tolerances["float32"]
    with pytest.raises(BackendError, match="runs mode fast only; mode 'reference' is run by torch"):
        Scorer.load(tiny_onnx, backend="ort-alias", mode="reference")


def test_an_option_the_backend_does_not_take_names_the_backends_that_do(tiny_onnx):
    with pytest.raises(BackendError, match="not take option 'cuda_graphs': it is an option of the tensorrt backend"):
        Scorer.load(tiny_onnx, options={"cuda_graphs": True})
    with pytest.raises(BackendError, match="does not take option 'memory': it is an option of the torch backend"):
        Scorer.load(tiny_onnx, memory="per-call")
    with pytest.raises(BackendError, match="'turbo': no backend takes it"):
        backends.backend("onnxruntime").load(tiny_onnx, turbo=True)
    with pytest.raises(BackendError, match="'device' has an argument of its own"):
        Scorer.load(tiny_onnx, options={"device": "cpu"})
    with pytest.raises(BackendError, match="io_binding must be true or false"):
        Scorer.load(tiny_onnx, backend="onnxruntime", options={"io_binding": "yes"})


def test_options_reach_the_backend_and_none_means_not_given(tiny_onnx):
    """``io_binding`` (once unreachable) goes through ``Scorer.load``; a None option is the backend's default."""
    assert Scorer.load(tiny_onnx, backend="onnxruntime", options={"io_binding": True}).description["io_binding"] is True
    assert Scorer.load(tiny_onnx, backend="onnxruntime", options={"io_binding": None}).description["io_binding"] is False  # CPU default
    loaded, _ = backends.backend("onnxruntime").load(tiny_onnx, memory=None, optimization="basic")
    assert loaded.description["device"] == "cpu"
    with pytest.raises(BackendError, match="optimisation level 'fastest'"):
        Scorer.load(tiny_onnx, backend="onnxruntime", options={"optimization": "fastest"})


def test_description_device_is_where_it_runs(tiny_onnx, fast):
    import onnxruntime as ort
    from editreward_rt.backends.ort_backend import device_of

    assert Scorer.load(tiny_onnx).description["device"] == "cpu" and fast.description["device"] == "cpu"
    on_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    assert Scorer.load(tiny_onnx, device="auto").description["device"] == ("cuda:0" if on_gpu else "cpu")
    # ONNX Runtime names providers, not devices: the GPU's index comes from what was asked.
    assert device_of(["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda:1") == "cuda:1"
    assert device_of(["CUDAExecutionProvider", "CPUExecutionProvider"], "auto") == "cuda:0"
    assert device_of(["CPUExecutionProvider"], "auto") == "cpu"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU: names the GPU torch runs on")
def test_torch_description_names_the_gpu(tiny):
    scorer = Scorer.load(tiny.checkpoint, backend="torch", device="cuda", prompts_from=tiny.prompts)
    assert scorer.description["device"] == "cuda:0"


def test_helper_graphs_bytes_equal_onnx_helper():
    """The hand-serialised helper graphs of the I/O-binding path (cache rows along the layout's batch
    axis, the call's embedding table) are byte-identical to what onnx.helper
    writes, pass its checker, and compute what numpy does."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from editreward_rt.backends.ort_backend import _select_graph, _table_graph
    from editreward_rt.families import CacheLayout
    from onnx import TensorProto, helper

    def same(ours: bytes, nodes, inputs, outputs, name):
        expected = helper.make_model(helper.make_graph(nodes, name, inputs, outputs),
                                     opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        assert ours == expected.SerializeToString()
        onnx.checker.check_model(onnx.load_from_string(ours))
        return ort.InferenceSession(ours, providers=["CPUExecutionProvider"])

    rng, info = np.random.default_rng(0), helper.make_tensor_value_info
    layout = CacheLayout("float32", (2, 2, "batch", 1, "past", 2), 2, 4)
    dims = [f"d{i}" for i in range(6)]
    for dtype, elem in ((np.float32, TensorProto.FLOAT), (np.float16, TensorProto.FLOAT16)):
        session = same(_select_graph(layout, np.dtype(dtype)), [helper.make_node("Gather", ["cache", "rows"], ["selected"], axis=2)],
                       [info("cache", elem, dims), info("rows", TensorProto.INT64, ["R"])],
                       [info("selected", elem, dims[:2] + ["R"] + dims[3:])], "select_rows")
        cache, rows = rng.standard_normal(layout.shape(3, 4)).astype(dtype), np.array([2, 0, 2], np.int64)
        np.testing.assert_array_equal(session.run(None, {"cache": cache, "rows": rows})[0], np.take(cache, rows, axis=2))
    session = same(_table_graph(2), [helper.make_node("Concat", ["part_0", "part_1"], ["joined"], axis=0),
                                     helper.make_node("Gather", ["joined", "index"], ["table"], axis=0)],
                   [info("part_0", TensorProto.FLOAT, ["n0", "H"]), info("part_1", TensorProto.FLOAT, ["n1", "H"]),
                    info("index", TensorProto.INT64, ["R"])], [info("table", TensorProto.FLOAT, ["R", "H"])], "embedding_table")
    a, b, index = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((2, 4)).astype(np.float32), np.array([4, 0, 3])
    np.testing.assert_array_equal(session.run(None, {"part_0": a, "part_1": b, "index": index})[0], np.concatenate([a, b])[index])


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
