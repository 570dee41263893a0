"""Model folders are tamper-evident and checked at load, not at the first score: every file the
runtime reads is covered by the manifest's hashes, and the manifest's spec must fit the graphs."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from editreward_rt import Scorer, backends
from editreward_rt.errors import ManifestError
from editreward_rt.manifest import MANIFEST, sha256_file


def copy_export(tiny_onnx, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_onnx, folder)
    return folder


def edit_manifest(folder, change, rehash: bool = False):
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    if rehash:
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_an_unaltered_copy_loads(tiny_onnx, tmp_path):
    assert Scorer.load(copy_export(tiny_onnx, tmp_path), backend="onnxruntime").description["backend"] == "onnxruntime"
    (tmp_path / "again").mkdir()
    assert Scorer.load(copy_export(tiny_onnx, tmp_path / "again")).description["backend"] == backends.cpu_engine()


@pytest.mark.parametrize("case,message", [
    ("graph hash removed", "not covered by the manifest's hashes"),
    ("graph points at an unlisted file", "not covered by the manifest's hashes"),
    ("graph points outside the folder", "not a file inside the model folder"),
    ("hash entry names a path", "not a file inside the model folder"),
    ("an unlisted file in the folder", "does not hash"),
    ("a listed file is a link", "symbolic link"),
    ("no hashes at all", "lists no file hashes"),
])
def test_every_file_the_folder_uses_is_hashed(tiny_onnx, tmp_path, case, message):
    folder = copy_export(tiny_onnx, tmp_path)
    if case == "graph hash removed":
        edit_manifest(folder, lambda m: m["files"].pop("decoder.onnx"))
    elif case == "graph points at an unlisted file":
        shutil.copy(folder / "decoder.onnx", tmp_path / "other.onnx")
        edit_manifest(folder, lambda m: m["graphs"]["decoder"].update(file="other.onnx"))
    elif case == "graph points outside the folder":
        shutil.copy(folder / "decoder.onnx", tmp_path / "outside.onnx")
        edit_manifest(folder, lambda m: m["graphs"]["decoder"].update(file="../outside.onnx"))
    elif case == "hash entry names a path":
        edit_manifest(folder, lambda m: m["files"].update({"sub/x.onnx": "0" * 64}))
    elif case == "an unlisted file in the folder":
        (folder / "extra.onnx").write_bytes(b"x")
    elif case == "a listed file is a link":
        target = tmp_path / "real-tokenizer.json"
        shutil.move(folder / "tokenizer.json", target)
        (folder / "tokenizer.json").symlink_to(target)
    elif case == "no hashes at all":
        edit_manifest(folder, lambda m: m.update(files={}))
    with pytest.raises(ManifestError, match=message):
        Scorer.load(folder)


def test_a_swapped_graph_is_refused_at_load(tiny_onnx, tmp_path):
    """A graph replaced by another one and re-hashed (a consistent but wrong folder) fails at load
    with a typed error naming the mismatch, not at the first score with ONNX Runtime's."""
    folder = copy_export(tiny_onnx, tmp_path)
    shutil.copy(folder / "vision.onnx", folder / "heads.onnx")
    edit_manifest(folder, lambda m: None, rehash=True)
    with pytest.raises(ManifestError, match="heads.onnx: the graph's inputs"):
        Scorer.load(folder)


def test_a_folder_of_an_older_graph_io_is_refused_naming_the_re_export(tiny_onnx, tmp_path):
    """A folder exported before the graphs' I/O changed (the vision graph took window and image
    segments and masked all N x N pairs; the decoder had no rows to keep) is refused at load,
    with what to do about it."""
    def older(manifest):
        vision = manifest["graphs"]["vision"]["inputs"]
        vision[3:] = [{"name": "window_segments", "dtype": "int64", "shape": ["patches"]},
                      {"name": "image_segments", "dtype": "int64", "shape": ["patches"]}]
        del manifest["graphs"]["decoder"]["inputs"][5]
    folder = copy_export(tiny_onnx, tmp_path)
    edit_manifest(folder, older)
    with pytest.raises(ManifestError, match=r"graphs.vision.inputs\[3\].name='window_segments'.*re-export the model"):
        Scorer.load(folder)


