"""The manager forgets a replica down for longer than `forget_down_after_s`: its keys go, then its
membership index entry, in two steps that keep a replica that joined again in between; a forgotten
replica joins anew. On every Redis deployment (`redis_proc`), through the manager's `Registry`.

A replica "down for two hours" is made by moving its recorded times back (what the passing of
that time would leave), so no test waits for a cutoff to pass."""

from __future__ import annotations

import argparse
import hashlib

import pytest

from adapter_svc.cli import add_manager_flags, manager_config_from
from adapter_svc.config import ManagerConfig
from adapter_svc.membership import Membership
from adapter_svc.records import ForgetPass, Forgot, JoinRequest, Resident, record_fields
from adapter_svc.registry import Registry
from loraserve import redis_connect

from harness import CLUSTER, ManagerHandle, assert_rejected, manager_config, wait_for
from redis_deployments import all_keys

HOUR_MS = 3_600_000
TTL_MS = 60_000
SHA = hashlib.sha256(b"weights").hexdigest()


def test_forgetting_deletes_only_replicas_down_past_the_cutoff(in_registry):
    async def scenario(registry: Registry, sync):
        epochs = await join_all(registry, ["r-old", "r-young", "r-up"], held=["ad-1"])
        for r in ("r-old", "r-young"):
            assert await registry.mark_down(r, "left", only_if_lapsed=False, epoch=epochs[r])
        age(sync, registry, "r-old", 2 * HOUR_MS)
        # last seen two hours ago, but marked down half an hour ago (no manager ran in between):
        # a candidate by its index score, kept by the script
        age(sync, registry, "r-young", HOUR_MS // 2, seen_ms=2 * HOUR_MS)
        before = await registry.last_event_id()

        done = await registry.forget_down(HOUR_MS, limit=100)

        assert done.forgotten == ("r-old",) and not done.more
        assert all_keys(sync, registry.keys.replica_prefix("r-old") + "*") == []
        assert sync.zscore(registry.keys.replicas, "r-old") is None
        assert sync.zscore(registry.keys.replicas_changed, "r-old") is None
        kept = {r.replica_id: r.status for r in await registry.replicas()}
        assert kept == {"r-up": "UP", "r-young": "DOWN"}
        assert [(e.type, e.replica_id) for e in await registry.read_events(before)] == [
            ("replica_forgotten", "r-old")
        ]
        # Reconciliation: the adapter's `on` follows the mirrors (none for a forgotten replica: here
        # r-old is put back as a manager that died between its MARK_DOWN and RESIDE left it), and
        # the version r-old left in `on-version` goes; live and remembered replicas keep theirs.
        on, versions = registry.keys.adapter_on("ad-1"), registry.keys.adapter_on_version("ad-1")
        assert sorted(sync.hkeys(versions)) == ["r-old", "r-up", "r-young"]
        sync.hset(on, "r-old", "CACHED")
        for _ in range(2):  # the first pass clears `on`, the second the version
            await registry.repair_adapters(["ad-1"])
        assert sync.hgetall(on) == {"r-up": "CACHED"}
        assert sorted(sync.hkeys(versions)) == ["r-up", "r-young"]

    in_registry(scenario)


def test_a_replica_that_joins_again_between_the_two_steps_is_kept(in_registry):
    async def scenario(registry: Registry, sync):
        await gone_long_ago(registry, sync, "r-1")
        seen = int(sync.zscore(registry.keys.replicas, "r-1"))

        assert await registry.forget_replica("r-1", HOUR_MS) is Forgot.FORGOTTEN
        await join_all(registry, ["r-1"])  # back between the steps: a new record, a new score
        assert not await registry.unlist_replica("r-1", seen)

        assert [(r.replica_id, r.status) for r in await registry.replicas()] == [("r-1", "UP")]
        assert sync.zscore(registry.keys.replicas_changed, "r-1") is not None
        # and a replica up again is never forgotten, however old its last down time
        sync.hset(registry.keys.replica("r-1"), "down_at", 1)
        assert await registry.forget_replica("r-1", HOUR_MS) is Forgot.KEPT

    in_registry(scenario)


def test_an_index_entry_left_by_a_manager_that_died_between_the_steps_goes_next_pass(in_registry):
    async def scenario(registry: Registry, sync):
        await gone_long_ago(registry, sync, "r-1")
        assert await registry.forget_replica("r-1", HOUR_MS) is Forgot.FORGOTTEN  # step two never ran

        assert sync.zscore(registry.keys.replicas, "r-1") is not None
        assert await registry.replicas() == []  # readers skip an entry without a record
        counts = await registry.counts()
        assert (counts.replicas_up, counts.replicas_down) == (0, 0)  # and the gauges do too

        done = await registry.forget_down(HOUR_MS, limit=100)
        assert done.forgotten == () and sync.zscore(registry.keys.replicas, "r-1") is None

    in_registry(scenario)


def test_a_pass_examines_at_most_its_limit_and_says_when_more_wait(in_registry):
    async def scenario(registry: Registry, sync):
        for r in ("r-1", "r-2"):
            await gone_long_ago(registry, sync, r)
        passes = [await registry.forget_down(HOUR_MS, limit=1) for _ in range(3)]
        assert [(len(p.forgotten), p.more) for p in passes] == [(1, True), (1, True), (0, False)]
        assert sorted(passes[0].forgotten + passes[1].forgotten) == ["r-1", "r-2"]
        # a full batch of replicas not down long enough: nothing to gain from a pass right after
        await gone_long_ago(registry, sync, "r-3", HOUR_MS // 2)
        age(sync, registry, "r-3", 0, seen_ms=2 * HOUR_MS)
        assert await registry.forget_down(HOUR_MS, limit=1) == ForgetPass((), more=False)

    in_registry(scenario)


def test_a_forgotten_replica_joins_anew_and_its_residency_is_mirrored(in_registry):
    async def scenario(registry: Registry, sync):
        # several residency changes, so the adapter's `on-version` for r-1 is above 1
        epochs = await join_all(registry, ["r-1"], held=["ad-1"])
        await registry.mirror_evicted("r-1", "ad-1")
        await join_all(registry, ["r-1"], held=["ad-1"])
        assert await registry.mark_down("r-1", "left", only_if_lapsed=False, epoch=epochs["r-1"] + 1)
        age(sync, registry, "r-1", 2 * HOUR_MS)
        assert (await registry.forget_down(HOUR_MS, limit=100)).forgotten == ("r-1",)
        assert await registry.replica("r-1") is None
        await registry.mirror_evicted("r-1", "ad-1")  # a late confirmation recreates nothing
        assert all_keys(sync, registry.keys.replica_prefix("r-1") + "*") == []
        # what the replica's old incarnation may still send: refused, so it joins again
        assert (await registry.heartbeat("r-1", epochs["r-1"] + 1, [], 0, TTL_MS)).rejoin

        epochs = await join_all(registry, ["r-1"], held=["ad-1"])

        assert epochs["r-1"] == 1  # a new record: its epochs start again
        back = await registry.replica("r-1")
        assert back.up and [r.adapter_id for r in back.residents] == ["ad-1"]
        assert (await registry.get("ad-1")).placements == {"r-1": "CACHED"}
        assert not (await registry.heartbeat("r-1", 1, [resident("ad-1")], 0, TTL_MS)).rejoin
        assert sync.zscore(registry.keys.replicas, "r-1") is not None

    in_registry(scenario)


def test_forget_down_after_s_zero_never_forgets(in_registry, redis_proc):
    async def scenario(registry: Registry, sync):
        await gone_long_ago(registry, sync, "r-1", 10_000 * HOUR_MS)
        config = ManagerConfig(redis_url=redis_proc.url, cluster=CLUSTER, forget_down_after_s=0)
        never = Membership(config, registry, placement=None)  # forgetting uses no placement
        assert (await never.forget_once()).forgotten == ()
        assert [r.replica_id for r in await registry.replicas()] == ["r-1"]
        config = ManagerConfig(redis_url=redis_proc.url, cluster=CLUSTER, forget_down_after_s=3600)
        hourly = Membership(config, registry, placement=None)
        assert (await hourly.forget_once()).forgotten == ("r-1",)

    in_registry(scenario)


def test_the_sweeper_marks_a_silent_replica_down_and_later_forgets_it(
    loop, redis_proc, tmp_path, adapter_root, model_dir
):
    config = manager_config(redis_proc.url, tmp_path, adapter_root, model_dir, forget_down_after_s=0.5)
    manager = ManagerHandle(loop, config)
    sync = redis_proc.client()
    try:
        registry = manager.server.registry
        before = loop.run(registry.last_event_id())
        loop.run(join_all(registry, ["r-silent"], ttl_ms=manager.manager.membership.ttl_ms))  # no heartbeat
        wait_for(lambda: sync.zscore(registry.keys.replicas, "r-silent") is None, "r-silent to be forgotten")
        assert all_keys(sync, registry.keys.replica_prefix("r-silent") + "*") == []
        events = [(e.type, e.detail.split(":")[-1].strip()) for e in loop.run(registry.read_events(before))]
        assert events[0][0] == "replica_joined"
        assert events[1:] == [("replica_down", "heartbeat lapsed"), ("replica_forgotten", "heartbeat lapsed")]
    finally:
        sync.close()
        manager.close()


def test_the_setting_comes_from_flag_or_environment_and_rejects_a_negative_value():
    assert ManagerConfig().forget_down_after_s == 3600.0
    parser = argparse.ArgumentParser()
    add_manager_flags(parser)
    environ = {"LORASERVE_MANAGER_FORGET_DOWN_AFTER_S": "0"}
    assert manager_config_from(parser.parse_args([]), environ).forget_down_after_s == 0
    args = parser.parse_args(["--forget-down-after-s", "86400"])
    assert manager_config_from(args, environ).forget_down_after_s == 86400
    assert_rejected(
        ManagerConfig,
        dict(forget_down_after_s=-1.0),
        "forget_down_after_s (-1.0) must be >= 0 (0 = never forget)",
    )


# --- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def in_registry(loop, redis_proc):
    """Runs `scenario(registry, sync)`: a `Registry` of the test's Redis with `ad-1` registered,
    and a plain client to look at its keys."""
    sync = redis_proc.client()

    async def run(scenario):
        client = redis_connect.connect(redis_proc.url, max_connections=16)
        registry = Registry(client, CLUSTER, 1000)
        try:
            fields = record_fields("ad-1", "src", SHA, SHA, 8, 16.0, False, ("q_proj",), 1000, "", {})
            await registry.register("ad-1", fields)
            await scenario(registry, sync)
        finally:
            await client.aclose()

    yield lambda scenario: loop.run(run(scenario))
    sync.close()


async def gone_long_ago(registry: Registry, sync, replica_id: str, ms: int = 2 * HOUR_MS) -> None:
    """Join the replica, let it leave, and age it by `ms` (see `age`)."""
    epochs = await join_all(registry, [replica_id])
    assert await registry.mark_down(replica_id, "left", only_if_lapsed=False, epoch=epochs[replica_id])
    age(sync, registry, replica_id, ms)


def resident(adapter_id: str) -> Resident:
    return Resident(adapter_id, -1, False, 1, SHA)


async def join_all(
    registry: Registry, replica_ids: list[str], held: tuple[str, ...] = (), ttl_ms: int = TTL_MS
) -> dict[str, int]:
    """Join each replica (a distinct address each) holding `held` in its host cache, live for
    `ttl_ms` without a heartbeat -> epochs."""
    epochs = {}
    for n, r in enumerate(replica_ids):
        snapshot = [resident(a) for a in held]
        join = JoinRequest(r, f"10.0.0.{n}:50051", {"max_loras": 2}, "{}", snapshot, 0, "cred")
        epochs[r] = (await registry.join(join, ttl_ms)).epoch
    return epochs


def age(sync, registry: Registry, replica_id: str, ms: int, seen_ms: int | None = None) -> None:
    """Move a down replica's times back, as if that long had passed: when it went down by `ms`,
    when it was last seen (its record and its membership index score) by `seen_ms` (default `ms`)."""
    key = registry.keys.replica(replica_id)
    down_at, last = (int(v) for v in sync.hmget(key, "down_at", "last_heartbeat"))
    seen = last - (ms if seen_ms is None else seen_ms)
    sync.hset(key, mapping={"down_at": down_at - ms, "last_heartbeat": seen})
    sync.zadd(registry.keys.replicas, {replica_id: seen})
