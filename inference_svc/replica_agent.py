"""The replica's side of the control plane: membership, routing, and adapters from the manager.

A replica started with `--adapter-manager HOST:PORT` runs one `ReplicaAgent`:

    client = ManagerClient("manager:50052", security)
    agent = ReplicaAgent(engine, client, "replica-0", "10.0.0.5:50051")
    LLMEngine(..., on_residency_change=agent.on_residency_change, host_eviction=HOST_BY_MANAGER)
    await agent.start()          # purge, join with a (now empty) snapshot, heartbeat, report
    concrete = await agent.resolve(request.adapter_id, request_headers)
    await agent.stop()           # leave: the manager marks the replica down at once

`engine` is the `AsyncEngine`. The agent holds no residency of its own: the engine's cache owns it,
and the agent asks it or listens to its events. Its two parts share one `ManagerClient`:
`membership.Membership` (join, heartbeats, residency reports, rejoin, routing table) and
`fetcher.Fetcher` (acquire, download, verify, load, local copies, room in the host cache).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from inference_svc import errors
from inference_svc.adapter_cache import ResidencyEvent, ResidentAdapter
from inference_svc.fetcher import Fetcher
from inference_svc.manager_client import ManagerClient
from inference_svc.membership import Membership
from loraserve.names import REQUEST_KEY_HEADER, TENANT_HEADER
from loraserve.routing import RoutingTable, resolve


class ReplicaAgent:
    """Joins the adapter manager and keeps it informed; gets adapters from it.

    Args:
        engine: the `AsyncEngine` (runs functions on the engine's thread, loads adapters off it).
        client: the replica's client of the manager (shared with `ownership.ManagerOwnership`).
        replica_id: this replica's stable id (the same after a restart).
        advertise_address: host:port where this replica's InferenceService is reachable.
        cache_dir: where fetched adapters are written (default: a new temporary directory).
        join_timeout_s: how long `start` keeps trying to reach the manager.
    """

    def __init__(
        self,
        engine,
        client: ManagerClient,
        replica_id: str,
        advertise_address: str,
        cache_dir: str | Path | None = None,
        join_timeout_s: float = 30.0,
    ):
        self.client = client
        self.join_timeout_s = join_timeout_s
        self.membership = Membership(engine, client, replica_id, advertise_address)
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="loraserve-adapters-"))
        self.fetcher = Fetcher(engine, client, self.membership, self.cache_dir)
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Purge the engine's residency, join with the snapshot, start heartbeats and reports.

        Raises errors.Unavailable if the manager cannot be reached within join_timeout_s.
        """
        self._loop = asyncio.get_running_loop()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        await self.membership.start(self.join_timeout_s)

    async def stop(self) -> None:
        """Finish writing local copies, stop heartbeating and leave (best effort)."""
        await self.fetcher.stop()
        await self.membership.stop()

    # --- the engine's callback ----------------------------------------------------------------

    def on_residency_change(self, event: ResidencyEvent) -> None:
        """LLMEngine's `on_residency_change`: called on the engine thread for every event."""
        if event.kind == "needs_room":
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self.fetcher.room_for, event.adapter_id)
            return
        self.membership.on_change(event)

    # --- requests and commands ----------------------------------------------------------------

    async def resolve(
        self,
        adapter_id: str,
        headers: Mapping[str, str] | None = None,
        authorize: Callable[[str], Awaitable[None]] | None = None,
    ) -> str:
        """The concrete adapter to serve a request with ("" = base model), held by the engine.

        `headers` are the request's metadata: routing rules match them, `x-tenant` is its tenant
        and `x-request-key` keeps alias variants sticky. Applies rules and aliases, then
        `authorize(concrete)` (which raises if the caller may not use it: nothing is fetched then),
        then `ensure_local`. Raises AdapterNotFound, NoEvictableSlot (nothing evictable),
        InvalidAdapter, or Unavailable (manager unreachable).
        """
        headers = {k.lower(): v for k, v in (headers or {}).items() if isinstance(v, str)}
        key, tenant = headers.get(REQUEST_KEY_HEADER, ""), headers.get(TENANT_HEADER, "")

        async def local(concrete: str) -> str:
            if concrete:
                if authorize is not None:
                    await authorize(concrete)
                await self.ensure_local(concrete)
            return concrete

        concrete = resolve(self.routing, adapter_id, key, tenant, headers).adapter_id
        try:
            return await local(concrete)
        except errors.AdapterNotFound:
            if not concrete:
                raise
            await self.membership.refresh_routing()  # it may be an alias created since the last refresh
            retry = resolve(self.routing, adapter_id, key, tenant, headers).adapter_id
            if retry == concrete:
                raise
            return await local(retry)

    async def ensure_local(self, adapter_id: str) -> None:
        """Make `adapter_id` resident in the engine's host cache (see `Fetcher.ensure_local`)."""
        await self.fetcher.ensure_local(adapter_id)

    async def load_commanded(
        self, adapter_id: str, sha256: str, evict: list[str], to_slot: bool, pin: bool | None
    ) -> ResidentAdapter:
        """The manager's LoadAdapter command (see `Fetcher.load_commanded`)."""
        return await self.fetcher.load_commanded(adapter_id, sha256, evict, to_slot, pin)

    # --- views --------------------------------------------------------------------------------

    @property
    def routing(self) -> RoutingTable:
        return self.membership.routing

    @property
    def unreported_changes(self) -> int:
        """Residency changes queued for the manager and not yet acknowledged by it."""
        return self.membership.unreported_changes

    @property
    def rpc_timeout_s(self) -> float:
        """Deadline of each call to the manager (fetches get 10x)."""
        return self.client.rpc_timeout_s

    @rpc_timeout_s.setter
    def rpc_timeout_s(self, value: float) -> None:
        self.client.rpc_timeout_s = value
