"""Where adapters go: loads (placed by affinity unless the caller names a replica), evictions, pins,
and the host-cache policy a replica asks before it loads. The LoadAdapter and EvictAdapter commands
to replicas are sent from here (`Placement._load_on`, `Placement.evict_on`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from adapter_svc import errors
from adapter_svc.config import ManagerConfig
from adapter_svc.records import (
    AcquireRequest,
    AdapterRecord,
    Exhausted,
    Refusal,
    Refused,
    ReplicaRecord,
    Resident,
)
from adapter_svc.registry import Registry
from adapter_svc.replica_client import ReplicaClient
from loraserve.engine_limits import serves

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Acquired:
    """The host-cache policy's answer to a replica about to load an adapter."""

    adapter_id: str
    sha256: str
    size_bytes: int
    resident: bool  # already in its host cache
    evict: list[str]  # least recently used first


def can_hold(replica: ReplicaRecord, adapter: AdapterRecord) -> bool:
    """A live replica whose slots are big enough and which serves the adapter's target modules."""
    engine = replica.engine
    return (
        replica.up
        and adapter.rank <= int(engine.get("max_lora_rank", 0))
        and all(serves(tuple(engine.get("lora_target_modules", ())), m) for m in adapter.target_modules)
    )


def choose_replica(adapter: AdapterRecord, replicas: list[ReplicaRecord]) -> ReplicaRecord | None:
    """The best replica for `adapter`, or None if no live replica can hold it.

    Preference, in order: already in a slot > in the host cache > being loaded there > most free
    host-cache room > fewest adapters > replica id (for a deterministic answer).
    """

    def score(replica: ReplicaRecord) -> tuple:
        held = replica.holds(adapter.adapter_id)
        count = len(replica.residents) + len(replica.loading)
        free = int(replica.engine.get("max_cpu_loras", 0)) - count
        return (
            held is not None and held.slot >= 0,
            held is not None,
            adapter.adapter_id in replica.loading,
            free,
            -count,
        )

    candidates = sorted((r for r in replicas if can_hold(r, adapter)), key=lambda r: r.replica_id)
    return max(candidates, key=score, default=None)


