"""Issue 25's reliability cases replayed, written as a table to ``docs/reliability.md`` (class,
cases tried, result, held).

The in-process classes (``reliability_local``: the batching cache, the client, the instruction
limit, manifests, the CLI's small cases) run on the exported folder without a service. The service
classes start ``editreward serve`` on a free loopback port with small limits (so each guard is
reached in seconds), replay their cases, stop the service with SIGTERM (the last class), and kill
it if it outlives the run. Loopback only; every loop is bounded in count and time.

    python benchmarks/reliability.py --model DIR [--only all|in-process|service] [--out docs/reliability.md]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from . import reliability_local
from .common import serve_cli

BODY_TIMEOUT, CLIENT_BODIES, REQUEST_TIMEOUT = 2.0, 8, 3.0
SERVE_FLAGS = ["--replicas", "1", "--threads", "1", "--max-batch", "1", "--max-body-mb", "4",
               "--body-timeout-s", str(BODY_TIMEOUT), "--max-client-bodies", str(CLIENT_BODIES),
               "--request-timeout-s", str(REQUEST_TIMEOUT), "--max-triples", "256", "--graceful-shutdown-s", "60"]


def _png(seed: int, height: int, width: int, flat: bool = False) -> str:
    """base64 PNG: noisy (costly to send), or flat (a few KB to send, height x width to decode)."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), seed % 200, np.uint8) if flat else rng.integers(0, 256, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Client:
    def __init__(self, port: int):
        self.port = port

    def call(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60):
        """(status, headers with lower-case names, parsed JSON or None when the body is not JSON, seconds)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        start = time.monotonic()
        try:
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        return response.status, {k.lower(): v for k, v in response.headers.items()}, parsed, time.monotonic() - start


def typed(status: int, body, kind: str | None = None) -> bool:
    """The project's error shape: {"error": {"type", "message"}} (of ``kind`` when given)."""
    ok = isinstance(body, dict) and set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    return ok and status >= 400 and (kind is None or body["error"]["type"] == kind)


# ---------------------------------------------------------------- the classes


def slow_bodies(client: Client, triple: dict) -> tuple[str, bool, str]:
    """Connections from 127.0.0.2 declare 100,000-byte bodies and send a byte every 0.5 s."""
    n = CLIENT_BODIES + 12
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", client.port), timeout=BODY_TIMEOUT + 10,
                                        source_address=("127.0.0.2", 0))
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{")
        socks.append(sock)
    stop, start = threading.Event(), time.monotonic()

    def dribble():
        for _ in range(int((BODY_TIMEOUT + 10) / 0.5)):
            if stop.wait(0.5):
                return
            for sock in socks:
                try:
                    sock.send(b" ")
                except OSError:
                    pass

    def answer(sock):
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read()), time.monotonic() - start

    dribbler = threading.Thread(target=dribble)
    dribbler.start()
    try:
        with ThreadPoolExecutor(n) as pool:
            slow = [pool.submit(answer, s) for s in socks]
            time.sleep(0.5)
            normal = client.call("POST", "/v1/score", triple)
            answers = [f.result() for f in slow]
    finally:
        stop.set()
        dribbler.join()
        for sock in socks:
            sock.close()
    late = [a for a in answers if a[0] == 408 and typed(a[0], a[1], "body_timeout") and a[2] < BODY_TIMEOUT + 5]
    refused = [a for a in answers if a[0] == 429 and typed(a[0], a[1], "overloaded")]
    held = len(late) == CLIENT_BODIES and len(refused) == n - CLIENT_BODIES and normal[0] == 200
    return (f"{n} slow bodies from one address, a normal request from another",
            held, f"{len(late)} typed 408 within the {BODY_TIMEOUT:g} s body deadline, {len(refused)} typed 429, "
                  f"normal request {normal[0]} in {normal[3]:.2f} s")


