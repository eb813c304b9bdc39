"""The sharded key layout (v2): keys of many adapters spread over every Cluster primary, a Redis
in the old single-tag layout (v1) is migrated once with nothing lost, and reconciliation repairs
each kind of drift a manager dying between the steps of a change could leave."""

from __future__ import annotations

import json

import grpc
import pytest

from adapter_svc import migration
from adapter_svc.blobs import blob_name
from adapter_svc.records import STATES, record_fields
from loraserve.v1 import adapter_pb2 as pb

from harness import CLUSTER, TIMEOUT_S, ManagerHandle, bulk_register, code_of, manager_config, wait_for
from redis_deployments import ClusterDeployment, all_keys

SPREAD = 10_000


def fake_records(count: int, prefix: str = "spread", tenants: int = 5) -> list[tuple[str, dict]]:
    """Records of made-up content (no stored copy: enough for the registry's keys)."""
    return [
        (
            f"{prefix}-{i:05d}",
            record_fields(
                f"{prefix}-{i:05d}",
                f"dir:/adapters/{prefix}-{i}",
                f"{i:064x}",
                f"{i % 3:064x}",
                8,
                16.0,
                False,
                ("q_proj", "v_proj"),
                4096,
                f"tenant-{i % tenants}" if tenants else "",
                {"i": str(i)},
            ),
        )
        for i in range(count)
    ]


def test_keys_of_ten_thousand_adapters_spread_over_every_primary(loop, redis_proc):
    if not isinstance(redis_proc, ClusterDeployment):
        pytest.skip("counts keys per Cluster primary")
    assert bulk_register(loop, redis_proc.url, fake_records(SPREAD)) == SPREAD
    with redis_proc.client() as c:
        sizes = {node.name: c.get_redis_connection(node).dbsize() for node in c.get_primaries()}
    mean = sum(sizes.values()) / len(sizes)
    assert len(sizes) == 3 and sum(sizes.values()) >= 2 * SPREAD  # a record and a blob key each
    assert min(sizes.values()) > 0 and max(sizes.values()) <= 2 * mean, sizes


# --- migration from layout v1 ------------------------------------------------------------------


def write_v1(client) -> dict:
    """A realistic v1 deployment: records (one pinned, one failed, one mid-load on a replica),
    indexes, a replica with its mirror, aliases, rules, routing version, blob references, a live
    lease, an orphaned blob and events, all under the single tag `{test}`."""
    old = migration.V1Keys(CLUSTER)
    records = fake_records(4, prefix="old", tenants=2)
    records[1][1]["pinned"] = "1"
    records[2][1].update(failed="1", reason="boom")
    states = {"old-00000": "ACTIVE", "old-00001": "REGISTERED", "old-00002": "FAILED", "old-00003": "CACHED"}
    pipe = client.pipeline(transaction=False)
    for adapter_id, fields in records:
        pipe.hset(
            old.adapter(adapter_id),
            mapping={**fields, "state": states[adapter_id], "created_at": 1, "updated_at": 2},
        )
        pipe.zadd(old.adapters, {adapter_id: 0})
        pipe.zadd(old.by_tenant(fields["tenant"]), {adapter_id: 0})
        pipe.zadd(old.by_state(states[adapter_id]), {adapter_id: 0})
        blob = blob_name(fields["sha256"], fields["config_sha256"])
        pipe.sadd(old.prefix + f"blob:{blob}:refs", adapter_id)
    pipe.hset(old.adapter("old-00000") + ":on", mapping={"rep-1": "ACTIVE"})
    pipe.hset(old.adapter("old-00003") + ":on", mapping={"rep-1": "CACHED"})
    pipe.sadd(old.pinned, "old-00001")
    pipe.zadd(old.replicas, {"rep-1": 1})
    pipe.hset(old.prefix + "replica:rep-1", mapping={"address": "127.0.0.1:1", "status": "UP", "epoch": 3})
    pipe.zadd(old.prefix + "replica:rep-1:host", {"old-00000": 1, "old-00003": 2})
    pipe.hset(old.prefix + "replica:rep-1:slots", mapping={"old-00000": 0})
    aliases = {"bot": json.dumps([["old-00000", 3], ["old-00001", 1]])}
    pipe.hset(old.aliases, mapping=aliases)
    rules = [
        {
            "name": "r1",
            "target": "bot",
            "match_tenant": "tenant-1",
            "match_headers": [],
            "match_adapter_id": "",
        }
    ]
    pipe.set(old.rules, json.dumps(rules))
    pipe.set(old.routing_version, 7)
    leased = blob_name(records[3][1]["sha256"], records[3][1]["config_sha256"])
    pipe.zadd(old.blob_leases(leased), {"fetch-token": 2**50})
    pipe.zadd(old.orphaned_blobs, {"gone-blob": 1234})
    pipe.set(old.blob_refs_version, "1")
    for n in range(3):
        pipe.xadd(
            old.events,
            {"type": "registered", "adapter": f"old-{n:05d}", "replica": "", "detail": "", "at": 1},
        )
    pipe.execute()
    return {"records": dict(records), "aliases": aliases, "rules": rules, "leased": leased}


