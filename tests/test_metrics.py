"""Both services' /metrics endpoints: every documented name is exposed, and the values move when
requests run (a managed replica and the manager, in-process, on a private redis-server)."""

import concurrent.futures
import re
from pathlib import Path

import pytest

from adapter_svc import metrics as manager_metrics
from endpoint_picker import metrics as picker_metrics
from inference_svc import metrics as engine_metrics
from inference_svc.adapter_cache import ResidencyEvent
from inference_svc.metrics import BASE_LABEL, OTHER_LABEL, EngineMetrics
from loraserve.v1 import inference_pb2

from harness import (
    TIMEOUT_S,
    LoopThread,
    RedisProcess,
    register,
    scrape,
    start_stack,
    total,
    value,
    wait_for,
    write_adapters,
    write_model,
)

README = Path(__file__).resolve().parents[1] / "README.md"
ADAPTERS = ["ad-0", "ad-1", "ad-2"]
PROMPT, PROMPT_TOKENS, MAX_TOKENS = "hello", 5, 4  # the demo tokenizer has one token per byte


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    model_dir, adapter_root = write_model(root), root / "adapters"
    write_adapters(model_dir, adapter_root, len(ADAPTERS))
    redis_proc = RedisProcess(root / "redis").start()
    loop = LoopThread()
    try:
        manager, replica = start_stack(loop, redis_proc.url, root, model_dir, adapter_root, metrics=True)
        for adapter_id in ADAPTERS:
            register(manager.stub, adapter_id, adapter_root / adapter_id)
        yield {
            "manager_url": manager.server.metrics_server.url,
            "replica_url": replica.server.metrics_server.url,
            "inference": replica.stub,
        }
        replica.close()
        manager.close()
    finally:
        loop.close()
        redis_proc.stop()


def generate(stub, adapter_id: str) -> list:
    request = inference_pb2.GenerateRequest(
        adapter_id=adapter_id,
        text=PROMPT,
        params=inference_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
    )
    return list(stub.Generate(request, timeout=TIMEOUT_S))


def documented(section: str) -> set[str]:
    """Metric names in one of the README's generated metrics tables."""
    text = README.read_text()
    block = re.search(rf"<!-- BEGIN GENERATED: {section} -->(.*?)<!-- END", text, re.S)[1]
    return set(re.findall(r"^\| `([^`]+)`", block, re.M))


def exposed_names(samples: dict) -> set[str]:
    names = {name for name, _ in samples}
    suffixes = ("_bucket", "_count", "_sum", "_created")
    return names | {n[: -len(s)] for n in names for s in suffixes if n.endswith(s)}


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def test_readme_documents_every_metric():
    assert documented("inference-metrics") == {s.name for s in engine_metrics.SPECS}
    assert documented("manager-metrics") == {s.name for s in manager_metrics.SPECS}
    assert documented("picker-metrics") == {s.name for s in picker_metrics.SPECS}


def test_replica_metrics_move_when_requests_run(cluster):
    stub = cluster["inference"]
    before = scrape(cluster["replica_url"])
    asks = ["", *ADAPTERS, "", "ad-0"]  # three adapters and the base model, mixed in flight
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        list(pool.map(lambda adapter_id: generate(stub, adapter_id), asks))
    after = scrape(cluster["replica_url"])

    # refusals exist only with authentication on: tests/reliability/test_trust_boundaries.py
    assert documented("inference-metrics") - {"loraserve:auth_refusals_total"} <= exposed_names(after)
    assert delta(before, after, "loraserve:requests_total", finish_reason="length") == len(asks)
    assert delta(before, after, "loraserve:requests_total", adapter="ad-0", finish_reason="length") == 2
    assert delta(before, after, "loraserve:generation_tokens_total", adapter=BASE_LABEL) == 2 * MAX_TOKENS
    assert delta(before, after, "loraserve:generation_tokens_total") == len(asks) * MAX_TOKENS
    assert delta(before, after, "loraserve:prompt_tokens_total") == len(asks) * PROMPT_TOKENS
    for histogram in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        assert delta(before, after, f"loraserve:{histogram}_seconds_count") == len(asks), histogram
    assert delta(before, after, "loraserve:batch_size_count") > 0
    assert value(after, "loraserve:batch_size_sum") > value(after, "loraserve:batch_size_count")  # batched
    assert value(after, "loraserve:adapters_per_step_sum") > 0
    assert value(after, "loraserve:lora_slots_total") == 2
    assert 1 <= value(after, "loraserve:lora_slots_used") <= 2
    assert value(after, "loraserve:host_cache_total") == 3
    assert value(after, "loraserve:host_cache_used") == 3
    assert value(after, "loraserve:adapter_loads_total", tier="host") >= 3
    assert value(after, "loraserve:adapter_loads_total", tier="slot") >= 3  # three adapters, two slots
    assert value(after, "loraserve:adapter_evictions_total", tier="slot") >= 1
    assert value(after, "loraserve:adapter_cache_misses_total", tier="slot") >= 3
    assert value(after, "loraserve:adapter_load_seconds_count", tier="host") >= 3
    assert value(after, "loraserve:num_requests_running") == 0
    assert value(after, "loraserve:num_requests_waiting") == 0
    (info,) = [labels for name, labels in after if name == "loraserve:lora_requests_info"]
    assert dict(info)["max_lora"] == "2"