def statuses(client: Client, triple: dict) -> tuple[str, bool, str]:
    cases = {
        "404 unknown path": (client.call("GET", "/nope"), 404),
        "405 wrong method": (client.call("GET", "/v1/score"), 405),
        "413 body over --max-body-mb": (client.call("POST", "/v1/score", {**triple, "source": "A" * 5_000_000}), 413),
        "415 content type": (client.call("POST", "/v1/score", b"hi", {"Content-Type": "text/plain"}), 415),
        "400 not JSON": (client.call("POST", "/v1/score", b"{oops"), 400),
    }
    bad = [name for name, ((status, _, body, _), want) in cases.items() if status != want or not typed(status, body)]
    return ", ".join(cases) + " (408, 429: slow bodies; 503: shutdown)", not bad, \
        "all typed JSON" if not bad else f"untyped or wrong: {bad}"


def rank_item_errors(client: Client, source: str, edits: list[str]) -> tuple[str, bool, str]:
    mixed = [edits[0], "bm9wZQ==", edits[1], "https://example.com/x.png"]
    status, _, body, _ = client.call("POST", "/v1/rank", {"instruction": "x", "source": source, "edits": mixed})
    items = (body or {}).get("results", [])
    held = (status == 200 and [("error" in r) for r in items] == [False, True, False, True]
            and sorted(body["order"]) == [0, 2])
    order = (body or {}).get("order")
    return "a bad image and a URL among four edits", held, f"{status}, errors in place at 1 and 3, order {order}"


def timeouts_not_replayed(client: Client, source: str) -> tuple[str, bool, str]:
    edits = [_png(700 + i, 40, 50) for i in range(256)]
    rank, key = {"instruction": "x", "source": source, "edits": edits}, {"Idempotency-Key": "reliability-timeout"}
    first = client.call("POST", "/v1/rank", rank, key)
    timed_out = sum(r.get("error", {}).get("type") == "timeout" for r in (first[2] or {}).get("results", []))
    again = client.call("POST", "/v1/rank", rank, key)
    final = [client.call("POST", "/v1/rank", {**rank, "edits": edits[:1]}, {"Idempotency-Key": "reliability-final"})
             for _ in range(2)]
    held = (first[0] == 200 and timed_out > 0 and "idempotency-replayed" not in again[1]
            and final[1][1].get("idempotency-replayed") == "true")
    return ("256 edits over the request timeout with an idempotency key, retried; a final answer retried", held,
            f"{first[0]} with {timed_out} timeouts, retry replayed: {again[1].get('idempotency-replayed', 'no')}, "
            f"final answer replayed: {final[1][1].get('idempotency-replayed', 'no')}")


def fair_decoding(client: Client, triple: dict) -> tuple[str, bool, str]:
    big = [_png(800 + i, 2000, 1500, flat=True) for i in range(16)]
    request = {"triples": [{"instruction": "x", "source": big[i], "edited": big[(i + 1) % 16]} for i in range(16)]}
    with ThreadPoolExecutor(2) as pool:
        start = time.monotonic()
        heavy = pool.submit(lambda: (client.call("POST", "/v1/score", request), time.monotonic() - start))
        time.sleep(0.2)
        small = client.call("POST", "/v1/score", triple)
        small_done = time.monotonic() - start
        (status, _, _, _), heavy_done = heavy.result()
    held = small[0] == 200 and status == 200 and small_done < heavy_done
    return ("a small request sent behind 16 distinct 3 MP images", held,
            f"small answered at {small_done:.2f} s, the big request at {heavy_done:.2f} s")


def shutdown(client: Client, proc: subprocess.Popen, triple: dict, source: str, edits: list[str]):
    in_flight = {}
    rank = threading.Thread(target=lambda: in_flight.setdefault(
        "rank", client.call("POST", "/v1/rank", {"instruction": "x", "source": source, "edits": edits[:32]},
                            timeout=120)))
    rank.start()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    seen, stop_by = [], time.monotonic() + 90

    def probe():  # four of these: one may wait in the scorer's queue while the others arrive
        while proc.poll() is None and time.monotonic() < stop_by:
            try:
                seen.append(client.call("POST", "/v1/score", triple, timeout=30))
            except OSError:  # refused: the proxy has stopped
                seen.append(None)
                time.sleep(0.05)

    probers = [threading.Thread(target=probe) for _ in range(4)]
    for t in probers:
        t.start()
    for t in [*probers, rank]:
        t.join(timeout=120)
    answered = [s for s in seen if s is not None]
    drained = [s for s in answered if s[0] == 503 and typed(s[0], s[2], "not_ready") and s[1].get("retry-after")]
    # A probe queued behind the request in flight may meet its 3 s request timeout (a typed 504);
    # what must never come is a 404 or an untyped answer.
    other = [s[0] for s in answered if s[0] != 200 and not typed(s[0], s[2])]
    held = (bool(drained) and not other and all(s[0] != 404 for s in answered)
            and in_flight.get("rank", (0,))[0] == 200 and proc.wait(60) == 0)
    return ("SIGTERM with a request in flight, then requests until the process exits", held,
            f"{len(seen)} probes: {len(drained)} typed 503 with Retry-After, {seen.count(None)} refused, "
            f"statuses {sorted({s[0] for s in answered})}, untyped {sorted(set(other)) or 'none'}; "
            f"in-flight answered {in_flight.get('rank', ('none',))[0]}")


