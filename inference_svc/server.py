"""Bootstrap of the inference gRPC server: `serve(config)` and the `InferenceServer` it runs.

With `http_port` set, the OpenAI-compatible HTTP API (`inference_svc.http_api`, uvicorn) runs on the
same event loop over the same request path; it starts listening with gRPC and stops after the drain.

The server listens before the model is loaded so that health checks answer at once:
NOT_SERVING while the engine is built and the start-up adapters are loaded, SERVING when ready,
NOT_SERVING again from the moment shutdown begins. Shutdown (SIGTERM/SIGINT) refuses new
requests, lets in-flight streams finish for most of the grace period, aborts the rest (UNAVAILABLE),
then stops the gRPC server and the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from inference_svc import errors
from inference_svc.adapter_cache import HOST_BY_MANAGER, HOST_LRU
from inference_svc.async_engine import AsyncEngine
from inference_svc.config import EngineConfig
from inference_svc.errors_grpc import status_for
from inference_svc.generation_config import GenerationConfig
from inference_svc.http_api import HttpApi, HttpServer
from inference_svc.limits import TenantConcurrencyLimiter
from inference_svc.manager_client import ManagerClient
from inference_svc.metrics import EngineMetrics
from inference_svc.ownership import ManagerOwnership, static_owners
from inference_svc.replica_agent import ReplicaAgent
from inference_svc.servicer import SERVICE_NAME, InferenceServicer
from inference_svc.tokenizer import load_tokenizer
from loraserve.auth import INFERENCE_POLICY
from loraserve.grpc_errors import DecodeGuard, ErrorInterceptor
from loraserve.security import SecurityConfig, check_exposure
from loraserve.serving import add_health_and_reflection, run_until_signalled
from loraserve.telemetry import MetricsServer, TelemetryInterceptor
from loraserve.v1 import inference_pb2_grpc

log = logging.getLogger(__name__)

# Largest message accepted or sent. A token-id prompt costs at most 5 bytes per token on the wire,
# so 8 MiB admits prompts far longer than any model's context; responses are a few tokens each.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# The server pings a connection after 30 s without traffic and closes it if no ack comes within
# 10 s: the streams of a client that vanished are then cancelled, freeing their KV blocks and slots.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
# Clients may send keepalive pings, also on idle connections, but not more often than every 10 s.
MIN_CLIENT_PING_INTERVAL_MS = 10_000
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
    ("grpc.http2.max_pings_without_data", 0),  # our own keepalive pings need no data in between
    ("grpc.so_reuseport", 0),  # a port in use is an error, not silently shared with another server
)
# Of the shutdown grace period, this much (at most) is kept for cancelling what is left after the
# drain and for stopping the gRPC server; the rest is the drain.
CANCEL_MARGIN_S = 1.0


@dataclass(frozen=True)
class ServerConfig:
    """Everything the inference server needs; the engine's own settings are in `engine`."""

    # Model directory: config.json, model.safetensors, tokenizer.json.
    model: str
    # Engine configuration (slots, host cache, KV cache, batch limits).
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Address to listen on; 127.0.0.1 keeps it local, 0.0.0.0 exposes it.
    host: str = "127.0.0.1"
    # Port to listen on; 0 picks a free one (logged and available as InferenceServer.port).
    port: int = 50051
    # (adapter_id, directory) pairs registered and loaded into the host cache at start-up.
    lora_modules: tuple[tuple[str, str], ...] = ()
    # Directories LoadAdapter(path=...) may register adapters from; empty disables it.
    adapter_roots: tuple[str, ...] = ()
    # Seconds from SIGTERM until the process is down: in-flight streams may finish meanwhile.
    grace_s: float = 10.0
    # host:port of the adapter manager (control plane); None = standalone, no manager.
    adapter_manager: str | None = None
    # This replica's id with the manager, stable across restarts; "" = the advertised address.
    replica_id: str = ""
    # host:port the manager reaches this replica at; "" = host:bound port.
    advertise_address: str = ""
    # Where adapters fetched from the manager are written; None = a new temporary directory.
    adapter_cache_dir: str | None = None
    # Port of the Prometheus endpoint (http://host:port/metrics, same host as gRPC); 0 = off.
    metrics_port: int = 0
    # Streams (gRPC Generate and HTTP completions together) one tenant may have in flight
    # (RESOURCE_EXHAUSTED, HTTP 429, beyond); 0 = no limit.
    max_concurrent_per_tenant: int = 0
    # Port of the OpenAI-compatible HTTP API (same host, TLS and tokens as gRPC); None = off, 0 = any free.
    http_port: int | None = None
    # The base model's name in the HTTP API (`model`, /v1/models); "" = the model directory's name.
    served_model_name: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port ({self.port}) must be in 0..65535")
        if self.max_concurrent_per_tenant < 0:
            raise ValueError(
                f"max_concurrent_per_tenant ({self.max_concurrent_per_tenant}) must be >= 0 (0 = no limit)"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port ({self.metrics_port}) must be in 0..65535")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port ({self.http_port}) must be in 0..65535 (or unset: off)")
        if self.grace_s < 0:
            raise ValueError(f"grace_s ({self.grace_s}) must be >= 0")
        ids = [name for name, _ in self.lora_modules]
        if any(not name for name in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"lora_modules ({ids}) must have distinct, non-empty names")


