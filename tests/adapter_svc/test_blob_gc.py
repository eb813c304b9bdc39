"""Stored copies are garbage-collected after the last adapter using them is unregistered, and never
while a registration or a fetch uses them, also with two managers racing on one Redis and store."""

from __future__ import annotations

import hashlib
import threading

import grpc
import pytest

from loraserve.v1 import adapter_pb2 as pb

from harness import TIMEOUT_S, ManagerHandle, code_of, manager_config, register, wait_for
from redis_deployments import all_keys


def fetched_sha256(stub, adapter_id: str) -> str:
    digest = hashlib.sha256()
    for part in stub.FetchAdapterWeights(
        pb.FetchAdapterWeightsRequest(adapter_id=adapter_id), timeout=TIMEOUT_S
    ):
        if part.WhichOneof("part") == "data":
            digest.update(part.data)
    return digest.hexdigest()


def unregister(stub, adapter_id: str) -> None:
    stub.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id=adapter_id), timeout=TIMEOUT_S)


def stored_copy(handle: ManagerHandle, record: pb.RegisteredAdapter):
    """The store directory of a record's bytes (`<sha256>-<config sha256[:16]>`)."""
    store = handle.manager.catalog.blobs
    found = list((store.blobs / record.sha256[:2]).glob(f"{record.sha256}-*"))
    assert len(found) <= 1
    return found[0] if found else store.blobs / record.sha256[:2] / f"{record.sha256}-missing"


def collect(loop, handle: ManagerHandle) -> list[str]:
    return loop.run(handle.manager.catalog.collect_garbage())


@pytest.fixture
def manual_manager(loop, redis_proc, tmp_path, adapter_root, model_dir):
    """Starts a manager whose collector runs only when the test calls `collect`, after `grace_s`."""
    handles = []

    def start(grace_s: float) -> ManagerHandle:
        config = manager_config(
            redis_proc.url, tmp_path, adapter_root, model_dir, blob_gc_interval_s=0, blob_gc_grace_s=grace_s
        )
        handles.append(ManagerHandle(loop, config))
        return handles[-1]

    yield start
    for handle in handles:
        handle.close()


def test_a_stored_copy_goes_with_the_last_adapter_using_it(loop, redis_proc, manual_manager, adapters):
    handle = manual_manager(0)
    first = register(handle.stub, "first", adapters["ad-0"])
    register(handle.stub, "second", adapters["ad-0"])  # the same files: one stored copy
    other = register(handle.stub, "other", adapters["ad-1"])
    path = stored_copy(handle, first)
    assert path.is_dir() and stored_copy(handle, other).is_dir()

    unregister(handle.stub, "first")
    assert collect(loop, handle) == [] and path.is_dir()  # "second" still uses it
    assert fetched_sha256(handle.stub, "second") == first.sha256

    unregister(handle.stub, "second")
    assert collect(loop, handle) == [path.name]
    assert not path.exists() and stored_copy(handle, other).is_dir()
    events = redis_proc.client().xrange(redis_proc.keys.events)
    assert [f["detail"] for _, f in events if f["type"] == "blob_deleted"] == [path.name]

    again = register(handle.stub, "first", adapters["ad-0"])  # written anew
    assert stored_copy(handle, again).is_dir()
    assert fetched_sha256(handle.stub, "first") == first.sha256
    assert collect(loop, handle) == []


def test_a_grace_period_keeps_a_copy_registered_again_soon(loop, redis_proc, manual_manager, adapters):
    handle = manual_manager(3600)
    record = register(handle.stub, "soon", adapters["ad-0"])
    unregister(handle.stub, "soon")
    assert collect(loop, handle) == [] and stored_copy(handle, record).is_dir()
    register(handle.stub, "soon", adapters["ad-0"])
    assert redis_proc.client().zcard(redis_proc.keys.orphaned_blobs) == 0  # used again: no longer garbage


def test_two_managers_racing_register_and_unregister_of_the_same_content(
    loop, redis_proc, tmp_path, adapters, adapter_root, model_dir
):
    """Both managers collect all the time (interval 10 ms, no grace) while each registers,
    fetches and unregisters its own id of the same files: every fetch of a registered adapter
    returns the whole copy, and once both are gone the copy is collected."""
    config = manager_config(
        redis_proc.url, tmp_path, adapter_root, model_dir, blob_gc_interval_s=0.01, blob_gc_grace_s=0
    )
    handles = [ManagerHandle(loop, config) for _ in range(2)]
    rounds, failures, sha = 25, [], {}

    def churn(handle: ManagerHandle, adapter_id: str) -> None:
        try:
            for _ in range(rounds):
                record = register(handle.stub, adapter_id, adapters["ad-0"])
                sha["value"] = record.sha256
                if not stored_copy(handle, record).is_dir():
                    failures.append(f"{adapter_id}: registered, but its stored copy is missing")
                got = fetched_sha256(handle.stub, adapter_id)
                if got != record.sha256:
                    failures.append(f"{adapter_id}: fetched {got}")
                unregister(handle.stub, adapter_id)
        except grpc.RpcError as e:
            failures.append(f"{adapter_id}: {e.code().name}: {e.details()}")

    threads = [threading.Thread(target=churn, args=(h, f"race-{i}")) for i, h in enumerate(handles)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT_S * 4)
        assert not any(t.is_alive() for t in threads)
        assert failures == []
        store = handles[0].manager.catalog.blobs
        client = redis_proc.client()

        def collected() -> bool:  # the files go first, then the collector forgets the copy in Redis
            gone = not any(store.blobs.glob("*/*"))
            return gone and client.zcard(redis_proc.keys.orphaned_blobs) == 0

        wait_for(collected, "both managers' collectors to delete the copy and forget it")
        assert not all_keys(client, redis_proc.keys.blob_prefix("*") + "*")
        assert (
            code_of(handles[1].stub.GetAdapter, pb.GetAdapterRequest(adapter_id="race-0")).code
            == grpc.StatusCode.NOT_FOUND
        )
    finally:
        for h in handles:
            h.close()


def test_adapters_registered_before_counting_are_counted_once(loop, redis_proc, manual_manager, adapters):
    """A Redis written before stored copies were counted (no blob keys): the collector's first
    start counts every record's reference, so a copy two old records share survives one going."""
    handle = manual_manager(0)
    record = register(handle.stub, "old-a", adapters["ad-0"])
    register(handle.stub, "old-b", adapters["ad-0"])
    client = redis_proc.client()
    # the layout before counting: no blob keys at all
    for key in all_keys(client, redis_proc.keys.prefix + "blob*") + all_keys(
        client, redis_proc.keys.blob_prefix("*") + "*"
    ):
        client.delete(key)
    registry = handle.server.registry
    assert loop.run(registry.count_blob_refs()) is True
    assert loop.run(registry.count_blob_refs()) is False  # once per Redis
    path = stored_copy(handle, record)
    unregister(handle.stub, "old-a")
    assert collect(loop, handle) == [] and path.is_dir()
    unregister(handle.stub, "old-b")
    assert collect(loop, handle) == [path.name]