@pytest.mark.parametrize("field,value,message", [
    (("image", "patch_size"), 0, "patch_size=0"),
    (("text", "hidden_size"), 96, "do not read hidden size 96"),
    (("image", "max_pixels"), 40_000_000, "max 40000000"),
    (("text", "num_layers"), 3, r"graphs.decoder.inputs\[6\].shape=\[2, .*the spec and kv_dtype imply \[3, "),
    (("text", "num_kv_heads"), 3, "not a multiple of num_kv_heads"),
    (("vision", "depth"), "two", "depth='two'"),
])
def test_absurd_spec_values_are_refused_quickly(tiny_onnx, tmp_path, field, value, message):
    folder = copy_export(tiny_onnx, tmp_path)
    edit_manifest(folder, lambda m: m["spec"][field[0]].update({field[1]: value}))
    start = time.perf_counter()
    with pytest.raises(ManifestError, match=message):
        Scorer.load(folder)
    assert time.perf_counter() - start < 1.0


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _set(path: str, value):
    """An edit setting the field at a dotted path (``spec.tokens.reward``) of the manifest."""
    *parents, last = path.split(".")

    def change(manifest):
        node = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return change


def _same_as(path: str, source: str):
    """An edit giving the field at ``path`` the value of the field at ``source``."""
    def change(manifest):
        node = manifest
        for key in source.split("."):
            node = node[key]
        _set(path, node)(manifest)
    return change


# (case, edit of the manifest's JSON, what the ManifestError must name). Issue 25's malformations
# (consistent hashes, so only the schema can refuse them) and the schema's other kinds of field.
MALFORMED = [
    ("a graph's file is a list", _set("graphs.vision.file", ["vision.onnx"]), r"graphs\.vision\.file="),
    ("quantization is a string", _set("quantization", "ort-int8"), r"quantization='ort-int8': not an object"),
    ("an unknown kv_dtype", _set("kv_dtype", "int2"), r"kv_dtype='int2': not one of"),
    ("a float16 cache declared on float32 graphs", _set("kv_dtype", "float16"),
     r"graphs\.decoder\.inputs\[6\]\.dtype='float32'.*imply 'float16'"),
    ("a float16 cache declared throughout on float32 graphs",
     lambda m: [_set(p, "float16")(m) for p in ("kv_dtype", "graphs.decoder.inputs.6.dtype", "graphs.decoder.outputs.1.dtype")],
     r"decoder\.onnx: the graph's inputs .* do not match .*float16"),  # in each engine's own type names
    ("image_mean of 2 channels", _set("spec.image.image_mean", [0.5, 0.5]), r"spec\.image\.image_mean=.*2 elements"),
    ("an unknown fusion", _set("spec.heads.fusion", "max"), r"spec\.heads\.fusion='max': not one of mean, min, sum"),
    ("image_std 0", _set("spec.image.image_std.1", 0), r"spec\.image\.image_std\[1\]=0: not above 0"),
    ("image_std NaN", _set("spec.image.image_std.1", float("nan")), r"spec\.image\.image_std\[1\]=nan: not finite"),
    ("image_pad is the reward token", _same_as("spec.tokens.image_pad", "spec.tokens.reward"),
     r"spec\.tokens\.reward=\d+ is the same id as spec\.tokens\.image_pad"),
    ("the reward token outside the vocabulary", _same_as("spec.tokens.reward", "spec.text.vocab_size"),
     r"spec\.tokens\.reward=\d+ is outside the vocabulary"),
    ("max_input_pixels a float", _set("spec.image.max_input_pixels", 1e15), r"spec\.image\.max_input_pixels=1000000000000000\.0: not an integer"),
    ("max_input_pixels beyond its bound", _set("spec.image.max_input_pixels", 10**15), r"spec\.image\.max_input_pixels=\d+: above"),
    ("a declared output renamed", _set("graphs.heads.outputs.0.name", "scores"), r"graphs\.heads\.outputs\[0\]\.name='scores'"),
    ("a graph role the family lacks", _set("graphs.extra", {"file": "vision.onnx", "inputs": [], "outputs": []}), r"graphs: declares"),
    ("an unknown runtime", _set("runtime", "tflite"), r"runtime='tflite': not one of"),
    ("family a list", _set("family", ["qwen2_5_vl"]), r"family=\['qwen2_5_vl'\]: not a non-empty string"),
    ("manifest_version true", _set("manifest_version", True), r"manifest_version True"),
    ("a negative rms_norm_eps", _set("spec.text.rms_norm_eps", -1e-6), r"spec\.text\.rms_norm_eps=-1e-06: not above 0"),
    ("an unknown spec field", _set("spec.vision.frobnicate", 1), r"spec\.vision\.frobnicate: unknown field"),
    ("three head names for two heads", _set("spec.heads.names", ["a", "b", "c"]), r"spec\.heads\.names \['a', 'b', 'c'\]"),
    ("a missing spec field", lambda m: m["spec"]["text"].pop("head_dim"), r"spec\.text\.head_dim: missing"),
    ("a TensorRT engine entry a string", _set("trt", {"engines": {"vision": "vision.engine"}}), r"trt\.engines\.vision="),
    ("no chat text", lambda m: m.pop("chat_text"), r"chat_text=None"),
    ("malformed templates", _set("templates.rubrics", [["only a name"]]), r"templates: malformed template data"),
    ("an unknown compute dtype", _set("compute_dtype", "os"), r"compute_dtype='os'"),
]


