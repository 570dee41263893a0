"""``editreward batch`` on Ray Data: every good row scored, every bad row recorded, resumable.

Ray starts once for the module (2 CPUs, local) and the tiny ONNX model scores a few hundred rows.
"""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")  # the serve extra is not installed
pytestmark = [pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]

from conftest import random_image, save  # noqa: E402

N_ROWS = 300
BAD_EDITS = {"bad/truncated.png", "bad/garbage.png", "bad/empty.png", "bad/missing.png"}


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """300 JSONL rows over 4 sources and 8 edits, some rows pointing at broken images, plus bad lines."""
    root = tmp_path_factory.mktemp("batch")
    (root / "img").mkdir()
    (root / "bad").mkdir()
    for i in range(12):
        save(random_image(200 + i, 40 + 4 * i, 56), root / "img", f"{i}.png")
    whole = (root / "img" / "5.png").read_bytes()
    (root / "bad" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "bad" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x13" * 100)
    (root / "bad" / "empty.png").write_bytes(b"")
    lines, expect_bad = [], set()
    for i in range(N_ROWS):
        edit = f"img/{4 + i % 8}.png"
        if i % 37 == 11:
            edit = sorted(BAD_EDITS)[(i // 37) % len(BAD_EDITS)]
            expect_bad.add(i)
        lines.append(json.dumps({"instruction": ["make it blue", "add a hat"][i % 2], "source": f"img/{i % 4}.png",
                                 "edited": edit}))
    lines[50] = "{this is not json"
    lines[51] = json.dumps({"instruction": "no images"})
    lines[52] = json.dumps({"instruction": "", "source": "img/0.png", "edited": "img/4.png"})
    expect_bad |= {50, 51, 52}
    (root / "triples.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, expect_bad


@pytest.fixture(scope="module")
def first_run(ray_local, dataset, tiny_onnx):
    from editreward_rt.serve.batch import BatchConfig, run_batch

    root, _ = dataset
    out = root / "results.parquet"
    cfg = BatchConfig(model=str(tiny_onnx), max_batch=8, part_rows=32, progress=False)
    counts = run_batch(cfg, root / "triples.jsonl", out)
    return out, counts, cfg


def _table(out) -> pa.Table:
    return pq.read_table(out).sort_by("index")


def test_every_good_row_scored_and_every_bad_row_recorded(first_run, dataset, tiny_onnx):
    from editreward_rt import Scorer

    out, counts, _ = first_run
    root, expect_bad = dataset
    assert counts["scored"] == N_ROWS - len(expect_bad) and counts["errors"] == len(expect_bad)
    assert counts["skipped"] == 0 and counts["parts"] > 1
    table = _table(out)
    assert table.column("index").to_pylist() == list(range(N_ROWS))
    assert {"index", "mu", "log_sigma", "sigma", "error_type", "error_message", "instruction", "source",
            "edited"} <= set(table.column_names)
    rows = table.to_pylist()
    bad = {r["index"] for r in rows if r["error_type"] is not None}
    assert bad == expect_bad
    for r in rows:
        if r["index"] in expect_bad:
            assert r["mu"] is None and r["error_message"]
        else:
            assert r["mu"] is not None and r["error_type"] is None
    kinds = {r["index"]: r["error_type"] for r in rows if r["error_type"]}
    assert kinds[50] == "input_error" and kinds[51] == "input_error" and kinds[52] == "instruction_error"
    assert {kinds[i] for i in expect_bad - {50, 51, 52}} == {"image_error"}

    # Scores equal in-process single-triple calls (paths in the input are relative to its folder).
    scorer = Scorer.load(tiny_onnx, threads=1)
    for r in rows[:6] + rows[-3:]:
        if r["error_type"] is None:
            want = scorer.score(r["instruction"], root / r["source"], root / r["edited"])
            assert r["mu"] == pytest.approx(want.mu, abs=1e-5)
            assert r["log_sigma"] == pytest.approx(want.log_sigma, abs=1e-5)
            assert [h["mu"] for h in r["heads"]] == pytest.approx([h.mu for h in want.heads], abs=1e-5)


def test_rerun_after_a_crash_scores_only_the_missing_rows(first_run, dataset):
    from editreward_rt.serve.batch import run_batch

    out, _, cfg = first_run
    root, expect_bad = dataset
    copy = root / "resumed.parquet"
    shutil.copytree(out, copy)
    parts = sorted(copy.glob("*.parquet"))
    lost = 0
    for part in parts[::2]:  # the parts a crash never wrote ...
        lost += pq.read_metadata(part).num_rows
        part.unlink()
    torn = parts[1]  # ... and one it was writing when it died
    lost += pq.read_metadata(torn).num_rows
    torn.write_bytes(torn.read_bytes()[:100])

    counts = run_batch(cfg, root / "triples.jsonl", copy)
    assert counts["scored"] + counts["errors"] == lost  # nothing already written was scored again
    assert counts["skipped"] == N_ROWS - lost
    table = _table(copy)
    assert table.column("index").to_pylist() == list(range(N_ROWS))  # every row exactly once
    assert {r["index"] for r in table.to_pylist() if r["error_type"]} == expect_bad

    again = run_batch(cfg, root / "triples.jsonl", copy)
    assert again["scored"] == again["errors"] == again["parts"] == 0 and again["skipped"] == N_ROWS


def test_cli_parquet_input(ray_local, dataset, tiny_onnx, tmp_path):
    from editreward_rt.cli import main

    root, _ = dataset
    lines = (root / "triples.jsonl").read_text().splitlines()[:24]
    rows = [json.loads(line) for line in lines if line.startswith('{"')]
    pq.write_table(pa.Table.from_pylist(rows), root / "some.parquet")
    out = tmp_path / "cli.parquet"
    args = ["batch", "--model", str(tiny_onnx), "--input", str(root / "some.parquet"), "--output", str(out),
            "--max-batch", "4", "--concurrency", "1", "--no-progress"]
    assert main(args) == 0
    table = _table(out)
    assert table.num_rows == len(rows)
    assert table.column("edited").to_pylist() == [r["edited"] for r in rows]
    assert table.column("error_type").null_count == len(rows) - sum(r["edited"] in BAD_EDITS for r in rows)
