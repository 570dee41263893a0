"""Shared fixtures: one tiny random checkpoint and its ONNX export per test session.

The tests mirror the source packages: ``tests/runtime/`` tests ``runtime/editreward_rt/``,
``tests/runtime/families/qwen2_5_vl/`` the family folder, ``tests/export/trt/``
``export/editreward_trt/``, and so on (folders named without the ``editreward_`` prefix, so that
none shadows a package)."""

from __future__ import annotations

import atexit
import io
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from editreward_families.qwen2_5_vl.fixture import write_fixture
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the repository

# The suite checks every path against the float32 reference at the float32 tolerance, so the
# default precision is pinned to fp32 here (and in the CLIs and services the tests start); bf16 and
# ``auto`` are tested where named. Unpinned, ``auto`` is bf16 on a CPU with bf16 units.
os.environ.setdefault("EDITREWARD_PRECISION", "fp32")
# Engines' compiled-model caches (OpenVINO's, under $XDG_CACHE_HOME/editreward) go to a folder of
# this session's, not the user's cache.
# Removed as the session ends: one full run's caches take about 2 GB.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="editreward-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_onnx(tiny, tmp_path_factory):
    from editreward_export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "tiny-fp32"
    return export_onnx(str(tiny.checkpoint), out, prompts_from=str(tiny.prompts), log=lambda *_: None)


@pytest.fixture(scope="session")
def reference(tiny):
    from editreward_rt import Scorer

    return Scorer.load(tiny.checkpoint, backend="torch", mode="reference", prompts_from=tiny.prompts)


@pytest.fixture(scope="session")
def fast(tiny):
    from editreward_rt import Scorer

    return Scorer.load(tiny.checkpoint, backend="torch", mode="fast", prompts_from=tiny.prompts)


def random_image(seed: int, height: int, width: int) -> Image.Image:
    """Smooth random picture: gradients plus noise, so resizing changes real content."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / max(width, 1), yy / max(height, 1), (xx + yy) / max(width + height, 1)], axis=-1) * 200
    noise = rng.integers(0, 56, (height, width, 3))
    return Image.fromarray((base + noise).astype(np.uint8))


# (height, width) pairs: square, landscape, portrait, very wide, very tall, tiny.
SHAPES = [(300, 400), (512, 512), (640, 200), (90, 1400), (1500, 60), (20, 30), (1080, 1920)]


@pytest.fixture(scope="session")
def images():
    return [random_image(i, h, w) for i, (h, w) in enumerate(SHAPES)]


@pytest.fixture(scope="module")
def triples(images):
    """Three edits of one source and one unrelated triple, for quantized-variant parity."""
    return [("Add a green bowl", images[0], e) for e in images[1:4]] + [("Make it snow", images[4], images[5])]


def hidden_at_reward(scorer, triples):
    """The decoder states the heads read, captured on the way in (as float32: a bf16 torch run
    hands the heads bf16 tensors, which numpy cannot hold)."""
    graphs, seen = scorer.backend.graphs, []
    original = graphs.heads
    as_array = lambda h: np.asarray(h.float().cpu() if hasattr(h, "float") else h, dtype=np.float32)
    graphs.heads = lambda h: (seen.append(as_array(h)), original(h))[1]
    try:
        scores = scorer.score_batch(triples)
    finally:
        graphs.heads = original
    return np.concatenate(seen), scores


def save(image: Image.Image, folder: Path, name: str) -> Path:
    path = folder / name
    image.save(path)
    return path


def assert_same_score(got, want, tol: float = 1e-5) -> None:
    """Two Scores equal to float round-off: fused mu and log_sigma and every head."""
    assert abs(got.mu - want.mu) <= tol and abs(got.log_sigma - want.log_sigma) <= tol, (got, want)
    assert [h.name for h in got.heads] == [h.name for h in want.heads]
    for g, w in zip(got.heads, want.heads):
        assert abs(g.mu - w.mu) <= tol and abs(g.log_sigma - w.log_sigma) <= tol, (got, want)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVING_MODES = ("ray", "single-process")


class ServedURL(str):
    """A served base URL, with ``drain(app, timeout_s)``: the gateway's graceful stop, first step
    (503 to new requests, those in flight answered) -> requests still in flight at the timeout."""

    def __new__(cls, url: str, drain):
        self = super().__new__(cls, url)
        self.drain = drain
        return self


@contextmanager
def serving(apps: dict, mode: str = "ray"):
    """``apps`` ({name: (route, ServeConfig)}) served on a free loopback port -> its ``ServedURL``.
    ``ray``: Ray (2 CPUs) and Serve, one application per route. ``single-process``: each app's
    gateway and scorer replica in this process (``serve/local.py``, as ``editreward serve
    --single-process`` runs them), mounted at its route on one uvicorn server in a thread."""
    if mode == "single-process":
        with _serving_in_process(apps) as url:
            yield url
        return
    import ray
    from editreward_rt.serve.app import build_app, shutdown_app
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for name, (route, cfg) in apps.items():
            serve.run(build_app(cfg), name=name, route_prefix=route)
        yield ServedURL(f"http://127.0.0.1:{port}", shutdown_app)
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def _serving_in_process(apps: dict):
    import asyncio
    import threading

    import uvicorn
    from editreward_rt.serve.gateway import build_api
    from editreward_rt.serve.local import CancelOnDisconnect, gateway_for
    from starlette.applications import Starlette
    from starlette.routing import Mount

    gateways = {name: gateway_for(cfg) for name, (_, cfg) in apps.items()}
    routes = sorted(((route, build_api(gateways[name])) for name, (route, _) in apps.items()), key=lambda r: -len(r[0]))
    app = Starlette(routes=[Mount(route.rstrip("/"), app=CancelOnDisconnect(api)) for route, api in routes])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
        time.sleep(0.05)

    def drain(name: str, timeout_s: float) -> int:
        return asyncio.run_coroutine_threadsafe(gateways[name].drain(timeout_s), loop).result(timeout_s + 10)

    try:
        yield ServedURL(f"http://127.0.0.1:{port}", drain)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        loop.close()
