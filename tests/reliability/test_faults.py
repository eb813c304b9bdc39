"""Real faults, each caused for real: a replica SIGKILLed mid-stream, Redis killed and restarted, the
manager SIGKILLed mid-upload, a corrupt file in the manager's store. After each: nothing registered
is lost and Redis's mirror equals what the replicas hold. Recovery times are printed (run with -s),
not asserted beyond the generous bounds the issue sets."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from adapter_svc.blobs import BlobStore
from inference_svc.demo_model import write_demo_adapter
from loraserve.model_summary import ModelConfig
from loraserve.v1 import adapter_pb2 as pb

from harness import (
    TIMEOUT_S,
    ManagerHandle,
    ManagerProcess,
    ReplicaHandle,
    ReplicaProcess,
    code_of,
    free_port,
    in_sync,
    long_request,
    manager_config,
    manager_process_and_replica,
    mirror,
    register,
    replica_state,
    request,
    truth,
    wait_for,
)

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def report(fault: str, registered_lost: int, **figures) -> None:
    """Print what `fault` cost (run with -s): `figures`, then how many registered adapters it lost."""
    figures["registered_lost"] = registered_lost
    print(
        f"\nFAULT {fault}: "
        + ", ".join(f"{k}={v:.2f}s" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    )


def registry(stub) -> list[tuple]:
    """What must survive every fault: each registered adapter's identity, content and labels."""
    listed = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT_S)
    return [
        (a.adapter_id, a.sha256, a.tenant, tuple(sorted(a.metadata.items())), a.pinned)
        for a in listed.adapters
    ]


def lost(before: list[tuple], stub) -> int:
    """How many of the adapters in `before` (a `registry`) the registry behind `stub` no longer
    holds as they were."""
    return len(set(before) - set(registry(stub)))


def test_replica_sigkilled_mid_stream(loop, redis_proc, tmp_path, adapter_root, adapters, model_dir):
    interval = 0.5
    config = manager_config(redis_proc.url, tmp_path, adapter_root, model_dir, heartbeat_interval_s=interval)
    manager = ManagerHandle(loop, config)
    replica = None
    try:
        for i in range(3):
            register(manager.stub, f"ad-{i}", adapters[f"ad-{i}"], tenant="acme")
        replica = ReplicaProcess(model_dir, manager.address, "rk", free_port(), tmp_path / "rk.log")
        manager.stub.PinAdapter(pb.PinAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S)
        manager.stub.LoadAdapter(
            pb.ClusterLoadAdapterRequest(adapter_id="ad-1", to_slot=True), timeout=TIMEOUT_S
        )
        before = registry(manager.stub)
        in_sync(manager.stub, "rk", replica.stub)

        stream = replica.stub.Generate(long_request("ad-1"), timeout=TIMEOUT_S)
        next(stream)  # tokens are flowing
        killed = time.monotonic()
        replica.proc.send_signal(signal.SIGKILL)
        code, _ = code_of(lambda: list(stream))
        client_saw = time.monotonic() - killed
        assert code == UNAVAILABLE and client_saw < 10  # promptly, not a hang until the deadline
        started = time.monotonic()
        assert code_of(_generate, replica.stub, "ad-1")[0] == UNAVAILABLE
        new_call = time.monotonic() - started

        wait_for(
            lambda: replica_state(manager.stub, "rk").status == pb.REPLICA_STATUS_DOWN,
            "the replica marked down",
        )
        marked_down = time.monotonic() - killed
        assert marked_down < 4 * interval + 2  # a few heartbeat periods
        assert mirror(manager.stub, "rk") == {}
        assert registry(manager.stub) == before

        replica.kill()
        replica = ReplicaProcess(model_dir, manager.address, "rk", free_port(), tmp_path / "rk2.log")
        back = time.monotonic() - killed
        # It purged, joined with an empty snapshot, and the manager put the pinned adapter back.
        wait_for(lambda: truth(replica.stub).get("ad-0") == (-1, True), "the pinned adapter to be reloaded")
        assert in_sync(manager.stub, "rk", replica.stub) == {"ad-0": (-1, True)}
        assert _generate(replica.stub, "ad-1")[-1].adapter_id == "ad-1"
        in_sync(manager.stub, "rk", replica.stub)
        assert registry(manager.stub) == before
        report(
            "replica SIGKILL mid-stream",
            lost(before, manager.stub),
            stream_error=code.name,
            client_saw_error_after=client_saw,
            new_call_refused_after=new_call,
            marked_down_after=marked_down,
            serving_again_after=back,
        )
    finally:
        if replica is not None:
            replica.terminate()
        manager.close()


def _generate(stub, adapter_id: str) -> list:
    req = request([5, 6, 7, 8], adapter_id, max_tokens=2, temperature=0, ignore_eos=True)
    return list(stub.Generate(req, timeout=TIMEOUT_S))


