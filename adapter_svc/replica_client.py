"""Commands the manager sends to replicas: their InferenceService at the address they advertised.

Each command carries the credential that replica chose at its latest join (no service token is
sent): the manager holds nothing that works against any other replica. A channel unused for
`idle_close_s` is closed (replicas come and go, a new address per pod), and opened again on demand.
"""

from __future__ import annotations

import time

import grpc

from adapter_svc import errors
from adapter_svc.records import ReplicaRecord
from loraserve.auth import token_metadata
from loraserve.security import SecurityConfig, aio_channel
from loraserve.telemetry import client_interceptors
from loraserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

# A replica restarted on the same address is reached again within 2 s.
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2000))
IDLE_CLOSE_S = 600.0


class ReplicaClient:
    """One channel per replica address, reused across calls (TLS per `security`; None =
    plaintext). Calls carry the replica's own credential. Channels unused for `idle_close_s` (at
    least `timeout_s`, so never one a call may still run on) are closed, checked at most ten times
    per `idle_close_s` when a command is sent."""

    def __init__(
        self,
        timeout_s: float,
        security: SecurityConfig | None = None,
        idle_close_s: float = IDLE_CLOSE_S,
        clock=time.monotonic,
    ):
        self.timeout_s = timeout_s
        self.security = security
        self.idle_close_s = max(idle_close_s, timeout_s)
        self.clock = clock
        self._channels: dict[str, tuple[grpc.aio.Channel, float]] = {}  # address -> (channel, last used)
        self._checked_at = clock()

    def addresses(self) -> list[str]:
        """The replica addresses with an open channel."""
        return sorted(self._channels)

    async def _stub(self, address: str) -> inference_pb2_grpc.InferenceServiceStub:
        now = self.clock()
        if now - self._checked_at >= self.idle_close_s / 10:
            self._checked_at = now
            for idle in [a for a, (_, used) in self._channels.items() if now - used > self.idle_close_s]:
                await self._channels.pop(idle)[0].close()
        known = self._channels.get(address)
        channel = (
            known[0]
            if known
            else aio_channel(
                self.security, address, CHANNEL_OPTIONS, client_interceptors(), send_service_token=False
            )
        )
        self._channels[address] = (channel, now)
        return inference_pb2_grpc.InferenceServiceStub(channel)

    async def load(
        self,
        replica: ReplicaRecord,
        adapter_id: str,
        to_slot: bool,
        pin: bool,
        sha256: str = "",
        evict: list[str] = (),
    ) -> common_pb2.ResidentAdapter:
        """LoadAdapter on the replica; raises ReplicaCommandFailed with the replica's status.

        `sha256` (the registered content hash) and `evict` (victims chosen by the host-cache
        policy) make it the manager's command: the replica fetches and loads without asking back.
        """
        request = inference_pb2.LoadAdapterRequest(
            adapter_id=adapter_id, to_slot=to_slot, pin=pin, sha256=sha256, evict=evict
        )
        try:
            response = await (await self._stub(replica.address)).LoadAdapter(
                request, timeout=self.timeout_s, metadata=_credential(replica)
            )
        except grpc.aio.AioRpcError as e:
            raise errors.ReplicaCommandFailed(replica.replica_id, e.code(), e.details() or "") from e
        return response.adapter

    async def evict(self, replica: ReplicaRecord, adapter_id: str, unpin: bool) -> bool:
        """EvictAdapter on the replica (idempotent); True if it was resident."""
        request = inference_pb2.EvictAdapterRequest(adapter_id=adapter_id, unpin=unpin)
        try:
            response = await (await self._stub(replica.address)).EvictAdapter(
                request, timeout=self.timeout_s, metadata=_credential(replica)
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return False  # the replica never heard of it: nothing to evict
            raise errors.ReplicaCommandFailed(replica.replica_id, e.code(), e.details() or "") from e
        return response.evicted

    async def close(self) -> None:
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()


def _credential(replica: ReplicaRecord) -> tuple:
    return token_metadata(replica.credential) if replica.credential else ()
