"""Model folders are tamper-evident and checked at load, not at the first score: every file the
runtime reads is covered by the manifest's hashes, and the manifest's spec must fit the graphs."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from editreward_rt import Scorer
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
    assert Scorer.load(copy_export(tiny_onnx, tmp_path)).description["backend"] == "onnxruntime"


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


@pytest.mark.parametrize("field,value,message", [
    (("image", "patch_size"), 0, "patch_size=0"),
    (("text", "hidden_size"), 96, "do not read hidden size 96"),
    (("image", "max_pixels"), 40_000_000, "max 40000000"),
    (("text", "num_layers"), 3, "do not match what the manifest's model spec implies"),
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
