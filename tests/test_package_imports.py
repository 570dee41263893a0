"""Package layering, read from every import statement (function-level ones too): the runtime
imports no build-time package, and neither the build-time packages nor the top-level folders
(runtime/, export/, quantize/, benchmarks/, scripts included) import each other in cycles."""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGES = {"editreward_rt": "runtime/editreward_rt", "editreward_families": "runtime/editreward_families",
            "editreward_export": "export/editreward_export", "editreward_trt": "export/editreward_trt",
            "editreward_quant": "quantize/editreward_quant", "editreward_bench": "benchmarks/editreward_bench"}
BUILD_TIME = ("editreward_export", "editreward_trt", "editreward_quant", "editreward_bench")


FOLDERS = sorted({path.split("/")[0] for path in PACKAGES.values()})


def project_imports(folder: str) -> dict[str, set[str]]:
    """Project package imported -> the modules under ``folder`` (relative to the repository) that import it."""
    out: dict[str, set[str]] = {}
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES:
                    out.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return out


def imports_of(package: str) -> dict[str, set[str]]:
    """Other project packages imported -> the modules of ``package`` that import them."""
    return {p: modules for p, modules in project_imports(PACKAGES[package]).items() if p != package}


def graph() -> dict[str, set[str]]:
    return {p: set(imports_of(p)) for p in PACKAGES}


def folder_graph() -> dict[str, set[str]]:
    """Top-level folder -> the other top-level folders its modules import from."""
    return {f: {PACKAGES[p].split("/")[0] for p in project_imports(f)} - {f} for f in FOLDERS}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, path = [], []

    def visit(node):
        if node in path:
            found.append(path[path.index(node):] + [node])
            return
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            visit(nxt)
        path.pop()

    for start in edges:
        visit(start)
    return found


def test_the_runtime_imports_no_build_time_package():
    for runtime in ("editreward_rt", "editreward_families"):
        used = imports_of(runtime)
        assert not {p: used[p] for p in BUILD_TIME if p in used}, (runtime, used)


def test_build_time_packages_import_each_other_without_cycles():
    edges = {p: e & set(BUILD_TIME) for p, e in graph().items() if p in BUILD_TIME}
    assert cycles(edges) == []


def test_top_level_folders_import_each_other_without_cycles():
    assert cycles(folder_graph()) == []


def test_export_reaches_the_quantizers_through_the_scheme_registry():
    """The TensorRT build quantizes through ``editreward_rt.schemes`` (as the Scorer loads), so the
    exporter never imports the quantizer, which itself builds on the exporter."""
    assert "editreward_quant" not in project_imports("export"), project_imports("export")["editreward_quant"]
    assert "export" in folder_graph()["quantize"]  # the edge that an export -> quantize import would close


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})[0] == ["a", "b", "c", "a"]
