"""The replica's side of the control plane: membership, residency reports, adapters on demand.

A replica started with `--adapter-manager HOST:PORT` runs one `ReplicaAgent`:

    agent = ReplicaAgent(engine, "manager:50052", "replica-0", "10.0.0.5:50051")
    LLMEngine(..., on_residency_change=agent.on_residency_change)   # when the engine is built
    await agent.start()          # purge, join with a (now empty) snapshot, heartbeat, report
    concrete = await agent.resolve(request.adapter_id, request_headers)
    await agent.stop()           # leave: the manager marks the replica down at once

`engine` is anything with `async call(fn)` that runs `fn(llm_engine)` on the engine's thread
(`AsyncEngine` is one). Residency events fire on that thread; the agent numbers them there, so a
snapshot taken there says exactly which events it already reflects, and hands them to its event
loop thread-safely. Reports go to the manager in order; a missed one (or a lapsed membership)
makes the agent join again with a full snapshot, which is how the manager reconciles.

An adapter the replica does not hold is acquired from the manager (which applies the cluster's
host-cache policy and names what to evict), fetched with FetchAdapterWeights, checked against its
sha256, written under `cache_dir`, registered with the engine and loaded. Concurrent requests for
one adapter share one fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol, TypeVar

import grpc

from inference_svc import errors
from inference_svc.adapter_cache import ResidencyEvent, ResidentAdapter
from loraserve import errors as format_errors
from loraserve.convert import resident_proto, routing_table_from
from loraserve.names import REQUEST_KEY_HEADER, TENANT_HEADER
from loraserve.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterFiles
from loraserve.routing import RoutingTable, resolve
from loraserve.security import SecurityConfig, aio_channel
from loraserve.telemetry import client_interceptors
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import adapter_pb2_grpc, common_pb2, inference_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANGE_KINDS = {
    "loaded": pb.RESIDENCY_CHANGE_KIND_LOADED,
    "activated": pb.RESIDENCY_CHANGE_KIND_ACTIVATED,
    "deactivated": pb.RESIDENCY_CHANGE_KIND_DEACTIVATED,
    "evicted": pb.RESIDENCY_CHANGE_KIND_EVICTED,
}
# Most residency changes sent in one ReportResidency call.
REPORT_BATCH = 256
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
# Deadline of LeaveReplica at shutdown: a manager that is down must not hold the shutdown up.
LEAVE_TIMEOUT_S = 1.0
# Changes kept while the manager is unreachable; beyond that a snapshot replaces them.
MAX_PENDING = 10_000
# Backoff between attempts to reach the manager (join, reports).
RETRY_BASE_S, RETRY_CAP_S = 0.05, 2.0


class EngineDriver(Protocol):
    async def call(self, fn: Callable) -> T:
        """Run `fn(engine)` on the engine's thread and return its result."""

    async def load_adapter(self, adapter_id: str, pin: bool | None = None) -> object:
        """Load into the host cache, reading the files off the engine's thread."""


