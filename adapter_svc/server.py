"""Bootstrap of the adapter manager: `serve(config)` and the `ManagerServer` it runs.

Health (grpc.health.v1) is SERVING while Redis answers and NOT_SERVING while it does not (the
manager keeps running and answers UNAVAILABLE meanwhile), and from the moment shutdown begins.
Background tasks: the replica sweeper (marks lapsed replicas down), the Redis health probe and the
collector of stored copies no adapter uses.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import redis.asyncio as redis
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from adapter_svc import errors, migration
from adapter_svc.blobs import BlobStore
from adapter_svc.config import ManagerConfig
from adapter_svc.errors import message_for, status_for
from adapter_svc.manager import AdapterManager
from adapter_svc.metrics import ManagerMetrics
from adapter_svc.registry import Registry, connect
from adapter_svc.replica_client import ReplicaClient
from adapter_svc.servicer import AdapterServicer
from loraserve.auth import MANAGER_POLICY
from loraserve.grpc_errors import DecodeGuard, ErrorInterceptor
from loraserve.security import SecurityConfig, check_exposure
from loraserve.serving import add_health_and_reflection, run_until_signalled
from loraserve.telemetry import MetricsServer, TelemetryInterceptor
from loraserve.v1 import adapter_pb2, adapter_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = adapter_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name
# Upload and fetch chunks are at most 4 MiB (ManagerConfig.fetch_chunk_bytes); requests are small.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.so_reuseport", 0),
)
# How often Redis is pinged to keep the health status current.
HEALTH_PROBE_S = 1.0
# Replica bookkeeping calls, logged at DEBUG when they succeed (they come every heartbeat).
QUIET_METHODS = frozenset({"Heartbeat", "ReportResidency", "GetRoutingTable"})


class ManagerServer:
    """AdapterService, health and reflection on one grpc.aio server, plus background tasks.

    `security`: authentication, TLS, and how replicas are called (None: all off).
    """

    def __init__(self, config: ManagerConfig, security: SecurityConfig | None = None):
        self.config = config
        self.security = security or SecurityConfig()
        check_exposure("the adapter manager", config.host, self.security)
        self.redis = connect(config)
        # WatchEvents' blocking reads get a pool of their own (at most max_watchers at once)
        self.watch_redis = connect(config, max_connections=config.max_watchers)
        self.registry = Registry(
            self.redis,
            config.cluster,
            config.events_maxlen,
            self.watch_redis,
            config.redis_wait_replicas,
            config.redis_wait_timeout_ms,
        )
        self.manager = AdapterManager(
            config,
            self.registry,
            BlobStore(config.store_dir),
            ReplicaClient(config.replica_rpc_timeout_s, self.security),
        )
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        self._serving: bool | None = None
        self._tasks: list[asyncio.Task] = []
        self.metrics = ManagerMetrics()
        self.metrics_server: MetricsServer | None = None
        telemetry = TelemetryInterceptor(status_for, self.metrics.observe_rpc, QUIET_METHODS)
        auth = self.security.interceptors(
            MANAGER_POLICY, self._tenant_of, errors.AdapterNotFound, self.metrics.on_auth_refusal
        )
        self._server = grpc.aio.server(
            interceptors=[DecodeGuard(), *auth, ErrorInterceptor(status_for, message_for), telemetry],
            options=SERVER_OPTIONS,
        )
        adapter_pb2_grpc.add_AdapterServiceServicer_to_server(AdapterServicer(self.manager), self._server)
        add_health_and_reflection(self._server, self.health, SERVICE_NAME)

    async def start(self) -> None:
        """Bind, bring Redis to the current key layout (`migration`), listen, then start the
        sweeper and the health probe (the first probe runs now)."""
        self.port = self.security.add_port(self._server, f"{self.config.host}:{self.config.port}")
        await self._migrate()  # after the bind: a port in use is reported first
        await self._server.start()
        await self._probe()
        self._tasks = [
            asyncio.create_task(self.manager.membership.run_sweeper(), name="replica-sweeper"),
            asyncio.create_task(self._probe_forever(), name="redis-probe"),
        ]
        if self.config.blob_gc_interval_s:
            self._tasks.append(
                asyncio.create_task(self.manager.catalog.run_garbage_collector(), name="blob-gc")
            )
        if self.config.metrics_port:
            self.metrics_server = self.security.metrics_server(
                self.metrics.registry, self.config.host, self.config.metrics_port
            )
            self._tasks.append(
                asyncio.create_task(self.metrics.refresh_forever(self.registry), name="metrics")
            )
            log.info("metrics on %s", self.metrics_server.url)
        log.info(
            "serving %s on %s:%d (cluster %r)", SERVICE_NAME, self.config.host, self.port, self.config.cluster
        )

    async def _migrate(self) -> None:
        """Migrate an old-layout Redis before serving; while Redis cannot be reached, retry (the
        manager answers UNAVAILABLE meanwhile, as it would anyway)."""
        delay = 0.1
        while True:
            try:
                await migration.migrate(self.registry)
                return
            except (redis.RedisError, OSError, errors.Unavailable) as e:
                log.warning("Redis layout check failed (%s); retrying", e)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, let in-flight calls finish within `grace_s`, then close everything."""
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        await cancel_and_wait(self._tasks)
        await self._server.stop(grace_s)
        await self.manager.close()
        await self.redis.aclose()
        await self.watch_redis.aclose()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        log.info("stopped")

    async def _tenant_of(self, adapter_id: str) -> str | None:
        """The registry's owner of an adapter, for tenant-scoped calls (None: not registered)."""
        record = await self.registry.get(adapter_id)
        return record.tenant if record is not None else None

    async def _probe(self) -> None:
        try:
            serving = bool(await asyncio.wait_for(self.registry.ping(), HEALTH_PROBE_S * 2))
        except Exception:  # any failure to reach Redis means "not serving", never a crash
            serving = False
        if serving != self._serving:
            self._serving = serving
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service in ("", SERVICE_NAME):
                await self.health.set(service, status)
            (log.info if serving else log.warning)(
                "redis %s", "reachable: SERVING" if serving else "unreachable: NOT_SERVING"
            )

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_PROBE_S)
            await self._probe()


async def cancel_and_wait(tasks: list[asyncio.Task]) -> None:
    """Cancel `tasks` and wait until they are done, cancelling again while any is not.

    redis-py (8.1) sometimes swallows a CancelledError that arrives during a command, so a single
    cancel can leave a background loop running (and `stop` waiting for it forever).
    """
    pending = [t for t in tasks if not t.done()]
    while pending:
        for task in pending:
            task.cancel()
        _, still = await asyncio.wait(pending, timeout=0.1)
        pending = list(still)


async def serve(config: ManagerConfig, security: SecurityConfig | None = None) -> None:
    """Run the manager until SIGTERM or SIGINT, then shut down within `config.shutdown_grace_s`."""
    await run_until_signalled(
        ManagerServer(config, security), "shutting down: in-flight calls get %.1f s", config.shutdown_grace_s
    )
