"""Reliability classes replayed in-process (no service): the batching cache, the HTTP client, the
instruction limit, manifests, and the CLI's and checkpoint reader's small cases.

Real parts only: a Scorer on the exported folder, real files, a raw-socket HTTP server on
127.0.0.1 for the client, and the CLI run as a subprocess under a timeout (a FIFO must not hang
it). Each class returns ``(cases tried, held, result)``; ``reliability.py`` writes the table.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from editreward_rt import BatchingScorer, Scorer
from editreward_rt.client import BadAnswerError, RewardClient
from editreward_rt.errors import CheckpointError, EditRewardError, ManifestError, NotReadyError
from editreward_rt.manifest import MANIFEST
from PIL import Image

# Batched and single scoring differ by float32 round-off only (tests/conftest.py's assert_same_score).
SAME = 1e-5
CLI = [sys.executable, "-c", "from editreward_rt.cli import main; raise SystemExit(main())", "score"]
CLI_TIMEOUT = 180.0  # a loaded 2-core machine starts the CLI in seconds; a hang would never end


def picture(seed: int, height: int, width: int) -> Image.Image:
    """Gradients plus noise, so resizing keeps real content and two seeds score apart."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], axis=-1) * 200
    return Image.fromarray((base + rng.integers(0, 56, (height, width, 3))).astype(np.uint8))


def same(a, b) -> bool:
    """Two Scores equal to round-off: fused and per head."""
    pairs = [(a.mu, b.mu), (a.log_sigma, b.log_sigma)] + [
        (g, w) for x, y in zip(a.heads, b.heads, strict=True) for g, w in ((x.mu, y.mu), (x.log_sigma, y.log_sigma))]
    return all(abs(g - w) <= SAME for g, w in pairs)


# ---------------------------------------------------------------- defect 2: stale reward


def stale_reward(scorer: Scorer, tmp: Path) -> tuple[str, bool, str]:
    """A file rewritten at one path (as str and as Path) and an image edited in place, each
    submitted before and after the change: the BatchingScorer must score the new content."""
    pics = [picture(200 + i, 40 + 6 * i, 56) for i in range(5)]
    path, canvas = tmp / "rollout.png", pics[3].copy()
    got, want = [], []
    with BatchingScorer(scorer, max_wait_ms=1) as batcher:
        def both(edited):
            want.append(scorer.score("add a cat", pics[0], edited))
            got.append(batcher.submit("add a cat", pics[0], edited).result(timeout=120))
        for step, content in enumerate(pics[1:3]):
            content.save(path)
            both(str(path) if step else path)
        both(canvas)
        canvas.paste(pics[4].resize(canvas.size))
        both(canvas)
    matched = sum(same(g, w) for g, w in zip(got, want))
    apart = abs(want[0].mu - want[1].mu) > SAME and abs(want[2].mu - want[3].mu) > SAME
    return ("rollout.png rewritten between two submits; a PIL image pasted over in place", matched == 4 and apart,
            f"{matched} of 4 scores equal Scorer.score on the new content (old and new contents score apart: {apart})")


# ---------------------------------------------------------------- defect 3: the client


class RawServer:
    """A raw HTTP server on 127.0.0.1: its n-th connection gets the n-th answer as bytes (the last
    repeats), after the request's head and announced body were read; then the connection closes."""

    def __init__(self, *answers: bytes):
        self.answers, self.served = answers, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed: the case is over
                return
            with conn:
                conn.settimeout(10)
                try:
                    self._read_request(conn)
                    conn.sendall(self.answers[min(self.served, len(self.answers) - 1)])
                except OSError:  # the client gave up first
                    pass
                self.served += 1

    @staticmethod
    def _read_request(conn) -> None:
        data = b""
        while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = sum(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-length:"))
        while len(body) < length and (chunk := conn.recv(65536)):
            body += chunk

    def __enter__(self) -> "RawServer":
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


def http(status: str, body: bytes, ctype: str = "application/json", length: int | None = None, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body) if length is None else length}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode() + body


