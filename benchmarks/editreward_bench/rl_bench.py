"""python benchmarks/rl_bench.py: EditReward as an RL reward. P prompts x G edits arrive from K
producer threads (rollout workers); each producer asks for its prompts' rewards. Methods:

- ``reference-serial``: upstream-style, the torch reference mode, one triple per call;
- ``score``: ``Scorer.score`` one triple per call on the fast path (callers serialised by its lock);
- ``batching``: ``BatchingScorer``, every producer's triples merged into batches;
- ``score-groups``: ``Scorer.score_groups``, one call per prompt (its source encoded once).

With ``--http``, the trainers' protocols against a local ``editreward serve`` on loopback, same
model and threads, served each way (``--serve-modes``): on Ray Serve, and with
``--single-process`` (rows suffixed ``@single-process``): ``http-unirl`` (UniRL's ``POST /score``,
one request per prompt's edits) and ``http-edit-r1`` (Edit-R1's pickled ``POST
/mode/logits_non_cot``). Each HTTP row's ``vs_score_groups`` is its throughput over in-process
``score-groups`` in the same run. Images are encoded to PNG before timing (the trainer's own
cost); building and parsing the bodies is timed.

Parity comes first: every method's scores must equal ``Scorer.score`` (the reference within its
tolerance) before anything is timed. Reports throughput (edits/s), p50/p99 latency per edit
(from the producer's request to its reward) and the mean triples per backend call.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from editreward_rt.hardware import usable_cpus

from .common import (
    ensure_fixture,
    free_port,
    results_document,
    serve_cli,
    synthetic_groups,
    tolerance_key,
    write_document,
)

METHODS = ("reference-serial", "score", "batching", "score-groups")
HTTP_METHODS = ("http-unirl", "http-edit-r1")


@contextmanager
def counting_calls(scorer):
    """Counts the backend calls and triples while the body runs: {"calls", "triples"}."""
    counts, backend = {"calls": 0, "triples": 0}, scorer.backend
    original = backend.head_outputs

    def counted(triples, *args, **kwargs):
        counts["calls"] += 1
        counts["triples"] += len(triples)
        return original(triples, *args, **kwargs)

    backend.head_outputs = counted
    try:
        yield counts
    finally:
        del backend.head_outputs  # the instance attribute goes; the class's method shows again


def produce(groups: list, producers: int, work) -> tuple[list, float]:
    """Each producer thread takes every ``producers``-th group; ``work(group) -> [(latency_s, Score)]``.
    -> (per group, its edits' (latency, score) in order), and the wall time."""
    out = [None] * len(groups)

    def run(k: int) -> None:
        for g in range(k, len(groups), producers):
            out[g] = work(groups[g])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(producers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, time.perf_counter() - start


def serial_work(scorer):
    def work(group):
        instruction, source, edits = group
        out = []
        for edit in edits:
            t0 = time.perf_counter()
            score = scorer.score(instruction, source, edit)
            out.append((time.perf_counter() - t0, score))
        return out
    return work


def groups_work(scorer):
    def work(group):
        t0 = time.perf_counter()
        scores = scorer.score_groups([group])[0]
        return [(time.perf_counter() - t0, s) for s in scores]
    return work


def batching_work(batcher):
    def work(group):
        instruction, source, edits = group
        t0 = time.perf_counter()
        done = [None] * len(edits)
        futures = [batcher.submit(instruction, source, e) for e in edits]
        for i, f in enumerate(futures):
            f.add_done_callback(lambda _, i=i: done.__setitem__(i, time.perf_counter()))
        scores = [f.result() for f in futures]
        return [(end - t0, s) for end, s in zip(done, scores)]
    return work


def run_method(method: str, fast, reference, groups: list, producers: int, max_wait_ms: float) -> tuple[dict, list]:
    """One method over the whole workload -> (its row, its scores in workload order)."""
    from editreward_rt import BatchingScorer

    scorer = reference if method == "reference-serial" else fast
    with counting_calls(scorer) as counts:
        if method == "batching":
            batcher = BatchingScorer(fast, max_wait_ms=max_wait_ms)
            try:
                per_group, wall = produce(groups, producers, batching_work(batcher))
            finally:
                batcher.close()
        else:
            work = groups_work(fast) if method == "score-groups" else serial_work(scorer)
            per_group, wall = produce(groups, producers, work)
    flat = [pair for part in per_group for pair in part]
    ms = 1000.0 * np.array([latency for latency, _ in flat])
    # n beside the figures: the percentiles are over every edit's latency, the rate over one timed run of them all.
    row = {"variant": method, "status": "ok", "edits": len(flat), "wall_s": wall, "edits_per_s": len(flat) / wall,
           "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n_latencies": len(flat),
           "n_runs": 1, "mean_batch": counts["triples"] / max(counts["calls"], 1), "backend_calls": counts["calls"]}
    return row, [score for _, score in flat]


def parity(fast, reference, groups: list, tolerance) -> dict:
    """Each method's scores on the first group against ``Scorer.score``: max |d mu|, |d log_sigma|.
    Batched methods are held to the batch-shape bound of the precision the fast path runs in."""
    from editreward_rt import BatchingScorer
    from editreward_rt.tolerances import batch_shape_tolerance

    probe = groups[:1]
    want = [fast.score(probe[0][0], probe[0][1], e) for e in probe[0][2]]
    got = {"score-groups": fast.score_groups(probe)[0]}
    with BatchingScorer(fast, max_wait_ms=50) as batcher:
        got["batching"] = [f.result() for f in [batcher.submit(probe[0][0], probe[0][1], e) for e in probe[0][2]]]
    if reference is not None:
        got["reference-serial"] = [reference.score(probe[0][0], probe[0][1], e) for e in probe[0][2]]
    description = fast.description
    batched = batch_shape_tolerance(*tolerance_key(description))
    out = {}
    for method, scores in got.items():
        limit = tolerance if method == "reference-serial" else batched
        d_mu = max(abs(a.mu - b.mu) for a, b in zip(scores, want))
        d_ls = max(abs(a.log_sigma - b.log_sigma) for a, b in zip(scores, want))
        out[method] = {"max_abs_mu": d_mu, "max_abs_log_sigma": d_ls, "limit": limit, "passed": max(d_mu, d_ls) <= limit}
    return out


def bench(fast, reference, groups: list, producers: int, max_wait_ms: float, methods=METHODS, tolerance: float = 1e-4) -> list:
    """Parity, then each method timed. A method off parity is timed too and labelled ``failed-parity``:
    its speed is still a finding, and a row that vanishes hides what went wrong."""
    fast.score(groups[0][0], groups[0][1], groups[0][2][0])  # warm-up: first-use allocations
    checks = parity(fast, reference if "reference-serial" in methods else None, groups, tolerance)
    rows = []
    for method in methods:
        check = checks.get(method, {"passed": True})
        row, _ = run_method(method, fast, reference, groups, producers, max_wait_ms)
        rows.append({**row, "status": "ok" if check["passed"] else "failed-parity", "parity": check})
    return rows


def workload(prompts: int, edits: int, seed: int = 0, size: tuple[int, int] | None = None) -> list:
    """P (instruction, source, [G edits]) groups of synthetic photos (``size``: HxW crop, for speed)."""
    groups = synthetic_groups(prompts, edits, seed=seed)
    if size is None:
        return groups
    h, w = size
    return [(i, s[:h, :w], [e[:h, :w] for e in es]) for i, s, es in groups]


def gpu_rows(ckpt, device: str, dtype_name: str, prompts: int = 8, edits: int = 8, producers: int = 4,
             compile: str | None = None) -> list:
    """The GPU matrix's RL rows (the issue's RL workload: 8 prompts x 8 edits): the torch fast path
    on its in-memory checkpoint (the matrix times the reference itself), its decoder compiled in
    mode ``compile`` if given (rows ``rl-compiled-*``). A failure (out of memory, say) is a row, so
    the matrix keeps its others."""
    from editreward_rt.backends.torch_backend import TorchBackend
    from editreward_rt.scorer import Scorer

    prefix = "rl-compiled" if compile else "rl"
    try:
        fast = Scorer(TorchBackend(ckpt, mode="fast", device=device, dtype=dtype_name, compile=compile), ckpt, max_batch=8)
        if hasattr(ckpt, "release_weights"):  # the modules hold the weights now; the drawn copy goes
            ckpt.release_weights()
        run = lambda: bench(fast, None, workload(prompts, edits), producers, max_wait_ms=10.0,  # noqa: E731
                            methods=("score", "batching", "score-groups"))
        # One untimed pass first, eager or compiled alike: each shape's first-use work (kernel
        # selection, allocations; compiling, CUDA-graph recording) is not what a training step pays.
        run()
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        rows = run()
        if compile:  # batches form by timing, so the timed pass may meet a shape the first did not: say so
            rows = [{**row, "graphs_compiled_while_timed": counters["stats"]["unique_graphs"] - before} for row in rows]
    except Exception as exc:
        return [{"variant": prefix, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"}]
    return [{**row, "variant": f"{prefix}-{row['variant']}"} for row in rows]


# ---------------------------------------------------------------- the trainers' protocols over HTTP


def _post(url: str, body: bytes, ctype: str | None) -> bytes:
    import urllib.request

    request = urllib.request.Request(url, body, {"Content-Type": ctype} if ctype else {}, method="POST")
    with urllib.request.urlopen(request, timeout=300) as response:
        return response.read()


def http_work(url: str, method: str):
    """A producer's call for one prompt's edits, as the trainer's client makes it -> its mu, each edit's."""
    import base64
    import json
    import pickle

    def work(group):
        instruction, source, edits = group  # source and edits: PNG bytes
        t0 = time.perf_counter()
        if method == "http-unirl":
            b64 = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
            body = {"requests": [{"history": [{"text": instruction, "image_b64": b64(source)},
                                              {"text": instruction, "image_b64": b64(e)}],
                                  "required_rewards": ["editreward"]} for e in edits]}
            answer = json.loads(_post(url + "/score", json.dumps(body).encode(), "application/json"))
            mus = [r["editreward"]["overall"] for r in answer["results"]]
        else:
            body = pickle.dumps({"ref_images": [source] * len(edits), "images": list(edits),
                                 "prompts": [instruction] * len(edits), "metadatas": [{}] * len(edits)})
            mus = pickle.loads(_post(url + "/mode/logits_non_cot", body, None))["scores"]
        return [(time.perf_counter() - t0, mu) for mu in mus]
    return work


def _batch_totals(url: str) -> tuple[float, float]:
    """The service's fast-path batches so far: (count, triples), from its /metrics."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
        lines = response.read().decode().splitlines()
    value = lambda name: sum(float(x.split()[-1]) for x in lines if x.startswith(name))  # noqa: E731
    return value("editreward_batch_size_count"), value("editreward_batch_size_sum")


SERVE_MODES = ("ray", "single-process")


@contextmanager
def _ray_service(cfg):
    """``cfg`` on Ray Serve (as ``editreward serve`` runs it) on a free loopback port -> (the base
    URL, None), as ``common.serve_cli`` gives (URL, its process)."""
    import ray
    from editreward_rt.serve.app import build_app
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg), name="rl-bench", route_prefix="/")
        yield f"http://127.0.0.1:{port}", None
    finally:
        serve.shutdown()
        ray.shutdown()


def http_rows(fast, model: str, groups: list, producers: int, max_batch: int, max_wait_ms: float, threads: int | None,
              tolerance: float, modes=SERVE_MODES) -> list:
    """Each protocol over loopback HTTP against each way of serving (``ray``: Ray Serve; rows
    ``http-unirl``, ``http-edit-r1``; ``single-process``: ``editreward serve --single-process``,
    rows suffixed ``@single-process``): parity of every edit against ``fast.score`` on the same
    images first, then the timed run (the rows' ``mean_batch`` is the service's, from /metrics)."""
    from editreward_rt.images import encode_png
    from editreward_rt.serve.gateway import ServeConfig

    encoded = [(i, encode_png(s), [encode_png(e) for e in es]) for i, s, es in groups]
    want = [fast.score(i, s, e).mu for i, s, es in groups for e in es]
    threads = threads or usable_cpus()  # one figure for both ways (each has its own default)
    rows = []
    for mode in modes:
        if mode == "ray":
            cfg = ServeConfig(model=model, threads=threads, max_batch=max_batch, batch_wait_ms=max_wait_ms)
            service, suffix = _ray_service(cfg), ""
        else:
            service, suffix = serve_cli(model, ["--single-process", "--max-batch", str(max_batch), "--batch-wait-ms",
                                                str(max_wait_ms), "--threads", str(threads)]), "@" + mode
        with service as (url, _):
            for method in HTTP_METHODS:
                http_work(url, method)(encoded[0])  # warm-up
                before = _batch_totals(url)
                per_group, wall = produce(encoded, producers, http_work(url, method))
                calls, triples = (b - a for a, b in zip(before, _batch_totals(url)))
                flat = [pair for part in per_group for pair in part]
                d_mu = max(abs(mu - w) for (_, mu), w in zip(flat, want))
                ms = 1000.0 * np.array([latency for latency, _ in flat])
                rows.append({"variant": method + suffix, "status": "ok" if d_mu <= tolerance else "failed-parity",
                             "edits": len(flat), "wall_s": wall, "edits_per_s": len(flat) / wall,
                             "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                             "n_latencies": len(flat), "n_runs": 1, "mean_batch": triples / max(calls, 1),
                             "backend_calls": calls,
                             "parity": {"max_abs_mu": d_mu, "limit": tolerance, "passed": d_mu <= tolerance}})
    return rows


def with_ratios(rows: list) -> list:
    """HTTP rows get ``vs_score_groups``: their throughput over in-process ``score-groups``'s, same run."""
    base = next((r["edits_per_s"] for r in rows if r["variant"] == "score-groups" and "edits_per_s" in r), None)
    if base is None:
        return rows
    return [{**r, "vs_score_groups": r["edits_per_s"] / base} if r["variant"].startswith("http-") and "edits_per_s" in r
            else r for r in rows]


def summary_line(row: dict) -> str:
    if "edits_per_s" not in row:
        return f"{row['variant']:<18} {row['status']}: {row.get('reason') or row.get('parity')}"
    return (f"{row['variant']:<18} {row['edits_per_s']:8.2f} edits/s  p50 {row['p50_ms']:8.1f} ms  "
            f"p99 {row['p99_ms']:8.1f} ms (n {row['n_latencies']})  mean batch {row['mean_batch']:5.2f}  {row['status']}"
            + (f"  {row['vs_score_groups']:.2f}x score-groups" if "vs_score_groups" in row else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", choices=("tiny", "small"), default="small")
    parser.add_argument("--workdir", default="results/work", help="where the generated fixture and its export are kept")
    parser.add_argument("--prompts", type=int, default=4, help="P: prompts (sources) per step")
    parser.add_argument("--edits", type=int, default=8, help="G: edits per prompt")
    parser.add_argument("--producers", type=int, default=4, help="K: producer threads")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, help="scorer threads")
    parser.add_argument("--image", default=None, help="HxW crop of the synthetic photos (default: full photos)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--http", action="store_true",
                        help="also time the trainers' protocols against a local editreward serve (serve extra)")
    parser.add_argument("--serve-modes", nargs="+", choices=SERVE_MODES, default=list(SERVE_MODES),
                        help="with --http: the ways of serving to time (Ray Serve, editreward serve --single-process)")
    parser.add_argument("--out", default="results/rl.json")
    args = parser.parse_args(argv)
    from editreward_rt import Scorer

    paths = ensure_fixture(Path(args.workdir), args.fixture)
    fast = Scorer.load(paths["onnx"], threads=args.threads, max_batch=args.max_batch)
    reference = None
    if "reference-serial" in args.methods:
        reference = Scorer.load(paths["ckpt"], backend="torch", mode="reference", prompts_from=paths["prompts_from"],
                                threads=args.threads, dtype="float32")
    size = tuple(int(x) for x in args.image.split("x")) if args.image else None
    groups = workload(args.prompts, args.edits, size=size)
    from editreward_rt.tolerances import tolerance

    tol = tolerance("onnxruntime", "float32")
    rows = bench(fast, reference, groups, args.producers, args.max_wait_ms, args.methods, max(tol.mu, tol.log_sigma))
    if args.http:
        from editreward_rt.tolerances import batch_shape_tolerance

        rows += http_rows(fast, str(paths["onnx"]), groups, args.producers, args.max_batch, args.max_wait_ms, args.threads,
                          batch_shape_tolerance(*tolerance_key(fast.description)), args.serve_modes)
        rows = with_ratios(rows)
    config = {k: getattr(args, k) for k in ("fixture", "prompts", "edits", "producers", "max_batch", "max_wait_ms",
                                            "threads", "image", "http", "serve_modes")}
    path = write_document(results_document("rl", config, rows, "cpu"), args.out)
    for row in rows:
        print(summary_line(row))
    print(f"wrote {path}", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in rows) else 1
