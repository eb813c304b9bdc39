"""Prometheus metrics of the endpoint picker.

Envoy keeps the door's own counters (admin `/stats`): retries are
`cluster.replicas_grpc.upstream_rq_retry`, requests routed without the picker (fail open)
`http.door_grpc.ext_proc.picker.failure_mode_allowed`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from endpoint_picker.policy import REASONS
from loraserve.telemetry import MetricSpec, build_metrics

DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)
FALLBACKS = ("no_replica", "no_endpoint")

P = "loraserve:picker_"
SPECS = (
    MetricSpec(
        P + "picks_total",
        "counter",
        "Requests routed, by reason (slot, host, free_slot, least_loaded, spread, base).",
        ("reason",),
    ),
    MetricSpec(
        P + "fallbacks_total",
        "counter",
        "Requests left to Envoy's Maglev hash, by why (no_replica up, no_endpoint for the listener).",
        ("why",),
    ),
    MetricSpec(
        P + "in_flight",
        "gauge",
        "Requests the picker routed that are still running, by replica.",
        ("replica",),
    ),
    MetricSpec(
        P + "decision_seconds", "histogram", "Time to pick one request's replica.", buckets=DECISION_BUCKETS
    ),
    MetricSpec(P + "state_read_errors_total", "counter", "Cluster state reads from Redis that failed."),
)


class PickerMetrics:
    """The picker's metrics. `registry`: where they are registered (default: a new one)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.m = build_metrics(SPECS, self.registry)
        for reason in REASONS:
            self.m[P + "picks_total"].labels(reason)  # exposed at 0 from the start
        for why in FALLBACKS:
            self.m[P + "fallbacks_total"].labels(why)

    def picked(self, reason: str) -> None:
        self.m[P + "picks_total"].labels(reason).inc()

    def fallback(self, why: str) -> None:
        self.m[P + "fallbacks_total"].labels(why).inc()

    def in_flight(self, replica_id: str, count: int) -> None:
        self.m[P + "in_flight"].labels(replica_id).set(count)

    def decided(self, seconds: float) -> None:
        self.m[P + "decision_seconds"].observe(seconds)

    def state_read_failed(self) -> None:
        self.m[P + "state_read_errors_total"].inc()
