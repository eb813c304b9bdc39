"""SIGKILL of the Redis primary during a bounded register loop, on Sentinel and on a Cluster: no
acknowledged registration is lost (Sentinel with redis_wait_replicas=1), the manager's calls
recover on the promoted node by themselves, and Redis mirrors what a replica holds afterwards."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from loraserve.v1 import adapter_pb2 as pb

from harness import TIMEOUT_S, ManagerHandle, ReplicaHandle, in_sync, manager_config, register, wait_for
from redis_deployments import ClusterDeployment, SentinelDeployment

LOOP_S = 12.0  # the register loop's length at least
AFTER = 3  # ... and it goes on until this many registrations succeeded after the failover
KILL_AFTER = 10  # acknowledged registrations before the primary is killed


def replicated(deployment) -> bool:
    """Every write the primary holding the control plane's keys took has reached a replica."""
    with deployment.client() as c:
        if isinstance(deployment, ClusterDeployment):
            c = c.get_redis_connection(c.get_node_from_key(deployment.keys.events))
        info = c.info("replication")
    offsets = [int(v["offset"]) for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
    return bool(offsets) and max(offsets) >= int(info["master_repl_offset"])


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
def test_killing_the_primary_loses_no_acknowledged_registration(
    kind, loop, tmp_path, adapters, adapter_root, model_dir
):
    deployment = (SentinelDeployment if kind == "sentinel" else ClusterDeployment)(tmp_path / kind).start()
    # Sentinel: WAIT for one replica on every registry write. Cluster (no WAIT yet): what was
    # replicated before the kill survives; the test waits for that point before killing.
    durability = {"redis_wait_replicas": 1} if kind == "sentinel" else {}
    config = manager_config(deployment.url, tmp_path, adapter_root, model_dir, redis_retries=8, **durability)
    manager = ManagerHandle(loop, config)
    replica = ReplicaHandle(loop, model_dir, manager.address, "r1")
    try:
        register(manager.stub, "before", adapters["ad-0"])
        replica.generate("before")  # the replica holds it: the mirror must survive the failover too
        acknowledged, refused, killed_at = [], [], []
        stop = time.monotonic() + LOOP_S

        def churn() -> None:
            i, hard_stop = 0, stop + TIMEOUT_S
            while time.monotonic() < hard_stop and (
                time.monotonic() < stop or sum(late for _, late in acknowledged) < AFTER
            ):
                adapter_id = f"reg-{i}"
                i += 1
                try:
                    register(manager.stub, adapter_id, adapters["ad-1"])
                    acknowledged.append((adapter_id, bool(killed_at)))
                except grpc.RpcError as e:
                    assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), e
                    refused.append(adapter_id)

        writer = threading.Thread(target=churn)
        writer.start()
        wait_for(lambda: len(acknowledged) >= KILL_AFTER, "registrations before the kill")
        if kind == "cluster":
            wait_for(lambda: replicated(deployment), "the writes so far to reach the primary's replica")
            synced = len(acknowledged)
        began = time.monotonic()
        deployment.kill_primary()
        killed_at.append(time.monotonic() - began)
        writer.join(LOOP_S + 2 * TIMEOUT_S)
        assert not writer.is_alive()

        after = [a for a, late in acknowledged if late]
        assert after, f"no registration succeeded after the failover ({len(refused)} refused)"
        must_survive = (
            [a for a, _ in acknowledged]
            if kind == "sentinel"
            else [a for a, _ in acknowledged[:synced]] + after
        )
        for adapter_id in ["before", *must_survive]:
            got = manager.stub.GetAdapter(pb.GetAdapterRequest(adapter_id=adapter_id), timeout=TIMEOUT_S)
            assert got.adapter_id == adapter_id
        # The replica's holdings are mirrored again (its reports land on the promoted node).
        replica.generate("before")
        assert "before" in in_sync(manager.stub, "r1", replica.stub)
        print(
            f"{kind}: failover {killed_at[0]:.1f} s, {len(acknowledged)} acknowledged, {len(refused)} refused"
        )
    finally:
        replica.close()
        manager.close()
        deployment.stop()
