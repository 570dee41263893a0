"""Request validation and limits for the HTTP API.

Images arrive only inline: base64 strings (optionally ``data:image/...;base64,`` URIs) in
JSON or form fields, or multipart file uploads. Strings that look like URLs or file paths
are rejected and never opened or fetched: the scorer only ever sees ``bytes`` from here.
Every rejection is an ``EditRewardError`` whose ``kind`` becomes ``error.type`` in the
response and whose HTTP status comes from ``http_status``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import sys
from dataclasses import asdict, dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import errors as E
from ..errors import EditRewardError, ImageError, InputError, InstructionError

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Limits:
    """Per-request limits; every one is a CLI flag of ``editreward serve``."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    # Decoded pixels of all distinct images of one request, read from their headers before any is
    # decoded: decoding is the costly step a small, well-compressed body can ask for (413 above).
    max_request_pixels: int = 200_000_000  # 16 phone photos of 12 MP; the hostile 16 x 25 MP is refused
    max_instruction_chars: int = 2000
    max_triples: int = 64  # triples in one /v1/score request, edits in one /v1/rank request
    request_timeout_s: float = 60.0
    # Deadline from the end of a request's headers to its body's last byte (408 after), and the
    # bodies one client address may send at once (429 above): slow senders cannot hold the
    # gateway's slots (guard.py).
    body_timeout_s: float = 10.0
    max_client_body_reads: int = 32

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- typed API errors


class ApiError(InputError):
    """A request the API refuses as a whole, before any triple is scored."""

    kind = "invalid_request"
    status = 422


class InvalidJsonError(ApiError):
    kind = "invalid_json"
    status = 400


class UnsupportedMediaTypeError(ApiError):
    kind = "unsupported_media_type"
    status = 415


class PayloadTooLargeError(ApiError):
    kind = "payload_too_large"
    status = 413


class ImageSourceError(ImageError):
    """An image given as a URL or a file path: the service reads inline images only."""

    kind = "image_source_rejected"


class ServiceError(EditRewardError):
    """The service, not the request, is at fault or busy."""

    kind = "internal_error"
    status = 500


class OverloadedError(ServiceError, E.OverloadedError):
    kind = "overloaded"
    status = 429


class RequestTimeoutError(ServiceError, E.DeadlineError):
    kind = "timeout"
    status = 504


class NotReadyError(ServiceError, E.NotReadyError):
    kind = "not_ready"
    status = 503


def overloaded() -> tuple[type[BaseException], ...]:
    """What a scorer handle raises when its queue is full: Serve's ``BackPressureError`` where Serve
    runs (its module is loaded in a gateway replica), else nothing (in one process,
    ``local.LocalHandle`` raises ``OverloadedError``, a typed error, itself; Ray is not imported)."""
    module = sys.modules.get("ray.serve.exceptions")
    return (module.BackPressureError,) if module is not None else ()


def typed_error(exc: Exception, timeout_s: float) -> EditRewardError:
    """What handling a request raised -> the typed error its answer carries: the deadline, a full
    queue, a typed error as it is, and anything else (a bug or a lost replica) as a logged 500."""
    if isinstance(exc, asyncio.TimeoutError):
        return RequestTimeoutError(f"not scored within {timeout_s:g} s")
    if isinstance(exc, overloaded()):
        return OverloadedError("the scoring queue is full; retry later")
    if isinstance(exc, EditRewardError):
        return exc
    log.error("request failed", exc_info=exc)
    return ServiceError(f"{type(exc).__name__}: {exc}")


class IdempotencyConflictError(ApiError):
    """An idempotency key sent again with another request body."""

    kind = "idempotency_conflict"
    status = 409


# The runtime's own service errors (a full batching queue, a closed scorer, a passed deadline).
_RUNTIME_STATUS = ((E.OverloadedError, 429), (E.NotReadyError, 503), (E.DeadlineError, 504))


def http_status(exc: EditRewardError) -> int:
    """422 for any triple that cannot be scored; the class's own status for API and service errors."""
    status = getattr(exc, "status", None)
    if status is not None:
        return status
    for cls, code in _RUNTIME_STATUS:
        if isinstance(exc, cls):
            return code
    return 422 if isinstance(exc, InputError) else 500


def transient(status: int) -> bool:
    """A status worth retrying (late, busy, shutting down or failed), never an answer to replay."""
    return status >= 500 or status in (408, 429)


def error_body(exc: EditRewardError) -> dict:
    return {"error": exc.to_dict()}


IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotency-Replayed"


