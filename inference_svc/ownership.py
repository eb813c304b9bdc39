"""Which tenant owns an adapter, as a replica learns it: the `tenant_of` of `loraserve.auth`.

- Standalone (no manager): a fixed map, the token file's `adapters` section.
- Managed: the manager's registry (`GetAdapter`, and for an alias `GetAlias`: an alias belongs to a
  tenant when all its variants do), asked with the service token through the replica's one
  `ManagerClient` and remembered for `ttl_s`.
  While the manager cannot be reached, answers it gave before are used however old they are, so
  a replica keeps serving its tenants what it holds through a manager outage.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import grpc

from inference_svc import errors
from inference_svc.manager_client import ManagerClient
from loraserve.v1 import adapter_pb2 as pb

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
        client: the replica's client of the manager (its service token is the credential).
        ttl_s: how long an answer is reused.
    """

    def __init__(self, client: ManagerClient, ttl_s: float = OWNER_TTL_S):
        self.client = client
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, str | None]] = {}  # id -> (when asked, tenant)

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
        try:
            record = await self.client.lookup(
                "GetAdapter", pb.GetAdapterRequest(adapter_id=adapter_id), LOOKUP_TIMEOUT_S
            )
            return record.tenant
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
        try:
            alias = await self.client.lookup(
                "GetAlias", pb.GetAliasRequest(name=adapter_id), LOOKUP_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        owners = {await self(v.adapter_id) for v in alias.variants}
        return owners.pop() if len(owners) == 1 else None
