"""The reliability script's in-process classes on the tiny export: each runs its cases and holds, and
the table is written with one row per class (the service's classes need ``editreward serve``, run by
``python benchmarks/reliability.py --model DIR``)."""

from __future__ import annotations

from editreward_bench import reliability

IN_PROCESS = ["stale reward (defect 2)", "the client (defect 3)", "instruction limit (defect 6)",
              "malformed manifests (defect 8)", "small ones (defect 10)"]


def test_the_in_process_classes_hold_and_are_tabled(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "reliability.md"
    code = reliability.main(["--model", str(tiny_onnx), "--only", "in-process", "--out", str(out)])
    report = capsys.readouterr().err
    assert code == 0, report
    lines = out.read_text().splitlines()
    rows = lines[lines.index("| --- | --- | --- | --- |") + 1:]  # the table ends the page
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == IN_PROCESS
    assert all(row.endswith("| yes |") for row in rows), rows
    assert "--only in-process" in out.read_text() and "FAILED" not in report
