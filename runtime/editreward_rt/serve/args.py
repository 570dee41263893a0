"""Arguments of ``editreward serve`` and ``editreward batch``; importable without Ray."""

from __future__ import annotations

import os

from ..backends import names as backend_names


def add_serve_arguments(p) -> None:
    p.add_argument("--model", required=True, help="exported model folder (or checkpoint for --backend torch)")
    p.add_argument("--backend", choices=backend_names(), help="default: for a float ONNX folder on a CPU the fastest engine installed "
                   "(backends.cpu_engine), else the runtime the folder names")
    p.add_argument("--device", default="cpu", help="cpu or cuda; with cuda each replica takes one GPU")
    p.add_argument("--replicas", type=int, help="default: one per GPU, or one per --threads CPU cores")
    p.add_argument("--threads", type=int,
                   help="CPU threads (and Ray CPUs) per replica; default 4, capped at the cluster's CPUs")
    p.add_argument("--max-batch", type=int,
                   help="triples per fast-path call and most merged from concurrent requests (default: the device's "
                        "per-call default, backends.default_max_batch, merging up to batching.MERGE_WIDTH)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long a batch collects requests after its first one arrives")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--token", default=os.environ.get("EDITREWARD_TOKEN"),
                   help="bearer token the JSON routes (/v1/*, UniRL /score) require; default $EDITREWARD_TOKEN, none: open")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--single-process", action="store_true",
                   help="no Ray: the gateway and one scorer replica in this process on uvicorn (default threads: every "
                        "CPU this process may use). The least overhead for one replica on one machine; no --replicas "
                        "above 1, no --address")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (413 above)")
    p.add_argument("--max-image-pixels", type=int, default=25_000_000, help="largest decoded image (422 above)")
    p.add_argument("--max-request-pixels", type=int, default=200_000_000,
                   help="decoded pixels of all images in one request, read from their headers (413 above)")
    p.add_argument("--max-instruction-chars", type=int, default=2000)
    p.add_argument("--max-triples", type=int, default=64, help="triples per /v1/score request, edits per /v1/rank")
    p.add_argument("--request-timeout-s", type=float, default=60.0, help="per request (504 after)")
    p.add_argument("--body-timeout-s", type=float, default=10.0,
                   help="for a request body to arrive, from the end of its headers to its last byte (408 after)")
    p.add_argument("--max-client-bodies", type=int, default=32,
                   help="request bodies one client address may send at once (429 above): slow senders cannot "
                        "hold every gateway slot")
    p.add_argument("--max-ongoing", type=int,
                   help="requests in flight per replica (default 2 x the batch width: --max-batch, or batching.MERGE_WIDTH)")
    p.add_argument("--max-queued", type=int, default=64, help="requests waiting for a replica; more get 429")
    p.add_argument("--graceful-shutdown-s", type=float, default=30.0,
                   help="how long shutdown waits for in-flight requests")


def add_batch_arguments(p) -> None:
    p.add_argument("--model", required=True, help="exported model folder (or checkpoint for --backend torch)")
    p.add_argument("--input", required=True, help="JSONL or Parquet of instruction/source/edited; paths relative to it")
    p.add_argument("--output", required=True, help="Parquet folder of results; an existing one is resumed")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--backend", choices=backend_names())
    p.add_argument("--device", default="cpu", help="cpu or cuda; with cuda each scoring actor takes one GPU")
    p.add_argument("--threads", type=int, help="CPU threads (and Ray CPUs) per scoring actor (default 1 on a CPU)")
    p.add_argument("--max-batch", type=int,
                   help="triples per fast-path call and rows per actor call (default: the device's per-call "
                        "default, backends.default_max_batch, with batching.MERGE_WIDTH rows per actor call)")
    p.add_argument("--concurrency", type=int, default=1, help="scoring actors")
    p.add_argument("--max-image-pixels", type=int, help="largest decoded image (an error record above)")
    p.add_argument("--part-rows", type=int, default=256, help="input rows per block (and so per output part)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
