import sys
from pathlib import Path

import pytest

from harness import RedisProcess

CORPUS = Path(__file__).resolve().parents[1] / "inference_svc"  # test_adapter_validation's corpus
if str(CORPUS) not in sys.path:
    sys.path.insert(0, str(CORPUS))


@pytest.fixture
def redis_proc(tmp_path):
    """A private redis-server with AOF (fsync always) on a free port, so a restart loses nothing."""
    proc = RedisProcess(tmp_path / "redis", appendonly=True).start()
    yield proc
    proc.stop()
