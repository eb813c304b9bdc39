"""The picker's process: the ext_proc gRPC server (with health and reflection) and its metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2

from endpoint_picker.config import PickerConfig
from endpoint_picker.extproc import ExternalProcessor
from endpoint_picker.metrics import PickerMetrics
from endpoint_picker.policy import Thresholds
from endpoint_picker.view import ClusterState
from loraserve.redis_connect import connect
from loraserve.serving import add_health_and_reflection, run_until_signalled
from loraserve.telemetry import MetricsServer

log = logging.getLogger(__name__)

SERVICE_NAME = ep.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name


class PickerServer:
    """ext_proc on `config.host:config.port` (port 0: a free one, see `.port`)."""

    def __init__(self, config: PickerConfig):
        self.config = config
        # one server, Sentinel or Cluster, as the manager's; short timeouts: a pick never waits long
        self.redis = connect(config.redis_url, retries=1, backoff_cap_s=0.1, socket_timeout_s=1.0)
        self.metrics = PickerMetrics()
        self.state = ClusterState(
            self.redis,
            config.cluster,
            config.cache_ttl_s,
            self.metrics.state_read_failed,
            full_refresh_s=config.full_refresh_s,
        )
        limits = Thresholds(
            config.queue_threshold, config.spread_threshold, config.max_copies, config.kv_free_threshold
        )
        self.processor = ExternalProcessor(
            self.state, limits, self.metrics, config.http_by_grpc, config.replica_http_port, config.tokens
        )
        self.health = health.aio.HealthServicer()
        self._server = grpc.aio.server()
        ep_grpc.add_ExternalProcessorServicer_to_server(self.processor, self._server)
        add_health_and_reflection(self._server, self.health, SERVICE_NAME)
        self.port: int | None = None
        self.metrics_server: MetricsServer | None = None
        self._refresher: asyncio.Task | None = None

    async def start(self) -> None:
        self.port = self._server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        self._refresher = asyncio.create_task(self.state.refresh_forever())
        await self._server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_port:
            self.metrics_server = MetricsServer(
                self.metrics.registry, self.config.host, self.config.metrics_port
            )
            log.info("metrics on %s", self.metrics_server.url)
        log.info("picking endpoints on %s:%d (cluster %r)", self.config.host, self.port, self.config.cluster)

    async def stop(self, grace_s: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.config.shutdown_grace_s if grace_s is None else grace_s)
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self.redis.aclose()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        log.info("stopped")


async def serve(config: PickerConfig) -> None:
    """Run the picker until SIGTERM or SIGINT."""
    await run_until_signalled(
        PickerServer(config), "shutting down: in-flight picks get %.1f s", config.shutdown_grace_s
    )
