"""Nothing is lost across restarts: of a replica (killed), of the manager (new process), of Redis (AOF)."""

from __future__ import annotations

import grpc

from loraserve.v1 import adapter_pb2 as pb

from harness import (
    TIMEOUT_S,
    ManagerHandle,
    ManagerProcess,
    RedisProcess,
    ReplicaHandle,
    ReplicaProcess,
    free_port,
    in_sync,
    manager_config,
    manager_process_and_replica,
    mirror,
    register,
    replica_state,
    truth,
    wait_for,
)


def test_killed_replica_is_marked_down_within_two_heartbeats_and_reconciled_on_return(
    loop, redis_proc, tmp_path, adapter_root, adapters, model_dir
):
    interval_s = 0.5
    manager = ManagerHandle(
        loop,
        manager_config(redis_proc.url, tmp_path, adapter_root, model_dir, heartbeat_interval_s=interval_s),
    )
    replica = None
    try:
        register(manager.stub, "ad-0", adapters["ad-0"])
        register(manager.stub, "ad-1", adapters["ad-1"])
        replica = ReplicaProcess(model_dir, manager.address, "rk", free_port(), tmp_path / "rk.log")
        manager.stub.PinAdapter(pb.PinAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S)
        manager.stub.LoadAdapter(
            pb.ClusterLoadAdapterRequest(adapter_id="ad-1", to_slot=True), timeout=TIMEOUT_S
        )
        assert in_sync(manager.stub, "rk", replica.stub) == {"ad-0": (-1, True), "ad-1": (0, False)}

        replica.kill()
        down = wait_for(
            lambda: (s := replica_state(manager.stub, "rk")).status == pb.REPLICA_STATUS_DOWN and s,
            "the killed replica to be marked down",
        )
        assert down.down_reason == "heartbeat lapsed"
        r = redis_proc.client()
        down_at = int(r.hget(redis_proc.keys.replica("rk"), "down_at"))
        assert down_at - down.last_heartbeat_ms <= 2 * interval_s * 1000  # Redis's clock on both ends
        assert mirror(manager.stub, "rk") == {} and list(down.adapters) == []
        for adapter_id in ("ad-0", "ad-1"):
            got = manager.stub.GetAdapter(pb.GetAdapterRequest(adapter_id=adapter_id), timeout=TIMEOUT_S)
            assert (got.state, list(got.placements)) == (pb.ADAPTER_STATE_REGISTERED, [])

        # Back with the same id (a new process, a new port): it purged, joined with an empty
        # snapshot, and the manager put the pinned adapter back on it.
        replica = ReplicaProcess(model_dir, manager.address, "rk", free_port(), tmp_path / "rk2.log")
        back = replica_state(manager.stub, "rk")
        assert (
            back.status == pb.REPLICA_STATUS_UP
            and back.address == replica.address
            and back.epoch == down.epoch + 1
        )
        wait_for(lambda: truth(replica.stub).get("ad-0") == (-1, True), "the pinned adapter to be reloaded")
        assert in_sync(manager.stub, "rk", replica.stub) == {"ad-0": (-1, True)}
    finally:
        if replica is not None:
            replica.terminate()
        manager.close()


def test_manager_restart_loses_nothing(loop, redis_proc, tmp_path, adapter_root, adapters, model_dir):
    config = manager_config(redis_proc.url, tmp_path, adapter_root, model_dir)
    port = free_port()
    first, channel, stub, replica = manager_process_and_replica(
        loop, config, port, model_dir, tmp_path / "manager1.log"
    )
    try:
        for i in range(3):
            register(stub, f"ad-{i}", adapters[f"ad-{i}"], tenant="acme", metadata={"n": str(i)})
        variants = [
            pb.AliasVariant(adapter_id="ad-1", weight=3),
            pb.AliasVariant(adapter_id="ad-2", weight=1),
        ]
        stub.SetAlias(pb.SetAliasRequest(alias=pb.Alias(name="bot", variants=variants)), timeout=TIMEOUT_S)
        rule = pb.RoutingRule(name="acme", match_tenant="acme", target="bot")
        stub.SetRoutingRules(
            pb.SetRoutingRulesRequest(rules=pb.RoutingRules(rules=[rule])), timeout=TIMEOUT_S
        )
        stub.PinAdapter(pb.PinAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S)
        replica.generate("ad-2")  # fetched once, then evicted: the replica keeps its verified copy
        stub.EvictAdapter(pb.ClusterEvictAdapterRequest(adapter_id="ad-2"), timeout=TIMEOUT_S)
        replica.generate("ad-1")
        held = in_sync(stub, "r1", replica.stub)

        def view():
            adapters_ = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT_S)
            table = stub.GetRoutingTable(pb.GetRoutingTableRequest(), timeout=TIMEOUT_S)
            for a in adapters_.adapters:
                a.ClearField("updated_at_ms")
                if a.adapter_id == "ad-2":  # loaded below while the manager is away
                    a.ClearField("state")
            return adapters_, table

        before = view()
        first.kill()
        # With the manager away, the replica still serves what it holds or has a copy of.
        replica.server.agent.rpc_timeout_s = 1.0
        assert replica.generate("ad-1")[-1].adapter_id == "ad-1"
        assert replica.generate("ad-2")[-1].adapter_id == "ad-2"
        second = ManagerProcess(config, port, tmp_path / "manager2.log")
        try:
            # The registry and routing are as they were. The replica may have been marked down
            # meanwhile (the outage outlasted its TTL): it rejoins and the mirror converges again.
            held["ad-2"] = truth(replica.stub)["ad-2"]  # loaded while the manager was away
            wait_for(lambda: view() == before and mirror(stub, "r1") == held, "the state before the restart")
            assert replica_state(stub, "r1").status == pb.REPLICA_STATUS_UP
            # The new process serves the stored bytes: a fresh adapter still reaches the replica.
            register(stub, "ad-3", adapters["ad-3"])
            assert replica.generate("ad-3")[-1].adapter_id == "ad-3"
        finally:
            second.terminate()
    finally:
        replica.close()
        channel.close()


