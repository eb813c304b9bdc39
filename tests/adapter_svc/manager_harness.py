"""Real processes and servers for the adapter manager tests.

- `RedisProcess`: `stack_helpers`' private `redis-server`, with this suite's `keys`; `LoopThread`
  (also `stack_helpers`') hosts the in-process gRPC servers, driven with the synchronous stubs.
- `ManagerHandle` / `ReplicaHandle`: an in-process `ManagerServer` / managed `InferenceServer`.
- `ManagerProcess` / `ReplicaProcess`: the same as separate processes (`python -m adapter_svc serve`,
  `python -m inference_svc serve --adapter-manager`), for kill and restart tests.
- `mirror` / `truth`: one replica's residency as Redis mirrors it / as the replica reports it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import redis
import stack_helpers
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stack_helpers import LoopThread, engine_config, free_port, wait_for  # noqa: F401 (re-exported)

from adapter_svc.config import ManagerConfig
from adapter_svc.keys import Keys
from adapter_svc.server import ManagerServer
from inference_svc.demo_model import TINY_SHAPE, write_demo_adapter, write_demo_model
from inference_svc.engine import LLMEngine
from inference_svc.sampling import SamplingParams
from inference_svc.server import InferenceServer, ServerConfig
from loraserve.model_summary import ModelConfig
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import adapter_pb2_grpc, inference_pb2, inference_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60  # bound on any single wait
CLUSTER = "test"


def write_model(root: Path) -> Path:
    return write_demo_model(root / "model", **TINY_SHAPE)


def write_adapters(model_dir: Path, root: Path, count: int, rank: int = 4) -> dict[str, Path]:
    model = ModelConfig.from_dir(model_dir)
    return {
        f"ad-{i}": write_demo_adapter(
            root / f"ad-{i}", model, rank=rank, seed=i, target_modules=("q_proj", "v_proj")
        )
        for i in range(count)
    }


# --- redis ----------------------------------------------------------------------------------------


class RedisProcess(stack_helpers.RedisProcess):
    """A private redis-server for the manager tests; `keys` builds their cluster's keys."""

    keys = Keys(CLUSTER)


# --- in-process servers -----------------------------------------------------------------------------


def manager_config(
    redis_url: str, tmp: Path, adapter_root: Path, model_dir: Path | None, **overrides
) -> ManagerConfig:
    base = dict(
        redis_url=redis_url,
        cluster=CLUSTER,
        host="127.0.0.1",
        port=0,
        adapter_roots=(str(adapter_root),),
        store_dir=str(tmp / "store"),
        model_config=str(model_dir) if model_dir else None,
        max_lora_rank=8,
        heartbeat_interval_s=1.0,
        redis_retries=2,
        redis_backoff_cap_s=0.2,
        shutdown_grace_s=1.0,
    )
    return ManagerConfig(**{**base, **overrides})


