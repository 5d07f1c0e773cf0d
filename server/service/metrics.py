"""The front-end's Prometheus metrics (documented in the README's metrics table); the engine's are in
server/engine/metrics.py."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..engine.metrics import LATENCY_BUCKETS, STAGE_BUCKETS


class Metrics:
    """The front-end's metrics: HTTP answers, readiness, encoding, finish reasons. With `--engine thread`
    the engine's metrics (EngineMetrics) share this registry; with an engine process /metrics appends
    the engine's own exposition (the families do not overlap)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dit_requests", "HTTP generation requests answered, by status code", ["code"],
                                registry=r)
        self.request_duration = Histogram("dit_request_duration_seconds", "arrival to answer of /generate",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.queue_capacity = Gauge("dit_queue_capacity", "requests the queue holds at most (--max-queue)",
                                    registry=r)
        self.ready = Gauge("dit_ready", "1 once the model is loaded and warmed up, 0 before and while stopping",
                           registry=r)
        self.encode_duration = Histogram("dit_encode_duration_seconds", "encoding one request's images",
                                         buckets=STAGE_BUCKETS, registry=r)
        self.requests_finished = Counter(
            "dit_requests_finished", "requests ended, by reason: finished, cancelled (by the client), timed_out, "
            "rejected (queue full, overloaded, over the key's quota, not ready, invalid) or failed", ["reason"],
            registry=r)
        self.admitted = Counter("dit_requests_admitted", "requests accepted into the engine (not rejected at once)",
                                registry=r)
        self.images = Counter("dit_images_generated", "images returned to clients", registry=r)
        self.dataset_images = Counter("dit_dataset_images", "dataset images generated (POST /datasets)", registry=r)
        self.webhook_deliveries = Counter(
            "dit_webhook_deliveries", "webhook deliveries ended, by result: delivered, or undelivered (refused, "
            "or every try failed)", ["result"], registry=r)
        self.webhook_attempts = Counter(
            "dit_webhook_attempts", "webhook tries, by outcome: delivered, refused (a 3xx or 4xx), retryable_status "
            "(a 5xx or 429), timeout (past the try's deadline), network_error, error", ["outcome"], registry=r)
        self.connections = Gauge("dit_http_connections", "HTTP connections open (--max-connections at most)",
                                 registry=r)
        self.connections_closed = Counter(
            "dit_http_connections_closed", "connections the server closed, by reason: header_timeout (no request "
            "headers within --header-timeout), over_capacity (the one waiting longest, at --max-connections), "
            "refused (503: every connection in a request)", ["reason"], registry=r)
        self.engine_up = Gauge("dit_engine_up", "1 while the engine (process) is serving", registry=r)