def test_redis_killed_and_restarted(loop, redis_proc, tmp_path, adapter_root, adapters, model_dir):
    config = manager_config(redis_proc.url, tmp_path, adapter_root, model_dir, heartbeat_interval_s=0.5)
    manager = ManagerHandle(loop, config)
    replica = None
    try:
        for i in range(3):
            register(manager.stub, f"ad-{i}", adapters[f"ad-{i}"], tenant="acme", metadata={"n": str(i)})
        replica = ReplicaHandle(loop, model_dir, manager.address, "r1")
        manager.stub.PinAdapter(pb.PinAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S)
        replica.generate("ad-1")
        before = registry(manager.stub)
        held = in_sync(manager.stub, "r1", replica.stub)

        redis_proc.kill()
        killed = time.monotonic()
        started = time.monotonic()
        code, details = code_of(
            manager.stub.GetAdapter, pb.GetAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S
        )
        answered = time.monotonic() - started
        assert code == UNAVAILABLE and "Redis" in details and answered < 10
        for call, request in (
            (manager.stub.ListAdapters, pb.ListAdaptersRequest()),
            (
                manager.stub.RegisterAdapter,
                pb.RegisterAdapterRequest(adapter_id="ad-3", path=str(adapters["ad-3"])),
            ),
            (manager.stub.PinAdapter, pb.PinAdapterRequest(adapter_id="ad-1")),
        ):
            assert code_of(call, request, timeout=TIMEOUT_S)[0] == UNAVAILABLE
        wait_for(lambda: manager.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING")
        # The data plane keeps serving what it holds while the control plane's store is away.
        assert replica.generate("ad-1")[-1].adapter_id == "ad-1"
        time.sleep(1.0)  # longer than the replica's membership TTL: it lapses meanwhile

        redis_proc.start()
        restarted = time.monotonic()
        wait_for(lambda: _answers(manager.stub), "the manager to answer again", interval=0.05)
        recovered = time.monotonic() - restarted
        wait_for(lambda: manager.health_status() == health_pb2.HealthCheckResponse.SERVING, "SERVING")
        assert registry(manager.stub) == before
        assert in_sync(manager.stub, "r1", replica.stub) == held
        wait_for(
            lambda: replica_state(manager.stub, "r1").status == pb.REPLICA_STATUS_UP, "the replica up again"
        )
        register(manager.stub, "ad-3", adapters["ad-3"], tenant="acme")  # and it takes new work
        assert replica.generate("ad-3")[-1].adapter_id == "ad-3"
        in_sync(manager.stub, "r1", replica.stub)
        report(
            "redis SIGKILL + restart",
            lost(before, manager.stub),
            manager_answered=code.name,
            unavailable_answer_after=answered,
            outage=restarted - killed,
            manager_recovered_after_restart=recovered,
        )
    finally:
        if replica is not None:
            replica.close()
        manager.close()


def _answers(stub) -> bool:
    try:
        stub.GetAdapter(pb.GetAdapterRequest(adapter_id="ad-0"), timeout=2)
        return True
    except grpc.RpcError:
        return False


def test_manager_sigkilled_mid_upload(loop, redis_proc, tmp_path, adapter_root, adapters, model_dir):
    config = manager_config(redis_proc.url, tmp_path, adapter_root, model_dir)
    big = write_demo_adapter(tmp_path / "big", ModelConfig.from_dir(model_dir), rank=8, seed=5)
    weights, adapter_config = (
        (big / "adapter_model.safetensors").read_bytes(),
        (big / "adapter_config.json").read_bytes(),
    )
    port = free_port()
    first, channel, stub, replica = manager_process_and_replica(
        loop, config, port, model_dir, tmp_path / "manager1.log"
    )
    try:
        register(stub, "ad-0", adapters["ad-0"], tenant="acme")
        replica.generate("ad-0")
        before = registry(stub)
        held = in_sync(stub, "r1", replica.stub)

        gate, outcome = threading.Event(), {}
        chunk = 16 * 1024  # above the writer's buffer: each chunk reaches the staging file at once

        def messages():
            yield pb.UploadAdapterRequest(
                header=pb.UploadHeader(adapter_id="half", adapter_config_json=adapter_config, tenant="acme")
            )
            yield pb.UploadAdapterRequest(chunk=weights[:chunk])
            gate.wait(TIMEOUT_S)
            for i in range(chunk, len(weights), chunk):
                yield pb.UploadAdapterRequest(chunk=weights[i : i + chunk])

        def client():
            try:
                stub.UploadAdapter(messages(), timeout=TIMEOUT_S)
                outcome["code"] = grpc.StatusCode.OK
            except grpc.RpcError as e:
                outcome["code"] = e.code()
                outcome["at"] = time.monotonic()

        uploader = threading.Thread(target=client, daemon=True)
        uploader.start()
        staging = Path(config.store_dir) / "staging"
        wait_for(
            lambda: any(f.stat().st_size >= chunk for f in staging.glob("*/adapter_model.safetensors")),
            "the first chunk in the staging area",
        )
        first.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        uploader.join(TIMEOUT_S)
        gate.set()
        assert outcome["code"] == UNAVAILABLE
        client_saw = outcome["at"] - killed

        second = ManagerProcess(config, port, tmp_path / "manager2.log")
        back = time.monotonic() - killed
        try:
            assert code_of(stub.GetAdapter, pb.GetAdapterRequest(adapter_id="half"), timeout=TIMEOUT_S)[
                0
            ] == (grpc.StatusCode.NOT_FOUND)
            assert registry(stub) == before
            blobs = list((Path(config.store_dir) / "blobs").glob("*/*"))
            assert len(blobs) == 1  # ad-0's; nothing of the half upload was committed
            leftovers = list(staging.iterdir())
            assert len(leftovers) == 1  # the dead process's partial file, invisible to everyone
            for path in (leftovers[0], *leftovers[0].iterdir()):  # as if it had lain there for 2 h
                os.utime(path, (time.time() - 7200, time.time() - 7200))
            assert BlobStore(config.store_dir).sweep_staging() == 0 and not any(staging.iterdir())
            wait_for(lambda: in_sync(stub, "r1", replica.stub) == held, "the mirror as before")
            # The same upload, sent again whole, is registered as if nothing had happened.
            stub.UploadAdapter(_upload("half", adapter_config, weights), timeout=TIMEOUT_S)
            assert replica.generate("half")[-1].adapter_id == "half"
            in_sync(stub, "r1", replica.stub)
            assert [a[0] for a in registry(stub)] == ["ad-0", "half"]
            report(
                "manager SIGKILL mid-upload",
                lost(before, stub),
                upload_error=outcome["code"].name,
                client_saw_error_after=client_saw,
                manager_serving_again_after=back,
                half_registered=0,
                staging_leftovers_swept=len(leftovers),
            )
        finally:
            second.terminate()
    finally:
        replica.close()
        channel.close()


def _upload(adapter_id: str, config: bytes, weights: bytes, chunk: int = 16 * 1024):
    yield pb.UploadAdapterRequest(
        header=pb.UploadHeader(adapter_id=adapter_id, adapter_config_json=config, tenant="acme")
    )
    for i in range(0, len(weights), chunk):
        yield pb.UploadAdapterRequest(chunk=weights[i : i + chunk])


def test_corrupt_file_in_the_store_is_detected_reported_and_not_served(
    loop, redis_proc, tmp_path, adapter_root, adapters, model_dir
):
    config = manager_config(redis_proc.url, tmp_path, adapter_root, model_dir)
    manager = ManagerHandle(loop, config)
    replica = None
    try:
        records = {i: register(manager.stub, f"ad-{i}", adapters[f"ad-{i}"], tenant="acme") for i in range(2)}
        replica = ReplicaHandle(loop, model_dir, manager.address, "r1")
        replica.generate("ad-0")
        before = registry(manager.stub)
        config_sha256 = hashlib.sha256((adapters["ad-1"] / "adapter_config.json").read_bytes()).hexdigest()
        stored = BlobStore(config.store_dir).path_for(records[1].sha256, config_sha256)
        weights = stored / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0x01  # one bit of one weight: the file still parses, only its checksum tells
        weights.write_bytes(bytes(data))

        code, details = code_of(replica.generate, "ad-1")
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "corrupt" in details, details
        failed = wait_for(
            lambda: (
                (
                    a := manager.stub.GetAdapter(pb.GetAdapterRequest(adapter_id="ad-1"), timeout=TIMEOUT_S)
                ).state
                == pb.ADAPTER_STATE_FAILED
                and a
            ),
            "the registry to record the failure",
        )
        assert "corrupt" in failed.reason and records[1].sha256 in failed.reason
        assert "ad-1" not in truth(replica.stub)  # not served, not held
        assert replica.generate("ad-0")[-1].adapter_id == "ad-0"  # everything else unaffected
        assert registry(manager.stub) == before
        in_sync(manager.stub, "r1", replica.stub)

        # Registering the same files again repairs the store.
        register(manager.stub, "ad-1", adapters["ad-1"], tenant="acme")
        assert replica.generate("ad-1")[-1].adapter_id == "ad-1"
        in_sync(manager.stub, "r1", replica.stub)
        assert registry(manager.stub) == before
        report(
            "corrupt file in the store",
            0,
            client_saw=code.name,
            registry_state="FAILED",
            served=0,
        )
    finally:
        if replica is not None:
            replica.close()
        manager.close()