@pytest.mark.parametrize("case,change,field", MALFORMED, ids=[c for c, _, _ in MALFORMED])
def test_a_malformed_manifest_is_refused_at_load_naming_the_field(tiny_onnx, tmp_path, case, change, field):
    folder = copy_export(tiny_onnx, tmp_path)
    edit_manifest(folder, change)
    with pytest.raises(ManifestError, match=field):
        Scorer.load(folder)


def test_a_deeply_nested_manifest_is_refused(tiny_onnx, tmp_path):
    folder = copy_export(tiny_onnx, tmp_path)
    text = (folder / MANIFEST).read_text()
    (folder / MANIFEST).write_text(text[:-1] + f', "origin": {_deep(100_000)}}}')
    with pytest.raises(ManifestError, match="nested too deeply"):
        Scorer.load(folder)


def test_a_folder_image_limit_never_changes_pils_for_the_process(tiny_onnx, tmp_path, images):
    """A folder may raise its own max_input_pixels (within the schema's bound); PIL's process-wide
    bomb guard stays what it was, before and after scoring with it."""
    from editreward_rt.preprocess import MAX_INPUT_PIXELS
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    folder = copy_export(tiny_onnx, tmp_path)
    edit_manifest(folder, _set("spec.image.max_input_pixels", MAX_INPUT_PIXELS))
    scorer = Scorer.load(folder)
    assert scorer.image_spec.max_input_pixels == MAX_INPUT_PIXELS
    assert np.isfinite(scorer.score("Add a bowl", images[0], images[1]).mu)
    assert Image.MAX_IMAGE_PIXELS == before


def test_the_fusions_the_schema_accepts_are_the_ones_fuse_computes():
    from editreward_families.qwen2_5_vl.spec import SUPPORTED_FUSIONS
    from editreward_rt.pipeline import fuse

    per_head = np.zeros((1, 2, 2), np.float32)
    for fusion in SUPPORTED_FUSIONS:
        assert fuse(per_head, fusion).shape == (1, 2)
    with pytest.raises(ValueError):
        fuse(per_head, "max")