def test_engine_info_eviction_counts_match_the_metric(cluster):
    """`loraserve status` shows GetEngineInfo's cache stats: they count every eviction (policy or
    command) exactly as loraserve:adapter_evictions_total does."""
    stub = cluster["inference"]
    generate(stub, "ad-1")
    evicted = stub.EvictAdapter(inference_pb2.EvictAdapterRequest(adapter_id="ad-1"), timeout=TIMEOUT_S)
    assert evicted.evicted
    stats = stub.GetEngineInfo(inference_pb2.GetEngineInfoRequest(), timeout=TIMEOUT_S).cache_stats
    after = scrape(cluster["replica_url"])
    assert stats.host_evictions >= 1
    assert stats.host_evictions == value(after, "loraserve:adapter_evictions_total", tier="host")
    assert stats.slot_evictions == value(after, "loraserve:adapter_evictions_total", tier="slot")


def test_a_cancelled_request_counts_as_aborted(cluster):
    stub = cluster["inference"]
    request = inference_pb2.GenerateRequest(
        adapter_id="ad-1",
        text=PROMPT,
        params=inference_pb2.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True),
    )

    def aborted() -> float:
        return value(
            scrape(cluster["replica_url"]), "loraserve:requests_total", adapter="ad-1", finish_reason="abort"
        )

    before = aborted()
    stream = stub.Generate(request, timeout=TIMEOUT_S)
    next(stream)
    stream.cancel()
    wait_for(lambda: aborted() == before + 1, "the aborted request to be counted")


def test_manager_metrics_count_rpcs_and_the_cluster(cluster):
    def refreshed():
        samples = scrape(cluster["manager_url"])
        return samples if value(samples, "loraserve:manager_registered_adapters") == len(ADAPTERS) else None

    samples = wait_for(refreshed, "the manager's gauges to refresh")
    # refusals exist only with authentication on: tests/reliability/test_trust_boundaries.py
    assert documented("manager-metrics") - {"loraserve:manager_auth_refusals_total"} <= exposed_names(samples)
    assert value(samples, "loraserve:manager_replicas", status="up") == 1
    assert value(samples, "loraserve:manager_replicas", status="down") == 0
    assert value(samples, "loraserve:manager_redis_up") == 1
    assert total(samples, "loraserve:manager_adapters_by_state") == len(ADAPTERS)
    assert value(samples, "loraserve:manager_rpc_requests_total", method="RegisterAdapter", code="OK") == 3
    assert value(samples, "loraserve:manager_rpc_requests_total", method="JoinReplica", code="OK") >= 1
    assert value(samples, "loraserve:manager_rpc_duration_seconds_count", method="AcquireAdapter") >= 3
    assert value(samples, "loraserve:manager_redis_errors_total", source="rpc") == 0


def test_adapter_labels_are_capped():
    metrics = EngineMetrics(max_adapter_labels=2)
    labels = [metrics.adapter_label(a) for a in ("a", "b", "c", "a", None)]
    assert labels == ["a", "b", OTHER_LABEL, "a", BASE_LABEL]


def test_residency_events_count_loads_and_evictions_per_tier():
    metrics = EngineMetrics()
    for kind, seconds in (("loaded", 0.01), ("activated", 0.001), ("deactivated", 0.0), ("evicted", 0.0)):
        metrics.on_residency_change(ResidencyEvent(kind, "x", 0, 0.0, seconds))
    registry = metrics.registry
    for tier in ("host", "slot"):
        assert registry.get_sample_value("loraserve:adapter_loads_total", {"tier": tier}) == 1
        assert registry.get_sample_value("loraserve:adapter_evictions_total", {"tier": tier}) == 1
    assert registry.get_sample_value("loraserve:adapter_load_seconds_sum", {"tier": "host"}) == pytest.approx(
        0.01
    )
