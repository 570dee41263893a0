"""The OpenVINO backend: fp32 equal to the PyTorch reference at the float32 row, bf16 within its
row, above the derived hidden-state SNR floor and keeping the reference's preferences, the
compiled-model cache kept outside the model folder, and folders of OpenVINO IR graphs (.xml + .bin)
held to the manifest's hashes like every file."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import shutil

import numpy as np
import pytest
from conftest import hidden_at_reward

from editreward_rt import Scorer, hardware
from editreward_rt.backends import backend
from editreward_rt.errors import BackendError, ManifestError
from editreward_rt.manifest import MANIFEST, open_exported, referenced_files, write_manifest
from editreward_rt.tolerances import BATCH_SHAPE_FLOAT32, bf16_snr_floor_db, max_abs_diff, snr_db, tolerance, within

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="OpenVINO is not installed (pip install 'editreward-deploy[openvino]')")
GRAPHS = ("vision", "decoder", "heads")


def _load(folder, **options):
    scorer_backend, model = backend("openvino").load(folder, **{"cache_dir": "off", **options})
    return Scorer(scorer_backend, model)


def _outputs(scorer, triples) -> np.ndarray:
    """Per-head (mu, log_sigma) [T, K, 2] of ``triples`` (instruction, source, edited)."""
    return scorer.backend.head_outputs([scorer.prepare(*t) for t in triples])


@pytest.fixture(scope="module")
def mixed(images):
    """Five edits of one source (10 pairs to order) and two more triples: square, landscape,
    portrait, very wide, very tall, tiny and 1080p images."""
    return [("Add a green bowl", images[0], e) for e in images[1:6]] + [("Make it snow", images[4], images[5]),
                                                                      ("Turn the cat into a tiger", images[6], images[2])]


@pytest.fixture(scope="module")
def expected(reference, mixed):
    return _outputs(reference, mixed)


@needs_openvino
def test_fp32_equals_the_reference(tiny_onnx, mixed, expected):
    scorer = _load(tiny_onnx, precision="fp32")
    assert scorer.description["precision"] == "fp32" and scorer.description["backend"] == "openvino"
    diff = max_abs_diff(_outputs(scorer, mixed), expected)
    assert within(diff, tolerance("openvino", "float32")), diff


@needs_openvino
def test_levels_decoded_in_bounded_calls_score_as_whole_levels(tiny_onnx, mixed, expected):
    """``call_tokens``: each level in calls of at most that many tokens (the kept chunk aside),
    each continuing the cache of the one before, equal to whole levels at the float32 tolerance."""
    whole, chunked = _load(tiny_onnx, precision="fp32", call_tokens=0), _load(tiny_onnx, precision="fp32", call_tokens=24)
    assert chunked.description["call_tokens"] == 24 and whole.description["call_tokens"] == 0
    calls = {}
    for name, scorer in (("whole", whole), ("chunked", chunked)):
        graphs, seen = scorer.backend.graphs, []
        original = graphs.decode
        graphs.decode = lambda *a, _o=original, _s=seen: (_s.append((a[0].shape, a[6] is not None)), _o(*a))[1]
        calls[name] = (_outputs(scorer, mixed), seen)
    (got_whole, seen_whole), (got, seen) = calls["whole"], calls["chunked"]
    assert len(seen) > len(seen_whole)  # some levels were split
    assert all(rows * cols <= 24 for (rows, cols), keeps in seen if not keeps)  # the kept chunk may be longer
    # Kept rows were taken from a chunk that started past column 0 (their positions shifted).
    assert max(cols for (_, cols), keeps in seen if keeps) < max(cols for (_, cols), keeps in seen_whole if keeps)
    assert max(max_abs_diff(got, got_whole).values()) <= BATCH_SHAPE_FLOAT32
    assert within(max_abs_diff(got, expected), tolerance("openvino", "float32"))
    for bad in (-1, 2.5, True):
        with pytest.raises(BackendError, match="call_tokens"):
            _load(tiny_onnx, call_tokens=bad)


@needs_openvino
def test_bf16_within_its_row_above_the_snr_floor_and_keeps_the_pairs(tiny_onnx, mixed, expected):
    fp32, bf16 = _load(tiny_onnx, precision="fp32"), _load(tiny_onnx, precision="bf16")
    if hardware.native_bf16("cpu"):
        assert bf16.description["precision"] == "bf16"
    # The reward heads stay float32, as upstream keeps them.
    assert bf16.backend.graphs.compiled["heads"].get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    actual, tol = _outputs(bf16, mixed), tolerance("openvino", "bfloat16")
    # The row is three times the relative hidden-state error bf16's noise model allows (registry comment).
    assert 3 * 10 ** (-bf16_snr_floor_db(bf16.spec, margin_db=0) / 20) <= tol.mu
    assert within(max_abs_diff(actual, expected), tol), max_abs_diff(actual, expected)
    h32, _ = hidden_at_reward(fp32, mixed)
    h16, _ = hidden_at_reward(bf16, mixed)
    assert snr_db(h32, h16) >= bf16_snr_floor_db(bf16.spec), (snr_db(h32, h16), bf16_snr_floor_db(bf16.spec))
    # The preferred edit of every pair of the first three edits (the ``triples`` fixture's, as torch
    # bf16 is held in tests/runtime/test_precision.py), however close: the task-level gate.
    mu_e, mu_a = expected.mean(axis=1)[:3, 0], actual.mean(axis=1)[:3, 0]
    for i, j in itertools.combinations(range(3), 2):
        assert np.sign(mu_a[i] - mu_a[j]) == np.sign(mu_e[i] - mu_e[j]), (mu_e, mu_a)


@needs_openvino
def test_auto_is_what_the_cpu_flags_say(tiny_onnx, monkeypatch):
    """``auto`` follows ``hardware.native_bf16``: fp32 on a CPU whose flags name no bf16 unit."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda *a: frozenset({"avx2", "avx512f"}))
    assert _load(tiny_onnx, precision="auto").description["precision"] == "fp32"
    monkeypatch.setattr(hardware, "cpu_flags", lambda *a: frozenset({"avx512f", "avx512_bf16"}))
    assert hardware.resolve_precision("auto", "cpu") == "bf16"
    with pytest.raises(BackendError, match="unknown precision 'half'"):
        _load(tiny_onnx, precision="half")
    with pytest.raises(BackendError, match="cpu only"):
        _load(tiny_onnx, device="cuda")


