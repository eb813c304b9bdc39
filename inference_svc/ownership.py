"""Which tenant owns an adapter, as a replica learns it: the `tenant_of` of `loraserve.auth`.

- Standalone (no manager): a fixed map, the token file's `adapters` section.
- Managed: the manager's registry (`GetAdapter`, and for an alias `GetAlias`: an alias belongs to a
  tenant when all its variants do), asked with the service token and remembered for `ttl_s`.
  While the manager cannot be reached, answers it gave before are used however old they are, so
  a replica keeps serving its tenants what it holds through a manager outage.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import grpc

from inference_svc import errors
from loraserve.security import SecurityConfig, aio_channel
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import adapter_pb2_grpc

# How long an answer from the manager is trusted before it is asked again.
OWNER_TTL_S = 2.0
LOOKUP_TIMEOUT_S = 5.0


def static_owners(owners: Mapping[str, str]):
    """tenant_of over a fixed {adapter id: tenant} map."""
    owners = dict(owners)

    async def tenant_of(adapter_id: str) -> str | None:
        return owners.get(adapter_id)

    return tenant_of


class ManagerOwnership:
    """tenant_of backed by the adapter manager's registry, with a short-lived cache.

    Args:
        target: the manager's host:port.
        security: TLS and service token for the channel (None: plaintext, no token).
        ttl_s: how long an answer is reused.
    """

    def __init__(self, target: str, security: SecurityConfig | None = None, ttl_s: float = OWNER_TTL_S):
        self.target = target
        self.security = security
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, str | None]] = {}  # id -> (when asked, tenant)
        self._stub: adapter_pb2_grpc.AdapterServiceStub | None = None
        self._channel: grpc.aio.Channel | None = None

    async def __call__(self, adapter_id: str) -> str | None:
        cached = self._cache.get(adapter_id)
        if cached is not None and time.monotonic() - cached[0] < self.ttl_s:
            return cached[1]
        try:
            tenant = await self._ask(adapter_id)
        except grpc.aio.AioRpcError as e:
            if cached is not None:  # the manager is away: the last answer still stands
                return cached[1]
            raise errors.Unavailable(f"cannot check who owns {adapter_id!r}: {e.details()}") from e
        self._cache[adapter_id] = (time.monotonic(), tenant)
        return tenant

    async def _ask(self, adapter_id: str) -> str | None:
        stub = self._connect()
        try:
            record = await stub.GetAdapter(
                pb.GetAdapterRequest(adapter_id=adapter_id), timeout=LOOKUP_TIMEOUT_S
            )
            return record.tenant
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
        try:
            alias = await stub.GetAlias(pb.GetAliasRequest(name=adapter_id), timeout=LOOKUP_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        owners = {await self(v.adapter_id) for v in alias.variants}
        return owners.pop() if len(owners) == 1 else None

    def _connect(self) -> adapter_pb2_grpc.AdapterServiceStub:
        if self._stub is None:
            self._channel = aio_channel(self.security, self.target)
            self._stub = adapter_pb2_grpc.AdapterServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