class Placement:
    """LoadAdapter, EvictAdapter, PinAdapter, UnpinAdapter, GetClusterState and AcquireAdapter.

    One load per (adapter, replica, to_slot) at a time in this process (single-flight); a Redis
    claim keeps manager copies from placing the same adapter on two replicas at once.
    """

    def __init__(self, config: ManagerConfig, registry: Registry, replicas: ReplicaClient):
        self.config = config
        self.registry = registry
        self.replicas = replicas
        self._loads: dict[tuple[str, str, bool], asyncio.Future] = {}

    async def load(self, adapter_id: str, replica_id: str = "", to_slot: bool = False):
        """LoadAdapter; -> (replica id, the replica's ResidentAdapter). One load per key at a time."""
        key = (adapter_id, replica_id, to_slot)
        running = self._loads.get(key)
        if running is None:
            running = asyncio.ensure_future(self._load(adapter_id, replica_id, to_slot))
            self._loads[key] = running
            running.add_done_callback(lambda _: self._loads.pop(key, None))
        return await asyncio.shield(running)

    async def _load(self, adapter_id: str, replica_id: str, to_slot: bool):
        record = await self.registry.require(adapter_id, live=True)
        replicas = await self.registry.replicas()
        if replica_id:
            target = next((r for r in replicas if r.replica_id == replica_id), None)
            if target is None:
                raise errors.ReplicaNotFound(replica_id)
            if not target.up:
                raise errors.Unavailable(f"replica {replica_id!r} is down ({target.down_reason})")
            if not can_hold(target, record):
                raise errors.FailedPrecondition(
                    f"replica {replica_id!r} cannot hold adapter {adapter_id!r} (rank {record.rank}, "
                    f"modules {list(record.target_modules)})"
                )
            return target.replica_id, await self._load_on(target, record, to_slot)
        chosen = choose_replica(record, replicas)
        if chosen is None:
            raise errors.NoReplicaAvailable(f"no live replica can hold adapter {adapter_id!r}")
        claimed, ours = await self.registry.claim_placement(
            adapter_id, chosen.replica_id, int(self.config.load_timeout_s * 1000)
        )
        target = next((r for r in replicas if r.replica_id == claimed and r.up), chosen)
        try:
            return target.replica_id, await self._load_on(target, record, to_slot)
        finally:
            if ours:
                await self.registry.release_placement(adapter_id)

    async def _load_on(self, replica: ReplicaRecord, record: AdapterRecord, to_slot: bool):
        """One LoadAdapter command carrying what the replica needs: the content hash, the victims
        the host-cache policy chose, the pin. The replica fetches the bytes and reports once."""
        acquired = await self.acquire(replica.replica_id, replica.epoch, record.adapter_id, [])
        return await self.replicas.load(
            replica,
            record.adapter_id,
            to_slot,
            record.pinned,
            sha256=acquired.sha256,
            evict=acquired.evict,
        )

    async def evict(self, adapter_id: str, replica_id: str = "", force: bool = False) -> list[str]:
        """EvictAdapter from one replica or all holders; -> replicas it was evicted from."""
        record = await self.registry.require(adapter_id)
        if record.pinned and not force:
            raise errors.AdapterPinned(f"adapter {adapter_id!r} is pinned; unpin it or use --force")
        if record.pinned:
            await self.registry.set_pinned(adapter_id, False)
        if replica_id:
            if await self.registry.replica(replica_id) is None:
                raise errors.ReplicaNotFound(replica_id)
            return await self.evict_on(adapter_id, [replica_id])
        return await self.evict_on(adapter_id, list(record.placements))

    async def evict_on(self, adapter_id: str, replica_ids: list[str]) -> list[str]:
        """Evict from each live replica named (clearing its local pin); mirror each confirmation."""
        by_id = {r.replica_id: r for r in await self.registry.replicas()}
        evicted = []

        async def one(replica: ReplicaRecord) -> None:
            if await self.replicas.evict(replica, adapter_id, unpin=True):
                evicted.append(replica.replica_id)
            await self.registry.mirror_evicted(replica.replica_id, adapter_id)

        live = [by_id[r] for r in replica_ids if r in by_id and by_id[r].up]
        await asyncio.gather(*(one(r) for r in live))
        return sorted(evicted)

    async def pin(self, adapter_id: str) -> list[str]:
        """PinAdapter: pinned on every live holder, loaded somewhere if none; -> those replicas."""
        was_pinned = (await self.registry.require(adapter_id, live=True)).pinned
        holders = await self._set_pinned(adapter_id, True)
        by_id = {r.replica_id: r for r in await self.registry.replicas()}
        pinned_on: list[str] = []
        try:
            for replica in (by_id[r] for r in holders if r in by_id and by_id[r].up):
                await self._load_on(replica, await self.registry.require(adapter_id), to_slot=False)
                pinned_on.append(replica.replica_id)
            if not pinned_on:
                replica_id, _ = await self.load(adapter_id)
                pinned_on.append(replica_id)
        except BaseException:
            if not was_pinned and not pinned_on:
                await self.registry.set_pinned(adapter_id, False)
            raise
        return sorted(pinned_on)

    async def unpin(self, adapter_id: str) -> None:
        """UnpinAdapter: evictable at once for the manager, and on every live holder (a holder that
        cannot be reached drops its pin at its next heartbeat)."""
        holders = await self._set_pinned(adapter_id, False)
        for replica in await self.registry.replicas():
            if replica.replica_id not in holders or not replica.up:
                continue
            try:
                await self.replicas.load(replica, adapter_id, False, False)
            except errors.ManagerError as e:
                log.warning(
                    "unpinning %s on %s failed (its heartbeat will): %s", adapter_id, replica.replica_id, e
                )

    async def _set_pinned(self, adapter_id: str, pinned: bool) -> list[str]:
        """Pin or unpin cluster-wide; -> the replicas holding it (CACHED or ACTIVE)."""
        answer = await self.registry.set_pinned(adapter_id, pinned)
        if isinstance(answer, Refused):
            raise answer.error(adapter_id)
        return [r for r, state in answer.items() if state in ("CACHED", "ACTIVE")]

    async def cluster_state(self) -> list[ReplicaRecord]:
        return await self.registry.replicas()

    async def acquire(
        self,
        replica_id: str,
        epoch: int,
        adapter_id: str,
        usage: list[Resident],
        wait_s: float | None = None,
    ) -> Acquired:
        """AcquireAdapter: apply the host-cache policy for a replica about to load `adapter_id`.

        While entries are only loading, waits for them up to `load_timeout_s`, or `wait_s` when
        shorter (the caller's remaining deadline), then refuses with NoEvictableAdapter.
        """
        replica = await self.registry.replica(replica_id)
        if replica is None:
            raise errors.ReplicaNotFound(replica_id)
        max_cpu_loras = int(replica.engine["max_cpu_loras"])
        timeout_ms = int(self.config.load_timeout_s * 1000)
        wait_s = self.config.load_timeout_s if wait_s is None else min(wait_s, self.config.load_timeout_s)
        deadline = asyncio.get_running_loop().time() + wait_s
        delay = 0.01
        ask = AcquireRequest(replica_id, epoch, adapter_id, usage)
        while True:
            answer = await self.registry.acquire(ask, max_cpu_loras, timeout_ms)
            # While some entries are only loading (not pinned), wait for their loads to land and
            # become evictable instead of refusing a burst of cold requests; when every entry is
            # pinned, refuse at once.
            transient = isinstance(answer, Exhausted) and answer.transient
            if not transient or asyncio.get_running_loop().time() + delay > deadline:
                break
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.2)
        if isinstance(answer, Exhausted):
            raise errors.NoEvictableAdapter(
                f"all {answer.held} host-cache entries of replica {replica_id!r} (max_cpu_loras="
                f"{max_cpu_loras}) are pinned or loading ({answer.pinned} pinned); nothing can be evicted"
            )
        if isinstance(answer, Refused):
            if answer.reason == Refusal.STALE:
                raise errors.StaleReplica(f"replica {replica_id!r} epoch {epoch} is not current: join again")
            raise answer.error(adapter_id)
        return Acquired(adapter_id, answer.sha256, answer.size_bytes, answer.resident, list(answer.evict))
