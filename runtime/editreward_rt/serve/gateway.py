"""The gateway: the HTTP API in front of the scorer replicas, the same code under Ray Serve
(``app.py``) and in one process (``local.py``).

Routes: ``POST /v1/score``, ``POST /v1/rank``, ``POST /v1/prefer`` (JSON with base64 images, or
multipart uploads), ``GET /healthz``, ``GET /readyz``, ``GET /metrics`` (Prometheus), and FastAPI's
``/openapi.json`` and ``/docs``; and the RL trainers' own protocols (``trainers.py``): UniRL's
``GET /health`` and ``POST /score``, Edit-R1's pickled ``POST /mode/logits_non_cot``. The gateway
validates and decodes requests and keeps the metrics; the scorer replicas (``replica.py``)
preprocess and score, merging concurrent requests into batches. ``build_api`` makes a gateway's
FastAPI app; the scorer is reached through a handle, Serve's ``DeploymentHandle`` or
``local.LocalHandle`` (``handle.method.remote(...)``, awaitable and cancellable).
Queue bounds are the handle's: ``max_ongoing_requests`` per scorer replica and ``max_queued_requests``
at the gateway's handle, whose overflow becomes a 429 with a typed error body (429 and 503 carry
``Retry-After``). Every route sits behind the body guard (``guard.py``: a deadline on each request
body, a typed 408 after it, and a bound on the bodies one client sends at once, a typed 429 above
it), and every error the gateway answers, its own or FastAPI's, has the typed body. A request with
an ``Idempotency-Key`` header is answered once: a retry with the same key and body gets the stored
answer (``idempotency.py``) unless that answer held a transient error; the same key with another
body, a 409. On shutdown the gateway answers 503 to every new request until the server stops.

A batch of triples is one ``POST /v1/score`` of ``{"triples": [...]}`` (up to ``max_triples``), each
answered in place: the endpoint for RL trainers (verl, OpenRLHF) and ``editreward_rt.client``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..batching import MERGE_WIDTH
from ..errors import EditRewardError, InputError
from . import schemas as S
from .guard import BodyGuard, BodyGuardMiddleware
from .idempotency import IdempotencyCache
from .prometheus import ServeMetrics
from .trainers import TrainerProtocols, check_token

log = logging.getLogger("ray.serve")

_REQUEST_START = contextvars.ContextVar("editreward_request_start")  # perf_counter at the request's start


@dataclass
class ServeConfig:
    model: str
    backend: str | None = None
    device: str = "cpu"
    replicas: int = 1
    threads: int | None = None
    max_batch: int | None = None  # None: the device's per-call size, batches of batching.MERGE_WIDTH
    batch_wait_ms: float = 10.0
    max_ongoing: int | None = None  # per scorer replica; default 2 * the batch width
    max_queued: int = 64  # requests waiting at the gateway for a scorer replica; more get 429
    graceful_shutdown_s: float = 30.0
    limits: S.Limits = field(default_factory=S.Limits)
    token: str | None = None  # bearer token the JSON protocols require (None: open); see trainers.py
    backend_options: dict = field(default_factory=dict)  # Scorer.load's ``options``
    precision: str | None = None  # Scorer.load's: None, the default (auto, or $EDITREWARD_PRECISION)

    @property
    def replica_ongoing(self) -> int:
        return self.max_ongoing or 2 * (self.max_batch or MERGE_WIDTH)

    def replica_args(self) -> tuple:
        """``ScorerReplica``'s positional arguments."""
        return (self.model, self.backend, self.device, self.threads, self.max_batch, self.batch_wait_ms / 1000.0,
                self.limits.max_image_pixels, self.backend_options, self.precision)


# ---------------------------------------------------------------- errors for routes FastAPI itself rejects


async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse({"error": {"type": kind, "message": str(exc.detail)}}, status_code=exc.status_code)


async def _validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse({"error": {"type": "invalid_request", "message": str(exc.errors()[:3])}}, status_code=422)


async def _typed_error(request: Request, exc: EditRewardError):
    """A typed error no route caught (the body guard's 408, for one): its own status and body."""
    status = S.http_status(exc)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(S.error_body(exc), status_code=status, headers=headers)


async def _bug(request: Request, exc: Exception):
    """Any other exception: a typed 500, never Starlette's plain-text one."""
    log.exception("request failed")
    return JSONResponse(S.error_body(S.ServiceError(f"{type(exc).__name__}: {exc}")), status_code=500)


