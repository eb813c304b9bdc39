"""SIGKILL of the Redis primary during a bounded register loop, on Sentinel and on a Cluster: no
acknowledged registration is lost (redis_wait_replicas=1), the manager's calls recover on the
promoted node by themselves, and Redis mirrors what a replica holds afterwards. On a Cluster whose
shard cannot replicate, a registration answers UNAVAILABLE and its retry is safe."""

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


def exposed(deployment, killed: int, acknowledged: list) -> list[str]:
    """The acknowledged registrations whose record the primary on port `killed` holds."""
    ids = [a for a, _ in list(acknowledged)]
    if isinstance(deployment, SentinelDeployment):
        return ids
    owners = deployment.primary_ports([deployment.keys.adapter(a) for a in ids])
    return [a for a, port in zip(ids, owners) if port == killed]


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
def test_killing_the_primary_loses_no_acknowledged_registration(
    kind, loop, tmp_path, adapters, adapter_root, model_dir
):
    deployment = (SentinelDeployment if kind == "sentinel" else ClusterDeployment)(tmp_path / kind).start()
    # WAIT for one replica on every registry write (on a Cluster, the replica of the adapter's shard).
    config = manager_config(
        deployment.url, tmp_path, adapter_root, model_dir, redis_retries=8, redis_wait_replicas=1
    )
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
        # On a Cluster the killed primary's shard is the one at stake: kill once it holds some
        # acknowledged records. (Its promoted replica has no replica of its own, so its
        # registrations after the kill answer UNAVAILABLE; the other shards' go on.)
        killed = deployment.primary_port()
        wait_for(
            lambda: (
                len(exposed(deployment, killed, acknowledged)) >= KILL_AFTER // 3
                and len(acknowledged) >= KILL_AFTER
            ),
            "registrations before the kill, some on the shard of the primary killed",
        )
        at_stake = exposed(deployment, killed, acknowledged)
        began = time.monotonic()
        deployment.kill_primary()
        killed_at.append(time.monotonic() - began)
        writer.join(LOOP_S + 2 * TIMEOUT_S)
        assert not writer.is_alive()

        after = [a for a, late in acknowledged if late]
        assert after, f"no registration succeeded after the failover ({len(refused)} refused)"
        for adapter_id in ["before", *(a for a, _ in acknowledged)]:
            got = manager.stub.GetAdapter(pb.GetAdapterRequest(adapter_id=adapter_id), timeout=TIMEOUT_S)
            assert got.adapter_id == adapter_id
        # The replica's holdings are mirrored again (its reports land on the promoted node).
        replica.generate("before")
        assert "before" in in_sync(manager.stub, "r1", replica.stub)
        print(
            f"{kind}: failover {killed_at[0]:.1f} s, {len(acknowledged)} acknowledged "
            f"({len(at_stake)} before the kill on the killed primary), {len(refused)} refused"
        )
    finally:
        replica.close()
        manager.close()
        deployment.stop()


def test_a_registration_no_replica_acknowledges_is_unavailable_and_its_retry_is_safe(
    loop, cluster_deployment, tmp_path, adapters, adapter_root, model_dir
):
    """The replica of the shard owning the adapter's key is stopped, so WAIT gets no
    acknowledgement: the registration answers UNAVAILABLE naming redis_wait_replicas (the shard's
    primary applied it: the record is there); once the replica runs again, the retry succeeds."""
    deployment = cluster_deployment
    deployment.flush()
    config = manager_config(
        deployment.url, tmp_path, adapter_root, model_dir, redis_wait_replicas=1, redis_wait_timeout_ms=300
    )
    manager = ManagerHandle(loop, config)
    record = deployment.keys.adapter("stalled")
    replica = deployment.replica_port(deployment.primary_port(record))
    try:
        register(manager.stub, "first", adapters["ad-0"])  # acknowledged while every replica runs
        deployment.pause(replica)
        try:
            with pytest.raises(grpc.RpcError) as refused:
                register(manager.stub, "stalled", adapters["ad-1"])
            with deployment.client() as c:
                applied = c.exists(record)
        finally:
            deployment.resume(replica)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        assert "redis_wait_replicas" in refused.value.details()
        assert applied, "the shard's primary applied the write WAIT could not confirm"

        def retried() -> bool:
            try:
                return register(manager.stub, "stalled", adapters["ad-1"]).adapter_id == "stalled"
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                return False

        wait_for(retried, "the retried registration to be acknowledged")
        got = manager.stub.GetAdapter(pb.GetAdapterRequest(adapter_id="stalled"), timeout=TIMEOUT_S)
        assert got.adapter_id == "stalled"
        listed = manager.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT_S)
        assert sorted(a.adapter_id for a in listed.adapters) == ["first", "stalled"]
    finally:
        manager.close()
