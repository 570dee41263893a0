"""`editreward serve` stopped by SIGTERM, as in a rolling restart: a real subprocess on loopback,
on Ray Serve and with ``--single-process``.

From the signal until the process exits, a client sees answers to requests already in flight,
typed 503s with Retry-After, and then a refused connection: never Ray's plain-text 404 of a
removed route, which a client takes for a permanent error. Bounded: the server has 120 s to
start, the probe loop runs until the process exits or 90 s pass.
"""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("ray")  # the serve extra is not installed
requests = pytest.importorskip("requests")

from conftest import free_port, png_bytes, random_image  # noqa: E402

EDITS = 32  # edits of the request in flight at the signal; at --max-batch 1 it outlasts the first probes
PROBERS = 4


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _wait_ready(proc: subprocess.Popen, url: str, log) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    pytest.fail("editreward serve did not become ready in 120 s:\n" + log.read_text())


@pytest.mark.parametrize("mode", [["--replicas", "1"], ["--single-process"]], ids=["ray", "single-process"])
def test_sigterm_answers_503_with_retry_after_never_404(tiny_onnx, tmp_path, mode):
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", "from editreward_rt.cli import main; raise SystemExit(main())", "serve",
               "--model", str(tiny_onnx), "--port", str(port), *mode, "--threads", "1",
               "--max-batch", "1", "--graceful-shutdown-s", "60"]
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=err, stderr=err)
    try:
        _wait_ready(proc, url, log)
        source = _b64(png_bytes(random_image(1, 48, 64)))
        edits = [_b64(png_bytes(random_image(500 + i, 40, 50))) for i in range(EDITS)]
        probe = {"instruction": "x", "source": source, "edited": edits[0]}
        in_flight = {}
        rank = threading.Thread(target=lambda: in_flight.setdefault("rank", requests.post(
            url + "/v1/rank", json={"instruction": "x", "source": source, "edits": edits}, timeout=120)))
        rank.start()
        time.sleep(0.3)  # the rank request has reached the scorer
        proc.send_signal(signal.SIGTERM)
        seen, stop_by = [], time.monotonic() + 90

        def probe_until_exit():  # several probers: one may wait in the scorer's queue while others arrive
            while proc.poll() is None and time.monotonic() < stop_by:
                try:
                    seen.append(requests.post(url + "/v1/score", json=probe, timeout=30))
                except requests.ConnectionError:  # the proxy has stopped: the process is about to exit
                    seen.append(None)
                    time.sleep(0.05)

        probers = [threading.Thread(target=probe_until_exit) for _ in range(PROBERS)]
        for t in probers:
            t.start()
        for t in [*probers, rank]:
            t.join(timeout=120)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert in_flight["rank"].status_code == 200 and "order" in in_flight["rank"].json()
    answered = [r for r in seen if r is not None]
    assert {r.status_code for r in answered} <= {200, 503}, [(r.status_code, r.text[:80]) for r in answered]
    refused = [r for r in answered if r.status_code == 503]
    assert refused, "no probe met the draining gateway"
    for r in refused:
        assert r.json()["error"]["type"] == "not_ready" and r.headers["Retry-After"] == "1"
