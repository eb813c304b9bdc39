import sys
from pathlib import Path

import pytest

from harness import start_server, write_model_and_adapters

RELIABILITY = Path(__file__).resolve().parents[1] / "reliability"  # credentials.py: tokens, certificates
if str(RELIABILITY) not in sys.path:
    sys.path.insert(0, str(RELIABILITY))


@pytest.fixture(scope="session")
def http_model(tmp_path_factory):
    """(model_dir, {adapter_id: adapter_dir}): the tiny model and 8 adapters `demo-0`..`demo-7`."""
    return write_model_and_adapters(tmp_path_factory.mktemp("http_model"))


@pytest.fixture(scope="module")
def served(http_model):
    """A standalone replica (max_loras=2, max_cpu_loras=4, 8 adapters) with gRPC and HTTP on loopback."""
    server = start_server(*http_model, server_overrides={"http_port": 0, "served_model_name": "tiny"})
    yield server
    server.close()