def dump(r) -> dict:
    """Every key with its type and full value."""
    out = {}
    for key in sorted(r.keys("*")):
        kind = r.type(key)
        value = {
            "string": lambda k: r.get(k),
            "hash": lambda k: r.hgetall(k),
            "zset": lambda k: r.zrange(k, 0, -1, withscores=True),
            "set": lambda k: sorted(r.smembers(k)),
            "stream": lambda k: r.xrange(k),
        }[kind](key)
        out[key] = (kind, value)
    return out


def test_redis_restart_with_aof_loses_nothing(loop, tmp_path, adapter_root, adapters, model_dir):
    redis_proc = RedisProcess(tmp_path / "redis-aof", appendonly=True).start()
    manager = ManagerHandle(loop, manager_config(redis_proc.url, tmp_path, adapter_root, model_dir))
    try:
        for i in range(4):
            register(manager.stub, f"ad-{i}", adapters[f"ad-{i}"], tenant=f"t{i % 2}")
        variants = [pb.AliasVariant(adapter_id="ad-0", weight=1)]
        manager.stub.SetAlias(
            pb.SetAliasRequest(alias=pb.Alias(name="bot", variants=variants)), timeout=TIMEOUT_S
        )
        manager.stub.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="ad-3"), timeout=TIMEOUT_S)
        r = redis_proc.client()
        before = dump(r)
        assert redis_proc.keys.adapter("ad-0") in before and redis_proc.keys.events in before
        listed = manager.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT_S)

        redis_proc.kill()  # SIGKILL: only what the AOF already holds survives
        redis_proc.start()
        assert dump(redis_proc.client()) == before
        after = wait_for(
            lambda: _list_or_none(manager.stub), "the running manager to reach the restarted Redis"
        )
        assert after == listed
    finally:
        manager.close()
        redis_proc.stop()


def _list_or_none(stub):
    try:
        return stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT_S)
    except grpc.RpcError:
        return None


def test_a_replica_marked_down_while_alive_rejoins_and_is_reconciled(
    loop, redis_proc, tmp_path, adapter_root, adapters, model_dir
):
    # Heartbeats too rare to land inside the test: the replica must rejoin on its own next call.
    config = manager_config(redis_proc.url, tmp_path, adapter_root, model_dir, heartbeat_interval_s=60.0)
    manager = ManagerHandle(loop, config)
    register(manager.stub, "ad-0", adapters["ad-0"])
    register(manager.stub, "ad-1", adapters["ad-1"])
    replica = ReplicaHandle(loop, model_dir, manager.address, "r1")
    try:
        replica.generate("ad-0")
        in_sync(manager.stub, "r1", replica.stub)  # its reports are in: none lands after the leave
        epoch = replica_state(manager.stub, "r1").epoch
        # As if its heartbeats had stalled past the TTL: the manager drops it and its residency.
        manager.stub.LeaveReplica(pb.LeaveReplicaRequest(replica_id="r1", epoch=epoch), timeout=TIMEOUT_S)
        assert replica_state(manager.stub, "r1").status == pb.REPLICA_STATUS_DOWN
        assert mirror(manager.stub, "r1") == {}
        # Its next call to the manager is refused (stale epoch); it rejoins with a snapshot and retries.
        assert replica.generate("ad-1")[-1].adapter_id == "ad-1"
        back = replica_state(manager.stub, "r1")
        assert back.status == pb.REPLICA_STATUS_UP and back.epoch > epoch
        assert set(in_sync(manager.stub, "r1", replica.stub)) == {"ad-0", "ad-1"}
    finally:
        replica.close()
        manager.close()
