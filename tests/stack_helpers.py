"""Real servers for the deployment-level tests (metrics, CLI): a private redis-server, and the
manager and inference servers in-process on one event-loop thread, driven with sync stubs."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import redis
from prometheus_client.parser import text_string_to_metric_families

from adapter_svc.config import ManagerConfig
from adapter_svc.server import ManagerServer
from inference_svc.config import EngineConfig
from inference_svc.demo_model import TINY_SHAPE, write_demo_adapter, write_demo_model
from inference_svc.server import InferenceServer, ServerConfig
from loraserve.model_summary import ModelConfig

TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, what: str, timeout: float = TIMEOUT_S, interval: float = 0.02):
    """Poll `predicate()` until truthy; AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def write_model(root: Path, num_adapters: int) -> tuple[Path, Path]:
    """(tiny model dir, adapter root with ad-0.. of rank 4 on q_proj/v_proj)."""
    model_dir = write_demo_model(root / "model", **TINY_SHAPE)
    model = ModelConfig.from_dir(model_dir)
    for i in range(num_adapters):
        write_demo_adapter(
            root / "adapters" / f"ad-{i}", model, rank=4, seed=i, target_modules=("q_proj", "v_proj")
        )
    return model_dir, root / "adapters"


class RedisProcess:
    """A private redis-server; `appendonly` turns on AOF with fsync on every write."""

    def __init__(self, directory: Path, appendonly: bool = False):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisProcess:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        args += ["--save", "", "--daemonize", "no", "--loglevel", "warning"]
        args += (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        wait_for(lambda: _pings(client), "redis-server to answer")
        client.close()
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL: no shutdown hook, no final save."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(TIMEOUT_S)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(TIMEOUT_S)
            self.proc = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class LoopThread:
    """An asyncio loop on a daemon thread; `run` executes a coroutine there and waits."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-servers", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, cls, config):
        """Build `cls(config)` on the loop (grpc.aio servers bind to it) and start it."""

        async def create():
            return cls(config)

        server = self.run(create())
        self.run(server.start())
        return server

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT_S)
        self.loop.close()


def manager_config(
    redis_url: str, root: Path, adapter_root: Path, model_dir: Path, **overrides
) -> ManagerConfig:
    values = dict(
        redis_url=redis_url,
        cluster="deploy-test",
        host="127.0.0.1",
        port=0,
        adapter_roots=(str(adapter_root),),
        store_dir=str(root / "store"),
        model_config=str(model_dir),
        max_lora_rank=8,
        heartbeat_interval_s=0.5,
        redis_retries=1,
        shutdown_grace_s=0.5,
    )
    return ManagerConfig(**{**values, **overrides})


def engine_config(**overrides) -> EngineConfig:
    """A small CPU engine configuration for the tiny model (2 slots, 3 host entries, rank 8)."""
    base = dict(
        max_loras=2,
        max_cpu_loras=3,
        max_lora_rank=8,
        device="cpu",
        dtype="float32",
        lora_backend="torch",
        kv_cache_bytes=1 << 20,
    )
    return EngineConfig(**{**base, **overrides})


def replica_config(model_dir: Path, manager: str | None, **overrides) -> ServerConfig:
    engine = engine_config()
    values = dict(
        model=str(model_dir), engine=engine, port=0, grace_s=1.0, adapter_manager=manager, replica_id="r-0"
    )
    return ServerConfig(**{**values, **overrides})


def start_stack(
    loop: LoopThread, redis_url: str, root: Path, model_dir: Path, adapter_root: Path, metrics: bool
):
    """(ManagerServer, InferenceServer) joined to it; metrics on free ports if `metrics`."""
    manager = loop.start(
        ManagerServer,
        manager_config(redis_url, root, adapter_root, model_dir, metrics_port=free_port() if metrics else 0),
    )
    address = f"127.0.0.1:{manager.port}"
    replica = loop.start(
        InferenceServer, replica_config(model_dir, address, metrics_port=free_port() if metrics else 0)
    )
    return manager, replica


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of label items): value} from a Prometheus text endpoint."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    """A sample's value (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """Sum over every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, items), v in samples.items() if n == name and want <= set(items))
