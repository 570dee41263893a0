"""``RewardClient``: score triples against an ``editreward serve`` service over HTTP, stdlib only
(urllib), so the thin runtime stays thin.

Images travel inline, as base64 in JSON (default) or as multipart uploads; nothing is pickled.
Triples are sent in batches of ``batch_size`` (one ``POST /v1/score`` each). Every request carries
an ``Idempotency-Key``, so it can be retried safely: on 429 and 503 (after the server's
``Retry-After``, or exponential backoff), on a timeout or a lost connection; a retry of a request
the server already answered gets the stored answer (not scored twice). Errors come back as the
runtime's typed errors, by the server's ``error.type``.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
import urllib.error
import urllib.request
import uuid
from email.utils import parsedate_to_datetime

from .errors import DeadlineError, EditRewardError, InputError, NotReadyError, OverloadedError, error_classes
from .images import encode_png
from .scorer import HeadScore, Score

RETRY_STATUS = (429, 503)


class RemoteError(EditRewardError):
    """An error the server reported, of a kind this runtime has no class for (``kind`` and ``status`` as sent)."""


class RemoteInputError(RemoteError, InputError):
    """A request or triple the server refused (4xx) with a kind of its own (``invalid_request``, ...)."""


def _by_status(status: int) -> type[EditRewardError]:
    fixed = {429: OverloadedError, 503: NotReadyError, 504: DeadlineError}
    return fixed.get(status, RemoteInputError if 400 <= status < 500 else RemoteError)


def remote_error(error: dict, status: int) -> EditRewardError:
    """A server error body's ``{"type", "message"}`` -> the matching typed error, ``.status`` set."""
    kind = str(error.get("type", "error"))
    cls = error_classes().get(kind) or _by_status(status)
    exc = cls(str(error.get("message", "")))
    exc.kind, exc.status = kind, status
    return exc


def score_from(item: dict) -> Score:
    heads = tuple(HeadScore(h["name"], float(h["mu"]), float(h["log_sigma"])) for h in item.get("heads", ()))
    return Score(float(item["mu"]), float(item["log_sigma"]), heads)


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` seconds or HTTP date -> seconds from now."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


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
    (a server's ``Retry-After`` wins when longer). ``encoding``: ``json`` or ``multipart``."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 5, backoff: float = 0.25, max_backoff: float = 8.0,
                 batch_size: int = 32, encoding: str = "json"):
        if encoding not in ("json", "multipart"):
            raise ValueError(f"encoding must be json or multipart, not {encoding!r}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.batch_size, self.encoding = max(1, batch_size), encoding
        self.attempts = 0  # HTTP attempts made, retries included

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
        answer = self.post("/v1/score", body)
        return [score_from(r) if "error" not in r else remote_error(r["error"], 422) for r in answer["results"]]

    def ready(self) -> dict:
        return self._send(urllib.request.Request(self.url + "/readyz", method="GET"))[1]

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
        headers = {"Content-Type": ctype, "Idempotency-Key": uuid.uuid4().hex, "Accept": "application/json"}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                status, answer, wait = self._attempt(urllib.request.Request(self.url + path, data, headers, method="POST"))
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as exc:
                if last:
                    raise NotReadyError(f"{self.url}{path}: no answer after {attempt + 1} attempts: {exc}") from None
                time.sleep(self._delay(attempt, None))
                continue
            if status < 300:
                return answer
            error = remote_error(answer.get("error", {"type": "error", "message": str(answer)}), status)
            if status not in RETRY_STATUS or last:
                raise error
            time.sleep(self._delay(attempt, wait))
        raise AssertionError("unreachable")

    def _attempt(self, request) -> tuple[int, dict, float | None]:
        self.attempts += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, json.loads(response.read()), None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = {"error": {"type": "error", "message": raw[:200].decode("utf-8", "replace")}}
            return exc.code, answer, _retry_after(exc.headers.get("Retry-After"))

    def _send(self, request) -> tuple[int, dict]:
        status, answer, _ = self._attempt(request)
        if status >= 300:
            raise remote_error(answer.get("error", {}), status)
        return status, answer

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter; a longer ``Retry-After`` from the server is honoured."""
        backoff = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
        return max(backoff, retry_after or 0.0)
