"""Prometheus metrics of the HTTP gateway (one registry per gateway replica).

Every request passes through the single gateway replica, and every scorer replica reports
each fast-path batch back with its results, so this one registry sees the whole service:
request counts and latency by endpoint and status, errors by type, triples scored, and the
size of every batch the scorer replicas ran.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("editreward_requests", "HTTP requests by endpoint and status code",
                                ("endpoint", "status"), registry=r)
        self.latency = Histogram("editreward_request_latency_seconds", "HTTP request latency by endpoint",
                                 ("endpoint",), buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("editreward_errors", "errors by type, whole requests and single triples alike",
                              ("type",), registry=r)
        self.triples = Counter("editreward_triples", "triples by outcome", ("outcome",), registry=r)
        self.batch_size = Histogram("editreward_batch_size", "triples per fast-path batch on a scorer replica",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("editreward_batch_requests",
                                        "request chunks merged into one fast-path batch", buckets=BATCH_BUCKETS,
                                        registry=r)
        self.batch_seconds = Histogram("editreward_batch_seconds", "scorer time per fast-path batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("editreward_inflight_requests", "requests being handled by the gateway", registry=r)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def batch(self, size: int, n_requests: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_requests.observe(n_requests)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
