"""The model-family seam: outside its family folder, no module names Qwen2.5-VL's classes, model
type, checkpoint key prefixes, special tokens or graph I/O names; the one exception is the family
registry line. A new family is therefore one folder plus one line."""

from __future__ import annotations

import re

from conftest import ROOT

FAMILY = ROOT / "runtime" / "editreward_families" / "qwen2_5_vl"
PACKAGES = [ROOT / "runtime", ROOT / "export", ROOT / "quantize", ROOT / "benchmarks"]
REGISTRY = ROOT / "runtime" / "editreward_rt" / "families.py"

# Quoted graph I/O names (axis names such as "batch" or "seq" are not I/O names).
IO_NAMES = ("patches", "cos", "sin", "window_segments", "image_segments", "image_embeds", "input_ids", "image_index",
            "position_ids", "attention_mask", "past", "present", "hidden", "rewards")
PATTERNS = {
    "class": re.compile(r"Qwen2_5_VL|Qwen2VL"),
    "model type": re.compile(r"qwen2_5_vl"),
    "key prefix": re.compile(r"model\.language_model\.|model\.visual\.|rm_heads\.|lm_head\."),
    "special token": re.compile(r"<\|(image_pad|vision_start|vision_end|im_start|im_end)\|>"),
    "graph I/O name": re.compile(r"""["'](%s)["']""" % "|".join(IO_NAMES)),
}


def family_names_outside(files) -> list[str]:
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if path == REGISTRY and line.startswith("FAMILIES = "):
                continue  # the registry line
            found += [f"{path.name}:{number}: {kind}: {line.strip()}"
                      for kind, pattern in PATTERNS.items() if pattern.search(line)]
    return found


def package_files():
    return [p for d in PACKAGES for p in d.rglob("*.py") if FAMILY not in p.parents]


def test_no_family_names_outside_the_family_folder():
    files = package_files()
    assert len(files) > 40 and REGISTRY in files
    assert family_names_outside(files) == []


def test_the_check_finds_a_family_name(tmp_path):
    """A module that named the family's graph inputs or keys outside the folder would be reported."""
    leak = tmp_path / "leak.py"
    leak.write_text('feeds = {"input_ids": ids}\nkey = "model.visual.blocks.0"\nfrom transformers import Qwen2_5_VLModel\n')
    assert [line.split(": ")[1] for line in family_names_outside([leak])] == ["graph I/O name", "key prefix", "class"]


def test_the_family_provides_the_whole_interface():
    """Every name of ``ModelFamily`` is there, and the family's spec names its registry key."""
    import inspect

    from editreward_rt.families import FAMILIES, ModelFamily, family

    wanted = {n for n, _ in inspect.getmembers(ModelFamily) if not n.startswith("_")} | set(ModelFamily.__annotations__)
    for name in FAMILIES:
        module = family(name)
        assert wanted <= set(dir(module)), wanted - set(dir(module))
        assert module.NAME == name
