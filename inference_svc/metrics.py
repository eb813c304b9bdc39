"""Prometheus metrics of one inference replica, in the style of vLLM's `vllm:*` metrics.

Everything is collected on the engine thread, between steps: `after_commands` (requests added or
aborted, residency commands) and `after_step` (one call per scheduling step, with that step's
record), plus `on_residency_change` for loads and evictions. Requests are counted from the
engine's `RequestEvent`s (first token, finished with its reason), never by diffing its tables. No metric is touched per token
outside that loop and nothing here does I/O; the HTTP endpoint only reads the registry.

Adapter labels: each adapter id is its own label value until `MAX_ADAPTER_LABELS` distinct ids
have been seen; later ones share the value `__other__`. The base model is `__base__`. Adapter ids
are tenants' names, so with authentication on `/metrics` answers admin and metrics tokens only.
Latencies are measured inside the engine, from the request's arrival in the engine.
"""

from __future__ import annotations

import time
from collections import Counter

from prometheus_client import CollectorRegistry

from loraserve.telemetry import MetricSpec, auth_refusals_spec, build_metrics

MAX_ADAPTER_LABELS = 100
BASE_LABEL = "__base__"
OTHER_LABEL = "__other__"
# At most this many adapter ids are listed in one label of `lora_requests_info`.
MAX_INFO_IDS = 32

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ADAPTER_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

P = "loraserve:"


def _since_arrival(name: str, until: str, buckets: tuple[float, ...]) -> MetricSpec:
    """A latency histogram timed from a request's arrival in the engine."""
    return MetricSpec(
        P + name, "histogram", f"From a request's arrival in the engine to its {until}.", buckets=buckets
    )


SPECS = (
    MetricSpec(
        P + "requests_total",
        "counter",
        "Finished requests, by adapter and finish reason (stop, length, abort, error).",
        ("adapter", "finish_reason"),
    ),
    MetricSpec(P + "prompt_tokens_total", "counter", "Prompt tokens prefilled, by adapter.", ("adapter",)),
    MetricSpec(P + "generation_tokens_total", "counter", "Tokens generated, by adapter.", ("adapter",)),
    _since_arrival("time_to_first_token_seconds", "first token", LATENCY_BUCKETS),
    MetricSpec(
        P + "time_per_output_token_seconds",
        "histogram",
        "Mean time between a finished request's output tokens after the first.",
        buckets=TPOT_BUCKETS,
    ),
    _since_arrival("e2e_request_latency_seconds", "last token", E2E_BUCKETS),
    MetricSpec(P + "num_requests_waiting", "gauge", "Requests queued for a place in the batch."),
    MetricSpec(P + "num_requests_running", "gauge", "Requests in the running batch."),
    MetricSpec(P + "batch_size", "histogram", "Sequences in each scheduling step.", buckets=BATCH_BUCKETS),
    MetricSpec(
        P + "adapters_per_step",
        "histogram",
        "Distinct adapters (LoRA slots, the base model not counted) in each scheduling step.",
        buckets=ADAPTER_BUCKETS,
    ),
    MetricSpec(P + "lora_slots_used", "gauge", "Accelerator LoRA slots holding an adapter."),
    MetricSpec(P + "lora_slots_total", "gauge", "Accelerator LoRA slots (max_loras)."),
    MetricSpec(P + "host_cache_used", "gauge", "Adapters in the host-memory cache."),
    MetricSpec(P + "host_cache_total", "gauge", "Host-memory cache capacity in adapters (max_cpu_loras)."),
    MetricSpec(P + "kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use (0..1)."),
    MetricSpec(
        P + "adapter_loads_total",
        "counter",
        "Adapter loads, by tier (host: files into host memory; slot: host memory into a slot).",
        ("tier",),
    ),
    MetricSpec(
        P + "adapter_evictions_total",
        "counter",
        "Adapters dropped from a tier (LRU or EvictAdapter), by tier.",
        ("tier",),
    ),
    MetricSpec(
        P + "adapter_cache_hits_total",
        "counter",
        "Lookups that found the adapter already in the tier (slot: per admitted request).",
        ("tier",),
    ),
    MetricSpec(
        P + "adapter_cache_misses_total",
        "counter",
        "Lookups that had to load the adapter into the tier.",
        ("tier",),
    ),
    MetricSpec(
        P + "adapter_load_seconds",
        "histogram",
        "Time to load an adapter into a tier, by tier.",
        ("tier",),
        buckets=LOAD_BUCKETS,
    ),
    MetricSpec(
        P + "lora_requests_info",
        "gauge",
        "Adapters of the running and waiting requests (comma-separated ids) and max_lora; "
        "the value is the Unix time they last changed.",
        ("running_lora_adapters", "waiting_lora_adapters", "max_lora"),
    ),
    auth_refusals_spec(P),
)

# Residency events -> (metric, tier).
_EVENT_COUNTERS = {
    "loaded": (P + "adapter_loads_total", "host"),
    "activated": (P + "adapter_loads_total", "slot"),
    "evicted": (P + "adapter_evictions_total", "host"),
    "deactivated": (P + "adapter_evictions_total", "slot"),
}
# AdapterCache.stats keys -> (metric, tier).
_STAT_COUNTERS = {
    "host_hits": (P + "adapter_cache_hits_total", "host"),
    "slot_hits": (P + "adapter_cache_hits_total", "slot"),
    "host_misses": (P + "adapter_cache_misses_total", "host"),
    "slot_misses": (P + "adapter_cache_misses_total", "slot"),
}