def test_a_v1_redis_is_migrated_once_with_nothing_lost(loop, redis_proc, tmp_path, adapter_root, model_dir):
    client = redis_proc.client()
    written = write_v1(client)
    events_before = [event_id for event_id, _ in client.xrange(migration.V1Keys(CLUSTER).events)]
    manager = ManagerHandle(loop, manager_config(redis_proc.url, tmp_path, adapter_root, model_dir))
    try:
        keys = redis_proc.keys
        assert client.get(keys.layout) == "v2"
        assert all_keys(client, "loraserve:v1:*") == []  # the old keys went after the copy
        stub = manager.stub
        for adapter_id, fields in written["records"].items():
            got = stub.GetAdapter(pb.GetAdapterRequest(adapter_id=adapter_id), timeout=TIMEOUT_S)
            assert (got.sha256, got.tenant, dict(got.metadata)) == (
                fields["sha256"],
                fields["tenant"],
                json.loads(fields["metadata"]),
            )
            # residency is not copied: replicas report it again when they rejoin
            failed = adapter_id == "old-00002"
            expected = pb.ADAPTER_STATE_FAILED if failed else pb.ADAPTER_STATE_REGISTERED
            assert got.state == expected and got.pinned == (adapter_id == "old-00001")
            blob = blob_name(fields["sha256"], fields["config_sha256"])
            assert client.smembers(keys.blob_refs(blob)) == {adapter_id}
        listed = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT_S)
        assert [a.adapter_id for a in listed.adapters] == sorted(written["records"])
        by_tenant = stub.ListAdapters(pb.ListAdaptersRequest(tenant="tenant-1"), timeout=TIMEOUT_S)
        assert [a.adapter_id for a in by_tenant.adapters] == ["old-00001", "old-00003"]
        failed = stub.ListAdapters(pb.ListAdaptersRequest(state=pb.ADAPTER_STATE_FAILED), timeout=TIMEOUT_S)
        assert [a.adapter_id for a in failed.adapters] == ["old-00002"]
        assert client.smembers(keys.pinned) == {"old-00001"}

        table = stub.GetRoutingTable(pb.GetRoutingTableRequest(), timeout=TIMEOUT_S)
        assert table.version == 7
        resolved = stub.ResolveAdapter(
            pb.ResolveAdapterRequest(adapter_id="bot", request_key="k"), timeout=TIMEOUT_S
        )
        assert resolved.adapter_id in ("old-00000", "old-00001")
        by_rule = stub.ResolveAdapter(pb.ResolveAdapterRequest(tenant="tenant-1"), timeout=TIMEOUT_S)
        assert (by_rule.rule, by_rule.alias) == ("r1", "bot") and by_rule.adapter_id in (
            "old-00000",
            "old-00001",
        )
        assert client.hgetall(keys.aliases) == written["aliases"]
        assert json.loads(client.get(keys.rules)) == written["rules"]

        assert client.zrange(keys.blob_leases(written["leased"]), 0, -1) == ["fetch-token"]
        assert client.zscore(keys.orphaned_blobs, "gone-blob") == 1234
        assert [event_id for event_id, _ in client.xrange(keys.events)][:3] == events_before

        # the copied records are usable: unpin one, unregister another
        stub.UnpinAdapter(pb.UnpinAdapterRequest(adapter_id="old-00001"), timeout=TIMEOUT_S)
        assert client.smembers(keys.pinned) == set()
        stub.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="old-00003"), timeout=TIMEOUT_S)
        assert client.smembers(keys.blob_refs(written["leased"])) == set()

        # a second start finds the marker: nothing is migrated again, even with v1 keys about
        old = migration.V1Keys(CLUSTER)
        (late, fields), *_ = fake_records(1, prefix="late")
        client.hset(old.adapter(late), mapping=fields)
        client.zadd(old.adapters, {late: 0})
        assert loop.run(migration.migrate(manager.server.registry)) is False
    finally:
        manager.close()
    again = ManagerHandle(loop, manager_config(redis_proc.url, tmp_path, adapter_root, model_dir))
    try:
        assert (
            code_of(again.stub.GetAdapter, pb.GetAdapterRequest(adapter_id=late)).code
            == grpc.StatusCode.NOT_FOUND
        )
        kept = again.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT_S)
        assert [a.adapter_id for a in kept.adapters] == ["old-00000", "old-00001", "old-00002"]
        assert client.exists(old.adapter(late)) == 1  # left alone
    finally:
        again.close()


# --- reconciliation ------------------------------------------------------------------------------


