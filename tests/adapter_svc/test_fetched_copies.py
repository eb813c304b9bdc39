"""An adapter fetched from the manager is loaded from the fetched bytes at once, while its local
copy is written; later loads (after a host eviction, or with the manager gone) read that copy."""

from __future__ import annotations

import hashlib

from loraserve.v1 import inference_pb2

from harness import (
    TIMEOUT_S,
    ManagerHandle,
    ReplicaHandle,
    manager_config,
    offline_tokens,
    register,
    truth,
    wait_for,
)


def local_copy(replica, adapter_id: str):
    """The directory the replica's engine now reads `adapter_id` from, once no bytes are held."""

    def written():
        def look(engine):
            path, _ = engine.adapters.sources[adapter_id]
            return None if adapter_id in engine.adapters.in_memory else path

        return replica.on_engine(look)

    return wait_for(written, "the local copy to be written")


def evict_on_replica(replica, adapter_id: str) -> None:
    request = inference_pb2.EvictAdapterRequest(adapter_id=adapter_id)
    assert replica.stub.EvictAdapter(request, timeout=TIMEOUT_S).evicted
    assert adapter_id not in truth(replica.stub)


def test_fetched_bytes_serve_at_once_and_the_local_copy_serves_later_loads(
    loop, redis_proc, tmp_path, adapter_root, adapters, model_dir
):
    manager = ManagerHandle(loop, manager_config(redis_proc.url, tmp_path, adapter_root, model_dir))
    replica = ReplicaHandle(loop, model_dir, manager.address, "r1")
    try:
        record = register(manager.stub, "ad-0", adapters["ad-0"])
        expected = offline_tokens(model_dir, adapters["ad-0"], max_tokens=4)
        first = replica.generate("ad-0", max_tokens=4)
        assert [t for out in first for t in out.token_ids] == expected

        # The copy on disk holds exactly the registered bytes, and the engine reads it from now on.
        copy = local_copy(replica, "ad-0")
        assert copy.parent == replica.server.agent.cache_dir
        weights = (copy / "adapter_model.safetensors").read_bytes()
        assert hashlib.sha256(weights).hexdigest() == record.sha256
        assert not [p.name for p in copy.parent.iterdir() if p.name.startswith(".staging-")]

        # Evicted from the host cache, it is read back from that copy: no second fetch.
        evict_on_replica(replica, "ad-0")
        again = replica.generate("ad-0", max_tokens=4)
        assert [t for out in again for t in out.token_ids] == expected
        assert manager.manager.catalog.fetches == 1

        # With the manager gone, the local copy still serves it (after one call to the manager
        # times out: shortened here from the default 10 s).
        evict_on_replica(replica, "ad-0")
        replica.server.agent.rpc_timeout_s = 1.0
        manager.close()
        manager = None
        alone = replica.generate("ad-0", max_tokens=4)
        assert [t for out in alone for t in out.token_ids] == expected
    finally:
        replica.close()
        if manager is not None:
            manager.close()
