"""A load the manager commands is one LoadAdapter carrying what the replica needs (content hash,
victims, pin): the replica fetches the bytes and reports, and asks the manager nothing else."""

from __future__ import annotations

import pytest

from loraserve.v1 import adapter_pb2 as pb

from harness import TIMEOUT_S, ReplicaHandle, mirror, register, truth, wait_for


@pytest.fixture
def replica(loop, manager, model_dir):
    handle = ReplicaHandle(loop, model_dir, manager.address, "r1", max_loras=1, max_cpu_loras=2)
    yield handle
    handle.close()


def rpcs(manager, method: str) -> float:
    """OK calls of `method` the manager has served."""
    counter = manager.server.metrics.m["loraserve:manager_rpc_requests_total"]
    return counter.labels(method, "OK")._value.get()


def test_a_commanded_load_asks_nothing_back_and_carries_victims_and_pin(
    manager, replica, redis_proc, adapters
):
    for i in range(3):
        register(manager.stub, f"ad-{i}", adapters[f"ad-{i}"])
    acquires = rpcs(manager, "AcquireAdapter")
    for adapter_id in ("ad-0", "ad-1"):
        manager.stub.LoadAdapter(pb.ClusterLoadAdapterRequest(adapter_id=adapter_id), timeout=TIMEOUT_S)
    wait_for(lambda: mirror(manager.stub, "r1") == truth(replica.stub), "Redis to mirror r1")

    # Full host cache: the manager names the LRU victim in the command, the replica evicts it.
    manager.stub.LoadAdapter(pb.ClusterLoadAdapterRequest(adapter_id="ad-2"), timeout=TIMEOUT_S)
    assert set(truth(replica.stub)) == {"ad-1", "ad-2"}

    # A pin travels in the command: pinned on the replica when PinAdapter returns.
    manager.stub.EvictAdapter(pb.ClusterEvictAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S)
    pinned = manager.stub.PinAdapter(pb.PinAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S)
    assert list(pinned.replica_ids) == ["r1"]
    assert truth(replica.stub)["ad-0"] == (-1, True)

    assert rpcs(manager, "AcquireAdapter") == acquires  # the replica never asked for room
    assert rpcs(manager, "FetchAdapterWeights") == 3  # ad-0 loaded again from its local copy