class ReplicaAgent:
    """Joins the adapter manager and keeps it informed; fetches adapters on demand.

    Args:
        engine: runs functions on the engine's thread (`AsyncEngine.call`) and loads adapters
            off it (`AsyncEngine.load_adapter`).
        manager_target: the adapter manager's host:port.
        replica_id: this replica's stable id (the same after a restart).
        advertise_address: host:port where this replica's InferenceService is reachable.
        cache_dir: where fetched adapters are written (default: a new temporary directory).
        join_timeout_s: how long `start` keeps trying to reach the manager.
        rpc_timeout_s: deadline of each call to the manager (fetches get 10x).
        security: TLS and the service token for the channel to the manager (None: plaintext).
    """

    def __init__(
        self,
        engine: EngineDriver,
        manager_target: str,
        replica_id: str,
        advertise_address: str,
        cache_dir: str | Path | None = None,
        join_timeout_s: float = 30.0,
        rpc_timeout_s: float = 10.0,
        security: SecurityConfig | None = None,
    ):
        self.engine = engine
        self.manager_target = manager_target
        self.security = security
        self.replica_id = replica_id
        self.advertise_address = advertise_address
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="loraserve-adapters-"))
        self.join_timeout_s = join_timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self.epoch = 0
        self.heartbeat_interval_s = 2.0
        self.routing = RoutingTable()
        self._lock = threading.Lock()  # guards the counter, the pending queue and the host view
        self._seq = 0  # residency changes so far (engine events and failed loads)
        self._pending: deque[pb.ResidencyChange] = deque()
        self._host: set[str] = set()  # adapters in the engine's host cache, from its events
        self._local: dict[str, str] = {}  # adapter id -> sha256 of the files registered with the engine
        self._inflight: dict[str, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._join_lock: asyncio.Lock | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: adapter_pb2_grpc.AdapterServiceStub | None = None
        self._tasks: list[asyncio.Task] = []
        self._writes: set[asyncio.Future] = set()  # local copies of fetched adapters being written

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Purge the engine's residency, join with the snapshot, start heartbeats and reports.

        Raises errors.Unavailable if the manager cannot be reached within join_timeout_s.
        """
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._join_lock = asyncio.Lock()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._channel = aio_channel(
            self.security, self.manager_target, MANAGER_CHANNEL_OPTIONS, client_interceptors()
        )
        self._stub = adapter_pb2_grpc.AdapterServiceStub(self._channel)
        deadline = time.monotonic() + self.join_timeout_s
        delay = RETRY_BASE_S
        while True:
            try:
                await self._join(purge=True)
                break
            except grpc.aio.AioRpcError as e:
                if time.monotonic() + delay > deadline:
                    raise errors.Unavailable(
                        f"adapter manager {self.manager_target} unreachable: {e.details()}"
                    ) from e
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_CAP_S)
        self._tasks = [
            asyncio.create_task(self._heartbeat_forever(), name="agent-heartbeat"),
            asyncio.create_task(self._report_forever(), name="agent-reports"),
        ]
        log.info(
            "joined adapter manager %s as %s (epoch %d)", self.manager_target, self.replica_id, self.epoch
        )

    async def stop(self) -> None:
        """Stop heartbeating and leave (best effort: a lapsed heartbeat has the same effect)."""
        await asyncio.gather(*self._writes)  # never leave a half-written local copy behind
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._stub is not None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._stub.LeaveReplica(
                    pb.LeaveReplicaRequest(replica_id=self.replica_id, epoch=self.epoch),
                    timeout=LEAVE_TIMEOUT_S,
                )
            await self._channel.close()
            self._stub = None

    # --- the engine's callback ----------------------------------------------------------------

    def on_residency_change(self, event: ResidencyEvent) -> None:
        """LLMEngine's `on_residency_change`: called on the engine thread for every change."""
        with self._lock:
            if event.kind == "loaded":
                self._host.add(event.adapter_id)
            elif event.kind == "evicted":
                self._host.discard(event.adapter_id)
            self._queue_change(CHANGE_KINDS[event.kind], event.adapter_id, event.slot, event.at, "")

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

    # --- requests -----------------------------------------------------------------------------

    async def resolve(self, adapter_id: str, headers: Mapping[str, str] | None = None) -> str:
        """The concrete adapter to serve a request with ("" = base model), held by the engine.

        `headers` are the request's metadata: routing rules match them, `x-tenant` is its tenant
        and `x-request-key` keeps alias variants sticky. Applies rules and aliases, then
        `ensure_local`. Raises AdapterNotFound, NoEvictableSlot (nothing evictable),
        InvalidAdapter, or Unavailable (manager unreachable).
        """
        headers = {k.lower(): v for k, v in (headers or {}).items() if isinstance(v, str)}
        key, tenant = headers.get(REQUEST_KEY_HEADER, ""), headers.get(TENANT_HEADER, "")
        concrete = resolve(self.routing, adapter_id, key, tenant, headers).adapter_id
        if not concrete:
            return ""
        try:
            await self.ensure_local(concrete)
        except errors.AdapterNotFound:
            await self._refresh_routing()  # it may be an alias created since the last refresh
            retry = resolve(self.routing, adapter_id, key, tenant, headers).adapter_id
            if retry == concrete:
                raise
            concrete = retry
            if concrete:
                await self.ensure_local(concrete)
        return concrete

    async def ensure_local(self, adapter_id: str) -> None:
        """Make `adapter_id` resident in the engine's host cache, fetching it if needed.

        While the manager is unreachable, an adapter fetched before is loaded from the local copy
        under the engine's own LRU policy; one never fetched fails with Unavailable.
        """
        with self._lock:
            if adapter_id in self._host:
                return
        if self._stub is None:
            raise errors.Unavailable("this replica has not joined its adapter manager yet")
        running = self._inflight.get(adapter_id)
        if running is None:
            running = asyncio.ensure_future(self._acquire_and_load(adapter_id))
            self._inflight[adapter_id] = running
            running.add_done_callback(lambda _: self._inflight.pop(adapter_id, None))
        await asyncio.shield(running)

    async def _acquire_and_load(self, adapter_id: str) -> None:
        residents = await self.engine.call(lambda e: e.list_resident_adapters())
        if any(r.adapter_id == adapter_id for r in residents):
            return
        request = pb.AcquireAdapterRequest(
            replica_id=self.replica_id,
            epoch=self.epoch,
            adapter_id=adapter_id,
            snapshot=[resident_to_proto(r) for r in residents],
        )
        try:
            acquired = await self._stub.AcquireAdapter(request, timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() in MANAGER_AWAY and adapter_id in self._local:
                log.warning("adapter manager unreachable; loading %s from its local copy", adapter_id)
                await self.engine.load_adapter(adapter_id)
                return
            if e.code() == grpc.StatusCode.ABORTED:  # our epoch is stale: join again, then retry
                await self._rejoin()
                request.epoch = self.epoch
                try:
                    acquired = await self._stub.AcquireAdapter(request, timeout=self.rpc_timeout_s)
                except grpc.aio.AioRpcError as again:
                    raise _engine_error(adapter_id, again) from again
            else:
                raise _engine_error(adapter_id, e) from e
        try:
            for victim in acquired.evict:
                await self.engine.call(lambda e, v=victim: _evict_quietly(e, v))
            if self._local.get(adapter_id) != acquired.sha256:
                files = await self._download(adapter_id, acquired.sha256)
                path = (
                    self.cache_dir / f"{acquired.sha256}-{hashlib.sha256(files.config_json).hexdigest()[:16]}"
                )
                await self.engine.call(lambda e: _register(e, adapter_id, path, files))
                self._local[adapter_id] = acquired.sha256
                # The engine loads from memory now; the local copy is written meanwhile.
                write = asyncio.ensure_future(self._write_local_copy(adapter_id, path, files))
                self._writes.add(write)
                write.add_done_callback(self._writes.discard)
            await self.engine.load_adapter(adapter_id, pin=True if acquired.pin else None)
        except Exception as e:
            with self._lock:
                self._queue_change(
                    pb.RESIDENCY_CHANGE_KIND_LOAD_FAILED, adapter_id, None, time.time(), str(e)
                )
            raise

    async def _download(self, adapter_id: str, sha256: str) -> AdapterFiles:
        """Fetch an adapter's files into memory, verifying their sha256."""
        digest, data, header = hashlib.sha256(), bytearray(), None
        stream = self._stub.FetchAdapterWeights(
            pb.FetchAdapterWeightsRequest(adapter_id=adapter_id), timeout=10 * self.rpc_timeout_s
        )
        try:
            async for part in stream:
                if part.WhichOneof("part") == "header":
                    header = part.header
                elif header is None or len(data) + len(part.data) > header.size_bytes:
                    stream.cancel()  # no header, or more bytes than announced: fails the check below
                    break
                else:
                    digest.update(part.data)
                    data += part.data
        except grpc.aio.AioRpcError as e:
            raise _engine_error(adapter_id, e) from e
        got = digest.hexdigest()
        if header is None or got != header.sha256 or got != sha256 or len(data) != header.size_bytes:
            raise format_errors.CorruptSafetensors(
                f"adapter {adapter_id!r}: fetched {len(data)} bytes hashing to {got}; the manager "
                f"registered {sha256}"
            )
        return AdapterFiles(header.adapter_config_json, data)

    async def _write_local_copy(self, adapter_id: str, path: Path, files: AdapterFiles) -> None:
        """Write fetched files to `path` in cache_dir; then the engine reads them from there."""
        try:
            if not path.is_dir():
                await asyncio.to_thread(_write_directory, self.cache_dir, path, files)
            await self.engine.call(lambda e: e.adapters.files_written(adapter_id, files))
        except Exception as e:  # the engine keeps the bytes in memory instead
            log.warning("could not write adapter %s to %s (%s); keeping it in memory", adapter_id, path, e)

    # --- membership ---------------------------------------------------------------------------

    def _snapshot(self, engine, purge: bool = False) -> tuple[list, int]:
        """On the engine thread: (resident adapters, the change counter they reflect)."""
        if purge:
            engine.adapters.purge()
        residents = engine.list_resident_adapters()
        with self._lock:
            self._host = {r.adapter_id for r in residents}
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
            joined = await self._stub.JoinReplica(
                pb.JoinReplicaRequest(
                    replica_id=self.replica_id,
                    address=self.advertise_address,
                    engine=engine_config,
                    model_config_json=model_json,
                    snapshot=snapshot,
                    snapshot_seq=seq,
                ),
                timeout=self.rpc_timeout_s,
            )
            self.epoch = joined.epoch
            self.heartbeat_interval_s = joined.heartbeat_interval_ms / 1000
            with self._lock:
                while self._pending and self._pending[0].seq <= seq:
                    self._pending.popleft()
        await self._drop(joined.drop)
        if joined.routing_version != self.routing.version:
            await self._refresh_routing()

    async def _rejoin(self) -> None:
        log.warning("rejoining adapter manager %s with a full snapshot", self.manager_target)
        await self._join(purge=False)

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            try:
                await self._heartbeat()
            except Exception as e:  # the manager or the engine is away: keep beating
                log.warning("heartbeat to %s failed: %s", self.manager_target, e)

    async def _heartbeat(self) -> None:
        snapshot, seq = await self.engine.call(self._snapshot)
        answer = await self._stub.Heartbeat(
            pb.HeartbeatRequest(
                replica_id=self.replica_id, epoch=self.epoch, snapshot=snapshot, snapshot_seq=seq
            ),
            timeout=self.rpc_timeout_s,
        )
        if answer.rejoin:
            await self._rejoin()
            return
        for adapter_id in answer.unpin:
            await self.engine.call(lambda e, a=adapter_id: e.adapters.unpin(a))
        for adapter_id in answer.pin:
            await self.engine.call(lambda e, a=adapter_id: _pin_quietly(e, a))
        await self._drop(answer.drop)
        if answer.routing_version != self.routing.version:
            await self._refresh_routing()

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
                    answer = await self._stub.ReportResidency(
                        pb.ReportResidencyRequest(
                            replica_id=self.replica_id, epoch=self.epoch, changes=batch
                        ),
                        timeout=self.rpc_timeout_s,
                    )
                    if answer.rejoin:
                        await self._rejoin()  # the snapshot covers (and drops) what was pending
                    else:
                        with self._lock:
                            while self._pending and self._pending[0].seq <= batch[-1].seq:
                                self._pending.popleft()
                    delay = RETRY_BASE_S
                except Exception as e:  # the manager is away: keep the changes and retry
                    log.warning("residency report to %s failed (%s); retrying", self.manager_target, e)
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, RETRY_CAP_S)

    async def _drop(self, adapter_ids) -> None:
        """Evict and forget adapters the manager does not know (with these bytes)."""
        for adapter_id in adapter_ids:
            try:
                await self.engine.call(lambda e, a=adapter_id: _forget(e, a))
                self._local.pop(adapter_id, None)
            except errors.AdapterInUse:
                log.info("adapter %s is still in use; dropping it later", adapter_id)

    async def _refresh_routing(self) -> None:
        table = await self._stub.GetRoutingTable(pb.GetRoutingTableRequest(), timeout=self.rpc_timeout_s)
        self.routing = routing_table_from(table)


# --- engine-thread helpers ----------------------------------------------------------------------


def resident_to_proto(r: ResidentAdapter) -> common_pb2.ResidentAdapter:
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


def _register(engine, adapter_id: str, path: Path, files: AdapterFiles) -> None:
    if engine.adapters.knows(adapter_id):
        engine.unregister_adapter(adapter_id)  # other bytes under the same id
    engine.register_adapter(adapter_id, path, files)


def _evict_quietly(engine, adapter_id: str) -> None:
    """Evict a victim the manager chose; one that became busy or unknown meanwhile is kept."""
    with contextlib.suppress(errors.AdapterNotFound, errors.AdapterInUse):
        engine.evict_adapter(adapter_id)


def _pin_quietly(engine, adapter_id: str) -> None:
    """Pin an adapter the manager pins, if it is still in the host cache."""
    if any(r.adapter_id == adapter_id for r in engine.list_resident_adapters()):
        engine.load_adapter(adapter_id, pin=True)


def _write_directory(cache_dir: Path, final: Path, files: AdapterFiles) -> None:
    """Write `files` into a staging directory of `cache_dir`, then rename it to `final`."""
    staging = cache_dir / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        (staging / CONFIG_FILE).write_bytes(files.config_json)
        (staging / WEIGHTS_FILE).write_bytes(files.weights)
        if not final.is_dir():
            staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _forget(engine, adapter_id: str) -> None:
    if engine.adapters.knows(adapter_id):
        engine.adapters.unpin(adapter_id)
        engine.unregister_adapter(adapter_id)


def _engine_error(adapter_id: str, e: grpc.aio.AioRpcError) -> errors.LoraServeError:
    """The data plane's typed error for a failed call to the manager."""
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
