"""``editreward serve --single-process``: the gateway and one scorer replica in this process, on
uvicorn, with no Ray.

Under Ray Serve a request crosses three processes (Serve's HTTP proxy, the gateway replica, the
scorer replica), each hop pickling its payload, and Ray's own processes (GCS, raylet, the Serve
controller) run beside them. On a machine with one replica that is pure overhead, taken from the
cores that score. Here the same ``Gateway`` (``gateway.py``) calls the same ``ScorerReplica``
(``replica.py``) through ``LocalHandle``, which keeps Serve's queue bounds: ``max_ongoing``
requests in the replica at once, ``max_queued`` more waiting, and a typed 429 beyond. The event
loop parses requests; decoding runs on the replica's preprocessing threads and scoring on its
batcher's thread, so neither holds the loop.

Shutdown is the Ray service's: the first SIGINT or SIGTERM makes the gateway answer 503 (with
``Retry-After``) to new requests while those in flight are answered, up to
``graceful_shutdown_s``; then the server stops. A second signal stops it at once.
"""

from __future__ import annotations

import asyncio
import json
import sys

from .gateway import Gateway, ServeConfig, build_api
from .replica import ScorerReplica
from .schemas import OverloadedError


class _Method:
    def __init__(self, handle: LocalHandle, name: str):
        self.handle, self.name = handle, name

    def remote(self, *args, **kwargs) -> asyncio.Task:
        """The call as a task: awaitable, and cancellable as a Serve response is."""
        return asyncio.ensure_future(self.handle._call(self.name, args, kwargs))


class LocalHandle:
    """A ``ScorerReplica`` in this process behind the interface the gateway uses of Serve's
    ``DeploymentHandle``: ``handle.score.remote(...)`` and so on. At most ``max_ongoing`` calls
    run in the replica at once and ``max_queued`` wait; a call beyond those raises
    ``OverloadedError`` (the gateway's 429). ``ready`` is never queued."""

    def __init__(self, replica: ScorerReplica, max_ongoing: int, max_queued: int):
        self.replica = replica
        self.max_ongoing, self.max_queued = max_ongoing, max_queued
        self.ongoing = 0  # calls admitted: running or waiting for a slot
        self._slots: asyncio.Semaphore | None = None  # made on the serving loop

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_") or not callable(getattr(self.replica, name, None)):
            raise AttributeError(name)
        return _Method(self, name)

    async def _call(self, name: str, args: tuple, kwargs: dict):
        method = getattr(self.replica, name)
        if name == "ready":
            return method(*args, **kwargs)
        if self.ongoing >= self.max_ongoing + self.max_queued:
            raise OverloadedError("the scoring queue is full; retry later")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_ongoing)
        self.ongoing += 1
        try:
            async with self._slots:
                return await method(*args, **kwargs)
        finally:
            self.ongoing -= 1


def gateway_for(cfg: ServeConfig) -> Gateway:
    """Load the model (this blocks until the scorer is ready) and make the gateway in front of it."""
    if cfg.replicas != 1:
        raise ValueError(f"serving in one process runs one replica, not {cfg.replicas}")
    if cfg.max_queued < 0:
        raise ValueError("serving in one process bounds its queue: --max-queued must be 0 or more")
    handle = LocalHandle(ScorerReplica(*cfg.replica_args()), cfg.replica_ongoing, cfg.max_queued)
    return Gateway(handle, cfg.limits.to_dict(), cfg.token)


class CancelOnDisconnect:
    """ASGI middleware: once a request's body has arrived, a client that disconnects cancels its
    handler, as Serve's proxy does (uvicorn leaves the handler running). The gateway then withdraws
    the request's work from the replica (``Gateway._call``) and forgets its idempotency key, so
    a client that gave up (its own timeout below the service's) frees its queue slot at once."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        arrived = asyncio.Event()  # the whole body, or the client left while sending it

        async def tracked():
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                arrived.set()
            return message

        answered = False  # the response's last byte was sent: uvicorn's receive says disconnect from then on

        async def sending(message):
            nonlocal answered
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True

        handler = asyncio.ensure_future(self.app(scope, tracked, sending))

        async def watch() -> None:
            await arrived.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            if not answered:
                handler.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if not watcher.done():  # cancelled from outside (shutdown), not by the client leaving
                raise
        finally:
            watcher.cancel()


def serve_single_process(cfg: ServeConfig, host: str, port: int) -> int:
    """Serve until SIGINT or SIGTERM, then drain (see the module's doc); returns the exit code."""
    import uvicorn

    gateway = gateway_for(cfg)

    class Server(uvicorn.Server):
        left, loop = 0, None

        async def startup(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)
            if self.started:
                print(json.dumps({"serving": f"http://{host}:{port}", "replicas": 1, "threads": cfg.threads,
                                  "max_batch": cfg.max_batch, "single_process": True}), file=sys.stderr, flush=True)

        def handle_exit(self, sig, frame) -> None:
            # A signal handler, run in the main thread between two steps of the loop: set flags and
            # schedule, nothing that may be re-entered (no I/O).
            if gateway.draining:  # a second signal: stop now
                self.should_exit = self.force_exit = True
                return
            gateway.draining = True  # from here on, every new request gets a 503
            if self.loop is None:  # before the server started: nothing in flight
                self.should_exit = True
                return
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

        async def _drain(self) -> None:
            print("editreward serve: draining in-flight requests and shutting down", file=sys.stderr, flush=True)
            self.left = await gateway.drain(cfg.graceful_shutdown_s)
            self.should_exit = True

    config = uvicorn.Config(CancelOnDisconnect(build_api(gateway)), host=host, port=port, log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    server = Server(config)
    server.run()
    left = server.left if not server.force_exit else gateway.inflight
    if left > 0:
        print(f"editreward serve: {left} requests were still in flight at the deadline", file=sys.stderr)
    return 0 if server.started else 1


__all__ = ["CancelOnDisconnect", "LocalHandle", "gateway_for", "serve_single_process"]