# ---------------------------------------------------------------- run and write


def run_service(model: str) -> list[tuple[str, str, bool, str]]:
    with serve_cli(model, SERVE_FLAGS, ready_s=180) as (url, proc):
        client = Client(int(url.rsplit(":", 1)[1]))
        source, edits = _png(1, 48, 64), [_png(10 + i, 40, 50) for i in range(32)]
        triple = {"instruction": "make the sky pink", "source": source, "edited": edits[0]}
        return [("slow request bodies (defect 1)", *slow_bodies(client, triple)),
                ("typed JSON for every status", *statuses(client, triple)),
                ("/v1/rank with a bad edit (defect 9)", *rank_item_errors(client, source, edits)),
                ("timeouts never replayed (defect 4)", *timeouts_not_replayed(client, source)),
                ("fair image decoding (defect 7)", *fair_decoding(client, triple)),
                ("shutdown (defect 5)", *shutdown(client, proc, triple, source, edits))]


def write(rows: list, out: Path, model: str, only: str) -> None:
    parts = {"in-process": "in this process (the service's classes are not in this run)",
             "service": "against a live `editreward serve` on loopback (the in-process classes are not in this run)",
             "all": "in this process and against a live `editreward serve` on loopback"}
    lines = ["# Reliability", "",
             f"Regenerated by `python benchmarks/reliability.py --model DIR --only {only}`, which replays each case "
             f"{parts[only]}. In-process classes use a Scorer on the exported folder, real files, a raw-socket HTTP "
             "server on 127.0.0.1 for the client, and the CLI as a subprocess under a timeout. The service runs with `"
             + " ".join(SERVE_FLAGS) + "`; 500 is answered as typed JSON by the gateway's handler of unexpected "
             "exceptions, and no request provokes it on purpose.", "",
             f"Model: `{Path(model).name}`; run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "| class | cases tried | result | held |", "| --- | --- | --- | --- |"]
    lines += [f"| {cls} | {cases} | {detail} | {'yes' if held else '**no**'} |" for cls, cases, held, detail in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def run(model: str, only: str = "all") -> list[tuple[str, str, bool, str]]:
    rows = []
    if only in ("all", "in-process"):
        with tempfile.TemporaryDirectory(prefix="editreward-reliability-") as tmp:
            rows += reliability_local.run(model, Path(tmp))
    if only in ("all", "service"):
        rows += run_service(model)
    return sorted(rows, key=_defect)


def _defect(row) -> int:
    """A row's defect number in issue 25 (its class ends "(defect N)"), so the table reads in the
    issue's order; a class of no single defect goes last."""
    number = row[0].rpartition("(defect ")[2].rstrip(")")
    return int(number) if number.isdigit() else 99


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported model folder")
    p.add_argument("--only", choices=("all", "in-process", "service"), default="all",
                   help="in-process: no service (seconds); service: the live `editreward serve` classes")
    p.add_argument("--out", default="docs/reliability.md")
    args = p.parse_args(argv)
    rows = run(args.model, args.only)
    write(rows, Path(args.out), args.model, args.only)
    for cls, _, held, detail in rows:
        print(f"{'held' if held else 'FAILED'}: {cls}: {detail}", file=sys.stderr)
    return 0 if all(held for _, _, held, _ in rows) else 1
