"""Prometheus metrics of the adapter manager.

RPC counts and latencies are recorded by `loraserve.telemetry.TelemetryInterceptor` through
`ManagerMetrics.observe_rpc`. Registry and membership gauges are refreshed by `refresh_forever`
(`Registry.counts`: a few pipelined counting commands, every `REFRESH_S`), never per RPC; they
describe the whole cluster, so every manager copy reports the same values.
"""

from __future__ import annotations

import asyncio
import logging

import redis
from prometheus_client import CollectorRegistry

from adapter_svc.registry import Registry
from loraserve.telemetry import MetricSpec, auth_refusals_spec, build_metrics

log = logging.getLogger(__name__)

# Seconds between refreshes of the registry and membership gauges.
REFRESH_S = 1.0

RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)

P = "loraserve:manager_"
SPECS = (
    MetricSpec(P + "registered_adapters", "gauge", "Adapters in the registry."),
    MetricSpec(
        P + "adapters_by_state",
        "gauge",
        "Registered adapters by registry state (REGISTERED, LOADING, CACHED, ACTIVE, FAILED).",
        ("state",),
    ),
    MetricSpec(P + "pinned_adapters", "gauge", "Adapters pinned cluster-wide."),
    MetricSpec(
        P + "replicas", "gauge", "Inference replicas known to the cluster, by status (up, down).", ("status",)
    ),
    MetricSpec(
        P + "rpc_requests_total",
        "counter",
        "AdapterService calls handled, by method and status code.",
        ("method", "code"),
    ),
    MetricSpec(
        P + "rpc_duration_seconds",
        "histogram",
        "AdapterService call latency by method (streams: until the stream ends).",
        ("method",),
        buckets=RPC_BUCKETS,
    ),
    MetricSpec(
        P + "redis_errors_total",
        "counter",
        "Redis failures seen by calls (after retries) and by the gauge refresh, by source (rpc, refresh).",
        ("source",),
    ),
    MetricSpec(P + "redis_up", "gauge", "1 if the last gauge refresh reached Redis, else 0."),
    auth_refusals_spec(P),
)


class ManagerMetrics:
    """The manager's metrics. `registry`: where they are registered (default: a new one)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.m = build_metrics(SPECS, self.registry)
        for source in ("rpc", "refresh"):
            self.m[P + "redis_errors_total"].labels(source)  # exposed at 0 from the start

    def observe_rpc(self, method: str, code: str, seconds: float, error: BaseException | None) -> None:
        """TelemetryInterceptor's observer: one finished AdapterService call."""
        self.m[P + "rpc_requests_total"].labels(method, code).inc()
        self.m[P + "rpc_duration_seconds"].labels(method).observe(seconds)
        if isinstance(error, redis.RedisError):
            self.m[P + "redis_errors_total"].labels("rpc").inc()

    def on_auth_refusal(self, method: str, reason: str) -> None:
        """AuthInterceptor's `on_refusal`."""
        self.m[P + "auth_refusals_total"].labels(method, reason).inc()

    async def refresh(self, registry: Registry) -> None:
        """Read the registry and membership counts from Redis into the gauges."""
        try:
            counts = await registry.counts()
        except redis.RedisError as e:
            self.m[P + "redis_errors_total"].labels("refresh").inc()
            self.m[P + "redis_up"].set(0)
            log.debug("metrics refresh could not reach redis: %s", e)
            return
        self.m[P + "redis_up"].set(1)
        self.m[P + "registered_adapters"].set(counts.adapters)
        for state, count in counts.by_state.items():
            self.m[P + "adapters_by_state"].labels(state).set(count)
        self.m[P + "pinned_adapters"].set(counts.pinned)
        self.m[P + "replicas"].labels("up").set(counts.replicas_up)
        self.m[P + "replicas"].labels("down").set(counts.replicas_down)

    async def refresh_forever(self, registry: Registry) -> None:
        while True:
            await self.refresh(registry)
            await asyncio.sleep(REFRESH_S)
