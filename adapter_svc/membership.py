"""Replica membership: join, heartbeat, residency reports and leave; the sweeper that marks lapsed
replicas down and forgets long-down ones; and placing pinned adapters again when membership changes."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from adapter_svc import errors
from adapter_svc.config import ManagerConfig
from adapter_svc.placement import Placement
from adapter_svc.records import (
    HOLDING_STATES,
    Change,
    ForgetPass,
    HeartbeatAnswer,
    JoinRequest,
    Load,
    Resident,
)
from adapter_svc.registry import Registry
from adapter_svc.validation import check_id
from loraserve.engine_limits import AdapterLimits
from loraserve.errors import InvalidModel
from loraserve.model_summary import ModelConfig

log = logging.getLogger(__name__)

# Entities one reconciliation step examines at most: adapters and stored copies, replicas; and
# how many sweeps apart the steps run (mostly reads, but steady background work on a large registry).
RECONCILE_ADAPTERS = 200
RECONCILE_REPLICAS = 20
RECONCILE_EVERY_SWEEPS = 8
# Replicas one forgetting pass examines at most. Passes run every min(forget_down_after_s / 10,
# FORGET_EVERY_S) seconds, and at the next sweep again while a pass finds a full batch (a backlog,
# as on the first pass over a Redis that never forgot).
FORGET_BATCH = 100
FORGET_EVERY_S = 60.0


@dataclass(frozen=True)
class Joined:
    epoch: int
    heartbeat_interval_ms: int
    drop: tuple[str, ...]
    routing_version: int


class Membership:
    """JoinReplica, Heartbeat, ReportResidency and LeaveReplica; `run_sweeper` in the background."""

    def __init__(self, config: ManagerConfig, registry: Registry, placement: Placement):
        self.config = config
        self.registry = registry
        self.placement = placement
        self._reconcile: asyncio.Task | None = None
        self._reconcile_again = False
        self._cursors: tuple[str, int, str] = ("", 0, "")

    @property
    def ttl_ms(self) -> int:
        return int(self.config.replica_ttl_s * 1000)

    async def join(
        self,
        replica_id: str,
        address: str,
        engine: dict,
        model_json: str,
        snapshot: list[Resident],
        snapshot_seq: int,
        credential: str = "",
    ) -> Joined:
        """Admit a replica (again), replacing its mirror with `snapshot`. `credential` (its
        choice, new each join) is what commands to it will carry. Raises AddressTaken while another
        live replica has `address` or this one is live elsewhere."""
        check_id("replica_id", replica_id)
        if not address:
            raise errors.InvalidArgument("address must be set (host:port of the replica's InferenceService)")
        try:
            ModelConfig.from_dict(json.loads(model_json))
            AdapterLimits.from_dict(engine)
        except (ValueError, KeyError, TypeError, InvalidModel) as e:
            raise errors.InvalidArgument(f"replica {replica_id!r} sent an unusable configuration: {e}") from e
        answer = await self.registry.join(
            JoinRequest(replica_id, address, engine, model_json, snapshot, snapshot_seq, credential),
            self.ttl_ms,
        )
        log.info(
            "replica %s joined at %s (epoch %d, %d resident)",
            replica_id,
            address,
            answer.epoch,
            len(snapshot),
        )
        self.schedule_reconcile()
        interval_ms = int(self.config.heartbeat_interval_s * 1000)
        return Joined(answer.epoch, interval_ms, answer.drop, answer.routing_version)

    async def heartbeat(
        self, replica_id: str, epoch: int, snapshot: list[Resident], snapshot_seq: int, load: Load = Load.IDLE
    ) -> HeartbeatAnswer:
        return await self.registry.heartbeat(
            replica_id,
            epoch,
            snapshot,
            snapshot_seq,
            self.ttl_ms,
            load,
            int(self.config.load_timeout_s * 1000),
        )

    async def report(self, replica_id: str, epoch: int, changes: list[Change]) -> bool:
        """ReportResidency; False when the replica must rejoin."""
        return await self.registry.report(replica_id, epoch, changes)

    async def leave(self, replica_id: str, epoch: int) -> None:
        if await self.registry.mark_down(replica_id, "left", only_if_lapsed=False, epoch=epoch):
            log.info("replica %s left", replica_id)
            self.schedule_reconcile()

    async def sweep_once(self) -> list[str]:
        """Mark down every replica whose heartbeat lapsed; -> their ids."""
        down = []
        for replica_id in await self.registry.lapsed_replicas(self.ttl_ms):
            if await self.registry.mark_down(replica_id, "heartbeat lapsed", only_if_lapsed=True):
                log.warning("replica %s marked down: heartbeat lapsed", replica_id)
                down.append(replica_id)
        if down:
            self.schedule_reconcile()
        return down

    async def forget_once(self) -> ForgetPass:
        """One bounded pass forgetting replicas down for longer than `forget_down_after_s`
        (`Registry.forget_down`); nothing when that is 0."""
        if not self.config.forget_down_after_s:
            return ForgetPass((), False)
        done = await self.registry.forget_down(int(self.config.forget_down_after_s * 1000), FORGET_BATCH)
        for replica_id in done.forgotten:
            log.info("replica %s forgotten: down for over %g s", replica_id, self.config.forget_down_after_s)
        return done

    async def reconcile_once(self) -> bool:
        """One bounded reconciliation step over adapters, replicas and stored copies (see
        adapter_svc/README.md, "Invariants across entities"); -> True when all three passes have
        wrapped around (a full pass ended)."""
        adapters, replicas, blobs = self._cursors
        adapters = await self.registry.reconcile_adapters(adapters, RECONCILE_ADAPTERS)
        replicas = await self.registry.reconcile_replicas(replicas, RECONCILE_REPLICAS)
        blobs = await self.registry.reconcile_blobs(blobs, RECONCILE_ADAPTERS)
        self._cursors = (adapters, replicas, blobs)
        return self._cursors == ("", 0, "")

    async def run_sweeper(self) -> None:
        """sweep_once every sweep interval, a reconciliation step every RECONCILE_EVERY_SWEEPS,
        and forget_once when due, until cancelled; Redis outages are logged and outlived."""
        failing, sweeps = False, 0
        loop = asyncio.get_running_loop()
        forget_every = min(self.config.forget_down_after_s / 10, FORGET_EVERY_S)
        forget_at = loop.time()
        while True:
            try:
                await self.sweep_once()
                sweeps += 1
                if sweeps % RECONCILE_EVERY_SWEEPS == 0:
                    await self.reconcile_once()
                if loop.time() >= forget_at:
                    more = (await self.forget_once()).more
                    forget_at = loop.time() + (0 if more else forget_every)
                if failing:
                    log.info("replica sweeps work again")
                failing = False
            except Exception as e:  # Redis down, a script error: keep the manager alive
                if not failing:
                    log.warning("replica sweep failed (logged once until it works again): %s", e)
                failing = True
            await asyncio.sleep(self.config.sweep_interval_s)

    def schedule_reconcile(self) -> None:
        """Soon, load every pinned adapter that no live replica holds (membership changed)."""
        if self._reconcile is not None and not self._reconcile.done():
            self._reconcile_again = True
            return
        self._reconcile = asyncio.get_running_loop().create_task(self._reconcile_pins())

    async def _reconcile_pins(self) -> None:
        self._reconcile_again = True
        while self._reconcile_again:
            self._reconcile_again = False
            try:
                for adapter_id in await self.registry.pinned_ids():
                    record = await self.registry.get(adapter_id)
                    if record is None or record.deleting:
                        continue
                    if any(s in HOLDING_STATES for s in record.placements.values()):
                        continue
                    try:
                        await self.placement.load(adapter_id)
                    except errors.ManagerError as e:
                        log.warning("pinned adapter %s has no replica: %s", adapter_id, e)
            except Exception as e:
                log.warning("pin reconciliation failed: %s", e)

    def close(self) -> None:
        """Stop a pin reconciliation in progress."""
        if self._reconcile is not None:
            self._reconcile.cancel()