def _files(folder) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@needs_openvino
def test_the_compiled_model_cache_lives_outside_the_folder_keyed_by_its_manifest(tiny_onnx, tmp_path, monkeypatch):
    before = _files(tiny_onnx)
    key = hashlib.sha256((tiny_onnx / MANIFEST).read_bytes()).hexdigest()[:16]
    first = backend("openvino").load(tiny_onnx, precision="fp32", cache_dir=str(tmp_path))[0]
    assert first.cache_dir == tmp_path / key / "fp32" and any(first.cache_dir.iterdir())
    assert not any(g.get_property("LOADED_FROM_CACHE") for g in first.graphs.compiled.values())
    second = backend("openvino").load(tiny_onnx, precision="fp32", cache_dir=str(tmp_path))[0]
    assert all(g.get_property("LOADED_FROM_CACHE") for g in second.graphs.compiled.values())
    assert _files(tiny_onnx) == before  # the model folder gained and changed nothing
    # The default root honours $XDG_CACHE_HOME; "off" and "" turn the cache off.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = backend("openvino").load(tiny_onnx, precision="fp32")[0]
    assert default.cache_dir == tmp_path / "xdg" / "editreward" / "openvino" / key / "fp32"
    assert backend("openvino").load(tiny_onnx, precision="fp32", cache_dir="off")[0].cache_dir is None
    assert backend("openvino").load(tiny_onnx, precision="fp32", cache_dir="")[0].cache_dir is None
    with pytest.raises(BackendError, match="inside the model folder"):
        backend("openvino").load(tiny_onnx, precision="fp32", cache_dir=str(tiny_onnx))
    assert _files(tiny_onnx) == before
    open_exported(tiny_onnx)  # still a valid folder: every file hashed


