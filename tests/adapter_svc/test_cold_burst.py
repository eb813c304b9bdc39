"""A burst of requests for many more cold adapters than a replica's host cache holds is served,
not refused: the replica fetches them a few at a time (`fetcher.cold_loads_at_once`), each once
an entry can be evicted, while the later ones wait their turn.

One real manager and replica (max_loras=1, max_cpu_loras=2); 96 adapters registered (the eight
test adapters, twelve ids each), two requests for each sent at once. How long a read may wait for
an entry while the host cache does not change (`fetcher.ROOM_WAIT_S`) is cut to one second, so
that loads stuck waiting on each other fail within the test instead of after ten (before loads
took turns and the wait counted from the last change, 54 of these 192 requests failed so, with
RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from inference_svc import fetcher

from harness import ReplicaHandle, in_sync, register

IDS = 96
PER_ADAPTER = 2


@pytest.fixture
def replica(loop, manager, model_dir, adapters, monkeypatch):
    monkeypatch.setattr(fetcher, "ROOM_WAIT_S", 1.0)
    paths = list(adapters.values())
    for i in range(IDS):
        register(manager.stub, f"burst-{i}", paths[i % len(paths)])
    handle = ReplicaHandle(loop, model_dir, manager.address, "r1", max_loras=1, max_cpu_loras=2)
    yield handle
    handle.close()


@pytest.mark.parametrize("redis_proc", ["single"], indirect=True)  # the replica's part, not Redis's
def test_a_burst_of_cold_adapters_is_served_not_refused(manager, replica):
    def ask(adapter_id: str) -> str:
        try:
            return replica.generate(adapter_id, max_tokens=4)[-1].adapter_id
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"

    wanted = [f"burst-{i}" for i in range(IDS) for _ in range(PER_ADAPTER)]
    with ThreadPoolExecutor(len(wanted)) as pool:
        served = list(pool.map(ask, wanted))
    failed = [(want, got) for want, got in zip(wanted, served) if got != want]
    assert not failed, f"{len(failed)} of {len(wanted)} failed, first: {failed[0]}"
    # The manager's mirror comes to agree with what the replica holds: no reservation is left.
    assert 0 < len(in_sync(manager.stub, "r1", replica.stub)) <= 2


@pytest.mark.parametrize("max_cpu_loras, at_once", [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (16, 4), (64, 4)])
def test_loads_in_flight_leave_half_the_host_cache_to_evict(max_cpu_loras, at_once):
    assert fetcher.cold_loads_at_once(max_cpu_loras) == at_once
