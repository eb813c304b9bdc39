import pytest

from harness import ManagerHandle, RedisProcess, ReplicaHandle, manager_config


@pytest.fixture
def redis_proc(tmp_path):
    """A private redis-server (no persistence) on a free port, killed after the test."""
    proc = RedisProcess(tmp_path / "redis").start()
    yield proc
    proc.stop()


@pytest.fixture
def manager(loop, redis_proc, tmp_path, adapter_root, model_dir):
    """An in-process manager on that Redis, validating against --model-config until replicas join."""
    handle = ManagerHandle(loop, manager_config(redis_proc.url, tmp_path, adapter_root, model_dir))
    yield handle
    handle.close()


@pytest.fixture
def replicas(loop, manager, model_dir):
    """Two managed replicas, r1 and r2 (max_loras 2, max_cpu_loras 3), joined to `manager`."""
    handles = [
        ReplicaHandle(loop, model_dir, manager.address, f"r{i}", max_loras=2, max_cpu_loras=3) for i in (1, 2)
    ]
    yield {h.replica_id: h for h in handles}
    for h in handles:
        h.close()
