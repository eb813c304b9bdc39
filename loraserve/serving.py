"""What both services' bootstraps share: health and reflection on a grpc.aio server, and running
a server until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def add_health_and_reflection(
    server: grpc.aio.Server, health: health_aio.HealthServicer, service: str
) -> None:
    """Serve `health` on `server` and reflection for `service`, health and reflection itself."""
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            service,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )


async def run_until_signalled(server: Stoppable, shutdown_message: str, grace_s: float) -> None:
    """Start `server`, wait for SIGTERM or SIGINT, log `shutdown_message % grace_s`, then stop it."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    await stopping.wait()
    log.info(shutdown_message, grace_s)
    await server.stop()
