"""The host-cache policy the manager applies for a replica: LRU by last use, pins never evicted.

One real replica (max_cpu_loras=3, max_loras=1) serves five adapters it fetches from the manager.
"""

from __future__ import annotations

import grpc
import pytest

from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import inference_pb2

from harness import TIMEOUT_S, ReplicaHandle, code_of, in_sync, register, replica_state, truth, wait_for


@pytest.fixture
def replica(loop, manager, model_dir, adapters):
    for i in range(5):
        register(manager.stub, f"ad-{i}", adapters[f"ad-{i}"])
    handle = ReplicaHandle(loop, model_dir, manager.address, "r1", max_loras=1, max_cpu_loras=3)
    yield handle
    handle.close()


def evictions(redis_proc) -> list[str]:
    entries = redis_proc.client().xrange(redis_proc.keys.events)
    return [f["adapter"] for _, f in entries if f["type"] == "evicted" and f["replica"] == "r1"]


def decisions(redis_proc) -> list[str]:
    """The manager's own choices of victims (AcquireAdapter), as its events record them."""
    entries = redis_proc.client().xrange(redis_proc.keys.events)
    return [f["detail"] for _, f in entries if f["type"] == "loading" and f["detail"]]


def use(replica, manager, adapter_id: str) -> set[str]:
    out = replica.generate(adapter_id)
    assert out[-1].adapter_id == adapter_id
    return set(in_sync(manager.stub, "r1", replica.stub))


def test_lru_eviction_pins_and_exhaustion(manager, replica, redis_proc):
    assert [use(replica, manager, f"ad-{i}") for i in range(3)] == [
        {"ad-0"},
        {"ad-0", "ad-1"},
        {"ad-0", "ad-1", "ad-2"},
    ]
    assert use(replica, manager, "ad-3") == {"ad-1", "ad-2", "ad-3"}
    assert use(replica, manager, "ad-4") == {"ad-2", "ad-3", "ad-4"}
    assert use(replica, manager, "ad-0") == {"ad-3", "ad-4", "ad-0"}
    assert use(replica, manager, "ad-3") == {"ad-3", "ad-4", "ad-0"}  # a hit refreshes ad-3
    assert use(replica, manager, "ad-1") == {"ad-3", "ad-0", "ad-1"}  # so ad-4 is the LRU
    assert evictions(redis_proc) == ["ad-0", "ad-1", "ad-2", "ad-4"]
    assert decisions(redis_proc) == ["evicting ad-0", "evicting ad-1", "evicting ad-2", "evicting ad-4"]

    # A pinned adapter survives every later load.
    pinned = manager.stub.PinAdapter(pb.PinAdapterRequest(adapter_id="ad-3"), timeout=TIMEOUT_S)
    assert list(pinned.replica_ids) == ["r1"]
    assert in_sync(manager.stub, "r1", replica.stub)["ad-3"] == (-1, True)
    for adapter_id in ("ad-2", "ad-4", "ad-0", "ad-1", "ad-2"):
        assert "ad-3" in use(replica, manager, adapter_id)
    assert "ad-3" not in evictions(redis_proc)[4:]

    # Every entry pinned: nothing can be evicted, and the answer is RESOURCE_EXHAUSTED, not a hang.
    held = set(in_sync(manager.stub, "r1", replica.stub))
    for adapter_id in sorted(held - {"ad-3"}):
        manager.stub.PinAdapter(pb.PinAdapterRequest(adapter_id=adapter_id), timeout=TIMEOUT_S)
    cold = sorted({f"ad-{i}" for i in range(5)} - held)[0]
    with pytest.raises(grpc.RpcError) as e:
        replica.generate(cold)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_cpu_loras=3" in e.value.details()
    load = code_of(manager.stub.LoadAdapter, pb.ClusterLoadAdapterRequest(adapter_id=cold)).code
    assert load == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert set(in_sync(manager.stub, "r1", replica.stub)) == held
    evict = code_of(manager.stub.EvictAdapter, pb.ClusterEvictAdapterRequest(adapter_id="ad-3")).code
    assert evict == grpc.StatusCode.FAILED_PRECONDITION
    unregister = code_of(manager.stub.UnregisterAdapter, pb.UnregisterAdapterRequest(adapter_id="ad-3")).code
    assert unregister == grpc.StatusCode.FAILED_PRECONDITION

    # Unpinned, adapters are evictable again (at once for the manager, by heartbeat on the replica;
    # the engine also pins the slot of a pinned adapter, so every pin must go for `cold` to run).
    for adapter_id in sorted(held):
        manager.stub.UnpinAdapter(pb.UnpinAdapterRequest(adapter_id=adapter_id), timeout=TIMEOUT_S)
    wait_for(lambda: not any(p for _, p in truth(replica.stub).values()), "the replica to drop its pins")
    in_sync(manager.stub, "r1", replica.stub)
    lru = replica_state(manager.stub, "r1").adapters[-1].adapter_id  # most recently used first
    assert use(replica, manager, cold) == held - {lru} | {cold}
    assert evictions(redis_proc)[-1] == lru


def test_concurrent_cold_requests_beyond_the_host_cache_wait_instead_of_failing(manager, replica, redis_proc):
    """Five first requests at once for five adapters on a 3-entry host cache: the ones that find every
    entry still loading or in use wait for one to free up; none is refused."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(5) as pool:
        outs = list(pool.map(lambda i: replica.generate(f"ad-{i}"), range(5)))
    assert [o[-1].adapter_id for o in outs] == [f"ad-{i}" for i in range(5)]
    assert len(in_sync(manager.stub, "r1", replica.stub)) == 3


def test_unpin_reaches_the_replica_at_once(manager, replica, redis_proc):
    """UnpinAdapter clears the pin on the holders before it returns, not at a later heartbeat."""
    replica.generate("ad-0")
    manager.stub.PinAdapter(pb.PinAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S)
    assert truth(replica.stub)["ad-0"][1] is True
    manager.stub.UnpinAdapter(pb.UnpinAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S)
    assert truth(replica.stub)["ad-0"][1] is False


def test_a_load_evicts_only_what_it_needs_of_the_victims_named(manager, replica, redis_proc):
    """The manager names victims from a mirror that may still count entries the replica already
    dropped, so it may name more than one load needs: the replica evicts in the named order only
    while its host cache is full (the concurrent-burst test above failed on this once)."""
    for i in range(3):
        use(replica, manager, f"ad-{i}")
    sha256 = manager.stub.GetAdapter(pb.GetAdapterRequest(adapter_id="ad-3"), timeout=TIMEOUT_S).sha256
    command = inference_pb2.LoadAdapterRequest(adapter_id="ad-3", sha256=sha256, evict=["ad-0", "ad-1"])
    replica.stub.LoadAdapter(command, timeout=TIMEOUT_S)
    assert set(in_sync(manager.stub, "r1", replica.stub)) == {"ad-1", "ad-2", "ad-3"}
    assert evictions(redis_proc) == ["ad-0"]
