"""``RewardClient``: score triples against an ``editreward serve`` service over HTTP, stdlib only
(urllib), so the thin runtime stays thin.

Images travel inline, as base64 in JSON (default) or as multipart uploads; nothing is pickled.
Triples are sent in batches of ``batch_size`` (one ``POST /v1/score`` each). Every request carries
an ``Idempotency-Key``, so it can be retried safely: on 429 and 503 (after the server's
``Retry-After``, or exponential backoff), on a timeout or a lost connection; a retry of a request
the server already answered gets the stored answer (not scored twice). Errors come back as the
runtime's typed errors, by the server's ``error.type``.

Every failure is one of the runtime's typed errors: a lost, cut or garbled exchange (a body cut
short, a status line that is not HTTP, a reset) and a 429 or 5xx are retried, and after the last
attempt raise ``NotReadyError`` or the status's error; an answer that breaks the protocol (a 2xx
that is not JSON, without ``results``, or with another count than the triples sent) is a
``BadAnswerError``. Every wait, a server's ``Retry-After`` included, is at most ``max_backoff``.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import random
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from email.utils import parsedate_to_datetime

from .errors import DeadlineError, EditRewardError, InputError, NotReadyError, OverloadedError, error_classes
from .images import encode_png
from .scorer import HeadScore, Score

# What a lost, cut or garbled exchange raises (IncompleteRead, BadStatusLine and RemoteDisconnected
# are HTTPExceptions); each is retried, which the idempotency key makes safe.
TRANSPORT_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError)


class _WatchedHTTP(http.client.HTTPConnection):
    """An HTTP connection that hands its socket to ``watch``, the list an attempt's deadline shuts down."""

    def __init__(self, *args, watch: list, **kwargs):
        super().__init__(*args, **kwargs)
        self.watch = watch

    def connect(self) -> None:
        super().connect()
        self.watch.append(self.sock)


class _WatchedHTTPS(http.client.HTTPSConnection, _WatchedHTTP):
    """The same over TLS (its ``connect`` wraps the socket, then ``_WatchedHTTP.connect`` records it)."""


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, watch: list):
        super().__init__()
        self.watch = watch

    def http_open(self, request):
        return self.do_open(_WatchedHTTP, request, watch=self.watch)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, watch: list):
        super().__init__()
        self.watch = watch

    def https_open(self, request):
        return self.do_open(_WatchedHTTPS, request, context=self._context, watch=self.watch)


class _Deadline:
    """One attempt's whole deadline. A socket timeout bounds each read alone, so a server that
    trickles its status line, headers or body a byte at a time would hold the attempt for ever;
    when this timer fires it shuts the attempt's sockets down, which wakes whatever read waits."""

    def __init__(self, seconds: float):
        self.sockets: list = []
        self.expired = False
        self.opener = urllib.request.build_opener(_HTTP(self.sockets), _HTTPS(self.sockets))
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def _expire(self) -> None:
        self.expired = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed: nothing waits on it
                pass

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def transient(status: int) -> bool:
    """A status worth retrying: overloaded (429), or the server or a proxy failing (5xx)."""
    return status == 429 or status >= 500


class RemoteError(EditRewardError):
    """An error the server reported, of a kind this runtime has no class for (``kind`` and ``status`` as sent)."""


class RemoteInputError(RemoteError, InputError):
    """A request or triple the server refused (4xx) with a kind of its own (``invalid_request``, ...)."""


class BadAnswerError(RemoteError):
    """An answer that breaks the protocol: a 2xx body that is not a JSON object, no ``results``, a
    result that is no score, or another count of results than triples sent (a proxy's page, say)."""

    kind = "bad_answer"


def _by_status(status: int) -> type[EditRewardError]:
    fixed = {429: OverloadedError, 503: NotReadyError, 504: DeadlineError}
    return fixed.get(status, RemoteInputError if 400 <= status < 500 else RemoteError)


