"""Serving benchmark: Ray Serve over loopback HTTP against in-process scoring of the same model.

For each ``--max-batch`` value the service is deployed on a local Ray and loaded by
``--clients`` threads that each send ``--requests`` one-triple ``POST /v1/score`` requests
(bounded in count and by ``--deadline-s``, loopback only). In-process baselines on the same
model and thread count run first, before Ray starts: one ``Scorer.score`` call at a time
(latency), and ``Scorer.score_batch`` over chunks of each ``--max-batch`` (throughput).
Prints a table and writes JSON (``--out``).

    python benchmarks/serve_bench.py --model DIR --clients 16 --requests 8 --max-batch 1,8
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .common import free_port


def _png(seed: int, height: int, width: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], axis=-1) * 200
    buf = io.BytesIO()
    Image.fromarray((base + rng.integers(0, 56, (height, width, 3))).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_triples(n: int, height: int, width: int) -> list[tuple[str, bytes, bytes]]:
    """``n`` distinct triples over n // 4 + 1 sources (several edits per source, as in practice)."""
    sources = [_png(1000 + i, height, width) for i in range(n // 4 + 1)]
    return [(["make the sky pink", "add a red hat", "remove the car"][i % 3], sources[i // 4], _png(i, height, width))
            for i in range(n)]


def stats(latencies: list[float], wall: float) -> dict:
    lat = np.asarray(latencies) * 1000.0
    return {"requests": len(lat), "wall_s": round(wall, 3), "throughput_rps": round(len(lat) / wall, 3),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "mean_ms": round(float(lat.mean()), 2)}


def in_process(model: str, threads: int, triples: list, batches: list[int]) -> dict:
    from editreward_rt import Scorer

    scorer = Scorer.load(model, threads=threads, max_batch=max(batches))
    scorer.score(*triples[0])  # warm-up
    lat, start = [], time.perf_counter()
    for t in triples:
        t0 = time.perf_counter()
        scorer.score(*t)
        lat.append(time.perf_counter() - t0)
    out = {"single": stats(lat, time.perf_counter() - start)}
    for b in batches:
        scorer.max_batch = b
        start = time.perf_counter()
        for s in range(0, len(triples), b):
            scorer.score_batch(triples[s : s + b])
        wall = time.perf_counter() - start
        out[f"score_batch_{b}"] = {"requests": len(triples), "wall_s": round(wall, 3),
                                   "throughput_rps": round(len(triples) / wall, 3)}
    return out


def _histogram(url: str, name: str) -> tuple[float, float]:
    import requests

    count = total = 0.0
    for line in requests.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "_count"):
            count = float(line.split()[-1])
        elif line.startswith(name + "_sum"):
            total = float(line.split()[-1])
    return count, total


def load(url: str, payloads: list[dict], clients: int, per_client: int, deadline_s: float) -> dict:
    import requests

    stop_at = time.monotonic() + deadline_s

    def client(k: int) -> tuple[list[float], int]:
        session, lat, failed = requests.Session(), [], 0
        for j in range(per_client):
            if time.monotonic() > stop_at:
                break
            t0 = time.perf_counter()
            r = session.post(url + "/v1/score", json=payloads[(k * per_client + j) % len(payloads)], timeout=120)
            if r.status_code == 200:
                lat.append(time.perf_counter() - t0)
            else:
                failed += 1
        return lat, failed

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(client, range(clients)))
    out = stats([x for lat, _ in parts for x in lat], time.perf_counter() - start)
    out["failed"] = sum(f for _, f in parts)
    return out


def served(args, triples: list, batches: list[int]) -> dict:
    import ray
    from editreward_rt.serve.app import ServeConfig, build_app
    from ray import serve

    payloads = [{"instruction": i, "source": base64.b64encode(s).decode(), "edited": base64.b64encode(e).decode()}
                for i, s, e in triples]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url, out = f"http://127.0.0.1:{port}", {}
    try:
        for b in batches:
            cfg = ServeConfig(model=args.model, threads=args.threads, replicas=args.replicas, max_batch=b,
                              batch_wait_ms=args.batch_wait_ms, max_ongoing=max(2 * b, args.clients),
                              max_queued=4 * args.clients)
            serve.run(build_app(cfg), name="bench", route_prefix="/")
            load(url, payloads[:2], 2, 1, 60)  # warm-up
            c0, s0 = _histogram(url, "editreward_batch_size")
            res = load(url, payloads, args.clients, args.requests, args.deadline_s)
            c1, s1 = _histogram(url, "editreward_batch_size")
            res["mean_batch"] = round((s1 - s0) / max(c1 - c0, 1), 2)
            out[f"serve_max_batch_{b}"] = res
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported (ONNX) model folder")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--max-batch", default="1,8", help="comma-separated values to compare")
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1, help="threads per replica and for the in-process baseline")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--image", default="256x320", help="HxW of the generated PNGs")
    p.add_argument("--deadline-s", type=float, default=300.0, help="stop sending after this long")
    p.add_argument("--out", default="serve_bench.json")
    args = p.parse_args(argv)
    batches = [int(x) for x in args.max_batch.split(",")]
    height, width = (int(x) for x in args.image.split("x"))
    triples = make_triples(min(args.clients * args.requests, 64), height, width)

    results = {"in_process": in_process(args.model, args.threads, triples, batches)}
    results.update(served(args, triples, batches))
    try:
        from editreward_bench.common import environment

        env = environment()
    except ImportError:
        env = {"cpu_count": os.cpu_count()}
    report = {"config": {k: getattr(args, k) for k in ("model", "clients", "requests", "max_batch", "batch_wait_ms",
                                                       "threads", "replicas", "image")},
              "environment": env, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")

    rows = [("in-process score() one at a time", results["in_process"]["single"])]
    rows += [(f"in-process score_batch({b})", results["in_process"][f"score_batch_{b}"]) for b in batches]
    rows += [(f"serve --max-batch {b} ({args.clients} clients)", results[f"serve_max_batch_{b}"]) for b in batches]
    print(f"{'variant':44} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10} {'n':>5} {'failed':>6}")
    for name, r in rows:
        print(f"{name:44} {r['throughput_rps']:8.2f} {r.get('p50_ms', float('nan')):8.1f} "
              f"{r.get('p99_ms', float('nan')):8.1f} {r.get('mean_batch', float('nan')):10.2f} {r['requests']:5d} "
              f"{r.get('failed', 0):6d}")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
