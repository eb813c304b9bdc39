"""The picker's view reads only the replicas the manager marked changed, and its periodic full read
repairs what a lost mark hid (real redis-server; the manager's `Registry` writes the state)."""

from __future__ import annotations

import asyncio
import hashlib
import signal

import redis.asyncio as aioredis

from adapter_svc.records import AcquireRequest, JoinRequest, Load, record_fields
from adapter_svc.registry import Registry
from endpoint_picker.view import ClusterState

from harness import CLUSTER, TIMEOUT_S, RedisProcess

ENGINE = {"max_loras": 2}


def replica_reads(client) -> int:
    """Membership hashes read so far (the view reads one per replica it reads)."""
    return int(client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))


def test_a_refresh_reads_only_the_replicas_that_changed(loop, tmp_path):
    redis_proc = RedisProcess(tmp_path / "redis").start()
    counter = redis_proc.client()
    now = [0.0]  # the view's clock for full reads: moved by hand

    async def scenario():
        manager = aioredis.from_url(redis_proc.url, decode_responses=True)
        picker = aioredis.from_url(redis_proc.url, decode_responses=True)
        registry = Registry(manager, CLUSTER, 1000)
        state = ClusterState(picker, CLUSTER, 0.0, full_refresh_s=60.0, clock=lambda: now[0])
        sha = hashlib.sha256(b"weights").hexdigest()
        fields = record_fields("ad-1", "src", sha, sha, 8, 16.0, False, ("q_proj",), 1000, "t", {})
        await registry.register("ad-1", fields)
        epochs = {}
        for n in range(5):
            r = f"r-{n}"
            joined = await registry.join(
                JoinRequest(r, f"10.0.0.{n}:50051", ENGINE, "{}", [], 0, "cred"), 60_000
            )
            epochs[r] = joined.epoch

        async def refresh():
            before = replica_reads(counter)
            seen = await state.view()
            return {r.replica_id: r for r in seen.replicas}, replica_reads(counter) - before

        try:
            view, reads = await refresh()  # the first read is a full one
            assert sorted(view) == [f"r-{n}" for n in range(5)] and reads == 5
            assert (await refresh())[1] == 0  # nothing changed: no replica read

            # one replica's load moves: only it is read
            await registry.heartbeat("r-2", epochs["r-2"], [], 0, 60_000, Load(waiting=3, running=1))
            view, reads = await refresh()
            assert reads == 1 and (view["r-2"].waiting, view["r-2"].running) == (3, 1)
            # the same load again marks nothing
            await registry.heartbeat("r-2", epochs["r-2"], [], 0, 60_000, Load(waiting=3, running=1))
            assert (await refresh())[1] == 0

            # a reservation (ACQUIRE) changes the replica's loads in progress
            await registry.acquire(AcquireRequest("r-0", epochs["r-0"], "ad-1", []), 16, 60_000)
            view, reads = await refresh()
            assert reads == 1 and "ad-1" in view["r-0"].cached

            # a joining replica appears
            joined = await registry.join(
                JoinRequest("r-5", "10.0.0.5:50051", ENGINE, "{}", [], 0, "cred"), 60_000
            )
            view, reads = await refresh()
            assert reads == 1 and view["r-5"].up

            # a mark lost (a manager that died before writing it): stale until the full read
            await registry.heartbeat("r-3", epochs["r-3"], [], 0, 60_000, Load(running=7))
            await manager.zrem(registry.keys.replicas_changed, "r-3")
            view, reads = await refresh()
            assert reads == 0 and view["r-3"].running == 0
            now[0] += 60.0
            view, reads = await refresh()
            assert reads == 6 and view["r-3"].running == 7 and state.full_reads == 2

            # a replica that leaves is down at the next refresh
            assert await registry.mark_down("r-1", "left", only_if_lapsed=False, epoch=epochs["r-1"])
            view, reads = await refresh()
            assert reads == 1 and not view["r-1"].up

            # a replica forgotten altogether disappears at the full read, and its mark is pruned
            k = registry.keys
            await manager.delete(
                *(
                    f("r-4")
                    for f in (k.replica, k.replica_alive, k.replica_host, k.replica_slots, k.replica_loading)
                )
            )
            await manager.zrem(registry.keys.replicas, "r-4")
            now[0] += 60.0
            view, _ = await refresh()
            assert "r-4" not in view and len(view) == 5
            assert await registry.reconcile_replicas(0, 100) == 0
            assert await manager.zscore(registry.keys.replicas_changed, "r-4") is None
            assert await manager.zcard(registry.keys.replicas_changed) == 4  # r-3 lost its by hand
        finally:
            await manager.aclose()
            await picker.aclose()

    try:
        loop.run(scenario())
    finally:
        counter.close()
        redis_proc.stop()


def test_picks_never_wait_for_a_read_while_the_view_refreshes_in_the_background(loop, tmp_path):
    """With `refresh_forever` running, `view()` answers from the cached view even while a read hangs
    (redis-server SIGSTOPped, no socket timeout), and a change reaches the view without any pick
    asking for it."""
    redis_proc = RedisProcess(tmp_path / "redis").start()

    async def scenario():
        manager = aioredis.from_url(redis_proc.url, decode_responses=True)
        # no socket timeout: a read of the stopped server hangs until it resumes
        picker = aioredis.from_url(redis_proc.url, decode_responses=True, socket_timeout=None)
        registry = Registry(manager, CLUSTER, 1000)
        state = ClusterState(picker, CLUSTER, 0.01)
        await registry.join(JoinRequest("r-0", "10.0.0.1:50051", ENGINE, "{}", [], 0, "cred"), 60_000)
        refresher = asyncio.create_task(state.refresh_forever())
        try:
            await wait_until(lambda: [r.replica_id for r in state._view.replicas] == ["r-0"])
            await registry.join(JoinRequest("r-1", "10.0.0.2:50051", ENGINE, "{}", [], 0, "cred"), 60_000)
            await wait_until(lambda: len(state._view.replicas) == 2)  # no view() call in between

            redis_proc.proc.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(0.2)  # the refresher is now blocked in a read
                view = await asyncio.wait_for(state.view(), TIMEOUT_S)
                assert sorted(r.replica_id for r in view.replicas) == ["r-0", "r-1"]
            finally:
                redis_proc.proc.send_signal(signal.SIGCONT)
        finally:
            refresher.cancel()
            await asyncio.gather(refresher, return_exceptions=True)
            await manager.aclose()
            await picker.aclose()

    async def wait_until(predicate):
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while not predicate():
            assert asyncio.get_running_loop().time() < deadline, "the background refresh never saw it"
            await asyncio.sleep(0.01)

    try:
        loop.run(scenario())
    finally:
        redis_proc.stop()
