import pytest

from harness import start_server, write_model_and_adapters


@pytest.fixture(scope="session")
def grpc_model(tmp_path_factory):
    """(model_dir, {adapter_id: adapter_dir}): the tiny model and 8 adapters the gRPC tests serve."""
    return write_model_and_adapters(tmp_path_factory.mktemp("grpc_model"))


@pytest.fixture(scope="module")
def served(grpc_model):
    """A real gRPC server (max_loras=2, max_cpu_loras=4, 8 adapters) on a free loopback port."""
    server = start_server(*grpc_model)
    yield server
    server.close()


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    """Where `helpers.tiny_engine` writes its demo adapters, once per test module."""
    return tmp_path_factory.mktemp("adapters")
