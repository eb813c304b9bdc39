import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
for helpers in ("adapter_svc", "inference_svc"):  # manager_harness, grpc_harness, the corpus
    if str(TESTS / helpers) not in sys.path:
        sys.path.insert(0, str(TESTS / helpers))

from manager_harness import LoopThread, RedisProcess, write_adapters, write_model  # noqa: E402


@pytest.fixture(scope="session")
def loop():
    """The event loop that hosts every in-process server of these tests."""
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The tiny Llama-style demo model (2 layers, hidden 64)."""
    return write_model(tmp_path_factory.mktemp("reliability_model"))


@pytest.fixture(scope="session")
def adapters(model_dir, tmp_path_factory):
    """{id: dir} of 8 rank-4 adapters (q_proj, v_proj), all under one adapter root."""
    return write_adapters(model_dir, tmp_path_factory.mktemp("reliability_adapters"), 8)


@pytest.fixture(scope="session")
def adapter_root(adapters):
    return next(iter(adapters.values())).parent


@pytest.fixture
def redis_proc(tmp_path):
    """A private redis-server with AOF (fsync always) on a free port, so a restart loses nothing."""
    proc = RedisProcess(tmp_path / "redis", appendonly=True).start()
    yield proc
    proc.stop()
