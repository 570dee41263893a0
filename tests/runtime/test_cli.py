"""``editreward score`` on one triple and on a JSONL file: errors per line, resumable output."""

from __future__ import annotations

import builtins
import errno
import json
import os
import time

import pytest
from conftest import save
from editreward_rt import backends, cli
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


@pytest.mark.parametrize("tear", ["no final newline", "half a record", "a few bytes of a record"])
def test_resume_leaves_valid_jsonl_with_every_index_once(tiny_onnx, triples_file, tmp_path, capsys, tear):
    """A crash mid-write tears the last line only: a whole record lacking its newline, or a prefix of one."""
    output = tmp_path / "results.jsonl"
    _score_file(tiny_onnx, triples_file, output, capsys)
    full = output.read_bytes().split(b"\n")[:-1]
    torn = {"no final newline": b"\n".join(full[:4]),
            "half a record": b"\n".join(full[:4]) + b"\n" + full[4][: len(full[4]) // 2],
            "a few bytes of a record": b"\n".join(full[:4]) + b"\n" + full[4][:3]}[tear]
    output.write_bytes(torn)
    code, out = _score_file(tiny_onnx, triples_file, output, capsys)
    assert code == 0
    assert json.loads(out.err.strip().splitlines()[-1])["skipped"] == 4
    results = _records(output)
    assert sorted(r["index"] for r in results) == list(range(7))
    assert [r["index"] for r in results[:4]] == [0, 1, 2, 3]


def _foreign(full: list[bytes], case: str) -> tuple[bytes, int]:
    """An output file holding one line that is not ours, and that line's number."""
    record = json.loads(full[5])
    lines = {"garbage after a newline": (full[:4] + [b"\xff{{"], 5),
             "repeated record": (full[:4] + [full[1]] + full[4:], 5),
             "a line of another file": (full[:2] + [b'{"id": 3, "caption": "a cat"}'] + full[2:], 3),
             "an index of no input line": (full[:3] + [b'{"index": 70, "mu": 0.5, "log_sigma": 0.1}'], 4),
             "an index as text": (full[:3] + [b'{"index": "3", "error": {"type": "x", "message": "y"}}'], 4),
             "a score of another triple": (full[:5] + [json.dumps({**record, "instruction": "Make it blue"}).encode()], 6),
             "neither score nor error": (full[:3] + [b'{"index": 3, "status": "done"}'], 4),
             "an unterminated foreign tail": (full[:4], 5)}[case]
    data = b"\n".join(lines[0]) + b"\n"
    return (data + b"not ours" if case == "an unterminated foreign tail" else data), lines[1]


@pytest.mark.parametrize("case", ["garbage after a newline", "repeated record", "a line of another file",
                                  "an index of no input line", "an index as text", "a score of another triple",
                                  "neither score nor error", "an unterminated foreign tail"])
def test_a_foreign_line_in_the_output_is_refused_naming_it(tiny_onnx, triples_file, tmp_path, capsys, case):
    """A line that is no record of this input's triples is neither counted as done (its triple
    would never be scored) nor cut (it would be lost): the resume is refused, the file left as it is."""
    output = tmp_path / "results.jsonl"
    _score_file(tiny_onnx, triples_file, output, capsys)
    data, line = _foreign(output.read_bytes().split(b"\n")[:-1], case)
    output.write_bytes(data)
    code, out = _score_file(tiny_onnx, triples_file, output, capsys)
    assert code == 2 and f"line {line} " in out.err and "refusing to resume" in out.err, out.err
    assert out.err.startswith("editreward: input_error: --output") and "Traceback" not in out.err
    assert output.read_bytes() == data


def test_a_byte_order_mark_costs_no_line(tiny_onnx, triples_file, tmp_path, capsys):
    bom = triples_file.with_name("bom.jsonl")
    bom.write_bytes(b"\xef\xbb\xbf" + triples_file.read_bytes())
    plain, marked = tmp_path / "plain.jsonl", tmp_path / "marked.jsonl"
    _score_file(tiny_onnx, triples_file, plain, capsys)
    code, out = _score_file(tiny_onnx, bom, marked, capsys)
    assert code == 0 and _records(marked)[0]["mu"] == _records(plain)[0]["mu"]
    assert [r.get("error", {}).get("type") for r in _records(marked)] == [r.get("error", {}).get("type")
                                                                           for r in _records(plain)]


def test_a_full_disk_is_a_typed_error_and_the_run_resumes(tiny_onnx, triples_file, tmp_path, capsys, monkeypatch):
    """/dev/full refuses every write with ENOSPC; a disk that fills mid-run keeps the lines written
    before, and the rerun (space freed) resumes after them."""
    code, out = _score_file(tiny_onnx, triples_file, "/dev/full", capsys)
    last = out.err.strip().splitlines()[-1]  # after the progress bar's line
    assert code == 2 and last.startswith("editreward: output_error: cannot write --output /dev/full: No space left")
    assert "Traceback" not in out.err

    path = triples_file.with_name("three-chunks.jsonl")
    path.write_text(triples_file.read_text() * 3)  # 21 lines: the CLI writes 8 at a time
    plain, output = tmp_path / "plain.jsonl", tmp_path / "results.jsonl"
    _score_file(tiny_onnx, path, plain, capsys)
    room = len(b"".join(line + b"\n" for line in plain.read_bytes().split(b"\n")[:8])) + 20

    class FillingDisk:
        """The results file on a disk with ``room`` bytes left: the write past it stores what fits, then fails."""

        def __init__(self, file):
            self.file, self.room = file, room

        def write(self, text):
            if len(text) > self.room:
                self.file.write(text[: self.room])
                self.file.flush()
                self.room = 0
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(text)
            return self.file.write(text)

        def __getattr__(self, name):  # flush, close: the real file's
            return getattr(self.file, name)

    monkeypatch.setattr(cli, "open", lambda *a, **k: FillingDisk(builtins.open(*a, **k)), raising=False)
    code, out = _score_file(tiny_onnx, path, output, capsys)
    assert code == 2 and out.err.strip().splitlines()[-1].startswith("editreward: output_error: ")
    assert "No space left" in out.err and "Traceback" not in out.err
    monkeypatch.undo()
    code, out = _score_file(tiny_onnx, path, output, capsys)
    assert code == 0 and json.loads(out.err.strip().splitlines()[-1])["skipped"] == 8  # the torn 9th line was cut
    assert _records(output) == _records(plain)


@pytest.mark.parametrize("case,message", [
    ("output is a directory", "is a directory"), ("input is missing", "no such file"),
    ("input is a directory", "not a regular file but a directory"), ("input is /dev/zero", "but a character device"),
    ("input is a FIFO", "not a regular file but a FIFO")])
def test_usage_errors_are_typed(tiny_onnx, triples_file, tmp_path, capsys, case, message):
    os.mkfifo(tmp_path / "pipe.jsonl")
    args = {"output is a directory": (triples_file, tmp_path), "input is missing": (tmp_path / "none.jsonl", tmp_path / "o"),
            "input is a directory": (tmp_path, tmp_path / "o"), "input is /dev/zero": ("/dev/zero", tmp_path / "o"),
            "input is a FIFO": (tmp_path / "pipe.jsonl", tmp_path / "o")}[case]
    code, out = run_cli(["score", "--model", str(tiny_onnx), "--input", str(args[0]), "--output", str(args[1])], capsys)
    assert code == 2 and out.err.startswith("editreward: input_error: --") and "Traceback" not in out.err
    assert message in out.err


def test_an_output_file_that_is_not_results_is_not_cut(tiny_onnx, triples_file, capsys):
    """Another triples file given as --output by mistake is refused, not cut back to nothing."""
    target = triples_file.with_name("inputs-again.jsonl")
    target.write_bytes(triples_file.read_bytes())
    code, out = run_cli(["score", "--model", str(tiny_onnx), "--input", str(triples_file), "--output", str(target)], capsys)
    assert code == 2 and "line 1 has no integer index" in out.err and "refusing to resume" in out.err
    assert target.read_bytes() == triples_file.read_bytes()


def _parsed(*argv):
    from editreward_rt.cli import build_parser

    return build_parser().parse_args(list(argv))


def test_score_serve_and_batch_default_to_the_devices_batch(tiny_onnx):
    """No --max-batch: each command's scorer takes ``backends.default_max_batch`` of its device (1 on a
    CPU), and a BatchingScorer (serve) merges MERGE_WIDTH triples a batch around those calls."""
    pytest.importorskip("ray")  # the serve extra: serve's replica and batch's actor
    from editreward_rt.backends import default_max_batch
    from editreward_rt.batching import MERGE_WIDTH
    from editreward_rt.cli import load_scorer
    from editreward_rt.serve.app import ServeConfig
    from editreward_rt.serve.batch import ScoreActor
    from editreward_rt.serve.replica import ScorerReplica

    score = _parsed("score", "--model", str(tiny_onnx), "--instruction", "a", "--source", "s", "--edited", "e")
    serve = _parsed("serve", "--model", str(tiny_onnx))
    batch = _parsed("batch", "--model", str(tiny_onnx), "--input", "in.jsonl", "--output", "out")
    assert score.max_batch is serve.max_batch is batch.max_batch is None
    assert load_scorer(score).max_batch == default_max_batch("cpu")
    replica = ScorerReplica(serve.model, device=serve.device, threads=1, max_batch=serve.max_batch,
                            options=dict(serve.backend_option))
    try:
        assert replica.scorer.max_batch == default_max_batch("cpu") and replica.batcher.max_batch == MERGE_WIDTH
        assert replica.ready()["per_call"] == default_max_batch("cpu")
    finally:
        replica.batcher.close()
    assert ServeConfig(model=serve.model, max_batch=serve.max_batch).replica_ongoing == 2 * MERGE_WIDTH
    actor = ScoreActor(batch.model, batch.backend, batch.device, 1, batch.max_batch, None, dict(batch.backend_option))
    assert actor.scorer.max_batch == default_max_batch("cpu")
    assert load_scorer(_parsed("score", "--model", str(tiny_onnx), "--max-batch", "3")).max_batch == 3


def test_precision_reaches_the_scorer_of_score_serve_and_batch(tiny_onnx):
    """--precision: the scorer of each command runs it (the description names what ran); unset, the default."""
    pytest.importorskip("ray")  # the serve extra: serve's replica and batch's actor
    from editreward_rt.cli import load_scorer
    from editreward_rt.serve.batch import ScoreActor
    from editreward_rt.serve.replica import ScorerReplica

    engine = backends.cpu_engine()
    score = _parsed("score", "--model", str(tiny_onnx), "--precision", "fp32")
    assert load_scorer(score).engine == f"{engine} fp32"
    serve = _parsed("serve", "--model", str(tiny_onnx), "--precision", "fp32")
    replica = ScorerReplica(serve.model, threads=1, options=dict(serve.backend_option), precision=serve.precision)
    try:
        assert replica.ready()["precision"] == "fp32"
    finally:
        replica.batcher.close()
    batch = _parsed("batch", "--model", str(tiny_onnx), "--input", "in.jsonl", "--output", "out", "--precision", "fp32")
    actor = ScoreActor(batch.model, batch.backend, batch.device, 1, None, None, {}, batch.precision)
    assert actor.scorer.description["precision"] == "fp32"
    assert _parsed("serve", "--model", "m").precision is None  # the default: Scorer.load's (auto, or $EDITREWARD_PRECISION)
    with pytest.raises(SystemExit):
        _parsed("score", "--model", "m", "--precision", "fp16")
    if engine == "openvino":  # ONNX Runtime has no bf16 CPU kernels; OpenVINO runs bf16 (or says it ran fp32)
        bf16 = load_scorer(_parsed("score", "--model", str(tiny_onnx), "--precision", "bf16"))
        assert bf16.description["precision"] in ("bf16", "fp32") and bf16.description["backend"] == "openvino"


def test_backend_options_from_the_command_line(tiny_onnx, images, tmp_path, capsys):
    """--backend-option KEY=VALUE reaches the backend (true/false as bools); one it does not take is
    refused naming the backends that do; a KEY no backend has is a usage error."""
    from editreward_rt.cli import backend_option, load_scorer

    assert backend_option("io_binding=false") == ("io_binding", False)
    assert backend_option("threads=4") == ("threads", 4) and backend_option("optimization=basic")[1] == "basic"
    args = _parsed("score", "--model", str(tiny_onnx), "--backend-option", "io_binding=true",
                   "--backend-option", "optimization=basic")
    assert load_scorer(args).description["io_binding"] is True
    src, edit = save(images[0], tmp_path, "s.png"), save(images[1], tmp_path, "e.png")
    code, out = run_cli(["score", "--model", str(tiny_onnx), "--instruction", "Add a bowl", "--source", str(src),
                         "--edited", str(edit), "--backend-option", "cuda_graphs=true"], capsys)
    assert code == 2 and "option of the tensorrt backend" in out.err
    code, out = run_cli(["score", "--model", str(tiny_onnx), "--instruction", "Add a bowl", "--source", str(src),
                         "--edited", str(edit), "--per-call"], capsys)
    assert code == 2 and "option of the torch backend" in out.err
    for bad in ("io_binding", "turbo=1"):
        with pytest.raises(SystemExit):
            _parsed("score", "--model", str(tiny_onnx), "--backend-option", bad)


def test_an_over_long_instruction_is_refused_before_tokenizing(tiny_onnx, triples_file, tmp_path, capsys):
    """A 50 MB instruction line costs its line a typed error, not minutes and gigabytes of tokenizing."""
    path = triples_file.with_name("long.jsonl")
    line = json.dumps({"instruction": "word " * 10_000_000, "source": "img0.png", "edited": "img1.png"})
    path.write_text(line + "\n" + triples_file.read_text().splitlines()[0] + "\n")
    start = time.perf_counter()
    code, out = _score_file(tiny_onnx, path, tmp_path / "out.jsonl", capsys)
    assert code == 0 and time.perf_counter() - start < 20  # tokenizing it whole took over a minute
    results = _records(tmp_path / "out.jsonl")
    assert results[0]["error"]["type"] == "prompt_too_long" and "mu" in results[1]