def remote_error(error: dict, status: int) -> EditRewardError:
    """A server error body's ``{"type", "message"}`` -> the matching typed error, ``.status`` set. A
    body without a specific type (a proxy's page, a bare ``error``) is typed by its status."""
    if not isinstance(error, dict):
        error = {"message": str(error)}
    kind = str(error.get("type", EditRewardError.kind))
    known = error_classes().get(kind)
    cls = known if known not in (None, EditRewardError) else _by_status(status)
    exc = cls(str(error.get("message", "")))
    exc.kind, exc.status = (kind if known is not EditRewardError else cls.kind), status
    return exc


def score_from(item) -> Score:
    """A result item -> its Score, or a ``BadAnswerError`` for anything else."""
    try:
        heads = tuple(HeadScore(str(h["name"]), float(h["mu"]), float(h["log_sigma"])) for h in item.get("heads", ()))
        return Score(float(item["mu"]), float(item["log_sigma"]), heads)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise BadAnswerError(f"a result is not a score ({type(exc).__name__}: {exc}): {str(item)[:120]}") from None


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` seconds or HTTP date -> seconds from now, not negative (``inf`` stays, to be
    capped by the caller); None when absent or unreadable (``nan`` included)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return None if math.isnan(seconds) else max(0.0, seconds)


def _multipart(fields: list[tuple[str, str | bytes]]) -> tuple[bytes, str]:
    """(name, text or image bytes) fields -> a multipart/form-data body and its content type."""
    boundary = uuid.uuid4().hex
    parts = []
    for i, (name, value) in enumerate(fields):
        if isinstance(value, bytes):
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{i}.png"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n")
            data = value
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"\r\n\r\n', value.encode("utf-8")
        parts.append(f"--{boundary}\r\n{head}".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class RewardClient:
    """``url``: the service (``http://host:port``). ``timeout``: seconds per attempt; ``retries``:
    attempts after the first; ``backoff``: the first wait, doubled each retry up to ``max_backoff``
    (a server's ``Retry-After`` wins when longer, up to ``max_backoff`` too). ``encoding``: ``json`` or ``multipart``.
    ``token``: the service's ``--token``, sent as ``Authorization: Bearer``."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 5, backoff: float = 0.25, max_backoff: float = 8.0,
                 batch_size: int = 32, encoding: str = "json", token: str | None = None):
        if encoding not in ("json", "multipart"):
            raise ValueError(f"encoding must be json or multipart, not {encoding!r}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.batch_size, self.encoding = max(1, batch_size), encoding
        self.attempts = 0  # HTTP attempts made, retries included
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}

    # ------------------------------------------------------------ the API

    def score(self, instruction: str, source, edited) -> Score:
        return self.score_batch([(instruction, source, edited)])[0]

    def score_batch(self, triples, errors: str = "raise") -> list:
        """Scores in order; with ``errors="return"`` a bad triple yields its typed error in place."""
        results = []
        for start in range(0, len(triples), self.batch_size):
            results.extend(self._score_chunk(triples[start : start + self.batch_size]))
        if errors == "raise":
            first = next((r for r in results if isinstance(r, EditRewardError)), None)
            if first is not None:
                raise first
        return results

    def score_groups(self, groups, errors: str = "raise") -> list[list]:
        """(instruction, source, [edited, ...]) groups: as ``Scorer.score_groups``, over ``score_batch``."""
        flat = [(instruction, source, e) for instruction, source, edits in groups for e in edits]
        scores, out, at = self.score_batch(flat, errors), [], 0
        for _, _, edits in groups:
            out.append(scores[at : at + len(edits)])
            at += len(edits)
        return out

    def _score_chunk(self, chunk) -> list:
        body = self._score_body(chunk)
        if self.encoding == "multipart" and len(chunk) == 1:  # a one-triple form is answered as one score, or its 4xx
            try:
                return [score_from(self.post("/v1/score", body))]
            except InputError as exc:
                return [exc]
        results = self.post("/v1/score", body).get("results")
        if not isinstance(results, list) or len(results) != len(chunk):
            got = f"{len(results)} results" if isinstance(results, list) else "no results list"
            raise BadAnswerError(f"{self.url}/v1/score answered {got} for {len(chunk)} triples")
        return [remote_error(r["error"], 422) if isinstance(r, dict) and "error" in r else score_from(r) for r in results]

    def ready(self) -> dict:
        """The service's readiness answer, in one attempt; a refusal or a lost exchange as its typed error."""
        try:
            status, answer, _ = self._attempt(urllib.request.Request(self.url + "/readyz", headers=self.auth, method="GET"))
        except TRANSPORT_ERRORS as exc:
            raise NotReadyError(f"{self.url}/readyz: no answer: {type(exc).__name__}: {exc}") from None
        if status >= 300:
            raise remote_error(answer.get("error", {}), status)
        return answer

    # ------------------------------------------------------------ requests

    def _score_body(self, triples) -> tuple[bytes, str]:
        images = [(encode_png(source), encode_png(edited)) for _, source, edited in triples]
        if self.encoding == "multipart":
            fields = []
            for (instruction, _, _), (src, edit) in zip(triples, images):
                fields += [("instruction", instruction), ("source", src), ("edited", edit)]
            return _multipart(fields)
        b64 = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
        payload = {"triples": [{"instruction": t[0], "source": b64(src), "edited": b64(edit)}
                               for t, (src, edit) in zip(triples, images)]}
        return json.dumps(payload).encode("utf-8"), "application/json"

    def post(self, path: str, body: tuple[bytes, str]) -> dict:
        """POST with one idempotency key for every attempt; -> the JSON answer, or its typed error."""
        data, ctype = body
        headers = {"Content-Type": ctype, "Idempotency-Key": uuid.uuid4().hex, "Accept": "application/json", **self.auth}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                status, answer, wait = self._attempt(urllib.request.Request(self.url + path, data, headers, method="POST"))
            except TRANSPORT_ERRORS as exc:
                if last:
                    raise NotReadyError(f"{self.url}{path}: no answer after {attempt + 1} attempts: "
                                        f"{type(exc).__name__}: {exc}") from None
                time.sleep(self._delay(attempt, None))
                continue
            if status < 300:
                return answer
            error = remote_error(answer.get("error", {"message": str(answer)}), status)
            if not transient(status) or last:
                raise error
            time.sleep(self._delay(attempt, wait))
        raise AssertionError("unreachable")

    def _attempt(self, request) -> tuple[int, dict, float | None]:
        """One exchange -> (status, JSON object answer, Retry-After seconds). A body that is not a
        JSON object is a ``BadAnswerError`` on a 2xx, and the error message of any other status."""
        self.attempts += 1
        with _Deadline(self.timeout) as deadline:
            try:
                try:
                    with deadline.opener.open(request, timeout=self.timeout) as response:
                        status, headers, raw = response.status, response.headers, response.read()
                except urllib.error.HTTPError as exc:
                    status, headers, raw = exc.code, exc.headers, exc.read()
            except TRANSPORT_ERRORS:
                if not deadline.expired:
                    raise
            if deadline.expired:  # whatever the shut-down socket gave: an error, or headers or a body cut short
                raise TimeoutError(f"no whole answer within timeout={self.timeout:g} s") from None
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            answer = None
        if not isinstance(answer, dict):
            if status < 300:
                error = BadAnswerError(f"{request.full_url} answered {status} with a body that is not a JSON object: "
                                       f"{raw[:120]!r}")
                error.status = status
                raise error
            answer = {"error": {"message": f"HTTP {status}: " + raw[:200].decode("utf-8", "replace")}}
        return status, answer, _retry_after(headers.get("Retry-After"))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter, or the server's longer ``Retry-After``: never over ``max_backoff``."""
        backoff = min(self.max_backoff, self.backoff * 2.0 ** min(attempt, 64)) * random.uniform(0.5, 1.0)
        return min(self.max_backoff, max(backoff, retry_after or 0.0))
