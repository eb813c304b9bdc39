import pytest
from manager_harness import (
    LoopThread,
    ManagerHandle,
    RedisProcess,
    manager_config,
    write_adapters,
    write_model,
)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Llama-style demo model (2 layers, hidden 64)."""
    return write_model(tmp_path_factory.mktemp("manager_model"))


@pytest.fixture(scope="session")
def adapters(model_dir, tmp_path_factory):
    """{id: dir} of 8 rank-4 adapters on q_proj/v_proj, all under one adapter root."""
    return write_adapters(model_dir, tmp_path_factory.mktemp("adapter_root"), 8)


@pytest.fixture(scope="session")
def adapter_root(adapters):
    return next(iter(adapters.values())).parent


@pytest.fixture(scope="session")
def loop():
    """The event loop that hosts every in-process server of the session."""
    thread = LoopThread()
    yield thread
    thread.close()


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