class ManagerHandle:
    """An in-process ManagerServer and a synchronous client to it."""

    def __init__(self, loop: LoopThread, config: ManagerConfig):
        self.loop = loop
        self.server: ManagerServer = loop.run(_create(ManagerServer, config))
        loop.run(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.address)
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
    """An in-process inference replica managed by the adapter manager at `manager_address`."""

    def __init__(self, loop: LoopThread, model_dir: Path, manager_address: str, replica_id: str, **engine):
        self.loop = loop
        self.replica_id = replica_id
        config = ServerConfig(
            model=str(model_dir),
            engine=engine_config(**engine),
            host="127.0.0.1",
            port=0,
            grace_s=1.0,
            adapter_manager=manager_address,
            replica_id=replica_id,
        )
        self.server: InferenceServer = loop.run(_create(InferenceServer, config))
        loop.run(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    def generate(self, adapter_id: str, max_tokens: int = 2, metadata=()) -> list:
        request = inference_pb2.GenerateRequest(
            adapter_id=adapter_id,
            text="hello",
            params=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        )
        return list(self.stub.Generate(request, timeout=TIMEOUT_S, metadata=metadata))

    def on_engine(self, fn):
        return self.server.engine.submit(fn).result(TIMEOUT_S)

    def close(self) -> None:
        self.channel.close()
        self.loop.run(self.server.stop(grace_s=0.5))


async def _create(cls, config):
    return cls(config)  # grpc.aio servers bind to the loop they are created on


# --- separate processes ---------------------------------------------------------------------------------


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


class _Process:
    def __init__(self, args: list[str], log: Path):
        self.log = log
        self._log_file = log.open("ab")
        self.proc = subprocess.Popen(
            args, cwd=REPO, env=_env(), stdout=self._log_file, stderr=subprocess.STDOUT
        )

    def wait_serving(self, address: str, timeout: float = TIMEOUT_S) -> None:
        channel = grpc.insecure_channel(address)
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
            wait_for(serving, f"{address} to report SERVING", timeout, interval=0.1)
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


class ManagerProcess(_Process):
    def __init__(self, config: ManagerConfig, port: int, log: Path):
        args = [sys.executable, "-m", "adapter_svc", "serve", "--redis-url", config.redis_url]
        args += ["--cluster", config.cluster, "--host", "127.0.0.1", "--port", str(port)]
        args += ["--store-dir", config.store_dir, "--heartbeat-interval-s", str(config.heartbeat_interval_s)]
        args += ["--max-lora-rank", str(config.max_lora_rank)]
        for root in config.adapter_roots:
            args += ["--adapter-root", root]
        if config.model_config:
            args += ["--model-config", config.model_config]
        super().__init__(args, log)
        self.address = f"127.0.0.1:{port}"
        self.wait_serving(self.address)


class ReplicaProcess(_Process):
    def __init__(
        self, model_dir: Path, manager_address: str, replica_id: str, port: int, log: Path, **engine
    ):
        config = engine_config(**engine)
        args = [sys.executable, "-m", "inference_svc", "serve", "--model", str(model_dir)]
        args += ["--host", "127.0.0.1", "--port", str(port), "--adapter-manager", manager_address]
        args += ["--replica-id", replica_id, "--grace-s", "1"]
        for name in (
            "max_loras",
            "max_cpu_loras",
            "max_lora_rank",
            "device",
            "dtype",
            "lora_backend",
            "kv_cache_bytes",
        ):
            args += ["--" + name.replace("_", "-"), str(getattr(config, name))]
        super().__init__(args, log)
        self.replica_id = replica_id
        self.address = f"127.0.0.1:{port}"
        self.wait_serving(self.address)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    def kill(self) -> None:
        self.channel.close()
        super().kill()

    def terminate(self) -> int:
        self.channel.close()
        return super().terminate()


# --- residency, both sides ----------------------------------------------------------------------------


def mirror(r: redis.Redis, replica_id: str, keys: Keys | None = None) -> dict:
    """What Redis says the replica holds: {adapter id: (slot or -1, pinned)}."""
    keys = keys or Keys(CLUSTER)
    host = r.zrange(keys.replica_host(replica_id), 0, -1)
    slots = r.hgetall(keys.replica_slots(replica_id))
    pins = r.smembers(keys.replica_pins(replica_id))
    return {a: (int(slots.get(a, -1)), a in pins) for a in host}


def truth(stub: inference_pb2_grpc.InferenceServiceStub) -> dict:
    """What the replica itself says it holds, in the same shape as `mirror`."""
    listed = stub.ListResidentAdapters(inference_pb2.ListResidentAdaptersRequest(), timeout=TIMEOUT_S)
    return {a.adapter_id: (a.slot if a.HasField("slot") else -1, a.pinned) for a in listed.adapters}


def offline_tokens(model_dir: Path, adapter_dir: Path, max_tokens: int) -> list[int]:
    """What `ReplicaHandle.generate` should stream for an adapter, from an offline engine that
    reads the adapter's own directory."""
    engine = LLMEngine(model_dir, engine_config())
    engine.register_adapter("offline", adapter_dir)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return engine.generate(["hello"], params, adapter_ids=["offline"])[0].token_ids


def register(stub, adapter_id: str, path: Path, timeout: float = TIMEOUT_S, **kw) -> pb.RegisteredAdapter:
    return stub.RegisterAdapter(
        pb.RegisterAdapterRequest(adapter_id=adapter_id, path=str(path), **kw), timeout=timeout
    )


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    """The status code `call(*args, **kwargs)` fails with (AssertionError if it succeeds)."""
    kwargs.setdefault("timeout", TIMEOUT_S)
    try:
        call(*args, **kwargs)
    except grpc.RpcError as e:
        return e.code()
    raise AssertionError("the call succeeded")
