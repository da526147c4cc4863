"""Prometheus metrics of the gateway (`GET /metrics`), in their own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("alignloop_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("alignloop_request_latency_seconds", "Time to the whole answer, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("alignloop_tokens", "Tokens processed, by kind (prompt, completion)",
                              ["kind"], registry=r)
        self.in_flight = Gauge("alignloop_requests_in_flight", "Live requests being answered now", registry=r)
        self.log_queue = Gauge("alignloop_log_queue_depth", "Records not yet written to the store (queued or being written)", registry=r)
        self.pair_queue = Gauge("alignloop_pair_queue_depth", "Exchanges waiting for a second response or being answered",
                                registry=r)
        self.pairs = Gauge("alignloop_pairs_made", "Pairs made from live traffic since the gateway started",
                           registry=r)
        self.errors = Gauge("alignloop_background_errors", "Failures no client saw, by where (pair_maker, "
                            "pair_queue_full, log_dropped, adapter_unload, monitor), since the gateway started",
                            ["where"], registry=r)
        self.labels = Counter("alignloop_labels", "Labels submitted", registry=r)
        self.feedback = Counter("alignloop_feedback", "Feedback received", ["kind"], registry=r)
        self.serving = Gauge("alignloop_serving_version", "Version id the served alias points to", registry=r)
        self.engine_up = Gauge("alignloop_engine_up", "1 while the vLLM engine answers health checks", registry=r)
        self.engine_restarts = Gauge("alignloop_engine_restarts", "Times an engine replica was restarted (local) "
                                     "or left rotation (external), all replicas together", registry=r)
        self.replica_up = Gauge("alignloop_replica_up", "1 while the replica takes traffic (healthy and holding "
                                "every routed adapter)", ["replica"], registry=r)
        self.replica_in_flight = Gauge("alignloop_replica_in_flight", "Requests being answered on the replica now",
                                       ["replica"], registry=r)
        self.replica_restarts = Gauge("alignloop_replica_restarts", "Times the replica was restarted (local) or "
                                      "left rotation (external)", ["replica"], registry=r)
        self.replica_adapters = Gauge("alignloop_replica_adapters", "LoRA adapters loaded on the replica",
                                      ["replica"], registry=r)
        self.rollbacks = Gauge("alignloop_automatic_rollbacks", "Versions the monitor rolled back (and canaries it "
                               "stopped) since the gateway started (why: /api/status monitor.last_rollback, and the promotion record)", registry=r)
        self.watching = Gauge("alignloop_monitor_watching_version", "Version the monitor is watching after its "
                              "promotion (-1: none)", registry=r)
        self.watching_canary = Gauge("alignloop_monitor_watching_canary", "Canary version the monitor is watching "
                                     "against what serves (-1: none)", registry=r)
        self.log_dropped = Gauge("alignloop_log_dropped", "Records dropped because the log queue was full",
                                 registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