class EngineMetrics:
    """The metrics of one engine and the engine-thread hooks that keep them current.

    Args:
        registry: where the metrics are registered (default: a new one, served by MetricsServer).
        max_adapter_labels: distinct adapter label values before `__other__`.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, max_adapter_labels: int = MAX_ADAPTER_LABELS
    ):
        self.registry = registry or CollectorRegistry()
        self.m = build_metrics(SPECS, self.registry)
        for metric, tier in (*_EVENT_COUNTERS.values(), *_STAT_COUNTERS.values()):
            self.m[metric].labels(tier)  # exposed at 0 from the start
        for tier in ("host", "slot"):
            self.m[P + "adapter_load_seconds"].labels(tier)
        self.max_adapter_labels = max_adapter_labels
        self._labels: set[str] = set()
        self._stats: dict[str, int] = {}
        self._info: tuple | None = None

    # --- engine-thread hooks (AsyncEngine observer) ---------------------------------------

    def after_commands(self, engine, events: list) -> None:
        """Requests may have been added or aborted (`events`), adapters loaded or evicted."""
        self._observe_events(events)
        self._update_state(engine)

    def after_step(self, engine, step) -> None:
        """One scheduling step ran (`EngineStep`: its record, outputs and request events)."""
        if step.ran:
            self.m[P + "batch_size"].observe(step.record.num_seqs)
            self.m[P + "adapters_per_step"].observe(len(step.record.slots))
        generated = Counter(
            self.adapter_label(out.adapter_id) for out in step.outputs if out.token is not None
        )
        for label, n in generated.items():
            self.m[P + "generation_tokens_total"].labels(label).inc(n)
        self._observe_events(step.events)
        self._update_state(engine)
        self._update_info(engine)

    def _observe_events(self, events: list) -> None:
        """First tokens (prompt tokens, TTFT) and finished requests (count, latencies)."""
        for event in events:
            label = self.adapter_label(event.adapter_id)
            if event.kind == "first_token":
                self.m[P + "prompt_tokens_total"].labels(label).inc(event.prompt_tokens)
                self.m[P + "time_to_first_token_seconds"].observe(event.first_token_at - event.arrival)
            elif event.kind == "finished":
                self.m[P + "requests_total"].labels(label, event.reason).inc()
                if event.reason != "abort":
                    self._observe_latency(event)

    def on_residency_change(self, event) -> None:
        """AdapterCache's listener: a load, slot activation or eviction (engine thread)."""
        if event.kind not in _EVENT_COUNTERS:  # "needs_room": not a change
            return
        metric, tier = _EVENT_COUNTERS[event.kind]
        self.m[metric].labels(tier).inc()
        if event.kind in ("loaded", "activated"):
            self.m[P + "adapter_load_seconds"].labels(tier).observe(event.seconds)

    def on_auth_refusal(self, method: str, reason: str) -> None:
        """AuthInterceptor's `on_refusal` (event loop thread)."""
        self.m[P + "auth_refusals_total"].labels(method, reason).inc()

    # --- helpers --------------------------------------------------------------------------

    def adapter_label(self, adapter_id: str | None) -> str:
        """The label value of an adapter (capped; see the module docstring)."""
        if not adapter_id:
            return BASE_LABEL
        if adapter_id in self._labels:
            return adapter_id
        if len(self._labels) < self.max_adapter_labels:
            self._labels.add(adapter_id)
            return adapter_id
        return OTHER_LABEL

    def _observe_latency(self, finished) -> None:
        self.m[P + "e2e_request_latency_seconds"].observe(finished.at - finished.arrival)
        if finished.completion_tokens > 1 and finished.first_token_at is not None:
            self.m[P + "time_per_output_token_seconds"].observe(
                (finished.at - finished.first_token_at) / (finished.completion_tokens - 1)
            )

    def _update_state(self, engine) -> None:
        """Queue, slot, host-cache and KV gauges and the cache hit/miss counters: O(1) reads."""
        scheduler, adapters, config = engine.scheduler, engine.adapters, engine.config
        self.m[P + "num_requests_waiting"].set(len(scheduler.waiting))
        self.m[P + "num_requests_running"].set(len(scheduler.running))
        self.m[P + "lora_slots_used"].set(adapters.slots_in_use)
        self.m[P + "lora_slots_total"].set(config.max_loras)
        self.m[P + "host_cache_used"].set(len(adapters.host))
        self.m[P + "host_cache_total"].set(config.max_cpu_loras)
        kv = engine.kv
        self.m[P + "kv_cache_usage_ratio"].set(1 - kv.num_free_blocks / kv.num_blocks if kv.num_blocks else 0)
        for key, (metric, tier) in _STAT_COUNTERS.items():
            value = adapters.stats.get(key, 0)
            delta = value - self._stats.get(key, 0)
            if delta > 0:
                self.m[metric].labels(tier).inc(delta)
            self._stats[key] = value

    def _update_info(self, engine) -> None:
        """`lora_requests_info`: one series, replaced when the running or waiting adapters change."""
        scheduler = engine.scheduler
        running = sorted({s.adapter_id for s in scheduler.running if s.adapter_id})
        waiting = sorted({s.adapter_id for s in scheduler.waiting if s.adapter_id})
        info = (_id_list(running), _id_list(waiting), str(engine.config.max_loras))
        if info != self._info:
            gauge = self.m[P + "lora_requests_info"]
            gauge.clear()
            gauge.labels(*info).set(time.time())
            self._info = info


def _id_list(ids: list[str]) -> str:
    listed = ",".join(ids[:MAX_INFO_IDS])
    return listed if len(ids) <= MAX_INFO_IDS else f"{listed},+{len(ids) - MAX_INFO_IDS} more"
