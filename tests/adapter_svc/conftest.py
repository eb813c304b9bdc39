import pytest

from harness import ManagerHandle, RedisProcess, ReplicaHandle, manager_config
from redis_deployments import ClusterDeployment, SentinelDeployment

# The control plane's suite runs on each Redis deployment it supports, through one code path.
DEPLOYMENTS = ["single", "sentinel", "cluster"]


@pytest.fixture(scope="session")
def sentinel_deployment(tmp_path_factory):
    deployment = SentinelDeployment(tmp_path_factory.mktemp("sentinel")).start()
    yield deployment
    deployment.stop()


@pytest.fixture(scope="session")
def cluster_deployment(tmp_path_factory):
    deployment = ClusterDeployment(tmp_path_factory.mktemp("redis-cluster")).start()
    yield deployment
    deployment.stop()


@pytest.fixture(params=DEPLOYMENTS)
def redis_proc(request, tmp_path):
    """The test's Redis: a private redis-server (no persistence) on a free port, killed after the
    test; or the session's Sentinel set or six-node Cluster, emptied for the test."""
    if request.param == "single":
        proc = RedisProcess(tmp_path / "redis").start()
        yield proc
        proc.stop()
        return
    deployment = request.getfixturevalue(f"{request.param}_deployment")
    deployment.flush()
    yield deployment


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
