"""A replica's membership with the adapter manager: join, heartbeat, residency reports, rejoin.

The engine's cache owns residency; membership only reports it. Residency events fire on the
engine thread (`on_change`); they are numbered there, so a snapshot taken there says exactly which
events it already reflects, and handed to the event loop thread-safely. Reports go to the manager
in order; a missed one (or a lapsed membership) makes the replica join again with a full snapshot,
which is how the manager reconciles. Heartbeats carry a snapshot too, and their answer reconciles
pins (the manager's pin set is the truth; a pin sent with LoadAdapter lands at once, one missed or
changed meanwhile lands here), adapters to drop, and the routing table's version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque

import grpc

from inference_svc import errors
from inference_svc.adapter_cache import ResidencyEvent, ResidentAdapter
from inference_svc.async_engine import DRAINING
from inference_svc.manager_client import ManagerClient
from loraserve.auth import IssuedCredentials, new_token
from loraserve.convert import resident_proto, routing_table_from
from loraserve.routing import RoutingTable
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import common_pb2, inference_pb2

log = logging.getLogger(__name__)

CHANGE_KINDS = {
    "loaded": pb.RESIDENCY_CHANGE_KIND_LOADED,
    "activated": pb.RESIDENCY_CHANGE_KIND_ACTIVATED,
    "deactivated": pb.RESIDENCY_CHANGE_KIND_DEACTIVATED,
    "evicted": pb.RESIDENCY_CHANGE_KIND_EVICTED,
}
# Most residency changes sent in one ReportResidency call.
REPORT_BATCH = 256
# Deadline of LeaveReplica at shutdown: a manager that is down must not hold the shutdown up.
LEAVE_TIMEOUT_S = 1.0
# Changes kept while the manager is unreachable; beyond that a snapshot replaces them.
MAX_PENDING = 10_000
# Backoff between attempts to reach the manager (join, reports).
RETRY_BASE_S, RETRY_CAP_S = 0.05, 2.0


class Membership:
    """This replica's place in the cluster: its epoch, its reports, the routing table it uses.

    Args:
        engine: runs functions on the engine's thread (`AsyncEngine.call`).
        client: the replica's client of the manager.
        replica_id: this replica's stable id (the same after a restart).
        advertise_address: host:port where this replica's InferenceService is reachable.
    """

    def __init__(self, engine, client: ManagerClient, replica_id: str, advertise_address: str):
        self.engine = engine
        self.client = client
        self.replica_id = replica_id
        self.advertise_address = advertise_address
        self.epoch = 0
        self.joined = False
        self.heartbeat_interval_s = 2.0
        self.routing = RoutingTable()
        # What the manager's commands must carry: a fresh credential chosen at each join.
        self.credentials = IssuedCredentials()
        self._lock = threading.Lock()  # guards the counter and the pending queue
        self._seq = 0  # residency changes so far (engine events and failed loads)
        self._pending: deque[pb.ResidencyChange] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._join_lock: asyncio.Lock | None = None
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, join_timeout_s: float) -> None:
        """Purge the engine's residency, join with the snapshot, start heartbeats and reports.

        Raises errors.Unavailable if the manager cannot be reached within join_timeout_s.
        """
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._join_lock = asyncio.Lock()
        deadline = time.monotonic() + join_timeout_s
        delay = RETRY_BASE_S
        while True:
            try:
                await self._join(purge=True)
                break
            except grpc.aio.AioRpcError as e:
                if time.monotonic() + delay > deadline:
                    raise errors.Unavailable(
                        f"adapter manager {self.client.target} unreachable: {e.details()}"
                    ) from e
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_CAP_S)
        self.joined = True
        self._tasks = [
            asyncio.create_task(self._heartbeat_forever(), name="agent-heartbeat"),
            asyncio.create_task(self._report_forever(), name="agent-reports"),
        ]
        log.info(
            "joined adapter manager %s as %s (epoch %d)", self.client.target, self.replica_id, self.epoch
        )

    async def stop(self) -> None:
        """Stop heartbeating and leave (best effort: a lapsed heartbeat has the same effect)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self.joined:
            self.joined = False
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.client.call(
                    "LeaveReplica",
                    pb.LeaveReplicaRequest(replica_id=self.replica_id, epoch=self.epoch),
                    timeout=LEAVE_TIMEOUT_S,
                )

    # --- residency changes --------------------------------------------------------------------

    def on_change(self, event: ResidencyEvent) -> None:
        """A residency change of the engine's cache, on the engine thread: queue its report."""
        with self._lock:
            self._queue_change(CHANGE_KINDS[event.kind], event.adapter_id, event.slot, event.at, "")

    def load_failed(self, adapter_id: str, reason: str) -> None:
        """Report a load that failed (the manager clears its reservation)."""
        with self._lock:
            self._queue_change(pb.RESIDENCY_CHANGE_KIND_LOAD_FAILED, adapter_id, None, time.time(), reason)

    @property
    def unreported_changes(self) -> int:
        """Residency changes queued for the manager and not yet acknowledged by it."""
        with self._lock:
            return len(self._pending)

    def _queue_change(self, kind: int, adapter_id: str, slot: int | None, at: float, reason: str) -> None:
        """Number and queue a change; the caller holds the lock."""
        self._seq += 1
        if len(self._pending) >= MAX_PENDING:
            self._pending.clear()  # the gap makes the manager ask for a rejoin with a snapshot
        change = pb.ResidencyChange(
            seq=self._seq, kind=kind, adapter_id=adapter_id, slot=slot, at_ms=int(at * 1000), reason=reason
        )
        self._pending.append(change)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    # --- join, heartbeat, reports -------------------------------------------------------------

    def _snapshot(self, engine, purge: bool = False) -> tuple[list, int]:
        """On the engine thread: (resident adapters, the change counter they reflect)."""
        if purge:
            engine.adapters.purge()
        residents = engine.list_resident_adapters()
        with self._lock:
            return [resident_to_proto(r) for r in residents], self._seq

    async def _join(self, purge: bool) -> None:
        def take(engine):
            snapshot, seq = self._snapshot(engine, purge)
            config = engine.config
            fields = inference_pb2.EngineConfig.DESCRIPTOR.fields_by_name
            values = {k: getattr(config, k) for k in config.__dataclass_fields__ if k in fields}
            engine_proto = inference_pb2.EngineConfig(**{k: v for k, v in values.items() if v is not None})
            return snapshot, seq, engine_proto, (engine.model_dir / "config.json").read_text()

        async with self._join_lock:
            snapshot, seq, engine_config, model_json = await self.engine.call(take)
            credential = new_token()
            self.credentials.issue(credential)  # accepted before the manager can use it
            joined = await self.client.call(
                "JoinReplica",
                pb.JoinReplicaRequest(
                    replica_id=self.replica_id,
                    address=self.advertise_address,
                    engine=engine_config,
                    model_config_json=model_json,
                    snapshot=snapshot,
                    snapshot_seq=seq,
                    manager_credential=credential,
                ),
            )
            self.epoch = joined.epoch
            self.heartbeat_interval_s = joined.heartbeat_interval_ms / 1000
            with self._lock:
                while self._pending and self._pending[0].seq <= seq:
                    self._pending.popleft()
        await self._drop(joined.drop)
        if joined.routing_version != self.routing.version:
            await self.refresh_routing()

    async def rejoin(self) -> None:
        """Join again with a full snapshot (the manager said our epoch is stale)."""
        log.warning("rejoining adapter manager %s with a full snapshot", self.client.target)
        await self._join(purge=False)

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            try:
                await self._heartbeat()
            except Exception as e:  # the manager or the engine is away: keep beating
                log.warning("heartbeat to %s failed: %s", self.client.target, e)

    async def _heartbeat(self) -> None:
        def take(engine):
            return *self._snapshot(engine), load_of(engine)

        snapshot, seq, load = await self.engine.call(take)
        load.draining = self.engine.state == DRAINING
        answer = await self.client.call(
            "Heartbeat",
            pb.HeartbeatRequest(
                replica_id=self.replica_id, epoch=self.epoch, snapshot=snapshot, snapshot_seq=seq, load=load
            ),
        )
        if answer.rejoin:
            await self.rejoin()
            return
        for adapter_id in answer.unpin:
            await self.engine.call(lambda e, a=adapter_id: e.adapters.unpin(a))
        for adapter_id in answer.pin:
            await self.engine.call(lambda e, a=adapter_id: _pin_if_held(e, a))
        await self._drop(answer.drop)
        if answer.routing_version != self.routing.version:
            await self.refresh_routing()

    async def _report_forever(self) -> None:
        delay = RETRY_BASE_S
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                with self._lock:
                    batch = [self._pending[i] for i in range(min(REPORT_BATCH, len(self._pending)))]
                if not batch:
                    break
                try:
                    answer = await self.client.call(
                        "ReportResidency",
                        pb.ReportResidencyRequest(
                            replica_id=self.replica_id, epoch=self.epoch, changes=batch
                        ),
                    )
                    if answer.rejoin:
                        await self.rejoin()  # the snapshot covers (and drops) what was pending
                    else:
                        with self._lock:
                            while self._pending and self._pending[0].seq <= batch[-1].seq:
                                self._pending.popleft()
                    delay = RETRY_BASE_S
                except Exception as e:  # the manager is away: keep the changes and retry
                    log.warning("residency report to %s failed (%s); retrying", self.client.target, e)
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, RETRY_CAP_S)

    async def _drop(self, adapter_ids) -> None:
        """Evict and forget adapters the manager does not know (with these bytes)."""
        for adapter_id in adapter_ids:
            try:
                await self.engine.call(lambda e, a=adapter_id: _forget(e, a))
            except errors.AdapterInUse:
                log.info("adapter %s is still in use; dropping it later", adapter_id)

    async def refresh_routing(self) -> None:
        table = await self.client.call("GetRoutingTable", pb.GetRoutingTableRequest())
        self.routing = routing_table_from(table)


def resident_to_proto(r: ResidentAdapter) -> common_pb2.ResidentAdapter:
    """One row of a residency snapshot (and of ListResidentAdapters)."""
    return resident_proto(
        r.adapter_id,
        r.slot,
        r.pinned,
        int(r.last_used * 1e9),
        r.sha256,
        in_flight=r.in_flight,
        rank=r.rank,
        size_bytes=r.size_bytes,
    )


# --- engine-thread helpers ----------------------------------------------------------------------


def load_of(engine) -> pb.ReplicaLoad:
    """The engine's load now, for the heartbeat (the front door's picker reads it)."""
    return pb.ReplicaLoad(
        waiting=len(engine.scheduler.waiting),
        running=len(engine.scheduler.running),
        kv_free_fraction=engine.kv.num_free_blocks / max(engine.kv.num_blocks, 1),
    )


def _pin_if_held(engine, adapter_id: str) -> None:
    """Pin an adapter the manager pins, if it is still in the host cache."""
    if engine.adapters.holds(adapter_id):
        engine.load_adapter(adapter_id, pin=True)


def _forget(engine, adapter_id: str) -> None:
    if engine.adapters.knows(adapter_id):
        engine.adapters.unpin(adapter_id)
        engine.unregister_adapter(adapter_id)