def _ir_folder(onnx_folder, out):
    """The ONNX folder's graphs as OpenVINO IR (float32 weights kept), with a manifest written by
    the project's own writer: every file hashed, ``runtime`` openvino."""
    import openvino as ov

    model = open_exported(onnx_folder)
    out.mkdir()
    core = ov.Core()
    for name in GRAPHS:
        ov.save_model(core.read_model(str(model.graph_path(name))), str(out / f"{name}.xml"), compress_to_fp16=False)
    shutil.copy2(model.root / model.manifest["tokenizer"], out / model.manifest["tokenizer"])
    manifest = {k: v for k, v in model.manifest.items() if k not in ("format", "manifest_version", "files", "validation")}
    manifest["graphs"] = {n: {**g, "file": f"{n}.xml"} for n, g in manifest["graphs"].items()}
    write_manifest(out, {**manifest, "runtime": "openvino"})
    return out


@pytest.fixture(scope="module")
def ir_folder(tiny_onnx, tmp_path_factory):
    return _ir_folder(tiny_onnx, tmp_path_factory.mktemp("ir") / "tiny-ir")


@needs_openvino
def test_an_ir_folder_loads_by_its_runtime_and_scores_as_the_onnx_graphs(ir_folder, tiny_onnx, mixed, expected):
    scorer = Scorer.load(ir_folder, precision="fp32", options={"cache_dir": "off"})
    assert scorer.description["backend"] == "openvino"
    actual = _outputs(scorer, mixed)
    assert within(max_abs_diff(actual, expected), tolerance("openvino", "float32"))
    # the same graphs on the same engine: equal to float32 reordering
    onnx = _outputs(_load(tiny_onnx, precision="fp32"), mixed)
    assert max(max_abs_diff(actual, onnx).values()) <= BATCH_SHAPE_FLOAT32


def test_an_ir_graph_references_its_weights_file():
    files = referenced_files({"graphs": {"decoder": {"file": "decoder.xml"}, "heads": {"file": "heads.onnx"}}})
    assert files["decoder.bin"] == "graph 'decoder''s weights" and "heads.bin" not in files


@needs_openvino
def test_an_ir_weights_file_unhashed_or_altered_is_refused(ir_folder, tmp_path):
    missing = shutil.copytree(ir_folder, tmp_path / "missing")
    manifest = json.loads((missing / MANIFEST).read_text())
    (missing / "decoder.bin").unlink()
    del manifest["files"]["decoder.bin"]
    (missing / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"graph 'decoder''s weights \(decoder.bin\) not covered"):
        _load(missing)
    altered = shutil.copytree(ir_folder, tmp_path / "altered")
    data = bytearray((altered / "heads.bin").read_bytes())
    data[len(data) // 2] ^= 0x40
    (altered / "heads.bin").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="heads.bin fails its hash check"):
        _load(altered)


@needs_openvino
def test_a_graph_that_is_not_what_the_spec_implies_is_refused(ir_folder, tmp_path):
    swapped = shutil.copytree(ir_folder, tmp_path / "swapped")
    for ext in (".xml", ".bin"):
        shutil.copy2(swapped / f"vision{ext}", swapped / f"heads{ext}")
    manifest = {k: v for k, v in json.loads((swapped / MANIFEST).read_text()).items()
                if k not in ("format", "manifest_version", "files")}
    write_manifest(swapped, manifest)  # hashes that match: only the graph check can tell
    with pytest.raises(ManifestError, match="heads.xml: the graph's inputs"):
        _load(swapped)
