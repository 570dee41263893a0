"""Answers of recent requests by idempotency key: a client that retries a request (its answer was
lost, or it timed out) gets the first answer again instead of having the triples scored twice.

One gateway sees every request (gateway.py), so its memory covers the whole service. Bounded
in keys and in bytes, oldest first out. Only final answers are kept (2xx and 4xx): a 408, 429 or
5xx is worth retrying, and so is a 200 that holds a per-item timeout or another transient item
error (the gateway says so with ``final``), so its key is forgotten and the retry is scored
afresh. A retry that arrives while the first request is still being answered waits for that answer.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from starlette.responses import Response

from .schemas import REPLAYED_HEADER, IdempotencyConflictError, transient


class IdempotencyCache:
    def __init__(self, max_keys: int = 4096, max_bytes: int = 64 * 1024 * 1024):
        self.max_keys, self.max_bytes = max_keys, max_bytes
        self._done: OrderedDict[str, tuple[bytes, int, bytes]] = OrderedDict()  # key -> (fingerprint, status, body)
        self._bytes = 0
        self._inflight: dict[str, tuple[bytes, asyncio.Future]] = {}

    async def begin(self, key: str, fingerprint: bytes) -> Response | None:
        """The stored answer for ``key`` (a replay), or None: the caller now answers it and must ``finish``."""
        while True:
            if key in self._done:
                known, status, body = self._done[key]
                self._check(known, fingerprint, key)
                self._done.move_to_end(key)
                return Response(body, status_code=status, media_type="application/json", headers={REPLAYED_HEADER: "true"})
            if key not in self._inflight:
                self._inflight[key] = (fingerprint, asyncio.get_running_loop().create_future())
                return None
            known, first = self._inflight[key]
            self._check(known, fingerprint, key)
            await asyncio.shield(first)  # then: a stored answer, or the key is free to answer again

    def finish(self, key: str, response: Response | None, final: bool) -> None:
        """Store the answer of the request that ``begin`` let through (None: it got none; ``final``
        False: an item of it is a transient error) and wake its retries."""
        fingerprint, first = self._inflight.pop(key)
        if response is not None and final and not transient(response.status_code):
            self._store(key, fingerprint, response.status_code, bytes(response.body))
        first.set_result(None)

    def _store(self, key: str, fingerprint: bytes, status: int, body: bytes) -> None:
        if len(body) > self.max_bytes:
            return
        self._done[key] = (fingerprint, status, body)
        self._bytes += len(body)
        while len(self._done) > self.max_keys or self._bytes > self.max_bytes:
            _, (_, _, old) = self._done.popitem(last=False)
            self._bytes -= len(old)

    @staticmethod
    def _check(known: bytes, fingerprint: bytes, key: str) -> None:
        if known != fingerprint:
            raise IdempotencyConflictError(f"idempotency key {key!r} was sent before with another request")

    def __len__(self) -> int:
        return len(self._done)
