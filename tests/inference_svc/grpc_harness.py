"""A real `grpc.aio` inference server on a free loopback port, for the gRPC tests.

The server runs on its own event-loop thread inside the test process, so tests drive it with the
generated synchronous client stubs and can inspect the engine between steps (`on_engine`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import stack_helpers
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference_svc.config import EngineConfig
from inference_svc.demo_model import TINY_SHAPE, write_demo_adapter, write_demo_model
from inference_svc.server import InferenceServer, ServerConfig
from loraserve.model_summary import ModelConfig
from loraserve.v1 import inference_pb2, inference_pb2_grpc

NUM_ADAPTERS = 8
TIMEOUT_S = 60  # bound on any single wait in these tests


def write_model_and_adapters(root: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny demo model and NUM_ADAPTERS adapters `demo-0`.. (ranks 4 and 8)."""
    model_dir = write_demo_model(root / "model", **TINY_SHAPE)
    model = ModelConfig.from_dir(model_dir)
    adapters = {
        f"demo-{i}": write_demo_adapter(root / "adapters" / f"demo-{i}", model, rank=4 * (1 + i % 2), seed=i)
        for i in range(NUM_ADAPTERS)
    }
    return model_dir, adapters


def engine_config(**overrides) -> EngineConfig:
    return stack_helpers.engine_config(**{"max_cpu_loras": 4, "kv_cache_bytes": 2 << 20, **overrides})


def offline_engine(model_dir: Path, adapters: dict[str, Path]):
    """The offline engine on a served model, its adapters and the servers' engine configuration."""
    from inference_svc.engine import LLMEngine

    engine = LLMEngine(model_dir, engine_config())
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    return engine


class ServerThread:
    """An `InferenceServer` on port 0, its event loop on a thread, and a client channel to it."""

    def __init__(self, config: ServerConfig):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-server-loop", daemon=True)
        self._thread.start()
        self.server: InferenceServer = self.run(self._create(config))
        self.run(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @staticmethod
    async def _create(config: ServerConfig) -> InferenceServer:
        return InferenceServer(config)  # a grpc.aio server binds to the loop it is created on

    def run(self, coro, timeout: float = TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_engine(self, fn):
        """fn(engine) on the engine thread, between steps."""
        return self.server.engine.submit(fn).result(TIMEOUT_S)

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S).status

    def close(self) -> None:
        self.channel.close()
        self.run(self.server.stop(grace_s=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT_S)
        self.loop.close()


def start_server(model_dir: Path, adapters: dict[str, Path], **engine_overrides) -> ServerThread:
    config = ServerConfig(
        model=str(model_dir),
        engine=engine_config(**engine_overrides),
        host="127.0.0.1",
        port=0,
        lora_modules=tuple((name, str(path)) for name, path in adapters.items()),
        adapter_roots=(str(next(iter(adapters.values())).parent),),
        grace_s=2.0,
    )
    return ServerThread(config)


def resources(engine) -> tuple[int, dict, bool]:
    """(free KV blocks, slot refcounts, unfinished requests?) - read on the engine thread."""
    return engine.kv.num_free_blocks, dict(engine.adapters.refcount), engine.has_unfinished_requests()


def wait_for(predicate, what: str, timeout: float = TIMEOUT_S):
    """Poll `predicate()` until it returns a truthy value; AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


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