def idempotency_key(headers) -> str | None:
    """The request's idempotency key (1-255 printable ASCII characters), None without one."""
    value = headers.get(IDEMPOTENCY_HEADER.lower())
    if value is None:
        return None
    if not 0 < len(value) <= 255 or not all(" " < c <= "~" for c in value):
        raise ApiError(f"{IDEMPOTENCY_HEADER} must be 1 to 255 printable ASCII characters without spaces")
    return value


def fingerprint(kind: str, content_type: str, body: bytes) -> bytes:
    """What a request asks, so that a key sent again with another request is refused."""
    import hashlib

    digest = hashlib.blake2b(f"{kind}\n{content_type}\n".encode(), digest_size=16)
    digest.update(body)
    return digest.digest()


# ---------------------------------------------------------------- request models (validation + OpenAPI)

ImageField = Field(description="the image as base64 (or a data: URI); URLs and paths are rejected")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Triple(_Strict):
    instruction: str
    source: str = ImageField
    edited: str = ImageField


class ScoreMany(_Strict):
    triples: list[Triple] = Field(min_length=1)


class RankRequest(_Strict):
    instruction: str
    source: str = ImageField
    edits: list[str] = Field(min_length=1, description="edited images, each base64 (or a data: URI)")


class PreferRequest(_Strict):
    instruction: str
    source: str = ImageField
    a: str = ImageField
    b: str = ImageField


class HeadOut(BaseModel):
    name: str
    mu: float
    log_sigma: float


class ScoreOut(BaseModel):
    mu: float
    log_sigma: float
    sigma: float
    heads: list[HeadOut]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail


class ItemOut(BaseModel):
    """One triple's outcome: a score, or ``error`` (per item; the request itself succeeded)."""

    index: int
    mu: float | None = None
    log_sigma: float | None = None
    sigma: float | None = None
    heads: list[HeadOut] | None = None
    error: ErrorDetail | None = None


class ScoreManyOut(BaseModel):
    results: list[ItemOut]


class RankOut(BaseModel):
    results: list[ItemOut]
    order: list[int] = Field(description="indices of the scored edits (an edit with an error is left out), "
                                         "best (highest mu) first")


class PreferOut(BaseModel):
    p_a_over_b: float
    a: ScoreOut
    b: ScoreOut


SCHEMA_MODELS = (Triple, ScoreMany, RankRequest, PreferRequest, ScoreOut, ScoreManyOut, RankOut, PreferOut, ErrorOut)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_json(body: bytes):
    if not body:
        raise InvalidJsonError("request body is empty")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJsonError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidJsonError("request body nests JSON too deeply") from None


def check_request_pixels(images: list[bytes], limits: Limits) -> None:
    """Sum the decoded sizes of a request's distinct images from their headers (nothing is
    decoded) and refuse the request above ``max_request_pixels``. A header that cannot be read
    is left for the scorer to report on that image's own line."""
    import hashlib
    import io

    from PIL import Image

    total = 0
    objects = {id(b): b for b in images}.values()  # an image sent for many triples is one object (hashed once)
    for data in {hashlib.blake2b(b, digest_size=16).digest(): b for b in objects}.values():  # distinct contents
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
        except Image.DecompressionBombError:  # over twice PIL's own limit: over any sane request budget too
            width, height = limits.max_request_pixels + 1, 1
        except Exception:  # PIL raises many classes for unreadable headers; the image's own error comes later
            continue
        total += width * height
        if total > limits.max_request_pixels:
            raise PayloadTooLargeError(f"the request's images decode to more than {limits.max_request_pixels} pixels "
                                       "(max_request_pixels); send fewer or smaller images per request")


# ---------------------------------------------------------------- field checks

