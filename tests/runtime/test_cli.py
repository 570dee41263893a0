"""``editreward score`` on one triple and on a JSONL file: errors per line, resumable output."""

from __future__ import annotations

import json

import pytest
from conftest import save
from editreward_rt.cli import main


@pytest.fixture()
def triples_file(tmp_path, images):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, image in enumerate(images[:4]):
        save(image, folder, f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    lines = [
        {"instruction": "Add a bowl", "source": "img0.png", "edited": "img1.png"},
        {"instruction": "Add a bowl", "source": "img0.png", "edited": "broken.png"},
        "this is not json",
        {"instruction": "Make it red", "source": "img2.png"},
        {"instruction": "Make it red", "source": "img2.png", "edited": "missing.png"},
        {"instruction": "Make it red", "source": "img2.png", "edited": "img3.png", "id": "keep-me"},
        {"instruction": "", "source": "img2.png", "edited": "img3.png"},
    ]
    path = folder / "triples.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr()


def test_single_triple_prints_json(tiny_onnx, images, tmp_path, capsys, fast):
    src, edit = save(images[0], tmp_path, "s.png"), save(images[1], tmp_path, "e.png")
    code, out = run_cli(["score", "--model", str(tiny_onnx), "--instruction", "Add a bowl",
                         "--source", str(src), "--edited", str(edit)], capsys)
    result = json.loads(out.out)
    assert code == 0 and result["instruction"] == "Add a bowl"
    assert result["mu"] == pytest.approx(fast.score("Add a bowl", src, edit).mu, abs=1e-4)
    assert {h["name"] for h in result["heads"]} == {"instruction_following", "visual_quality"}


def test_torch_backend_from_the_cli(tiny, images, tmp_path, capsys):
    src, edit = save(images[0], tmp_path, "s.png"), save(images[1], tmp_path, "e.png")
    code, out = run_cli(["score", "--model", str(tiny.checkpoint), "--backend", "torch", "--mode", "reference",
                         "--prompts-from", str(tiny.prompts), "--instruction", "Add a bowl",
                         "--source", str(src), "--edited", str(edit)], capsys)
    assert code == 0 and "mu" in json.loads(out.out)


def test_batch_file_records_every_line(tiny_onnx, triples_file, tmp_path, capsys):
    output = tmp_path / "results.jsonl"
    code, out = run_cli(["score", "--model", str(tiny_onnx), "--input", str(triples_file), "--output", str(output),
                         "--max-batch", "3"], capsys)
    assert code == 0
    results = [json.loads(l) for l in output.read_text().splitlines()]
    assert [r["index"] for r in results] == list(range(7))
    ok = [r for r in results if "error" not in r]
    assert [r["index"] for r in ok] == [0, 5]
    assert ok[1]["source"] == "img2.png" and "mu" in ok[1]
    errors = {r["index"]: r["error"]["type"] for r in results if "error" in r}
    assert errors == {1: "image_error", 2: "input_error", 3: "input_error", 4: "image_error", 6: "instruction_error"}
    assert json.loads(out.err.strip().splitlines()[-1]) == {"scored": 2, "errors": 5, "skipped": 0}


def test_batch_resumes_without_rescoring(tiny_onnx, triples_file, tmp_path, capsys):
    output = tmp_path / "results.jsonl"
    run_cli(["score", "--model", str(tiny_onnx), "--input", str(triples_file), "--output", str(output)], capsys)
    full = output.read_text().splitlines()
    # Simulate a crash mid-write: keep three lines and half of the fourth.
    output.write_text("\n".join(full[:3]) + "\n" + full[3][: len(full[3]) // 2])
    code, out = run_cli(["score", "--model", str(tiny_onnx), "--input", str(triples_file), "--output", str(output)], capsys)
    assert code == 0
    assert json.loads(out.err.strip().splitlines()[-1])["skipped"] == 3
    resumed = [json.loads(l) for l in output.read_text().splitlines()]
    assert [r["index"] for r in resumed] == list(range(7))
    assert resumed[5]["mu"] == pytest.approx(json.loads(full[5])["mu"], abs=1e-6)


def test_argument_errors(tiny_onnx, capsys):
    with pytest.raises(SystemExit):
        main(["score", "--model", str(tiny_onnx)])
    with pytest.raises(SystemExit):
        main(["score", "--model", str(tiny_onnx), "--input", "x.jsonl"])
    code, out = run_cli(["score", "--model", "/nonexistent/model", "--instruction", "a", "--source", "s", "--edited", "e"], capsys)
    assert code == 2 and "checkpoint_error" in out.err


def test_make_fixture_subcommand(tmp_path, capsys):
    code, out = run_cli(["make-fixture", "--out", str(tmp_path / "fx"), "--size", "tiny"], capsys)
    paths = json.loads(out.out)
    assert code == 0 and (tmp_path / "fx" / "checkpoint" / "model.safetensors").is_file()
    assert paths["checkpoint"].endswith("checkpoint")


def test_every_tool_is_a_subcommand(tiny, tiny_onnx, tmp_path, capsys):
    """``editreward export|quantize|bench ...`` run the same code as the scripts, arguments passed through."""
    out = tmp_path / "onnx"
    assert main(["export", "onnx", "--ckpt", str(tiny.checkpoint), "--out", str(out), "--prompts-from", str(tiny.prompts),
                 "--no-validate"]) == 0
    assert json.loads((out / "manifest.json").read_text())["family"] == "qwen2_5_vl"
    assert main(["quantize", "--model-dir", str(tiny_onnx), "--scheme", "ort-int8", "--out", str(tmp_path / "q")]) == 0
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["quantization"]["scheme"] == "ort-int8"
    assert main(["export", "check-trt-ops", str(tiny_onnx)]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "latency", "--help"])
    assert exit_info.value.code == 0 and "--variant" in capsys.readouterr().out


def test_a_tool_whose_extra_is_missing_names_it(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "editreward_bench.serve_bench", None)
    assert main(["bench", "serve", "--model", "x"]) == 2
    assert "pip install 'editreward-deploy[serve]'" in capsys.readouterr().err


def test_unknown_arguments_still_fail_for_the_runtime_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--model", "m", "--instruction", "x", "--frobnicate"])
    assert exit_info.value.code == 2 and "--frobnicate" in capsys.readouterr().err


def _score_file(tiny_onnx, path, output, capsys):
    return run_cli(["score", "--model", str(tiny_onnx), "--input", str(path), "--output", str(output), "--max-batch", "4"],
                   capsys)


def _records(output):
    data = output.read_bytes()
    assert data.endswith(b"\n") and b"\r" not in data
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def test_one_line_costs_one_line_whatever_its_bytes(tiny_onnx, triples_file, tmp_path, capsys):
    """A line that is not UTF-8, a path the OS refuses (NUL byte), and characters str.splitlines()
    breaks at (U+2028, U+0085) inside a valid line: each costs at most its own line."""
    good = json.dumps({"instruction": "Add a bowl", "source": "img0.png", "edited": "img1.png"}).encode()
    odd = json.dumps({"instruction": "Write OPEN\u2028on the sign\u0085now", "source": "img0.png", "edited": "img1.png"},
                     ensure_ascii=False).encode()
    nul = json.dumps({"instruction": "Add a bowl", "source": "img0.png", "edited": "img\u00001.png"}).encode()
    path = triples_file.parent / "odd.jsonl"
    path.write_bytes(b"\n".join([good, b"\xff\xfe\x00 not text", odd, nul, good]) + b"\n")
    output = tmp_path / "out.jsonl"
    code, out = _score_file(tiny_onnx, path, output, capsys)
    assert code == 0, out.err
    results = _records(output)
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert [r.get("error", {}).get("type") for r in results] == [None, "input_error", None, "image_error", None]
    assert results[2]["instruction"] == "Write OPEN\u2028on the sign\u0085now"
    code, out = _score_file(tiny_onnx, path, output, capsys)  # a rerun finishes too: nothing left to do
    assert code == 0 and json.loads(out.err.strip().splitlines()[-1]) == {"scored": 0, "errors": 0, "skipped": 5}


@pytest.mark.parametrize("tear", ["no final newline", "half a record", "garbage after a newline", "repeated record"])
def test_resume_leaves_valid_jsonl_with_every_index_once(tiny_onnx, triples_file, tmp_path, capsys, tear):
    output = tmp_path / "results.jsonl"
    _score_file(tiny_onnx, triples_file, output, capsys)
    full = output.read_bytes().split(b"\n")[:-1]
    torn = {"no final newline": b"\n".join(full[:4]),
            "half a record": b"\n".join(full[:4]) + b"\n" + full[4][: len(full[4]) // 2],
            "garbage after a newline": b"\n".join(full[:4]) + b"\n\xff{{\n",
            "repeated record": b"\n".join(full[:4] + [full[1]]) + b"\n"}[tear]
    output.write_bytes(torn)
    code, out = _score_file(tiny_onnx, triples_file, output, capsys)
    assert code == 0
    results = _records(output)
    assert sorted(r["index"] for r in results) == list(range(7))
    assert [r["index"] for r in results[:4]] == [0, 1, 2, 3]


@pytest.mark.parametrize("case", ["output is a directory", "input is missing", "input is a directory"])
def test_usage_errors_are_typed(tiny_onnx, triples_file, tmp_path, capsys, case):
    args = {"output is a directory": (triples_file, tmp_path), "input is missing": (tmp_path / "none.jsonl", tmp_path / "o"),
            "input is a directory": (tmp_path, tmp_path / "o")}[case]
    code, out = run_cli(["score", "--model", str(tiny_onnx), "--input", str(args[0]), "--output", str(args[1])], capsys)
    assert code == 2 and out.err.startswith("editreward: input_error: --") and "Traceback" not in out.err


def test_an_output_file_that_is_not_results_is_not_cut(tiny_onnx, triples_file, capsys):
    """Another triples file given as --output by mistake is refused, not cut back to nothing."""
    target = triples_file.with_name("inputs-again.jsonl")
    target.write_bytes(triples_file.read_bytes())
    code, out = run_cli(["score", "--model", str(tiny_onnx), "--input", str(triples_file), "--output", str(target)], capsys)
    assert code == 2 and "refusing to cut it" in out.err
    assert target.read_bytes() == triples_file.read_bytes()
