"""Register -> load -> generate -> evict -> unregister through gRPC with two real inference replicas,
Redis checked against each replica's ListResidentAdapters after every step."""

from __future__ import annotations

import grpc
import pytest

from loraserve.v1 import adapter_pb2 as pb

from harness import TIMEOUT_S, code_of, mirror, register, truth, wait_for


def consistent(manager, replicas) -> dict:
    """Wait until the manager mirrors every replica exactly (host cache, slots, pins) and the
    registry's per-replica states agree; -> {replica id: {adapter id: (slot, pinned)}}."""

    def check():
        held = {rid: truth(h.stub) for rid, h in replicas.items()}
        if any(mirror(manager.stub, rid) != residents for rid, residents in held.items()):
            return None
        for rid, residents in held.items():
            for adapter_id, (slot, _) in residents.items():
                if state(manager, adapter_id)[1].get(rid) != (
                    pb.ADAPTER_STATE_ACTIVE if slot >= 0 else pb.ADAPTER_STATE_CACHED
                ):
                    return None
        return (held,)

    return wait_for(check, "the manager to mirror both replicas")[0]


def state(manager, adapter_id: str) -> tuple[int, dict]:
    got = manager.stub.GetAdapter(pb.GetAdapterRequest(adapter_id=adapter_id), timeout=TIMEOUT_S)
    return got.state, {p.replica_id: p.state for p in got.placements}


def test_register_load_generate_evict_unregister(manager, replicas, redis_proc, adapters):
    stub = manager.stub
    assert consistent(manager, replicas) == {"r1": {}, "r2": {}}

    register(stub, "ad-0", adapters["ad-0"])
    register(stub, "ad-1", adapters["ad-1"])
    assert consistent(manager, replicas) == {"r1": {}, "r2": {}}
    assert state(manager, "ad-0") == (pb.ADAPTER_STATE_REGISTERED, {})

    # Load without naming a replica: both are empty, so the tie goes to the first by id.
    loaded = stub.LoadAdapter(pb.ClusterLoadAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S)
    assert loaded.replica_id == "r1" and loaded.adapter.adapter_id == "ad-0"
    assert consistent(manager, replicas) == {"r1": {"ad-0": (-1, False)}, "r2": {}}
    assert state(manager, "ad-0") == (pb.ADAPTER_STATE_CACHED, {"r1": pb.ADAPTER_STATE_CACHED})

    to_slot = pb.ClusterLoadAdapterRequest(adapter_id="ad-1", replica_id="r2", to_slot=True)
    assert stub.LoadAdapter(to_slot, timeout=TIMEOUT_S).adapter.HasField("slot")
    assert consistent(manager, replicas) == {"r1": {"ad-0": (-1, False)}, "r2": {"ad-1": (0, False)}}
    assert state(manager, "ad-1") == (pb.ADAPTER_STATE_ACTIVE, {"r2": pb.ADAPTER_STATE_ACTIVE})

    # Affinity: ad-0 stays where it already is, with no second fetch.
    fetches = manager.manager.catalog.fetches
    again = stub.LoadAdapter(pb.ClusterLoadAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S)
    assert again.replica_id == "r1" and manager.manager.catalog.fetches == fetches

    # Generate on a replica that does not hold the adapter: it fetches it from the manager.
    out = replicas["r2"].generate("ad-0", max_tokens=3)
    assert out[-1].adapter_id == "ad-0" and sum(len(m.token_ids) for m in out) == 3
    out = replicas["r1"].generate("ad-0", max_tokens=3)
    held = consistent(manager, replicas)
    assert held["r1"]["ad-0"][0] >= 0 and held["r2"]["ad-0"][0] >= 0 and "ad-1" in held["r2"]
    assert state(manager, "ad-0")[0] == pb.ADAPTER_STATE_ACTIVE
    on_r2 = stub.ListAdapters(pb.ListAdaptersRequest(replica_id="r2"), timeout=TIMEOUT_S)
    assert [a.adapter_id for a in on_r2.adapters] == sorted(held["r2"]) == ["ad-0", "ad-1"]
    active = stub.ListAdapters(pb.ListAdaptersRequest(state=pb.ADAPTER_STATE_ACTIVE), timeout=TIMEOUT_S)
    assert [a.adapter_id for a in active.adapters] == ["ad-0", "ad-1"]

    evicted = stub.EvictAdapter(pb.ClusterEvictAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S)
    assert list(evicted.evicted_from) == ["r1", "r2"]
    assert consistent(manager, replicas) == {"r1": {}, "r2": {"ad-1": (0, False)}}
    assert state(manager, "ad-0") == (pb.ADAPTER_STATE_REGISTERED, {})

    # ad-1 is in a slot: unregistering needs force, which evicts it everywhere first.
    refused = code_of(stub.UnregisterAdapter, pb.UnregisterAdapterRequest(adapter_id="ad-1")).code
    assert refused == grpc.StatusCode.FAILED_PRECONDITION
    forced = stub.UnregisterAdapter(
        pb.UnregisterAdapterRequest(adapter_id="ad-1", force=True), timeout=TIMEOUT_S
    )
    assert list(forced.evicted_from) == ["r2"]
    assert consistent(manager, replicas) == {"r1": {}, "r2": {}}
    with pytest.raises(grpc.RpcError) as e:
        replicas["r2"].generate("ad-1")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    cluster = stub.GetClusterState(pb.GetClusterStateRequest(), timeout=TIMEOUT_S)
    assert [(r.replica_id, r.status, list(r.adapters)) for r in cluster.replicas] == [
        ("r1", pb.REPLICA_STATUS_UP, []),
        ("r2", pb.REPLICA_STATUS_UP, []),
    ]
    assert {r.address for r in cluster.replicas} == {h.address for h in replicas.values()}
    assert cluster.replicas[0].engine.max_cpu_loras == 3
