"""The gateway's guard on request bodies, an ASGI middleware in front of every route.

Ray's proxy hands a request to the gateway as soon as its headers arrive, and the gateway pulls
the body from the proxy chunk by chunk: a client that declares a large body and sends it a byte
at a time holds a gateway slot for as long as it likes. The guard gives every body a total
deadline (``Limits.body_timeout_s``; a typed 408 after it) and lets one client address read at
most ``Limits.max_client_body_reads`` bodies at once (a typed 429 above it), so a few slow
connections can neither hold a slot for long nor hold many. Its errors are ``EditRewardError``\\ s
raised from ``receive``: the route, or the app's handler for them, answers with the error body.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from starlette.responses import JSONResponse

from . import schemas as S


class BodyTimeoutError(S.ApiError):
    """The request body did not arrive within the body deadline."""

    kind = "body_timeout"
    status = 408


def _has_body(scope) -> bool:
    headers = dict(scope.get("headers", ()))
    declared = headers.get(b"content-length", b"0").strip()
    return b"transfer-encoding" in headers or not declared.isdigit() or int(declared) > 0


class BodyGuard:
    """The bodies each client is sending: one per gateway, handed to its app's middleware."""

    def __init__(self, limits: S.Limits):
        self.limits = limits
        self.reading: Counter[str] = Counter()  # client address -> bodies still arriving

    def admit(self, client: str) -> bool:
        if self.reading[client] >= self.limits.max_client_body_reads:
            return False
        self.reading[client] += 1
        return True

    def release(self, client: str) -> None:
        self.reading[client] -= 1
        if not self.reading[client]:
            del self.reading[client]


class BodyGuardMiddleware:

    def __init__(self, app, guard: BodyGuard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _has_body(scope):
            return await self.app(scope, receive, send)
        guard = self.guard
        client = (scope.get("client") or ("unknown",))[0]
        if not guard.admit(client):
            err = S.OverloadedError(f"this client already sends {guard.limits.max_client_body_reads} request bodies; "
                                    "retry when one has arrived")
            return await JSONResponse(S.error_body(err), status_code=err.status, headers={"Retry-After": "1"})(
                scope, receive, send)
        loop = asyncio.get_running_loop()
        timeout = guard.limits.body_timeout_s
        deadline = loop.time() + timeout
        reading = True

        def done() -> None:
            nonlocal reading
            if reading:
                reading = False
                guard.release(client)

        async def guarded_receive():
            if not reading:  # after the body: disconnect notices, which may come at any time
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                done()
                raise BodyTimeoutError(f"the request body did not arrive within {timeout:g} s") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                done()
            return message

        try:
            await self.app(scope, guarded_receive, send)
        finally:
            done()  # a route that never read its body
