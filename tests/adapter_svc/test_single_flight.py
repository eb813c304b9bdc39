"""Concurrent cold requests for one adapter trigger one load: through the manager (also with two
manager copies on one Redis) and through a replica's Generate."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from loraserve.v1 import adapter_pb2 as pb

from harness import TIMEOUT_S, ManagerHandle, ReplicaHandle, manager_config, register, wait_for

CALLERS = 8


@pytest.fixture
def replicas(loop, manager, model_dir):
    handles = [ReplicaHandle(loop, model_dir, manager.address, f"r{i}") for i in (1, 2)]
    yield handles
    for h in handles:
        h.close()


def loads(redis_proc, replicas, adapter_id: str) -> list[str]:
    """Replicas that reported loading `adapter_id` into their host cache, one entry per load.

    Replicas report residency changes after answering, so first wait until every change they
    queued has reached the manager (and so the event stream)."""
    wait_for(
        lambda: all(r.server.agent.unreported_changes == 0 for r in replicas),
        "replicas to report their residency changes",
    )
    entries = redis_proc.client().xrange(redis_proc.keys.events)
    return [f["replica"] for _, f in entries if f["type"] == "loaded" and f["adapter"] == adapter_id]


def test_concurrent_manager_loads_share_one(manager, replicas, redis_proc, adapters):
    register(manager.stub, "ad-5", adapters["ad-5"])
    request = pb.ClusterLoadAdapterRequest(adapter_id="ad-5")
    with ThreadPoolExecutor(CALLERS) as pool:
        answers = list(
            pool.map(lambda _: manager.stub.LoadAdapter(request, timeout=TIMEOUT_S), range(CALLERS))
        )
    assert len({a.replica_id for a in answers}) == 1
    assert manager.manager.catalog.fetches == 1
    assert loads(redis_proc, replicas, "ad-5") == [answers[0].replica_id]


def test_two_managers_on_one_redis_still_load_once(
    loop, manager, replicas, redis_proc, adapters, tmp_path, adapter_root, model_dir
):
    other = ManagerHandle(loop, manager_config(redis_proc.url, tmp_path / "other", adapter_root, model_dir))
    try:
        register(manager.stub, "ad-6", adapters["ad-6"])
        request = pb.ClusterLoadAdapterRequest(adapter_id="ad-6")
        stubs = [manager.stub, other.stub] * (CALLERS // 2)
        with ThreadPoolExecutor(CALLERS) as pool:
            answers = list(pool.map(lambda stub: stub.LoadAdapter(request, timeout=TIMEOUT_S), stubs))
        assert len({a.replica_id for a in answers}) == 1
        assert loads(redis_proc, replicas, "ad-6") == [answers[0].replica_id]
        assert manager.manager.catalog.fetches + other.manager.catalog.fetches == 1
    finally:
        other.close()


def test_concurrent_cold_generates_on_a_replica_fetch_once(manager, replicas, redis_proc, adapters):
    register(manager.stub, "ad-7", adapters["ad-7"])
    replica = replicas[1]
    with ThreadPoolExecutor(CALLERS) as pool:
        outputs = list(pool.map(lambda _: replica.generate("ad-7"), range(CALLERS)))
    assert all(out[-1].adapter_id == "ad-7" for out in outputs)
    assert manager.manager.catalog.fetches == 1
    assert loads(redis_proc, replicas, "ad-7") == ["r2"]
