"""A replica's load reaches Redis with its heartbeats, and the picker's cached view reads it."""

from __future__ import annotations

import redis.asyncio as aioredis

from endpoint_picker.view import ClusterState

from harness import CLUSTER, TIMEOUT_S, RedisProcess, long_request, start_stack, wait_for


def test_heartbeats_carry_the_load_and_the_picker_reads_it(loop, tmp_path, model_dir, adapter_root):
    redis_proc = RedisProcess(tmp_path / "redis").start()
    manager, replica = start_stack(loop, redis_proc.url, tmp_path, model_dir, adapter_root, metrics=False)
    client = redis_proc.client()
    key = RedisProcess.keys.replica("r-0")

    async def make_state():
        return ClusterState(aioredis.from_url(redis_proc.url, decode_responses=True), CLUSTER, 0.0)

    state = loop.run(make_state())
    try:
        stream = replica.stub.Generate(long_request(), timeout=TIMEOUT_S)
        next(stream)  # running
        wait_for(lambda: client.hget(key, "running") == "1", "a heartbeat to report one running request")
        fields = client.hgetall(key)
        assert fields["waiting"] == "0" and fields["draining"] == "0"
        assert 0.0 <= float(fields["kv_free"]) < 1.0  # the running request holds KV blocks
        (seen,) = loop.run(state.view()).replicas
        assert (seen.replica_id, seen.up, seen.running, seen.address) == ("r-0", True, 1, replica.address)
        assert seen.kv_free == float(fields["kv_free"])
        stream.cancel()
        wait_for(lambda: client.hget(key, "running") == "0", "a heartbeat to report it finished")
        # The view re-reads a replica once the manager marks it changed, which follows the
        # heartbeat's own write: it may take one more read to see it.
        wait_for(lambda: loop.run(state.view()).replicas[0].running == 0, "the view to read it finished")
    finally:
        loop.run(state.client.aclose())
        client.close()
        replica.close()
        manager.close()
        redis_proc.stop()
