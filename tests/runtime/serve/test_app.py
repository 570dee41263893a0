"""The HTTP API, over real loopback HTTP against the tiny ONNX model, served both ways: on Ray
Serve and in one process (``serve/local.py``); every test runs against each.

Each way starts once for the module (Ray with 2 CPUs) with two applications: the main one, and a "tight"
one whose queue, batch and timeout are tiny so 429 and timeouts can be provoked. Slow-body
clients connect from 127.0.0.2, so that the per-address bound on bodies in flight leaves the
test's own requests (from 127.0.0.1) alone. Every client loop is bounded in count and time.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

ray = pytest.importorskip("ray")  # the serve extra is not installed
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")
requests = pytest.importorskip("requests")

from conftest import SERVING_MODES, png_bytes, random_image, serving  # noqa: E402
from editreward_rt import backends  # noqa: E402

MAX_PIXELS = 1_000_000
MAX_BODY = 2 * 1024 * 1024
MAX_REQUEST_PIXELS = 8_000_000
TIMEOUT = 60
BODY_TIMEOUT = 3.0  # the main app's body deadline
CLIENT_BODIES = 32  # bodies one client address may send at once (the default)


TIGHT_EDITS = 256  # edits in the rank request that must outlast the tight app's timeout


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def pictures():
    """Six small PNGs (as bytes): index 0 and 1 are sources, the rest edits."""
    return [png_bytes(random_image(100 + i, 48 + 8 * i, 64)) for i in range(6)]


@pytest.fixture(scope="module")
def local(tiny_onnx):
    from editreward_rt import Scorer

    return Scorer.load(tiny_onnx, threads=1, max_batch=8)


@pytest.fixture(scope="module", params=SERVING_MODES)
def server(tiny_onnx, request):
    from editreward_rt.serve.app import ServeConfig
    from editreward_rt.serve.schemas import Limits

    limits = Limits(max_body_bytes=MAX_BODY, max_image_pixels=MAX_PIXELS, max_instruction_chars=200, max_triples=16,
                    max_request_pixels=MAX_REQUEST_PIXELS, body_timeout_s=BODY_TIMEOUT,
                    max_client_body_reads=CLIENT_BODIES)
    main = ServeConfig(model=str(tiny_onnx), threads=1, max_batch=8, batch_wait_ms=20, limits=limits)
    tight = ServeConfig(model=str(tiny_onnx), threads=1, max_batch=1, batch_wait_ms=0, max_ongoing=1, max_queued=1,
                        limits=Limits(request_timeout_s=2.0, max_triples=TIGHT_EDITS))
    with serving({"editreward": ("/", main), "tight": ("/tight", tight)}, request.param) as url:
        yield url


def post(url, path, payload=None, **kw):
    return requests.post(url + path, json=payload, timeout=TIMEOUT, **kw) if payload is not None else \
        requests.post(url + path, timeout=TIMEOUT, **kw)


def triple(pictures, instruction="make the sky pink", src=0, edit=2) -> dict:
    return {"instruction": instruction, "source": _b64(pictures[src]), "edited": _b64(pictures[edit])}


def close(got: dict, want, tol=1e-5) -> None:
    assert got["mu"] == pytest.approx(want.mu, abs=tol)
    assert got["log_sigma"] == pytest.approx(want.log_sigma, abs=tol)
    assert got["sigma"] == pytest.approx(want.sigma, abs=tol)
    for h, w in zip(got["heads"], want.heads, strict=True):
        assert h["name"] == w.name
        assert h["mu"] == pytest.approx(w.mu, abs=tol) and h["log_sigma"] == pytest.approx(w.log_sigma, abs=tol)


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert body["error"]["message"]
    return body["error"]["type"]


# ---------------------------------------------------------------- the happy paths


def test_health_ready_and_openapi(server):
    assert requests.get(server + "/healthz", timeout=TIMEOUT).json() == {"status": "ok"}
    ready = requests.get(server + "/readyz", timeout=TIMEOUT)
    # the default engine for a float ONNX folder on a CPU, at the suite's pinned default precision
    assert ready.status_code == 200 and ready.json()["model"]["backend"] == backends.cpu_engine()
    assert ready.json()["model"]["precision"] == "fp32"
    assert ready.json()["model"]["max_input_pixels"] == MAX_PIXELS
    spec = requests.get(server + "/openapi.json", timeout=TIMEOUT).json()
    assert {"/v1/score", "/v1/rank", "/v1/prefer", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    schemas = set(spec["components"]["schemas"])
    assert {"Triple", "ScoreMany", "RankRequest", "PreferRequest", "ScoreOut", "ErrorOut"} <= schemas
    content = spec["paths"]["/v1/score"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert error_of(requests.get(server + "/nope", timeout=TIMEOUT), 404) == "not_found"
    assert error_of(requests.get(server + "/v1/score", timeout=TIMEOUT), 405) == "method_not_allowed"


def test_score_one_many_and_multipart(server, pictures, local):
    want = local.score("make the sky pink", pictures[0], pictures[2])
    close(post(server, "/v1/score", triple(pictures)).json(), want)

    corrupt = {**triple(pictures), "edited": _b64(pictures[3][:200])}
    body = {"triples": [triple(pictures), triple(pictures, "", 1, 3), triple(pictures, "add a cat", 1, 4), corrupt]}
    out = post(server, "/v1/score", body)
    assert out.status_code == 200
    results = out.json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    close(results[0], want)
    assert results[1]["error"]["type"] == "instruction_error" and "mu" not in results[1]
    close(results[2], local.score("add a cat", pictures[1], pictures[4]))
    assert results[3]["error"]["type"] == "image_error"
    assert results[3]["error"]["message"].startswith("triples[3].edited:")

    files = {"source": ("s.png", pictures[0], "image/png"), "edited": ("e.png", pictures[2], "image/png")}
    close(post(server, "/v1/score", data={"instruction": "make the sky pink"}, files=files).json(), want)
    bad = {"source": ("s.png", b"\x89PNG\r\n\x1a\n broken", "image/png"), "edited": files["edited"]}
    assert error_of(post(server, "/v1/score", data={"instruction": "x"}, files=bad), 422) == "image_error"


def test_rank_and_prefer(server, pictures, local):
    edits = [pictures[i] for i in (2, 3, 4, 5)]
    want = local.rank("brighten it", pictures[1], edits)
    out = post(server, "/v1/rank", {"instruction": "brighten it", "source": _b64(pictures[1]),
                                    "edits": [_b64(e) for e in edits]}).json()
    for got, w in zip(out["results"], want, strict=True):
        close(got, w)
    assert out["order"] == sorted(range(4), key=lambda i: -want[i].mu)

    files = [("source", ("s.png", pictures[1], "image/png"))] + [("edits", (f"{i}.png", e, "image/png"))
                                                                  for i, e in enumerate(edits)]
    multipart = post(server, "/v1/rank", data={"instruction": "brighten it"}, files=files).json()
    assert multipart["order"] == out["order"]

    # A bad edit is its own error item, in place; the other edits are scored and ranked (a 200).
    mixed = [_b64(edits[0]), "bm9wZQ==", _b64(edits[1]), "https://example.com/edit.png"]
    r = post(server, "/v1/rank", {"instruction": "brighten it", "source": _b64(pictures[1]), "edits": mixed})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [g["index"] for g in got] == [0, 1, 2, 3]
    close(got[0], want[0])
    close(got[2], want[1])
    assert got[1]["error"]["type"] == "image_error" and got[1]["error"]["message"].startswith("edits[1]")
    assert got[3]["error"]["type"] == "image_source_rejected" and "mu" not in got[3]
    assert r.json()["order"] == sorted([0, 2], key=lambda i: -got[i]["mu"])

    p = post(server, "/v1/prefer", {"instruction": "brighten it", "source": _b64(pictures[1]),
                                    "a": _b64(pictures[2]), "b": _b64(pictures[3])}).json()
    want_p = local.prefer("brighten it", pictures[1], pictures[2], pictures[3])
    assert p["p_a_over_b"] == pytest.approx(want_p, abs=1e-5)
    close(p["a"], want[0])


def test_concurrent_clients_are_batched_and_exact(server, pictures, local):
    """32 clients x 4 requests: every answer equals an in-process score, and batches held > 1 triple."""
    cases = [("make the sky pink", s, e) for s in (0, 1) for e in (2, 3, 4, 5)]
    want = {c: local.score(c[0], pictures[c[1]], pictures[c[2]]) for c in cases}
    before = _histogram(server, "editreward_batch_size")

    def client(k: int) -> list:
        session, out = requests.Session(), []
        for j in range(4):
            case = cases[(k + j) % len(cases)]
            r = session.post(server + "/v1/score", json=triple(pictures, *case), timeout=TIMEOUT)
            out.append((case, r.status_code, r.json()))
        return out

    deadline = time.monotonic() + 120
    with ThreadPoolExecutor(32) as pool:
        answers = [a for part in pool.map(client, range(32)) for a in part]
    assert time.monotonic() < deadline
    assert len(answers) == 128
    for case, status, body in answers:
        assert status == 200, body
        close(body, want[case])
    after = _histogram(server, "editreward_batch_size")
    batches, triples = after["count"] - before["count"], after["sum"] - before["sum"]
    assert triples == 128 and batches < 128, (batches, triples)  # some batch merged several requests
    assert after["le"]["1.0"] - before["le"]["1.0"] < batches  # a batch of more than one triple ran


def _histogram(server, name: str) -> dict:
    text = requests.get(server + "/metrics", timeout=TIMEOUT).text
    out = {"count": 0.0, "sum": 0.0, "le": {}}
    for line in text.splitlines():
        if line.startswith(name + "_count"):
            out["count"] = float(line.split()[-1])
        elif line.startswith(name + "_sum"):
            out["sum"] = float(line.split()[-1])
        elif line.startswith(name + "_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out["le"][le] = float(line.split()[-1])
    return out


# ---------------------------------------------------------------- every bad input gets its typed 4xx


def test_bad_inputs_get_typed_4xx(server, pictures):
    good = triple(pictures)
    big = png_bytes(Image.new("RGB", (1200, 1000), (10, 20, 30)))  # 1.2 MP, over the 1 MP limit
    cases = [
        ({**good, "source": "!!not base64!!"}, 422, {"image_error"}),
        ({**good, "edited": _b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)}, 422, {"image_error"}),
        ({**good, "edited": _b64(pictures[2][: len(pictures[2]) // 2])}, 422, {"image_error"}),
        ({**good, "source": "https://example.com/cat.png"}, 422, {"image_source_rejected"}),
        ({**good, "source": "file:///etc/passwd"}, 422, {"image_source_rejected"}),
        ({**good, "source": "images/cat.png"}, 422, {"image_source_rejected"}),
        ({**good, "source": "/etc/passwd"}, 422, {"image_source_rejected", "image_error"}),
        ({**good, "edited": _b64(big)}, 422, {"image_too_large"}),
        ({**good, "instruction": "   "}, 422, {"instruction_error"}),
        ({**good, "instruction": "x" * 201}, 422, {"instruction_error"}),
        ({"instruction": "x", "source": good["source"]}, 422, {"invalid_request"}),
        ({**good, "instruction": 5}, 422, {"invalid_request"}),
        ({**good, "extra": 1}, 422, {"invalid_request"}),
        ({"triples": []}, 422, {"invalid_request"}),
        ({"triples": [good] * 17}, 422, {"invalid_request"}),
    ]
    for payload, status, kinds in cases:
        assert error_of(post(server, "/v1/score", payload), status) in kinds, payload.get("source", "")[:30]

    huge = {**good, "source": "A" * (MAX_BODY + 10)}
    assert error_of(post(server, "/v1/score", huge), 413) == "payload_too_large"
    as_json, as_text = {"content-type": "application/json"}, {"content-type": "text/plain"}
    assert error_of(post(server, "/v1/score", data=b"{not json", headers=as_json), 400) == "invalid_json"
    assert error_of(post(server, "/v1/score", data=b"hello", headers=as_text), 415) == "unsupported_media_type"
    bad_source = {"instruction": "x", "source": "bm9wZQ==", "edits": [good["edited"]]}
    r = post(server, "/v1/rank", bad_source)
    assert error_of(r, 422) == "image_error" and r.json()["error"]["message"].startswith("source:")
    no_b = {"instruction": "x", "source": good["source"], "a": good["edited"]}
    assert error_of(post(server, "/v1/prefer", no_b), 422) == "invalid_request"
    files = {"source": ("s.png", pictures[0], "image/png")}
    assert error_of(post(server, "/v1/score", data={"instruction": "x"}, files=files), 422) == "invalid_request"

    # Nothing above hurt the service: it is ready and scores, and the errors were counted by type.
    assert requests.get(server + "/readyz", timeout=TIMEOUT).status_code == 200
    assert post(server, "/v1/score", good).status_code == 200
    metrics = requests.get(server + "/metrics", timeout=TIMEOUT).text
    assert 'editreward_errors_total{type="image_source_rejected"}' in metrics
    assert 'editreward_requests_total{endpoint="score",status="413"}' in metrics


def test_queue_bound_gives_429_and_overlong_requests_timeouts_never_replayed(server, pictures):
    """The "tight" app holds 1 request per replica and queues 1: a burst overflows into typed 429s.
    A request over its 2 s limit is answered in time with what was scored and per-item timeouts,
    and that answer is never replayed to a retry with the same idempotency key."""
    payload = triple(pictures)

    def one(_):
        r = requests.post(server + "/tight/v1/score", json=payload, timeout=TIMEOUT)
        return r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    statuses = [s for s, _ in answers]
    assert set(statuses) <= {200, 429, 504}, statuses
    assert 429 in statuses and 200 in statuses, statuses
    assert all(b["error"]["type"] == "overloaded" for s, b in answers if s == 429)

    # TIGHT_EDITS edits at max_batch 1 take well over the tight app's 2 s limit on any CPU: one
    # tiny-model triple costs >= ~25 ms on a fast core (measured), so 256 of them take >= ~6 s.
    edits = [_b64(png_bytes(random_image(300 + i, 40, 50))) for i in range(TIGHT_EDITS)]
    rank = {"instruction": "x", "source": payload["source"], "edits": edits}
    key = {"Idempotency-Key": "overlong-rank"}
    first = requests.post(server + "/tight/v1/rank", json=rank, headers=key, timeout=TIMEOUT)
    assert first.status_code == 200, first.text
    assert "timeout" in [r.get("error", {}).get("type") for r in first.json()["results"]]
    # The replica dropped the timed-out request's remaining edits (>= ~4 s of scoring) instead of
    # finishing them, so a small request behind it is answered at once.
    start = time.monotonic()
    assert requests.post(server + "/tight/v1/score", json=payload, timeout=TIMEOUT).status_code == 200
    assert time.monotonic() - start < 3.0
    # An answer holding timeouts was not stored: the retry with the same key is scored afresh ...
    again = requests.post(server + "/tight/v1/rank", json=rank, headers=key, timeout=TIMEOUT)
    assert again.status_code == 200 and "Idempotency-Replayed" not in again.headers, again.headers
    # ... while a final answer is: its retry is the stored answer.
    final = [requests.post(server + "/tight/v1/score", json=payload, headers={"Idempotency-Key": "final"},
                           timeout=TIMEOUT) for _ in range(2)]
    assert [r.status_code for r in final] == [200, 200] and final[1].headers.get("Idempotency-Replayed") == "true"
    assert final[1].json() == final[0].json()


def _metric(server: str, path: str, line_start: str) -> float:
    text = requests.get(server + path + "/metrics", timeout=TIMEOUT).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


def test_a_client_that_leaves_cancels_its_request(server, pictures):
    """A client that disconnects once its request has arrived cancels it (Serve's proxy does; in
    one process, ``local.CancelOnDisconnect``): the tight app's request leaves the gateway without
    an answer, so no status is counted for it. Left running, it would be answered (a 200 holding
    per-item timeouts, at the tight app's 2 s limit) and counted. The disconnect races that limit
    on a loaded machine, so up to three tries: without cancellation every one is counted."""
    edits = [_b64(png_bytes(random_image(300 + i, 40, 50))) for i in range(TIGHT_EDITS)]
    body = json.dumps({"instruction": "x", "source": triple(pictures)["source"], "edits": edits}).encode()
    head = (b"POST /tight/v1/rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    counted = 'editreward_requests_total{endpoint="rank"'
    host, port = server.split("//")[1].split(":")
    for _ in range(3):
        before = _metric(server, "/tight", counted)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            sock.sendall(head + body)
            deadline = time.monotonic() + 30
            while _metric(server, "/tight", "editreward_inflight_requests") < 1:  # it reached the gateway
                assert time.monotonic() < deadline, "the request never reached the gateway"
                time.sleep(0.02)
        deadline = time.monotonic() + 30
        while _metric(server, "/tight", "editreward_inflight_requests") > 0:
            assert time.monotonic() < deadline, "the request was still in flight 30 s after its client left"
            time.sleep(0.05)
        time.sleep(0.2)  # an answer's count is recorded as the request leaves the gateway
        if _metric(server, "/tight", counted) == before:
            return
    pytest.fail("each of three requests whose client left was answered and counted: none was cancelled")


def test_deeply_nested_json_is_a_400(server):
    body = "[" * 100_000 + "]" * 100_000
    response = requests.post(server + "/v1/score", data=body, headers={"content-type": "application/json"},
                             timeout=TIMEOUT)
    assert error_of(response, 400) == "invalid_json"


def _flatpng_bytes(width: int, height: int, seed: int) -> bytes:
    """A nearly flat picture: a few KB to send, width x height pixels to decode."""
    from PIL import Image

    image = Image.new("L", (width, height), seed % 256)
    image.putpixel((seed % width, 0), 255 - seed % 256)  # distinct images, so none is decoded once for all
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def test_decode_cost_is_bounded_per_request(server, pictures):
    """16 distinct nearly flat PNGs, each within the per-image limit, in one small body ask for 16 M
    decoded pixels, twice the per-request limit: the request is refused from the headers alone
    (413), and a small request at the same time stays fast."""
    big = [_b64(_flatpng_bytes(1000, 1000, i)) for i in range(16)]
    hostile = {"triples": [{"instruction": "x", "source": big[i], "edited": big[(i + 1) % 16]} for i in range(16)]}
    assert len(json.dumps(hostile)) < MAX_BODY
    with ThreadPoolExecutor(2) as pool:
        start = time.monotonic()
        refused = pool.submit(requests.post, server + "/v1/score", json=hostile, timeout=TIMEOUT)
        small = pool.submit(lambda: (requests.post(server + "/v1/score", json=triple(pictures), timeout=TIMEOUT),
                                     time.monotonic() - start))
        assert error_of(refused.result(), 413) == "payload_too_large"
        response, seconds = small.result()
    assert response.status_code == 200 and seconds < 5.0
    assert time.monotonic() - start < 10.0


SLOW_CLIENTS = 100  # more than the main gateway's 96 slots (16 in flight at its scorer + 64 queued + 16)


def _slow_body(port: int) -> socket.socket:
    """A connection from 127.0.0.2 (another client address than the test's own requests) that
    declares a 100,000-byte body and sends one byte of it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT + 10, source_address=("127.0.0.2", 0))
    sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n{")
    return sock


def _answer_of(sock: socket.socket, opened: float) -> tuple[int, dict, float, float]:
    """(status, JSON body, seconds from opening to the answer, monotonic time of the answer)."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = json.loads(response.read())
    now = time.monotonic()
    return response.status, body, now - opened, now


def test_slow_bodies_get_408_and_cannot_shut_out_other_clients(server, pictures):
    """100 connections from one address dribble their bodies: the first CLIENT_BODIES get a typed
    408 at the body deadline, the rest a typed 429 at once (they would otherwise hold every gateway
    slot), and meanwhile the requests of another address are answered."""
    port = int(server.rsplit(":", 1)[1])
    opened = time.monotonic()
    socks = [_slow_body(port) for _ in range(SLOW_CLIENTS)]
    answered: set[int] = set()
    stop = threading.Event()

    def dribble():  # one byte every 0.5 s to each connection not answered yet, for a bounded time
        for _ in range(int((BODY_TIMEOUT + 10) / 0.5)):
            if stop.wait(0.5):
                return
            for i, sock in enumerate(socks):
                if i not in answered:
                    try:
                        sock.send(b" ")
                    except OSError:  # answered and closed by the server
                        answered.add(i)

    def read(i: int):
        out = _answer_of(socks[i], opened)
        answered.add(i)
        return out

    dribbler = threading.Thread(target=dribble)
    dribbler.start()
    try:
        with ThreadPoolExecutor(SLOW_CLIENTS) as pool:
            slow = [pool.submit(read, i) for i in range(SLOW_CLIENTS)]
            time.sleep(0.5)  # every slow connection has reached the gateway
            normal = [requests.post(server + "/v1/score", json=triple(pictures), timeout=TIMEOUT) for _ in range(2)]
            normal_done = time.monotonic()
            answers = [f.result() for f in slow]
    finally:
        stop.set()
        dribbler.join()
        for sock in socks:
            sock.close()
    assert [r.status_code for r in normal] == [200, 200]
    by_status = {}
    for status, body, seconds, _ in answers:
        assert set(body) == {"error"}, body
        by_status.setdefault(status, []).append((body["error"]["type"], seconds))
    assert sorted(by_status) == [408, 429], by_status.keys()
    assert len(by_status[408]) == CLIENT_BODIES and len(by_status[429]) == SLOW_CLIENTS - CLIENT_BODIES
    assert {kind for kind, _ in by_status[408]} == {"body_timeout"}
    assert {kind for kind, _ in by_status[429]} == {"overloaded"}
    assert all(BODY_TIMEOUT - 0.5 < seconds < BODY_TIMEOUT + 5 for _, seconds in by_status[408])
    # The other address was answered while the slow connections still held their slots.
    assert normal_done < min(at for status, _, _, at in answers if status == 408)


def test_missing_ray_names_the_extra_and_one_process_needs_no_ray(monkeypatch, capsys):
    from editreward_rt.cli import main
    from editreward_rt.errors import BackendError
    from editreward_rt.serve import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(BackendError, match=r"editreward-deploy\[serve\]"):
        require_ray()
    assert main(["serve", "--model", "nowhere"]) == 2
    assert "editreward-deploy[serve]" in capsys.readouterr().err
    # One process needs no Ray: the model is what fails here, and one replica is all it runs.
    assert main(["serve", "--single-process", "--model", "nowhere"]) == 2
    assert "nowhere is neither a folder nor a hub repository id" in capsys.readouterr().err
    assert main(["serve", "--single-process", "--replicas", "2", "--model", "nowhere"]) == 2
    assert "--single-process runs one replica" in capsys.readouterr().err


def test_shutdown_drains_in_flight_requests(server, pictures):
    """Stopping the app while requests are in flight still answers every one of them."""
    payload = {"triples": [triple(pictures, src=s, edit=e) for s in (0, 1) for e in (2, 3, 4, 5)]}
    results, started = [], threading.Barrier(7)

    def one():
        started.wait()
        results.append(requests.post(server + "/v1/score", json=payload, timeout=TIMEOUT).status_code)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.1)  # let the requests reach the gateway
    assert server.drain("editreward", 60) == 0
    for t in threads:
        t.join(timeout=TIMEOUT)
    assert results == [200] * 6
    # The app keeps its routes until Serve stops (a removed route is the proxy's plain-text 404):
    # every request now gets a typed 503 with Retry-After.
    for response in (post(server, "/v1/score", triple(pictures)), requests.get(server + "/readyz", timeout=TIMEOUT)):
        assert error_of(response, 503) == "not_ready" and response.headers["Retry-After"] == "1"
