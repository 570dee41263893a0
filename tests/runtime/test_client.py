"""RewardClient against a live ``editreward serve`` application over real HTTP on 127.0.0.1 (the
tiny ONNX export): the same numbers as in-process scoring, typed errors, retries of 429 after the
server's Retry-After, and a retried request whose first answer was lost is not scored twice. And
against a raw socket server that misbehaves (cut bodies, garbage status lines, HTML, absurd
Retry-After, missing or short results): every failure typed, transient ones retried, waits bounded."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import assert_same_score, png_bytes, random_image, serving

pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")

from editreward_rt import Scorer  # noqa: E402
from editreward_rt.client import BadAnswerError, RemoteError, RemoteInputError, RewardClient  # noqa: E402
from editreward_rt.errors import EditRewardError, ImageError, InstructionError, NotReadyError, OverloadedError  # noqa: E402


@pytest.fixture(scope="module")
def pictures():
    return [png_bytes(random_image(500 + i, 40 + 4 * i, 56)) for i in range(6)]


@pytest.fixture(scope="module")
def local(tiny_onnx):
    return Scorer.load(tiny_onnx, threads=1, max_batch=8)


@pytest.fixture(scope="module")
def url(tiny_onnx):
    pytest.importorskip("ray")  # the serve extra
    from editreward_rt.serve.app import ServeConfig

    main = ServeConfig(model=str(tiny_onnx), threads=1, max_batch=8, batch_wait_ms=10)
    tight = ServeConfig(model=str(tiny_onnx), threads=1, max_batch=1, batch_wait_ms=0, max_ongoing=1, max_queued=1)
    with serving({"main": ("/", main), "tight": ("/tight", tight)}) as base:
        yield base


def _counter(url: str, name: str, labels: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name}{{{labels}}}"))


def test_scores_match_in_process_and_errors_are_typed(url, pictures, local):
    triples = [("add a cat", pictures[0], pictures[2]), ("add a cat", pictures[0], pictures[3][:100]),
               ("", pictures[1], pictures[4]), ("make it snow", pictures[1], pictures[5])]
    for encoding in ("json", "multipart"):
        client = RewardClient(url, batch_size=3, encoding=encoding)
        got = client.score_batch(triples, errors="return")
        assert_same_score(got[0], local.score(*triples[0]))
        assert isinstance(got[1], ImageError) and got[1].kind == "image_error"
        assert isinstance(got[2], InstructionError)
        assert_same_score(got[3], local.score(*triples[3]))
    with pytest.raises(ImageError):
        client.score(*triples[1])
    groups = client.score_groups([("brighten", pictures[1], pictures[2:5])])
    for score, edit in zip(groups[0], pictures[2:5], strict=True):
        assert_same_score(score, local.score("brighten", pictures[1], edit))


class LosingProxy:
    """A loopback TCP proxy that forwards the first request to the server and drops its answer
    (closes the connection unanswered): the server has scored it, the client never hears so."""

    def __init__(self, upstream_port: int):
        self.upstream, self.connections = upstream_port, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @staticmethod
    def _request(conn) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        while len(body) < length:
            body += conn.recv(65536)
        return head + b"\r\n\r\n" + body

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            self.connections += 1
            with conn, socket.create_connection(("127.0.0.1", self.upstream)) as up:
                up.sendall(self._request(conn))
                answer = b""
                while chunk := up.recv(65536):
                    answer += chunk
                if self.connections > 1:
                    conn.sendall(answer)


def test_a_retried_request_is_not_scored_twice(url, pictures, local):
    scored = lambda: _counter(url, "editreward_triples_total", 'outcome="scored"')  # noqa: E731
    before = scored()
    proxy = LosingProxy(int(url.rsplit(":", 1)[1]))
    client = RewardClient(f"http://127.0.0.1:{proxy.port}", backoff=0.05)
    triples = [("add a cat", pictures[0], pictures[e]) for e in (2, 3, 4)]
    got = client.score_batch(triples)
    assert client.attempts == 2 and proxy.connections == 2  # the first answer was lost, the retry answered
    for score, triple in zip(got, triples):
        assert_same_score(score, local.score(*triple))
    assert scored() - before == 3  # scored once: the retry got the stored answer


def test_the_server_remembers_keys_and_refuses_a_reused_one(url, pictures):
    body = json.dumps({"instruction": "add a cat", "source": __import__("base64").b64encode(pictures[0]).decode(),
                       "edited": __import__("base64").b64encode(pictures[2]).decode()}).encode()

    def post(data: bytes, key: str):
        request = urllib.request.Request(url + "/v1/score", data, {"Content-Type": "application/json",
                                                                   "Idempotency-Key": key}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, r.headers.get("Idempotency-Replayed"), json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None, json.loads(exc.read())

    first, again = post(body, "key-1"), post(body, "key-1")
    assert first[0] == again[0] == 200 and first[1] is None and again[1] == "true" and first[2] == again[2]
    status, _, answer = post(body.replace(b"add a cat", b"add a dog"), "key-1")
    assert status == 409 and answer["error"]["type"] == "idempotency_conflict"
    assert post(body, "bad key")[0] == 422
    with pytest.raises(RemoteInputError) as caught:
        RewardClient(url).post("/v1/score", (b"{not json", "application/json"))
    assert caught.value.kind == "invalid_json" and caught.value.status == 400


def test_overload_is_retried_after_retry_after(url, pictures, local):
    """16 clients at once on the app that takes 1 request and queues 1: some get 429 (Retry-After: 1)
    and wait at least that long before their retry; every one is answered with the right score."""
    want = local.score("add a cat", pictures[0], pictures[2])

    def one(_):
        client = RewardClient(url + "/tight", backoff=0.01, retries=30)
        start = time.monotonic()
        score = client.score("add a cat", pictures[0], pictures[2])
        return client.attempts, time.monotonic() - start, score

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    retried = [(attempts, seconds) for attempts, seconds, _ in answers if attempts > 1]
    assert retried, "no request was refused: the burst did not overload the tight app"
    assert all(seconds >= 1.0 for _, seconds in retried)  # honoured Retry-After, not the 10 ms backoff
    for _, _, score in answers:
        assert_same_score(score, want)
    assert _counter(url + "/tight", "editreward_requests_total", 'endpoint="score",status="429"') >= len(retried)


# ---------------------------------------------------------------- a server that misbehaves


class Scripted:
    """A raw HTTP server on 127.0.0.1: its n-th connection gets the n-th of ``answers`` (bytes sent as
    they are, or a function of the connection), then is closed; the last answer repeats."""

    def __init__(self, *answers):
        self.answers, self.served = answers, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                self._request(conn)
                answer = self.answers[min(self.served, len(self.answers) - 1)]
                self.served += 1
                try:
                    answer(conn) if callable(answer) else conn.sendall(answer)
                except OSError:  # the client gave up first
                    pass

    @staticmethod
    def _request(conn) -> None:
        """Read one request through: its head, and the body its Content-Length announces."""
        data = b""
        while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
        while len(body) < sum(lengths) and (chunk := conn.recv(65536)):
            body += chunk

    def __enter__(self) -> "Scripted":
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


def http(status: str, body: bytes, ctype: str = "application/json", length: int | None = None, headers: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body) if length is None else length}\r\n"
            f"{headers}Connection: close\r\n\r\n").encode() + body


SCORE = {"mu": 0.5, "log_sigma": -1.0, "heads": [{"name": "instruction_following", "mu": 0.5, "log_sigma": -1.0}]}
GOOD = http("200 OK", json.dumps({"results": [SCORE, SCORE]}).encode())
PAIR = [("add a cat", b"source bytes", b"edited bytes"), ("add a dog", b"source bytes", b"other bytes")]


def trickle(head: bytes):
    """``head``, then one byte every 0.1 s: each read is quick, the whole never ends."""
    def answer(conn) -> None:
        conn.sendall(head)
        for _ in range(100):
            conn.sendall(b" ")
            time.sleep(0.1)
    return answer


TRANSIENT = {
    "a body cut midway": (http("200 OK", json.dumps({"results": [SCORE, SCORE]}).encode()[:30], length=400), NotReadyError),
    "a garbage status line": (b"garbage\r\n\r\n", NotReadyError),
    "closed unanswered": (b"", NotReadyError),
    "a bad gateway page": (http("502 Bad Gateway", b"<html><body>bad gateway</body></html>", "text/html"), RemoteError),
    "a 500": (http("500 Internal Server Error", b'{"error": {"type": "backend_error", "message": "boom"}}'), EditRewardError),
    "a 503 in plain text": (http("503 Service Unavailable", b"shutting down", "text/plain"), NotReadyError),
    "a 429": (http("429 Too Many Requests", b'{"error": {"type": "overloaded", "message": "busy"}}',
                   headers="Retry-After: 0\r\n"), OverloadedError),
    "a trickled body": (trickle(http("200 OK", b"", length=1000)), NotReadyError),
    "trickled headers": (trickle(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow:"), NotReadyError),
}


@pytest.mark.parametrize("case", list(TRANSIENT))
def test_transient_failures_are_retried_then_typed(case):
    """Each transient failure is retried (the next answer is used); repeated past the retries it is
    a typed error, not an http.client or socket exception, and never a hang."""
    bad, error = TRANSIENT[case]
    with Scripted(bad, GOOD) as server:
        client = RewardClient(server.url, timeout=0.5, retries=2, backoff=0.01, max_backoff=0.05)
        got = client.score_batch(PAIR)
    assert client.attempts == 2 and [s.mu for s in got] == [0.5, 0.5]
    with Scripted(bad) as server:
        client = RewardClient(server.url, timeout=0.5, retries=1, backoff=0.01, max_backoff=0.05)
        start = time.monotonic()
        with pytest.raises(error) as caught:
            client.score_batch(PAIR)
    assert isinstance(caught.value, EditRewardError) and client.attempts == 2 and time.monotonic() - start < 3


@pytest.mark.parametrize("answer,message", [
    (http("200 OK", b"<html><body>Welcome to nginx!</body></html>", "text/html"), "not a JSON object"),
    (http("200 OK", b'["not", "an", "object"]'), "not a JSON object"),
    (http("200 OK", json.dumps({"results": [SCORE]}).encode()), "1 results for 2 triples"),
    (http("200 OK", json.dumps({"results": []}).encode()), "0 results for 2 triples"),
    (http("200 OK", b'{"scored": true}'), "no results list"),
    (http("200 OK", json.dumps({"results": [SCORE, {"mu": "high"}]}).encode()), "not a score"),
])
def test_an_answer_that_breaks_the_protocol_is_a_bad_answer(answer, message):
    """A 2xx that is not JSON, lacks results or holds another count than the triples sent is refused
    at once (not retried: asking again gets the same), never misaligned with the triples."""
    with Scripted(answer) as server:
        client = RewardClient(server.url, retries=3, backoff=0.01)
        with pytest.raises(BadAnswerError, match=message) as caught:
            client.score_groups([("add a cat", b"source bytes", [b"edited bytes", b"other bytes"])])
    assert caught.value.kind == "bad_answer" and client.attempts == 1


@pytest.mark.parametrize("retry_after", ["100000", "inf", "nan", "-5", "1e400", "Fri, 31 Dec 9999 23:59:59 GMT", "soon"])
def test_every_wait_is_capped_by_max_backoff(retry_after):
    """Whatever Retry-After says (a day, infinity, not a number, the past, a far date, nonsense), the
    client waits at most max_backoff and then retries."""
    busy = http("503 Service Unavailable", b'{"error": {"type": "not_ready", "message": "draining"}}',
                headers=f"Retry-After: {retry_after}\r\n")
    with Scripted(busy, busy, GOOD) as server:
        client = RewardClient(server.url, retries=3, backoff=0.01, max_backoff=0.2)
        start = time.monotonic()
        assert [s.mu for s in client.score_batch(PAIR)] == [0.5, 0.5]
    assert client.attempts == 3 and time.monotonic() - start < 2.0


def test_readiness_failures_are_typed():
    with Scripted(b"garbage\r\n\r\n") as server:
        with pytest.raises(NotReadyError, match="BadStatusLine"):
            RewardClient(server.url, timeout=1).ready()
    with Scripted(http("200 OK", b"<html></html>", "text/html")) as server:
        with pytest.raises(BadAnswerError):
            RewardClient(server.url, timeout=1).ready()