# ---------------------------------------------------------------- OpenAPI: request bodies are read by hand


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _form(fields: dict[str, str], repeated: tuple[str, ...] = ()) -> dict:
    props = {}
    for name, kind in fields.items():
        one = {"type": "string", "format": "binary"} if kind == "image" else {"type": "string"}
        props[name] = {"type": "array", "items": one} if name in repeated else one
    return {"schema": {"type": "object", "properties": props, "required": list(fields)}}


def _doc(json_schema: dict, form: dict, ok: dict) -> dict:
    return {
        "openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {"schema": json_schema},
                                                                        "multipart/form-data": form}}},
        "responses": {200: {"content": {"application/json": {"schema": ok}}},
                      **{code: {"model": S.ErrorOut} for code in (400, 409, 413, 415, 422, 429, 503, 504)}},
    }


_SCORE_DOC = _doc({"oneOf": [_ref("Triple"), _ref("ScoreMany")]},
                  _form({"instruction": "text", "source": "image", "edited": "image"},
                        ("instruction", "source", "edited")),
                  {"oneOf": [_ref("ScoreOut"), _ref("ScoreManyOut")]})
_RANK_DOC = _doc(_ref("RankRequest"), _form({"instruction": "text", "source": "image", "edits": "image"}, ("edits",)),
                 _ref("RankOut"))
_PREFER_DOC = _doc(_ref("PreferRequest"), _form({"instruction": "text", "source": "image", "a": "image", "b": "image"}),
                   _ref("PreferOut"))


def _openapi(api: FastAPI) -> dict:
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in S.SCHEMA_MODELS:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        api.openapi_schema = schema
    return api.openapi_schema



# ---------------------------------------------------------------- the gateway