_SCHEME = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.\-]*:")
_DATA_URI = re.compile(r"^\s*data:[\w.+\-]+/[\w.+\-]+(;[\w.+\-]+=[\w.+\-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


def check_instruction(value, limits: Limits, field: str = "instruction") -> str:
    if not isinstance(value, str):
        raise InstructionError(f"{field} must be a string")
    if not value.strip():
        raise InstructionError(f"{field} is empty")
    if len(value) > limits.max_instruction_chars:
        raise InstructionError(
            f"{field} is {len(value)} characters, over the limit of {limits.max_instruction_chars}"
        )
    return value


def decode_image_field(value, field: str) -> bytes:
    """base64 text or uploaded bytes -> image bytes. URLs and paths are refused, never opened.

    Plain base64, what every client sends, is decoded in one strict pass over the text (a few ms a
    megabyte); only text that fails it pays for the whitespace scan (about 4x slower, run on the
    gateway's event loop for every image of a request)."""
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise ImageError(f"{field}: uploaded file is empty")
        return bytes(value)
    if not isinstance(value, str):
        raise ApiError(f"{field} must be a base64 string or a file upload")
    match = _DATA_URI.match(value)
    if match:
        value = value[match.end():]
    elif _SCHEME.match(value):
        raise ImageSourceError(
            f"{field}: looks like a URL ({value[:40]!r}); images are never fetched, send them inline "
            "as base64 or as a multipart upload"
        )
    text, data = value, _strict_b64(value)  # validate=True refuses whitespace, ".", "\\" and "~"
    if data is None:
        text = _WHITESPACE.sub("", value)
    if not text:
        raise ImageError(f"{field}: empty image string")
    if len(text) < 4096 and any(c in text for c in ".\\~"):
        raise ImageSourceError(
            f"{field}: looks like a file path ({text[:40]!r}); files are never read, send images inline "
            "as base64 or as a multipart upload"
        )
    if data is None:
        try:
            data = _b64(text)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"{field}: not valid base64 ({exc})") from None
    if not data:
        raise ImageError(f"{field}: decodes to zero bytes")
    return data


def _b64(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional; raises on any other character."""
    altchars = b"-_" if ("-" in text or "_" in text) else None
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)


def _strict_b64(text: str) -> bytes | None:
    try:
        return _b64(text)
    except (binascii.Error, ValueError):
        return None


# ---------------------------------------------------------------- requests -> work


@dataclass
class ScoreWork:
    triples: list  # [(instruction, source, edited)]; images still as given (str or uploaded bytes)
    many: bool


@dataclass
class RankWork:
    instruction: object
    source: object
    edits: list


@dataclass
class PreferWork:
    instruction: object
    source: object
    a: object
    b: object


def work_from_json(kind: str, data, limits: Limits):
    """A JSON body (already parsed) -> the request's work, validated against the schema."""
    try:
        if kind == "score":
            if isinstance(data, dict) and "triples" in data:
                req = ScoreMany.model_validate(data)
                work = ScoreWork([(t.instruction, t.source, t.edited) for t in req.triples], True)
            else:
                t = Triple.model_validate(data)
                work = ScoreWork([(t.instruction, t.source, t.edited)], False)
        elif kind == "rank":
            r = RankRequest.model_validate(data)
            work = RankWork(r.instruction, r.source, list(r.edits))
        else:
            p = PreferRequest.model_validate(data)
            work = PreferWork(p.instruction, p.source, p.a, p.b)
    except ValidationError as exc:
        raise ApiError(f"request does not match the schema: {_validation_message(exc)}") from None
    return check_counts(work, limits)


def work_from_form(kind: str, fields: dict[str, list], limits: Limits):
    """Multipart fields ({name: [str or uploaded bytes, ...]}) -> the same work as the JSON form.

    score: ``instruction``/``source``/``edited`` (repeat all three, paired in order, for several
    triples); rank: ``instruction``, ``source`` and one or more ``edits``; prefer: ``instruction``,
    ``source``, ``a``, ``b``. Image fields are file uploads or base64 text.
    """
    known = {"score": ("instruction", "source", "edited"), "rank": ("instruction", "source", "edits"),
             "prefer": ("instruction", "source", "a", "b")}[kind]
    extra = sorted(set(fields) - set(known))
    if extra:
        raise ApiError(f"unknown form fields: {', '.join(extra)}")
    missing = [name for name in known if not fields.get(name)]
    if missing:
        raise ApiError(f"request does not match the schema: {', '.join(missing)}: field required")
    if kind == "score":
        cols = [fields[n] for n in known]
        if len({len(c) for c in cols}) != 1:
            raise ApiError("instruction, source and edited must be repeated the same number of times")
        work = ScoreWork(list(zip(*cols)), len(cols[0]) > 1)
    elif kind == "rank":
        work = RankWork(_one(fields, "instruction"), _one(fields, "source"), list(fields["edits"]))
    else:
        work = PreferWork(*(_one(fields, n) for n in known))
    return check_counts(work, limits)


def _one(fields: dict, name: str):
    if len(fields[name]) != 1:
        raise ApiError(f"{name}: expected one value, got {len(fields[name])}")
    return fields[name][0]


def check_counts(work, limits: Limits):
    n = len(work.triples) if isinstance(work, ScoreWork) else len(work.edits) if isinstance(work, RankWork) else 2
    if n > limits.max_triples:
        raise ApiError(f"{n} triples in one request, over the limit of {limits.max_triples}")
    return work
