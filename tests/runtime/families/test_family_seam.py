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
IO_NAMES = ("patches", "cos", "sin", "window_rows", "window_slots", "image_embeds", "input_ids", "image_index",
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


def interface() -> set[str]:
    import inspect

    from editreward_rt.families import ModelFamily

    return {n for n, _ in inspect.getmembers(ModelFamily) if not n.startswith("_")} | set(ModelFamily.__annotations__)


def missing(package) -> set[str]:
    """The interface's names a family package lacks."""
    return interface() - set(dir(package))


def test_the_family_provides_the_whole_interface():
    """Every name of ``ModelFamily`` is there, and the family's spec names its registry key."""
    from editreward_rt.families import FAMILIES, family

    for name in FAMILIES:
        module = family(name)
        assert missing(module) == set()
        assert module.NAME == name


# What callers reach a family through: a bound family (``fam``, ``self.family``, ``family_for(...)``) or a package.
CALLER = re.compile(r"(?:\bfam|self\.family|family_for\([^()]*\)|\bfamily\([^()]*\))\.([A-Za-z_]\w*)")


def test_every_name_a_caller_uses_is_in_the_interface():
    """The interface lists everything any caller uses: a name reached outside the family folder and
    missing from ``ModelFamily`` would let a new family omit it unnoticed."""
    used = {}
    for path in package_files():
        for name in CALLER.findall(path.read_text(encoding="utf-8")):
            used.setdefault(name, path.name)
    assert len(used) > 15 and {"vision_feeds", "graph_specs", "placeholder_modules"} <= set(used)
    assert {n: f for n, f in used.items() if n not in interface() | {"module", "spec"}} == {}


def test_a_bound_family_binds_the_spec_and_refuses_other_names(tiny):
    import pytest
    from editreward_rt.checkpoint import open_checkpoint
    from editreward_rt.families import ModelFamily, family_for, spec_bound_names

    spec = open_checkpoint(str(tiny.checkpoint), prompts_from=str(tiny.prompts)).spec
    fam = family_for(spec)
    bound = spec_bound_names()
    assert {"vision_feeds", "graph_specs", "cache_layout", "expected_shapes", "prompt_builder"} <= set(bound)
    assert fam.graph_specs("float32") == fam.module.graph_specs(spec, "float32")
    assert fam.cache_layout("float32").shape(3, 5)[fam.cache_layout("float32").batch_axis] == 3
    assert fam.FLOPS is fam.module.FLOPS and fam.checkpoint_key is fam.module.checkpoint_key
    with pytest.raises(AttributeError, match="not part of the model-family interface"):
        fam.image_rows  # noqa: B018 (a name the package may have but the interface does not list)
    assert not hasattr(ModelFamily, "image_rows")


def test_a_family_lacking_an_interface_name_is_caught():
    """The whole-interface check names what a package lacks (here, the exporter's ``validation_subset``)."""
    import types

    from editreward_rt.families import FAMILIES, family

    module = family(next(iter(FAMILIES)))
    lacking = types.SimpleNamespace(**{n: getattr(module, n) for n in interface() - {"validation_subset"}})
    assert missing(lacking) == {"validation_subset"}
