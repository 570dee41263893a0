"""``editreward serve`` and ``editreward batch``: the entry points ``cli.py`` calls once what they
need is known to be installed: Ray, or for ``serve --single-process`` FastAPI and uvicorn alone
(their arguments are in ``args.py``, which needs neither)."""

from __future__ import annotations

import json
import signal
import sys
import threading

from . import require_ray


def _ray_init(ray, address: str | None) -> bool:
    """Connect to ``address`` or start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)
    return True


def _placement(ray, device: str, replicas: int | None, threads: int | None) -> tuple[int, int]:
    """Default replica count and threads per replica from what the cluster has."""
    res = ray.cluster_resources()
    cpus = max(1, int(res.get("CPU", 1)))
    if device.startswith("cuda"):  # CPU threads only where asked: a GPU-only backend takes none
        return replicas or max(1, int(res.get("GPU", 0))), threads
    if replicas and not threads:
        threads = max(1, cpus // replicas)
    threads = min(threads or 4, cpus)
    return replicas or max(1, cpus // threads), threads


def serve_config(args, replicas: int, threads: int | None):
    """``editreward serve``'s arguments -> the ServeConfig both ways of serving take."""
    from .gateway import ServeConfig
    from .schemas import Limits

    limits = Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_image_pixels=args.max_image_pixels,
                    max_request_pixels=args.max_request_pixels,
                    max_instruction_chars=args.max_instruction_chars, max_triples=args.max_triples,
                    request_timeout_s=args.request_timeout_s, body_timeout_s=args.body_timeout_s,
                    max_client_body_reads=args.max_client_bodies)
    return ServeConfig(model=args.model, backend=args.backend, device=args.device, replicas=replicas, threads=threads,
                       max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_ongoing=args.max_ongoing,
                       max_queued=args.max_queued, graceful_shutdown_s=args.graceful_shutdown_s, limits=limits,
                       backend_options=dict(args.backend_option), precision=args.precision, token=args.token)


def _serve_single_process(args) -> int:
    from .local import serve_single_process

    if (args.replicas or 1) != 1 or args.address:
        print("editreward serve: --single-process runs one replica in this process: drop --replicas and --address, "
              "or serve on Ray", file=sys.stderr)
        return 2
    threads = args.threads
    if threads is None and not args.device.startswith("cuda"):  # a GPU-only backend takes no CPU threads
        from ..hardware import usable_cpus

        threads = usable_cpus()
    return serve_single_process(serve_config(args, 1, threads), args.host, args.port)


def cmd_serve(args) -> int:
    if args.single_process:
        return _serve_single_process(args)
    ray = require_ray()
    from ray import serve

    from .app import build_app, shutdown_app

    started = _ray_init(ray, args.address)
    replicas, threads = _placement(ray, args.device, args.replicas, args.threads)
    cfg = serve_config(args, replicas, threads)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": args.host, "port": args.port,
                              # past the gateway's own deadlines (body, then scoring): its typed
                              # 408 and 504 come first, never the proxy's plain-text 408
                              "request_timeout_s": args.body_timeout_s + args.request_timeout_s + 10})
    serve.run(build_app(cfg), name="editreward", route_prefix="/", blocking=False)
    print(json.dumps({"serving": f"http://{args.host}:{args.port}", "replicas": replicas, "threads": threads,
                      "max_batch": args.max_batch}), file=sys.stderr, flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        print("editreward serve: draining in-flight requests and shutting down", file=sys.stderr, flush=True)
        # Drain while the HTTP proxy and every replica still run: in-flight requests are answered
        # (up to --graceful-shutdown-s), new ones get 503; only then stop Serve itself, which stops
        # the proxy in the step that removes the routes (so no request meets a missing route).
        left = shutdown_app("editreward", args.graceful_shutdown_s)
        if left > 0:
            print(f"editreward serve: {left} requests were still in flight at the deadline", file=sys.stderr)
        serve.shutdown()
        if started:
            ray.shutdown()
    return 0


def cmd_batch(args) -> int:
    ray = require_ray()
    from .batch import BatchConfig, run_batch

    started = _ray_init(ray, args.address)
    try:
        # One CPU thread per actor on a CPU unless asked (actors run side by side); none on a GPU.
        threads = args.threads or (None if args.device.startswith("cuda") else 1)
        cfg = BatchConfig(model=args.model, backend=args.backend, device=args.device, threads=threads,
                          max_batch=args.max_batch, concurrency=args.concurrency,
                          backend_options=dict(args.backend_option), precision=args.precision,
                          max_input_pixels=args.max_image_pixels, part_rows=args.part_rows,
                          progress=not args.no_progress)
        counts = run_batch(cfg, args.input, args.output)
    finally:
        if started:
            ray.shutdown()
    print(json.dumps(counts), file=sys.stderr)
    return 0