SCORE = {"mu": 0.5, "log_sigma": -1.0, "heads": [{"name": "instruction_following", "mu": 0.5, "log_sigma": -1.0}]}
GOOD = http("200 OK", json.dumps({"results": [SCORE, SCORE]}).encode())
CUT = http("200 OK", b'{"results": [', length=400)
BUSY = b'{"error": {"type": "not_ready", "message": "draining"}}'
PAIR = [("add a cat", b"source bytes", b"edited bytes"), ("add a dog", b"source bytes", b"other bytes")]
MAX_BACKOFF = 0.2
# (case, answers in turn, the typed error wanted (None: the pair scored), attempts wanted). Transient
# failures are retried; an answer that breaks the protocol is refused at once.
CLIENT_CASES = [
    ("a body cut midway, then a good answer", [CUT, GOOD], None, 2),
    ("a body cut midway, every time", [CUT], NotReadyError, 2),
    ("a garbage status line", [b"garbage\r\n\r\n"], NotReadyError, 2),
    ("200 with HTML", [http("200 OK", b"<html><body>Welcome</body></html>", "text/html")], BadAnswerError, 1),
    ("Retry-After: 100000", [http("503 Service Unavailable", BUSY, extra="Retry-After: 100000\r\n"), GOOD], None, 2),
    ("Retry-After: inf", [http("503 Service Unavailable", BUSY, extra="Retry-After: inf\r\n"), GOOD], None, 2),
    ("fewer results than triples", [http("200 OK", json.dumps({"results": [SCORE]}).encode())], BadAnswerError, 1),
    ("no results", [http("200 OK", b'{"scored": true}')], BadAnswerError, 1),
]


def _bounded(call, limit: float = 30.0):
    """(what ``call`` returned or raised, seconds), from a daemon thread given ``limit`` seconds: a
    client that sleeps for a server's Retry-After of a day is reported, not waited for."""
    out = [TimeoutError(f"still waiting after {limit:g} s")]

    def target():
        try:
            out[0] = call()
        except Exception as exc:  # noqa: BLE001 - what it raises is the finding
            out[0] = exc
    start = time.monotonic()
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(limit)
    return out[0], time.monotonic() - start


def client_failures() -> tuple[str, bool, str]:
    """Each case against its own raw server, with one retry and a small ``max_backoff``: the right
    typed error (or the scores), the attempts counted, and every wait capped."""
    held, waits, kinds = [], {}, set()
    for case, answers, error, attempts in CLIENT_CASES:
        with RawServer(*answers) as server:
            client = RewardClient(server.url, timeout=5, retries=1, backoff=0.01, max_backoff=MAX_BACKOFF)
            got, seconds = _bounded(lambda: client.score_batch(PAIR))
        if case.startswith("Retry-After"):
            waits[case] = seconds
        kinds.add(type(got).__name__ if isinstance(got, Exception) else "scored")
        typed_ok = isinstance(got, error) if error else isinstance(got, list) and [s.mu for s in got] == [0.5, 0.5]
        # one retry waits at most MAX_BACKOFF; the rest is loopback exchanges
        held.append(typed_ok and isinstance(got, (EditRewardError, list)) and client.attempts == attempts
                    and seconds < attempts + MAX_BACKOFF)
    return ("; ".join(case for case, _, _, _ in CLIENT_CASES) + f" (max_backoff {MAX_BACKOFF:g} s)", all(held),
            f"{sum(held)} of {len(held)} as expected (retried or refused at once, attempts and result counts checked); "
            f"outcomes {', '.join(sorted(kinds))}; " + ", ".join(f"{c} answered in {t:.2f} s" for c, t in waits.items()))


# ---------------------------------------------------------------- defect 6: the instruction limit


def huge_instruction() -> str:
    return "word " * 10_000_000  # 50 MB: before the limit, tokenizing it took 77 s and 9.9 GB