class Gateway:
    def __init__(self, scorer, limits: dict, token: str | None = None):
        self.scorer = scorer
        self.limits = S.Limits(**limits)
        self.metrics = ServeMetrics()
        self.inflight = 0
        self.draining = False
        self.replays = IdempotencyCache()
        self.guard = BodyGuard(self.limits)  # what BodyGuardMiddleware enforces (guard.py)
        self.token = token
        self.trainers = TrainerProtocols(self, token)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve's late-bound ingress (``serve.ingress()``): the app is built in the gateway's replica."""
        return build_api(self)

    async def drain(self, timeout_s: float) -> int:
        """Refuse new scoring requests (503) and wait up to ``timeout_s`` for those in flight to be
        answered; returns how many are still in flight. Called by ``shutdown_app`` over a handle."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.inflight

    async def healthz(self) -> dict:
        return {"status": "ok"}

    async def readyz(self):
        if self.draining:
            err = S.NotReadyError("shutting down")
            return JSONResponse(S.error_body(err), status_code=err.status, headers={"Retry-After": "1"})
        try:
            model = await asyncio.wait_for(self.scorer.ready.remote(), timeout=5.0)
        except Exception as exc:  # not deployed yet, replicas restarting, ...
            err = S.NotReadyError(f"no scorer replica answered: {type(exc).__name__}")
            return JSONResponse(S.error_body(err), status_code=err.status, headers={"Retry-After": "1"})
        return {"status": "ready", "model": model, "limits": self.limits.to_dict()}

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    # ------------------------------------------------------------ the trainers' own protocols (trainers.py)

    async def unirl_health(self) -> Response:
        return await self.trainers.health()

    async def unirl_score(self, request: Request) -> Response:
        return await self.trainers.handle("unirl", request, self.trainers.unirl)

    async def edit_r1_score(self, request: Request) -> Response:
        return await self.trainers.handle("edit_r1", request, self.trainers.edit_r1)

    async def score(self, request: Request):
        """One triple -> its score; ``{"triples": [...]}`` -> per-triple results (a bad triple is its own
        error item, the others are still scored)."""
        return await self._serve("score", request)

    async def rank(self, request: Request):
        """One source and instruction, many edits -> their scores and the order best first. The source is
        preprocessed and encoded once."""
        return await self._serve("rank", request)

    async def prefer(self, request: Request):
        """P(edit ``a`` is preferred over edit ``b``) for one source and instruction."""
        return await self._serve("prefer", request)

    # ------------------------------------------------------------ request handling

    async def _serve(self, kind: str, request: Request) -> Response:
        start = time.perf_counter()
        _REQUEST_START.set(start)  # seen by the task asyncio.wait_for runs the dispatch in
        self.metrics.inflight.inc()
        self.inflight += 1
        try:
            response = await self._answer(kind, request)
        finally:
            self.metrics.inflight.dec()
            self.inflight -= 1
        self.metrics.request(kind, response.status_code, time.perf_counter() - start)
        return response

    async def _answer(self, kind: str, request: Request) -> Response:
        """The response to one scoring request; with an idempotency key, a request seen before
        gets its first answer again (``Idempotency-Replayed: true``) and is not scored twice."""
        key, response, final = None, None, True  # final: no item of the answer is a transient error
        try:
            if self.draining:
                raise S.NotReadyError("the service is shutting down")
            check_token(request.headers, self.token)
            wanted = S.idempotency_key(request.headers)
            body = await self._body(request)
            if wanted is not None:
                ctype = request.headers.get("content-type", "")
                replay = await self.replays.begin(wanted, S.fingerprint(kind, ctype, body))
                if replay is not None:
                    return replay
                key = wanted
            work = await self._parse(kind, request, body)
            result, final = await asyncio.wait_for(self._dispatch(kind, work), timeout=self.limits.request_timeout_s)
            response = JSONResponse(result)
        except Exception as exc:  # answered with its typed error, never a crash of the gateway
            response = self._error(S.typed_error(exc, self.limits.request_timeout_s))
        finally:
            if key is not None:  # also when the client went away (cancelled): its retries must not wait forever
                self.replays.finish(key, response, final)
        return response

    def _error(self, exc: EditRewardError) -> JSONResponse:
        self.metrics.error(exc.kind)
        status = S.http_status(exc)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return JSONResponse(S.error_body(exc), status_code=status, headers=headers)

    async def _body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise S.PayloadTooLargeError(f"request body of {declared} bytes is over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise S.PayloadTooLargeError(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(self, kind: str, request: Request, body: bytes):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            return S.work_from_form(kind, await _form_fields(request, body), self.limits)
        if ctype in ("", "application/json") or ctype.endswith("+json"):
            return S.work_from_json(kind, S.parse_json(body), self.limits)
        raise S.UnsupportedMediaTypeError(f"content type {ctype!r}: send application/json or multipart/form-data")

    async def _dispatch(self, kind: str, work) -> tuple[dict, bool]:
        """The answer's body, and whether it is final: False when an item holds a transient error
        (a timeout, a busy or failed replica), so that the answer is never replayed to a retry."""
        lim = self.limits
        if kind == "score":
            return await self._score(work)
        instruction = S.check_instruction(work.instruction, lim)
        source = S.decode_image_field(work.source, "source")
        if kind == "rank":
            return await self._rank(instruction, source, work.edits)
        a, b = S.decode_image_field(work.a, "a"), S.decode_image_field(work.b, "b")
        S.check_request_pixels([source, a, b], lim)
        out = await self._call(self.scorer.prefer.remote(instruction, source, a, b, budget_s=self._budget()))
        sa, sb = (self._item(None, r, single=True) for r in out["results"])
        return {"p_a_over_b": out["p_a_over_b"], "a": sa, "b": sb}, True

    async def _rank(self, instruction: str, source: bytes, given: list) -> tuple[dict, bool]:
        """A bad edit is its own error item, in place; the others are scored and ranked (``order``
        holds the scored edits only, best first)."""
        results, edits = [None] * len(given), []
        for i, value in enumerate(given):
            try:
                edits.append((i, S.decode_image_field(value, f"edits[{i}]")))
            except InputError as exc:
                results[i] = {"error": exc.to_dict(), "status": S.http_status(exc)}
        if edits:
            S.check_request_pixels([source, *(e for _, e in edits)], self.limits)
            names = [f"edits[{i}]" for i, _ in edits]
            out = await self._call(self.scorer.rank.remote(instruction, source, [e for _, e in edits], names,
                                                           budget_s=self._budget()))
            if "source_error" in out:  # no edit can be scored: the request's own error
                raise _RemoteError(out["source_error"]["error"], out["source_error"]["status"])
            for (i, _), r in zip(edits, out["results"]):
                results[i] = r
        final = _final(results)
        items = [self._item(i, r, single=False) for i, r in enumerate(results)]
        order = sorted((i for i, r in enumerate(items) if "error" not in r), key=lambda i: -items[i]["mu"])
        return {"results": items, "order": order}, final

    async def _score(self, work: S.ScoreWork) -> tuple[dict, bool]:
        """Validate each triple; bad ones become error items (or the 4xx of a one-triple request)."""
        checked, results = [], [None] * len(work.triples)
        for i, (instruction, source, edited) in enumerate(work.triples):
            prefix = f"triples[{i}]." if work.many else ""
            try:
                checked.append((i, (S.check_instruction(instruction, self.limits, prefix + "instruction"),
                                    S.decode_image_field(source, prefix + "source"),
                                    S.decode_image_field(edited, prefix + "edited"))))
            except InputError as exc:
                if not work.many:
                    raise
                results[i] = {"error": exc.to_dict(), "status": S.http_status(exc)}
        if checked:
            S.check_request_pixels([image for _, (_, src, edit) in checked for image in (src, edit)], self.limits)
            names = [(f"triples[{i}].source", f"triples[{i}].edited") if work.many else ("source", "edited")
                     for i, _ in checked]
            out = await self._call(self.scorer.score.remote([t for _, t in checked], names, budget_s=self._budget()))
            for (i, _), r in zip(checked, out["results"]):
                results[i] = r
        if not work.many:
            return self._item(None, results[0], single=True), True
        return {"results": [self._item(i, r, single=False) for i, r in enumerate(results)]}, _final(results)

    def _budget(self) -> float:
        """Seconds the replica may still spend on this request (the request's budget less what the
        gateway used, less a margin); the replica turns it into a deadline on its own monotonic clock,
        so no two machines' clocks are compared. Past it the replica skips the work left and answers
        what it scored, the rest as per-item timeouts; the margin (a quarter of the budget, at most
        5 s) is for the batch running at the deadline and the way back, so that the answer reaches
        the gateway before its own deadline (a 504, which loses what was scored)."""
        timeout = self.limits.request_timeout_s
        used = time.perf_counter() - _REQUEST_START.get(time.perf_counter())
        return max(0.0, timeout - min(0.25 * timeout, 5.0) - used)

    async def _call(self, response) -> dict:
        try:
            out = await response
        except asyncio.CancelledError:  # the request timed out: cancel the replica's call too
            response.cancel()
            raise
        for info in out.get("batches", ()):
            self.metrics.batch(info["size"], info["requests"], info["seconds"])
        return out

    def _item(self, index: int | None, result: dict, single: bool) -> dict:
        """A replica's per-triple result -> a response item; in a one-answer request an error raises."""
        if "error" in result:
            self.metrics.triples.labels("error").inc()
            if single:
                raise _RemoteError(result["error"], result.get("status", 422))
            self.metrics.error(result["error"]["type"])
            return {"index": index, "error": result["error"]}
        self.metrics.triples.labels("scored").inc()
        return result if index is None else {"index": index, **result}


def _final(results: list[dict]) -> bool:
    """No result is a transient error (results as the replicas give them, errors with their status)."""
    return not any("error" in r and S.transient(r.get("status", 500)) for r in results)


class _RemoteError(EditRewardError):
    """An error a scorer replica reported for one triple, re-raised with its type and status."""

    def __init__(self, error: dict, status: int):
        super().__init__(error.get("message", ""))
        self.kind, self.status = error.get("type", "error"), status


async def _form_fields(request: Request, body: bytes) -> dict[str, list]:
    """Parse a multipart body already read (and size-checked) into {field: [str | bytes, ...]}."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=256, max_fields=256, max_part_size=len(body) + 1)
    except Exception as exc:  # malformed multipart: starlette raises its own HTTP or parser errors
        raise S.ApiError(f"malformed multipart body: {getattr(exc, 'detail', exc)}") from None
    fields: dict[str, list] = {}
    for key, value in form.multi_items():
        fields.setdefault(key, []).append(await value.read() if isinstance(value, UploadFile) else value)
    await form.close()
    return fields


# ---------------------------------------------------------------- the app


def build_api(gateway: Gateway) -> FastAPI:
    """The FastAPI app serving ``gateway``: its routes, the body guard, and the typed error bodies."""
    api = FastAPI(title="EditReward", version=__version__,
                  description="Scores (instruction, source image, edited image) triples. Images are sent inline "
                              "(base64 or multipart uploads); URLs and paths are refused.")
    api.add_middleware(BodyGuardMiddleware, guard=gateway.guard)
    for exc_type, handler in ((StarletteHTTPException, _http_error), (RequestValidationError, _validation_error),
                              (EditRewardError, _typed_error), (Exception, _bug)):
        api.add_exception_handler(exc_type, handler)
    api.get("/healthz")(gateway.healthz)
    api.get("/readyz")(gateway.readyz)
    api.get("/metrics")(gateway.metrics_text)
    api.get("/health", include_in_schema=False)(gateway.unirl_health)
    api.post("/score", include_in_schema=False)(gateway.unirl_score)
    api.post("/mode/logits_non_cot", include_in_schema=False)(gateway.edit_r1_score)
    api.post("/v1/score", **_SCORE_DOC)(gateway.score)
    api.post("/v1/rank", **_RANK_DOC)(gateway.rank)
    api.post("/v1/prefer", **_PREFER_DOC)(gateway.prefer)
    api.openapi = lambda: _openapi(api)
    return api