def test_reconciliation_repairs_every_kind_of_drift(loop, manager, replicas, redis_proc, adapters):
    stub, keys, r = manager.stub, redis_proc.keys, redis_proc.client()
    for i in range(3):
        stub.RegisterAdapter(
            pb.RegisterAdapterRequest(adapter_id=f"ad-{i}", path=str(adapters[f"ad-{i}"])), timeout=TIMEOUT_S
        )
    stub.LoadAdapter(
        pb.ClusterLoadAdapterRequest(adapter_id="ad-0", replica_id="r1", to_slot=True), timeout=TIMEOUT_S
    )
    stub.LoadAdapter(pb.ClusterLoadAdapterRequest(adapter_id="ad-1", replica_id="r2"), timeout=TIMEOUT_S)
    wait_for(lambda: r.hgetall(keys.adapter_on("ad-1")) == {"r2": "CACHED"}, "ad-1 cached on r2")
    blob0 = blob_name(r.hget(keys.adapter("ad-0"), "sha256"), r.hget(keys.adapter("ad-0"), "config_sha256"))
    healthy = snapshot(r, keys, ["ad-0", "ad-1", "ad-2"], blob0)

    # each drift a crash between two steps of a sequence could leave, made by hand
    r.hset(keys.adapter_on("ad-0"), mapping={"r1": "LOADING", "ghost": "ACTIVE"})  # on vs mirrors
    r.hdel(keys.adapter_on("ad-1"), "r2")  # a mirror entry missing from the adapter's on
    r.zrem(keys.by_state("ACTIVE"), "ad-0")  # state index vs record
    r.zadd(keys.by_state("FAILED"), {"ad-0": 0})
    r.zrem(keys.adapters, "ad-2")  # a record missing from the index
    r.zadd(keys.adapters, {"ad-gone": 0})  # an index entry without a record
    r.sadd(keys.pinned, "ad-1")  # the pinned set vs records
    r.srem(keys.blob_refs(blob0), "ad-0")  # a reference missing ...
    r.sadd(keys.blob_refs(blob0), "ad-gone")  # ... and one too many
    r.zadd(keys.orphaned_blobs, {blob0: 1})  # a referenced copy marked garbage
    assert snapshot(r, keys, ["ad-0", "ad-1", "ad-2"], blob0) != healthy

    membership = manager.manager.membership
    for _ in range(3):  # every pass wraps around at least once
        while not loop.run(membership.reconcile_once()):
            pass
    assert snapshot(r, keys, ["ad-0", "ad-1", "ad-2"], blob0) == healthy
    assert r.zscore(keys.adapters, "ad-gone") is None


def snapshot(r, keys, ids: list[str], blob: str) -> dict:
    return {
        "on": {a: r.hgetall(keys.adapter_on(a)) for a in ids},
        "states": {s: sorted(r.zrange(keys.by_state(s), 0, -1)) for s in STATES},
        "all": sorted(r.zrange(keys.adapters, 0, -1)),
        "pinned": sorted(r.smembers(keys.pinned)),
        "refs": sorted(r.smembers(keys.blob_refs(blob))),
        "orphaned": r.zscore(keys.orphaned_blobs, blob),
    }


def test_every_script_touches_one_hash_tag():
    """Each script builds keys of one entity kind only (Redis Cluster refuses the rest; this
    catches it on every deployment)."""
    from adapter_svc import scripts

    kinds = {
        "k_adapter": "a", "k_on": "a", "k_on_version": "a", "k_placement": "a",
        "k_replica": "r", "k_alive": "r", "k_host": "r", "k_slots": "r", "k_pins": "r", "k_loading": "r",
        "k_blob_refs": "b", "k_blob_leases": "b", "k_blob_deleting": "b",
        "k_all": "g", "k_tenant": "g", "k_state": "g", "k_state_seq": "g", "k_pinned": "g",
        "k_aliases": "g", "k_rules": "g", "k_routing_version": "g", "k_events": "g",
        "k_replicas": "g", "k_replicas_changed": "g",
    }  # fmt: skip
    helpers = scripts.PRELUDE
    for name, source in scripts.SCRIPTS.items():
        body = source[len(helpers) :]
        used = {kinds[k] for k in kinds if f"{k}(" in body}
        assert len(used) <= 1, (name, used)


def test_pipelined_scripts_survive_redis_losing_them(loop, manager, redis_proc):
    """A failover or restart empties the script cache: pipelines load the scripts again."""
    registry = manager.server.registry
    records = fake_records(3, prefix="lost")
    assert loop.run(registry.register_bulk(records[:1]))[1] == 1  # the scripts are loaded now
    client = redis_proc.client()
    if isinstance(redis_proc, ClusterDeployment):
        for node in client.get_primaries():
            client.get_redis_connection(node).script_flush()
    else:
        client.script_flush()
    assert loop.run(registry.register_bulk(records[1:]))[1] == 2
    listed = manager.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT_S)
    assert [a.adapter_id for a in listed.adapters] == [a for a, _ in records]