def _peak_mb() -> float:
    """This process's peak resident memory so far (getrusage; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def limit_probe(model: str, how: str, path: str) -> None:
    """Run in a child process (its peak RSS is its own): load a Scorer, then send the 50 MB
    instruction through ``Scorer.score`` or ``editreward score --input path``; print one JSON line
    with how far the work raised the process's peak RSS (getrusage) above its peak before: loading
    the model sets that earlier peak, and a refusal that tokenized the whole string would pass it by
    gigabytes."""
    from editreward_rt.cli import main

    scorer = Scorer.load(model, threads=1)
    image, huge = picture(1, 40, 56), (huge_instruction() if how == "scorer" else None)
    before, start = _peak_mb(), time.monotonic()
    if how == "scorer":
        try:
            scorer.score(huge, image, image)
            kind = "scored"
        except EditRewardError as exc:
            kind = exc.kind
    else:
        code = main(["score", "--model", model, "--input", path, "--output", path + ".out"])
        record = json.loads(Path(path + ".out").read_text().splitlines()[0])
        kind = f"{record.get('error', {}).get('type', 'scored')}, exit {code}"
    seconds = time.monotonic() - start
    growth_mb = _peak_mb() - before
    print(json.dumps({"kind": kind, "seconds": seconds, "growth_mb": growth_mb}))


def instruction_limit(model: str, tmp: Path) -> tuple[str, bool, str]:
    """Held when both are refused as prompt_too_long in under 10 s, the peak RSS growing by under
    1 GB above the model-loaded peak: the string and its JSON line are 50 MB each, so a few copies
    fit; tokenizing it took 9.9 GB."""
    picture(1, 40, 56).save(tmp / "s.png")
    line = tmp / "huge.jsonl"
    line.write_text(json.dumps({"instruction": huge_instruction(), "source": "s.png", "edited": "s.png"}) + "\n")
    found = {}
    for how in ("scorer", "cli"):
        code = f"from editreward_bench.reliability_local import limit_probe; limit_probe({model!r}, {how!r}, {str(line)!r})"
        try:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CLI_TIMEOUT)
            found[how] = json.loads(done.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            found[how] = {"kind": f"unanswered after {CLI_TIMEOUT:g} s", "seconds": CLI_TIMEOUT, "growth_mb": float("inf")}
        except (IndexError, ValueError):  # no JSON line: the child died
            found[how] = {"kind": f"crashed (exit {done.returncode}): {done.stderr.strip()[-200:]}", "seconds": 0,
                          "growth_mb": float("inf")}
    held = (found["scorer"]["kind"] == "prompt_too_long" and found["cli"]["kind"] == "prompt_too_long, exit 0"
            and all(f["seconds"] < 10 and f["growth_mb"] < 1024 for f in found.values()))
    detail = "; ".join(f"{'Scorer.score' if how == 'scorer' else 'score --input'}: {f['kind']} in {f['seconds']:.2f} s, "
                       f"peak RSS raised by {f['growth_mb']:.0f} MB" for how, f in found.items())
    return "a 50 MB instruction through Scorer.score and through `score --input` (one line)", held, detail


# ---------------------------------------------------------------- defect 8: manifests


def _at(manifest: dict, path: str):
    node = manifest
    for key in path.split("."):
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def _set(path: str, value):
    """An edit setting the field at a dotted path; a callable value is computed from the manifest."""
    parent, last = path.rpartition(".")[::2]

    def change(manifest: dict) -> None:
        node = _at(manifest, parent) if parent else manifest
        node[int(last) if isinstance(node, list) else last] = value(manifest) if callable(value) else value
    return change


# (case, edit of manifest.json, the field the ManifestError must name). The manifest is not among
# the hashed files, so every copy's hashes stay consistent: only the schema can refuse these.
MALFORMED = [
    ("a graph's file a list", _set("graphs.vision.file", ["vision.onnx"]), "graphs.vision.file"),
    ("quantization a string", _set("quantization", "ort-int8"), "quantization"),
    ('kv_dtype "int2"', _set("kv_dtype", "int2"), "kv_dtype"),
    ("a float16 cache on float32 graphs", _set("kv_dtype", "float16"), "graphs.decoder.inputs"),
    ("a 2-element image_mean", _set("spec.image.image_mean", [0.5, 0.5]), "spec.image.image_mean"),
    ('fusion "max"', _set("spec.heads.fusion", "max"), "spec.heads.fusion"),
    ("image_std 0", _set("spec.image.image_std.1", 0), "spec.image.image_std[1]"),
    ("image_std NaN", _set("spec.image.image_std.1", float("nan")), "spec.image.image_std[1]"),
    ("image_pad equal to the reward token", _set("spec.tokens.image_pad", lambda m: _at(m, "spec.tokens.reward")),
     "spec.tokens"),
    ("the reward token outside the vocabulary", _set("spec.tokens.reward", lambda m: _at(m, "spec.text.vocab_size")),
     "spec.tokens.reward"),
    ("image.max_input_pixels 1e15", _set("spec.image.max_input_pixels", 1e15), "spec.image.max_input_pixels"),
    ("a declared graph output renamed", _set("graphs.heads.outputs.0.name", "scores"), "graphs.heads.outputs[0].name"),
    ("patch_size 0", _set("spec.image.patch_size", 0), "patch_size"),
    ("manifest_version true", _set("manifest_version", True), "manifest_version"),
    ("an unknown spec field", _set("spec.vision.frobnicate", 1), "spec.vision.frobnicate"),
    ("a missing spec field", lambda m: m["spec"]["text"].pop("head_dim"), "spec.text.head_dim"),
    ("a 100,000-deep manifest", _set("origin", "DEEP"), "nested too deeply"),  # DEEP: replaced in the text
]


def _link_copy(model: Path, folder: Path) -> None:
    """A copy of the exported folder whose graphs are hard links (a 7B is not copied 17 times) and
    whose manifest is a file of its own, so editing it never writes through to the original."""
    def link(src, dst):
        if Path(src).name == MANIFEST:
            return shutil.copy2(src, dst)
        try:
            os.link(src, dst)
        except OSError:  # another file system, or links refused: copy
            shutil.copy2(src, dst)
    shutil.copytree(model, folder, copy_function=link)


def manifests(model: str, tmp: Path) -> tuple[str, bool, str]:
    refused, wrong = 0, []
    for i, (case, change, field) in enumerate(MALFORMED):
        folder = tmp / f"manifest-{i}"
        _link_copy(Path(model), folder)
        manifest = json.loads((folder / MANIFEST).read_text())
        change(manifest)
        (folder / MANIFEST).write_text(json.dumps(manifest).replace('"DEEP"', "[" * 100_000 + "]" * 100_000))
        try:
            Scorer.load(folder, threads=1)
            wrong.append(f"{case}: loaded")
        except ManifestError as exc:
            if field in str(exc):
                refused += 1
            else:
                wrong.append(f"{case}: does not name {field}")
        except Exception as exc:  # noqa: BLE001 - an untyped error is the finding
            wrong.append(f"{case}: {type(exc).__name__}")
        shutil.rmtree(folder)
    return (f"{len(MALFORMED)} malformations with consistent hashes: " + "; ".join(c for c, _, _ in MALFORMED),
            not wrong, f"{refused} of {len(MALFORMED)} a ManifestError at load naming the field"
                       + (f"; not: {wrong}" if wrong else ""))


# ---------------------------------------------------------------- defect 10: small ones


def _cli(model: str, source, output) -> tuple[int, str]:
    """``editreward score --input source --output output`` in a subprocess: (exit code, stderr).
    A run past CLI_TIMEOUT (a FIFO read that blocks) is killed and reported as a hang."""
    try:
        done = subprocess.run([*CLI, "--model", model, "--input", str(source), "--output", str(output)],
                              capture_output=True, text=True, timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return -1, f"hung for {CLI_TIMEOUT:g} s"
    return done.returncode, done.stderr


def small_ones(scorer: Scorer, model: str, tmp: Path) -> tuple[str, bool, str]:
    cases = {}
    for i in range(3):
        picture(300 + i, 40 + 8 * i, 56).save(tmp / f"p{i}.png")
    triples = [{"instruction": "add a cat", "source": "p0.png", "edited": "p1.png"},
               {"instruction": "make it snow", "source": "p0.png", "edited": "p2.png"}]
    bom, results = tmp / "bom.jsonl", tmp / "results.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(t) + "\n" for t in triples).encode())
    code, err = _cli(model, bom, results)
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    first = records[0] if records else {}
    want = scorer.score("add a cat", tmp / "p0.png", tmp / "p1.png")
    cases["BOM: line 0 scored"] = (code == 0 and first.get("index") == 0 and "mu" in first
                                   and abs(first["mu"] - want.mu) <= SAME)

    foreign = results.read_bytes() + b'{"id": 3, "caption": "a cat"}\n'
    results.write_bytes(foreign)
    code, err = _cli(model, bom, results)
    cases["a foreign record refused naming its line"] = (code == 2 and "line 3 " in err and "refusing to resume" in err
                                                         and results.read_bytes() == foreign)

    code, err = _cli(model, bom, "/dev/full")
    last = err.strip().splitlines()[-1] if err.strip() else ""
    cases["--output /dev/full: output_error (exit 2)"] = code == 2 and last.startswith("editreward: output_error:")

    os.mkfifo(tmp / "pipe.jsonl")
    for name, source, says in (("a FIFO", tmp / "pipe.jsonl", "not a regular file but a FIFO"),
                               ("/dev/zero", "/dev/zero", "not a regular file but a character device")):
        code, err = _cli(model, source, tmp / "o.jsonl")
        cases[f"--input {name}: not a regular file"] = code == 2 and says in err and "Traceback" not in err

    cases.update(_configs(tmp))
    held = [name for name, ok in cases.items() if ok]
    return ("; ".join(cases), len(held) == len(cases),
            f"{len(held)} of {len(cases)} held" + ("" if len(held) == len(cases) else
                                                     f"; not: {[n for n in cases if n not in held]}"))


def _configs(tmp: Path) -> dict[str, bool]:
    """A tiny checkpoint (written here: the exported folder has no config.json) whose base config is
    100,000 deep, then a list: each a CheckpointError naming config.json, never an untyped error."""
    from editreward_rt.checkpoint import open_checkpoint
    from editreward_rt.families import DEFAULT_FAMILY, family

    paths = family(DEFAULT_FAMILY).write_fixture(tmp / "checkpoint-fixture", size="tiny")
    out = {}
    for name, text in (("a 100,000-deep config.json", "[" * 100_000 + "]" * 100_000),
                       ("a list-valued config.json", '["model_type", "vision_config"]')):
        (paths.base / "config.json").write_text(text)
        try:
            open_checkpoint(paths.checkpoint, prompts_from=paths.prompts)
            out[f"{name}: CheckpointError"] = False
        except CheckpointError as exc:
            out[f"{name}: CheckpointError"] = "config.json" in str(exc)
        except Exception:  # noqa: BLE001 - an untyped error is the finding
            out[f"{name}: CheckpointError"] = False
    return out


# ---------------------------------------------------------------- all of them


def run(model: str, tmp: Path) -> list[tuple[str, str, bool, str]]:
    """The in-process rows, in the table's order; ``tmp`` is a scratch folder."""
    scorer = Scorer.load(model, threads=1, max_batch=8)
    rows = [("stale reward (defect 2)", *stale_reward(scorer, tmp)),
            ("the client (defect 3)", *client_failures()),
            ("instruction limit (defect 6)", *instruction_limit(model, tmp)),
            ("malformed manifests (defect 8)", *manifests(model, tmp)),
            ("small ones (defect 10)", *small_ones(scorer, model, tmp))]
    return rows