class InferenceServer:
    """One replica's gRPC server: InferenceService, health and reflection over one engine.

    `security`: authentication, TLS, and how the manager is called (None: all off).
    """

    def __init__(self, config: ServerConfig, security: SecurityConfig | None = None):
        self.config = config
        self.security = security or SecurityConfig()
        check_exposure("the inference server", config.host, self.security)
        self.metrics = EngineMetrics()
        self.metrics_server: MetricsServer | None = None
        self.engine = AsyncEngine(self._build_engine, on_crash=self._engine_crashed, observer=self.metrics)
        self.agent: ReplicaAgent | None = None
        self.manager: ManagerClient | None = None  # one client of the manager: agent and ownership
        if config.adapter_manager:
            self.manager = ManagerClient(config.adapter_manager, self.security)
            self.agent = ReplicaAgent(
                self.engine,
                self.manager,
                config.replica_id,
                config.advertise_address,
                config.adapter_cache_dir,
            )
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        self._crash_handling: asyncio.Task | None = None
        self.ownership = self._ownership()
        issued = self.agent.membership.credentials if self.agent is not None else None
        auth = self.security.interceptors(
            INFERENCE_POLICY, self.ownership, errors.AdapterNotFound, self.metrics.on_auth_refusal, issued
        )
        self.limiter = None
        if config.max_concurrent_per_tenant:
            self.limiter = TenantConcurrencyLimiter(config.max_concurrent_per_tenant)
        limits = [self.limiter] if self.limiter is not None else []
        self._server = grpc.aio.server(
            interceptors=[
                DecodeGuard(),
                *auth,
                *limits,
                ErrorInterceptor(status_for),
                TelemetryInterceptor(status_for),
            ],
            options=SERVER_OPTIONS,
        )
        # the checkpoint's sampling defaults, read now: requests are converted off the engine thread
        defaults = GenerationConfig.from_dir(config.model).sampling_defaults
        servicer = InferenceServicer(self.engine, config.adapter_roots, self.agent, defaults)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, self._server)
        add_health_and_reflection(self._server, self.health, SERVICE_NAME)
        self.http: HttpServer | None = None
        if config.http_port is not None:
            self.http = self._http_server(servicer.generation)

    def _http_server(self, generation) -> HttpServer:
        """The OpenAI-compatible face: the servicer's request path, the same auth, limits and TLS."""
        tokenizer = load_tokenizer(self.config.model)
        api = HttpApi(
            generation,
            self.engine,
            model_name=self.config.served_model_name or Path(self.config.model).resolve().name,
            token_text=lambda token_id: tokenizer.decode([token_id]),
            security=self.security,
            tenant_of=self.ownership,
            limiter=self.limiter,
            manager=self.manager,
            routing=(lambda: self.agent.routing) if self.agent is not None else None,
            on_refusal=self.metrics.on_auth_refusal,
        )
        return HttpServer(api.app(), self.config.host, self.config.http_port, self.security)

    def _ownership(self):
        """Who owns each adapter: the manager's registry, or the token file's `adapters` map."""
        if self.manager is not None and self.security.auth_enabled:
            return ManagerOwnership(self.manager)
        tokens = self.security.tokens
        return static_owners(tokens.adapter_tenants if tokens is not None else {})

    def _build_engine(self):
        from inference_svc.engine import LLMEngine  # torch is imported on the engine thread

        agent, metrics = self.agent, self.metrics

        def on_change(event) -> None:
            metrics.on_residency_change(event)
            if agent is not None:
                agent.on_residency_change(event)

        # The manager chooses host-cache victims for its replicas; a standalone engine chooses its own.
        eviction = HOST_BY_MANAGER if agent is not None else HOST_LRU
        engine = LLMEngine(self.config.model, self.config.engine, on_change, eviction)
        shapes = engine.warm_up()  # Triton compiles now, not inside the first requests' steps
        if shapes:
            log.info("warmed up %d step shapes (Triton kernels compiled)", len(shapes))
        for i, (adapter_id, path) in enumerate(self.config.lora_modules):
            engine.register_adapter(adapter_id, path)
            if i < engine.config.max_cpu_loras:  # more would only evict the first ones again
                engine.load_adapter(adapter_id)
                log.info("preloaded adapter %r from %s into the host cache", adapter_id, path)
            else:
                log.info(
                    "registered adapter %r from %s (host cache full: loads on first use)", adapter_id, path
                )
        return engine

    async def start(self) -> None:
        """Listen (NOT_SERVING), build the engine and preload adapters, then report SERVING.

        Raises whatever building the engine raised, after stopping the server.
        """
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.security.add_port(self._server, f"{self.config.host}:{self.config.port}")
        await self._server.start()
        log.info("listening on %s:%d (NOT_SERVING until the engine is ready)", self.config.host, self.port)
        try:
            if self.http is not None:
                await self.http.start()
                log.info("OpenAI-compatible HTTP API on %s/v1", self.http.url)
            if self.config.metrics_port:
                self.metrics_server = self.security.metrics_server(
                    self.metrics.registry, self.config.host, self.config.metrics_port
                )
                log.info("metrics on %s", self.metrics_server.url)
            await self.engine.start()
            # occupancy gauges from the start
            await self.engine.call(lambda engine: self.metrics.after_commands(engine, []))
            if self.agent is not None:  # purge, then join with the snapshot, before SERVING
                member = self.agent.membership
                member.advertise_address = member.advertise_address or f"{self.config.host}:{self.port}"
                member.replica_id = member.replica_id or member.advertise_address
                await self.agent.start()
        except BaseException:
            await self._stop_http()
            await self._server.stop(0)
            await self.engine.stop()
            self._close_metrics()
            await self._close_manager()
            raise
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d", SERVICE_NAME, self.config.host, self.port)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown within `grace_s` (default: the config's): drain, cancel, stop."""
        grace_s = self.config.grace_s if grace_s is None else grace_s
        margin = min(CANCEL_MARGIN_S, grace_s / 2)
        await self.health.enter_graceful_shutdown()
        if self.agent is not None:  # leave first, so the manager stops sending work here
            await self.agent.stop()
        aborted = await self.engine.drain(grace_s - margin)
        if aborted:
            log.warning("grace period over: aborted %d in-flight requests", aborted)
        await self._stop_http()
        await self._server.stop(margin)
        await self.engine.stop()
        self._close_metrics()
        await self._close_manager()
        log.info("stopped")

    async def _stop_http(self) -> None:
        if self.http is not None:
            await self.http.stop()

    async def _close_manager(self) -> None:
        if self.manager is not None:
            await self.manager.close()

    def _close_metrics(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

    def _engine_crashed(self, error: BaseException) -> None:
        self._crash_handling = asyncio.get_running_loop().create_task(self.health.enter_graceful_shutdown())

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)


async def serve(config: ServerConfig, security: SecurityConfig | None = None) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down within `config.grace_s` seconds."""
    await run_until_signalled(
        InferenceServer(config, security), "shutting down: draining for up to %.1f s", config.grace_s
    )
