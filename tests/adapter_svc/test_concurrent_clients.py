"""16 concurrent clients register, load, evict, pin, unpin, unregister and generate for a bounded
time against two replicas; afterwards no limit was exceeded, no pin was broken, the mirror equals
the replicas and the registry's indexes agree with its records."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from adapter_svc.records import STATES
from loraserve.v1 import adapter_pb2 as pb

from harness import TIMEOUT_S, ManagerHandle, manager_config, mirror, register, replica_state, truth, wait_for
from redis_deployments import all_keys

LOAD_TIMEOUT_S = 5.0  # a reservation whose load neither landed nor failed lapses after this
CLIENTS = 16
RUN_S = 6.0  # each client stops starting operations after this long
MAX_OPS = 40  # ... or after this many
SHARED = [f"ad-{i}" for i in range(1, 8)]  # ad-0 is pinned for the whole run
# Refusals the workload provokes on purpose; anything else (INTERNAL, UNKNOWN ...) fails the test.
EXPECTED = {
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # everything pinned or busy
    grpc.StatusCode.FAILED_PRECONDITION,  # pinned / in a slot / being unregistered
    grpc.StatusCode.NOT_FOUND,  # unregistered by its owner meanwhile
    grpc.StatusCode.ALREADY_EXISTS,
}


def client(n: int, manager, replicas, adapters, deadline: float, counts: dict, lock: threading.Lock) -> None:
    rng = random.Random(n)
    stub = manager.stub
    own: list[str] = []
    replica_ids = sorted(replicas)
    for op_index in range(MAX_OPS):
        if time.monotonic() > deadline:
            return
        op = rng.choice(
            ["register", "unregister", "load", "load", "evict", "pin", "unpin", "generate", "generate"]
        )
        if op == "unregister" and not own:
            op = "register"
        adapter_id = rng.choice(own) if own and rng.random() < 0.3 else rng.choice(SHARED)
        if op in ("pin", "unpin"):
            adapter_id = rng.choice(["ad-1", "ad-2"])  # pins the clients may also take away
        try:
            if op == "register":
                new_id = f"c{n}-{op_index}"
                register(stub, new_id, adapters[f"ad-{rng.randrange(1, 8)}"], tenant=f"tenant-{n % 3}")
                own.append(new_id)
            elif op == "unregister":
                stub.UnregisterAdapter(
                    pb.UnregisterAdapterRequest(adapter_id=own.pop(), force=True), timeout=TIMEOUT_S
                )
            elif op == "load":
                replica_id = rng.choice(["", *replica_ids])
                request = pb.ClusterLoadAdapterRequest(adapter_id=adapter_id, replica_id=replica_id)
                stub.LoadAdapter(request, timeout=TIMEOUT_S)
            elif op == "evict":
                stub.EvictAdapter(pb.ClusterEvictAdapterRequest(adapter_id=adapter_id), timeout=TIMEOUT_S)
            elif op == "pin":
                stub.PinAdapter(pb.PinAdapterRequest(adapter_id=adapter_id), timeout=TIMEOUT_S)
            elif op == "unpin":
                stub.UnpinAdapter(pb.UnpinAdapterRequest(adapter_id=adapter_id), timeout=TIMEOUT_S)
            elif op == "generate":
                replicas[rng.choice(replica_ids)].generate(adapter_id)
            outcome = "ok"
        except grpc.RpcError as e:
            assert e.code() in EXPECTED, f"client {n}: {op} {adapter_id} -> {e.code()}: {e.details()}"
            outcome = e.code().name
        with lock:
            counts[(op, outcome)] = counts.get((op, outcome), 0) + 1


@pytest.fixture
def manager(loop, redis_proc, tmp_path, adapter_root, model_dir):
    """The suite's manager with reservations that lapse within the test's bounds."""
    config = manager_config(redis_proc.url, tmp_path, adapter_root, model_dir, load_timeout_s=LOAD_TIMEOUT_S)
    handle = ManagerHandle(loop, config)
    yield handle
    handle.close()


def test_sixteen_concurrent_clients_keep_every_invariant(manager, replicas, redis_proc, adapters):
    for i in range(8):
        register(manager.stub, f"ad-{i}", adapters[f"ad-{i}"])
    pinned_on = manager.stub.PinAdapter(
        pb.PinAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S
    ).replica_ids
    r = redis_proc.client()
    events_before = r.xrevrange(redis_proc.keys.events, count=1)[0][0]

    counts: dict = {}
    lock = threading.Lock()
    deadline = time.monotonic() + RUN_S
    with ThreadPoolExecutor(CLIENTS) as pool:
        for f in [
            pool.submit(client, n, manager, replicas, adapters, deadline, counts, lock)
            for n in range(CLIENTS)
        ]:
            f.result(timeout=TIMEOUT_S * 2)
    assert sum(n for (op, outcome), n in counts.items() if outcome == "ok") > CLIENTS, counts

    for adapter_id in ("ad-1", "ad-2"):
        manager.stub.UnpinAdapter(pb.UnpinAdapterRequest(adapter_id=adapter_id), timeout=TIMEOUT_S)

    def quiescent():
        held = {rid: truth(h.stub) for rid, h in replicas.items()}
        return (held,) if all(mirror(manager.stub, rid) == h for rid, h in held.items()) else None

    held = wait_for(quiescent, "the manager to mirror both replicas after the run")[0]

    for rid, handle in replicas.items():
        config = handle.server.config.engine
        history = handle.on_engine(lambda e: [len(step.slots) for step in e.step_history])
        assert max(history, default=0) <= config.max_loras  # the scheduler's own record of each step
        assert len(held[rid]) <= config.max_cpu_loras
        assert sum(slot >= 0 for slot, _ in held[rid].values()) <= config.max_loras
        # every load reservation landed, failed or lapsed (LOAD_TIMEOUT_S, at a heartbeat): none is held
        wait_for(
            lambda rid=rid: not replica_state(manager.stub, rid).loading, f"{rid}'s reservations to clear"
        )

    # The pin held: ad-0 stayed on its replica, pinned, and was never evicted anywhere.
    assert all(held[rid].get("ad-0", (None, False))[1] for rid in pinned_on)
    evicted = [
        f for _, f in r.xrange(redis_proc.keys.events, min=f"({events_before}") if f["type"] == "evicted"
    ]
    assert not [f for f in evicted if f["adapter"] == "ad-0"]

    # The registry agrees with itself: every record in the all-index and exactly one state index,
    # its per-replica states equal to the mirrors, its state derived from them.
    ids = r.zrange(redis_proc.keys.adapters, 0, -1)
    assert sorted(ids) == sorted(
        k.split("/a/", 1)[1].rsplit("}:", 1)[0] for k in all_keys(r, redis_proc.keys.adapter("*"))
    )
    for adapter_id in ids:
        record = r.hgetall(redis_proc.keys.adapter(adapter_id))
        assert record.get("deleting") != "1"
        on = r.hgetall(redis_proc.keys.adapter_on(adapter_id))
        expected_on = {
            rid: ("ACTIVE" if held[rid][adapter_id][0] >= 0 else "CACHED")
            for rid in held
            if adapter_id in held[rid]
        }
        assert on == expected_on, adapter_id
        in_states = [s for s in STATES if r.zscore(redis_proc.keys.by_state(s), adapter_id) is not None]
        assert in_states == [record["state"]], adapter_id
        best = "ACTIVE" if "ACTIVE" in on.values() else "CACHED" if on else record["state"]
        assert record["state"] == best, adapter_id
