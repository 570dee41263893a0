"""The Ray Serve application: one gateway replica (``gateway.py``, built in its own process by
Serve's late-bound ingress) in front of N scorer replicas (``replica.py``). Queue bounds are
Serve's: ``max_ongoing_requests`` per scorer replica and ``max_queued_requests`` at the gateway's
handle, whose overflow (Serve's ``BackPressureError``) the gateway answers with a typed 429. For
one replica on one machine, ``local.py`` serves the same gateway and replica in one process.
"""

from __future__ import annotations

import logging

from ray import serve

from .gateway import Gateway, ServeConfig
from .replica import ScorerReplica

log = logging.getLogger("ray.serve")

GatewayDeployment = serve.deployment(serve.ingress()(Gateway), name="EditRewardGateway")
ScorerDeployment = serve.deployment(ScorerReplica, name="EditRewardScorer")


def replica_resources(device: str, threads: int | None) -> dict:
    if device.startswith("cuda"):
        return {"num_gpus": 1, "num_cpus": max(1, threads or 1)}
    return {"num_cpus": max(1, threads or 1)}


def build_app(cfg: ServeConfig):
    """The bound Serve application for ``serve.run``."""
    shutdown = {"graceful_shutdown_timeout_s": cfg.graceful_shutdown_s, "graceful_shutdown_wait_loop_s": 0.5}
    scorer = ScorerDeployment.options(
        num_replicas=cfg.replicas,
        ray_actor_options=replica_resources(cfg.device, cfg.threads),
        max_ongoing_requests=cfg.replica_ongoing,
        max_queued_requests=cfg.max_queued,
        **shutdown,
    ).bind(*cfg.replica_args())
    # One gateway sees every request, so /metrics covers the whole service. Its own bounds sit
    # above the scorer's, so overflow is answered by the gateway's typed 429 first.
    ongoing = cfg.replicas * cfg.replica_ongoing + cfg.max_queued + 16
    gateway = GatewayDeployment.options(
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=ongoing,
        max_queued_requests=ongoing,
        backpressure_config={"status_code": 429, "retry_after_s": 1},
        **shutdown,
    )
    return gateway.bind(scorer, cfg.limits.to_dict(), cfg.token)


def shutdown_app(name: str, timeout_s: float) -> int:
    """Graceful stop, first step: the gateway answers every new request with a 503 (and
    ``Retry-After``) and answers those in flight while every scorer replica is still up. Returns
    requests left unanswered. The application is not deleted: a deleted route makes Ray's proxy
    answer a plain-text 404 until the proxy stops, which a client takes for a permanent error.
    The caller ends with ``serve.shutdown()``, which stops the proxies as it deletes the routes."""
    gateway = serve.get_deployment_handle("EditRewardGateway", app_name=name)
    try:
        return gateway.drain.remote(timeout_s).result(timeout_s=timeout_s + 10)
    except Exception:  # the gateway is gone already: nothing to drain
        log.warning("could not drain the gateway of %s", name, exc_info=True)
        return -1


__all__ = ["GatewayDeployment", "ScorerDeployment", "ServeConfig", "build_app", "replica_resources", "shutdown_app"]
