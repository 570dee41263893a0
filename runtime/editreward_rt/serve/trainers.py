"""The reward protocols RL trainers already speak, served by the same gateway and scorer replicas
as ``/v1/*`` (so their triples batch with everyone else's, and the edits of one source share
its encoded prefix within a batch).

- **UniRL v1** (``unirl/reward/remote.py``): ``GET /health`` -> status ok and the reward roster,
  ``{editreward: [sub-metrics]}``; ``POST /score`` with ``{"requests": [{"history": [{"text",
  "image_b64": source}, {"text", "image_b64": edited}], "required_rewards": ["editreward"],
  "metadata", ...}]}`` -> ``{"results", "errors", "identities", "protocol_version"}``. A bad item
  fails alone (its ``errors[i]`` says why, its ``results[i]`` is empty): the client retries a
  whole non-2xx answer three times. The sub-metrics put ``overall`` (mu) first and then each
  head's mu: with EditReward's mean fusion both of the client's ``first`` and ``mean``
  reductions give mu (UniRL's own wrapper returns mu and log-sigma, which ``mean`` averages).
  A model fused otherwise (min, sum) reports ``overall`` alone, so ``mean`` still gives mu.
- **Edit-R1** (``flow_grpo/rewards.py``, ``mllm_score_continue``): ``POST /mode/logits_non_cot``,
  body ``pickle.dumps({"ref_images": [jpeg], "images": [jpeg], "prompts": [str], "metadatas":
  [dict]})`` with no content type -> ``pickle.dumps({"scores": [mu, ...]})``. The body is read by
  ``safe_pickle``, never by ``pickle.loads``. The client retries an HTTP 500 about a thousand
  times, so a bad request is always a typed 4xx (JSON) and the whole batch fails at once.

The pickle clients send no credentials; ``--token`` guards the JSON protocols (``Authorization:
Bearer``), and the service binds 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import time
from collections import OrderedDict

from fastapi.responses import JSONResponse, Response

from ..errors import EditRewardError, InputError
from . import safe_pickle
from . import schemas as S

log = logging.getLogger("ray.serve")

REWARD = "editreward"  # the name UniRL's required_rewards asks for
PROTOCOL = "1"
IDENTITY_FIELDS = ("request_id", "sample_id", "group_id", "idempotency_key")


class UnauthorizedError(S.ApiError):
    kind = "unauthorized"
    status = 401


def check_token(headers, token: str | None) -> None:
    """With a service token, a request must carry ``Authorization: Bearer <token>``, or HTTP Basic
    with the token as password: UniRL's client has no header setting, but ``requests`` sends the
    credentials of a ``base_url`` such as ``http://editreward:<token>@host:8000`` as Basic."""
    if token is None:
        return
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            given = base64.b64decode(given.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            given = ""
    elif scheme.lower() != "bearer":
        given = ""
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise UnauthorizedError("this service needs Authorization: Bearer <token> (the --token it was started with)")


def sub_metrics(result: dict, with_heads: bool) -> dict[str, float]:
    """A replica's score -> UniRL sub-metrics, ``overall`` (mu) first, then each head's mu."""
    return {"overall": result["mu"], **({h["name"]: h["mu"] for h in result["heads"]} if with_heads else {})}


class ItemReplays:
    """UniRL answers by ``idempotency_key``: a retried item gets its first answer and is not scored
    again. Bounded, oldest first out; only final answers are kept (a score, or an input error)."""

    def __init__(self, max_keys: int = 65536):
        self.max_keys = max_keys
        self._done: OrderedDict[str, tuple[bytes, tuple]] = OrderedDict()

    def get(self, key: str, fingerprint: bytes):
        if key not in self._done:
            return None
        known, answer = self._done[key]
        if known != fingerprint:
            return ({}, {REWARD: f"idempotency_key {key!r} was sent before with another request"})
        self._done.move_to_end(key)
        return answer

    def put(self, key: str, fingerprint: bytes, answer: tuple) -> None:
        self._done[key] = (fingerprint, answer)
        while len(self._done) > self.max_keys:
            self._done.popitem(last=False)


def _fingerprint(item: dict) -> bytes:
    return hashlib.blake2b(json.dumps(item, sort_keys=True).encode(), digest_size=16).digest()


class TrainerProtocols:
    """The trainers' routes over one gateway (its scorer handle, limits, metrics and drain state)."""

    def __init__(self, gateway, token: str | None = None):
        self.gateway, self.token = gateway, token
        self.replays = ItemReplays()
        self._model: dict | None = None  # a scorer replica's ready(): head names and fusion

    async def model(self) -> dict:
        if self._model is None:
            self._model = await asyncio.wait_for(self.gateway.scorer.ready.remote(), timeout=5.0)
        return self._model

    async def mean_fused(self) -> bool:
        """Head sub-metrics go out only when mu is the heads' mean: then the mean of [mu, heads] is mu."""
        return (await self.model())["fusion"] == "mean"

    @property
    def limits(self) -> S.Limits:
        return self.gateway.limits

    async def health(self) -> Response:
        """UniRL checks ``/health`` once before training: ok only once a scorer replica answers."""
        try:
            model = await asyncio.wait_for(self.gateway.scorer.ready.remote(), timeout=5.0)
        except Exception as exc:  # not deployed yet, replicas restarting, ...
            return self._error(S.NotReadyError(f"no scorer replica answered: {type(exc).__name__}"))
        self._model = model
        names = ["overall", *(model["heads"] if model["fusion"] == "mean" else ())]
        return JSONResponse(dict(status="ok", rewards={REWARD: names}, protocol_version=PROTOCOL))

    # ------------------------------------------------------------ request handling (shared)

    async def handle(self, kind: str, request, answer) -> Response:
        """Run ``answer(body, deadline)`` for one request: drain and in-flight accounting, the body
        cap, the request's time budget, and every failure as a typed JSON error (never a bare 500
        for input: the pickle clients retry 500s)."""
        gw, start = self.gateway, time.perf_counter()
        gw.metrics.inflight.inc()
        gw.inflight += 1
        try:
            if gw.draining:
                raise S.NotReadyError("the service is shutting down")
            body = await gw._body(request)
            deadline = time.monotonic() + self.limits.request_timeout_s
            response = await asyncio.wait_for(answer(request, body, deadline), timeout=self.limits.request_timeout_s)
        except Exception as exc:  # answered with its typed error, never a crash of the gateway
            response = self._error(S.typed_error(exc, self.limits.request_timeout_s))
        finally:
            gw.metrics.inflight.dec()
            gw.inflight -= 1
        gw.metrics.request(kind, response.status_code, time.perf_counter() - start)
        return response

    def _error(self, exc: EditRewardError) -> JSONResponse:
        self.gateway.metrics.error(exc.kind)
        status = S.http_status(exc)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return JSONResponse(S.error_body(exc), status_code=status, headers=headers)

    async def _score(self, triples: list, names: list, deadline: float) -> list[dict]:
        """Triples of (instruction, source bytes, edited bytes) -> the replica's per-triple results."""
        S.check_request_pixels([image for _, src, edit in triples for image in (src, edit)], self.limits)
        budget = max(0.0, deadline - time.monotonic())
        out = await self.gateway._call(self.gateway.scorer.score.remote(triples, names, budget_s=budget))
        for result in out["results"]:
            self.gateway.metrics.triples.labels("error" if "error" in result else "scored").inc()
        return out["results"]

    # ------------------------------------------------------------ UniRL v1

    async def unirl(self, request, body: bytes, deadline: float) -> Response:
        check_token(request.headers, self.token)
        data = S.parse_json(body)
        if not isinstance(data, dict) or not isinstance(data.get("requests"), list):
            raise S.ApiError('the body must be {"requests": [...]} (UniRL reward-service protocol)')
        version = data.get("protocol_version", PROTOCOL)
        if str(version) != PROTOCOL:
            raise S.ApiError(f"protocol_version {version!r}: this service speaks UniRL protocol {PROTOCOL}")
        items = data["requests"]
        if len(items) > self.limits.max_triples:
            raise S.ApiError(f"{len(items)} requests in one call, over the limit of {self.limits.max_triples}")
        answers, todo, prints, decoded = [None] * len(items), [], [None] * len(items), {}
        for i, item in enumerate(items):
            key = item.get("idempotency_key") if isinstance(item, dict) else None
            if key is not None:  # json.dumps of an item with two base64 images: once per item
                prints[i] = _fingerprint(item)
                replay = self.replays.get(str(key), prints[i])
                if replay is not None:
                    answers[i] = replay
                    continue
            try:
                triple, others = self._unirl_item(i, item, decoded)
            except InputError as exc:
                answers[i] = ({}, {REWARD: f"{exc.kind}: {exc}"})
                continue
            answers[i] = ({}, others)
            if triple is not None:
                todo.append((i, triple))
        if todo:
            with_heads = await self.mean_fused()
            names = [(f"requests[{i}].history[0].image_b64", f"requests[{i}].history[1].image_b64") for i, _ in todo]
            for (i, _), result in zip(todo, await self._score([t for _, t in todo], names, deadline)):
                answers[i] = self._unirl_answer(result, answers[i][1], with_heads)
                if prints[i] is not None and ("error" not in result or result.get("status", 500) < 500):
                    self.replays.put(str(items[i]["idempotency_key"]), prints[i], answers[i])
        return JSONResponse({
            "protocol_version": PROTOCOL,
            "results": [result for result, _ in answers],
            "errors": [errors for _, errors in answers],
            "identities": [{k: item[k] for k in IDENTITY_FIELDS if k in item} if isinstance(item, dict) else {}
                           for item in items],
        })

    def _unirl_item(self, i: int, item, decoded: dict) -> tuple[tuple | None, dict]:
        """One UniRL request -> (its triple, or None when it does not ask for editreward; errors of
        the other rewards it asks for, which this service does not serve). ``decoded``: the call's
        images so far, base64 text -> bytes (``_decode_once``)."""
        where = f"requests[{i}]"
        if not isinstance(item, dict):
            raise S.ApiError(f"{where} must be an object")
        wanted = item.get("required_rewards")
        if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
            raise S.ApiError(f"{where}.required_rewards must be a list of reward names")
        others = {name: f"unknown reward {name!r}; this service serves {[REWARD]}" for name in wanted if name != REWARD}
        if REWARD not in wanted:
            return None, others
        history = item.get("history")
        if not isinstance(history, list) or len(history) != 2 or not all(isinstance(t, dict) for t in history):
            raise S.ApiError(f"{where}.history must be two turns, [source, edited] (EditReward scores edits)")
        for t, turn in enumerate(history):
            if turn.get("image_b64") is None:
                raise S.ApiError(f"{where}.history[{t}] has no image_b64")
        instruction = S.check_instruction(history[0].get("text"), self.limits, f"{where}.history[0].text")
        source, edited = (_decode_once(turn["image_b64"], f"{where}.history[{t}].image_b64", decoded)
                          for t, turn in enumerate(history))
        return (instruction, source, edited), others

    @staticmethod
    def _unirl_answer(result: dict, others: dict, with_heads: bool) -> tuple[dict, dict]:
        if "error" in result:
            return {}, {**others, REWARD: f"{result['error']['type']}: {result['error']['message']}"}
        metrics = sub_metrics(result, with_heads)
        if not all(math.isfinite(v) for v in metrics.values()):  # JSON has no NaN; the client fails the sample
            return {}, {**others, REWARD: "the model gave a non-finite score"}
        return {REWARD: metrics}, others

    # ------------------------------------------------------------ Edit-R1 (pickle)

    async def edit_r1(self, request, body: bytes, deadline: float) -> Response:
        payload = safe_pickle.loads(body)
        if not isinstance(payload, dict):
            raise S.ApiError("the pickle must hold a dict of ref_images, images, prompts (and metadatas)")
        if payload.get("ref_images") is None:
            raise S.ApiError("no ref_images: EditReward scores an edit against its source image. verl-omni's "
                             "scorer client sends none: use editreward_rt.adapters.verl_omni.compute_score")
        columns = {name: self._column(payload, name) for name in ("ref_images", "images", "prompts")}
        n = len(columns["images"])
        if any(len(c) != n for c in columns.values()):
            lengths = {name: len(c) for name, c in columns.items()}
            raise S.ApiError(f"ref_images, images and prompts must be as long as each other: {lengths}")
        if n > self.limits.max_triples:
            raise S.ApiError(f"{n} images in one request, over the limit of {self.limits.max_triples}")
        triples, names = [], []
        for i, (prompt, source, edited) in enumerate(zip(columns["prompts"], columns["ref_images"], columns["images"])):
            prompt = str(prompt) if isinstance(prompt, str) else prompt  # a numpy str_ becomes a plain str
            triples.append((S.check_instruction(prompt, self.limits, f"prompts[{i}]"),
                            _image_bytes(source, f"ref_images[{i}]"), _image_bytes(edited, f"images[{i}]")))
            names.append((f"ref_images[{i}]", f"images[{i}]"))
        results = await self._score(triples, names, deadline) if triples else []
        failed = [(i, r["error"]) for i, r in enumerate(results) if "error" in r]
        if failed:  # the client has no per-image error slot: the batch fails loudly, never with a made-up score
            i, first = failed[0]
            raise _ItemError(f"{len(failed)} of {n} images could not be scored; the first, {i}: "
                             f"{first['type']}: {first['message']}")
        scores = [float(r["mu"]) for r in results]
        return Response(safe_pickle.dumps({"scores": scores}), media_type="application/octet-stream")

    @staticmethod
    def _column(payload: dict, name: str) -> list:
        value = payload.get(name)
        if hasattr(value, "tolist"):  # a numpy string array (np.array_split of the prompts)
            value = value.tolist()
        if not isinstance(value, (list, tuple)):
            raise S.ApiError(f"{name} must be a list, not {type(value).__name__}")
        return list(value)


def _decode_once(value, field: str, decoded: dict) -> bytes:
    """``S.decode_image_field`` of each distinct base64 string once per call. A UniRL call repeats
    its source in every edit's history: decoded once, it is one bytes object, which Ray pickles once
    on the way to the scorer replica and which is hashed once there (8 edits: 9 images, not 16).
    A string that fails is not remembered: each item it appears in gets its own error."""
    if not isinstance(value, str):
        return S.decode_image_field(value, field)
    if value not in decoded:
        decoded[value] = S.decode_image_field(value, field)
    return decoded[value]


class _ItemError(InputError):
    kind = "unscorable_items"
    status = 422


def _image_bytes(value, field: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise S.ApiError(f"{field} must be non-empty encoded image bytes (JPEG or PNG)")
    return bytes(value)
