"""A replica's one client of the adapter manager: one channel, every call the data plane makes.

The replica agent (membership and fetcher) and `ownership.ManagerOwnership` share one instance:

    client = ManagerClient("manager:50052", security)
    joined = await client.call("JoinReplica", request)       # waits for a reconnecting manager
    record = await client.lookup("GetAdapter", request)      # fails at once if it is away
    async for part in client.fetch(adapter_id): ...          # FetchAdapterWeights
    await client.close()

Failed calls raise `grpc.aio.AioRpcError`; `engine_error` turns one into the data plane's typed
error for an adapter.
"""

from __future__ import annotations

import json

import grpc

from inference_svc import errors
from loraserve import errors as format_errors
from loraserve.security import SecurityConfig, aio_channel
from loraserve.telemetry import client_interceptors
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import adapter_pb2_grpc

# Calls to the manager wait (up to their deadline) for the channel to reconnect rather than fail at
# once: a manager restart then costs a delay, not errors. Reconnects are attempted at least every 2 s.
MANAGER_CHANNEL_OPTIONS = (
    (
        "grpc.service_config",
        json.dumps(
            {"methodConfig": [{"name": [{"service": "loraserve.v1.AdapterService"}], "waitForReady": True}]}
        ),
    ),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
# Codes that mean "the manager cannot be asked now".
MANAGER_AWAY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class ManagerClient:
    """The channel to the adapter manager, opened on first use.

    Args:
        target: the manager's host:port.
        security: TLS and the service token (None: plaintext, no token).
        rpc_timeout_s: deadline of each call (fetches get 10x).
    """

    def __init__(self, target: str, security: SecurityConfig | None = None, rpc_timeout_s: float = 10.0):
        self.target = target
        self.security = security
        self.rpc_timeout_s = rpc_timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: adapter_pb2_grpc.AdapterServiceStub | None = None

    def _connect(self) -> adapter_pb2_grpc.AdapterServiceStub:
        if self._stub is None:
            self._channel = aio_channel(
                self.security, self.target, MANAGER_CHANNEL_OPTIONS, client_interceptors()
            )
            self._stub = adapter_pb2_grpc.AdapterServiceStub(self._channel)
        return self._stub

    async def call(self, method: str, request, timeout: float | None = None):
        """One unary call (e.g. "JoinReplica"), waiting for the channel while the manager restarts."""
        rpc = getattr(self._connect(), method)
        return await rpc(request, timeout=self.rpc_timeout_s if timeout is None else timeout)

    async def lookup(self, method: str, request, timeout: float):
        """One unary call that fails at once (UNAVAILABLE) while the manager cannot be reached."""
        return await getattr(self._connect(), method)(request, timeout=timeout, wait_for_ready=False)

    def fetch(self, adapter_id: str):
        """FetchAdapterWeights: the stream of a WeightsHeader part, then the weights in chunks."""
        return self._connect().FetchAdapterWeights(
            pb.FetchAdapterWeightsRequest(adapter_id=adapter_id), timeout=10 * self.rpc_timeout_s
        )

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None


def engine_error(adapter_id: str, e: grpc.aio.AioRpcError) -> errors.LoraServeError:
    """The data plane's typed error for a failed call to the manager about `adapter_id`."""
    code, details = e.code(), f"adapter manager: {e.details()}"
    if code == grpc.StatusCode.NOT_FOUND:
        return errors.AdapterNotFound(adapter_id)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return errors.NoEvictableSlot(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return format_errors.InvalidAdapter(details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return errors.FailedPrecondition(details)
    return errors.Unavailable(details)
