"""Adapters a managed replica gets from its manager: acquire, download, verify, load, keep a copy.

Two ways in, one way to load:
  - a request for an adapter the engine does not hold (`ensure_local`): AcquireAdapter asks the
    manager's host-cache policy for room (it names the victims) and the content hash; concurrent
    requests for one adapter share one acquire and one fetch;
  - the manager's LoadAdapter command (`load_commanded`) already carries the hash, the victims and
    the pin, so nothing is asked back.
Either way the replica evicts the victims, fetches the bytes with FetchAdapterWeights unless its
engine already has a copy with that sha256, checks the sha256, registers them with the engine and
loads once; the engine's residency events make the one report. The engine loads from the fetched
bytes at once while a background task writes the local copy under `cache_dir` that later loads
read (also while the manager is unreachable).

The manager chooses host-cache victims (`adapter_cache.HOST_BY_MANAGER`): when a finished read
still finds the host cache full, the cache's `needs_room` event makes `room_for` ask the manager.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import uuid
from pathlib import Path

import grpc

from inference_svc import errors
from inference_svc.adapter_cache import ResidentAdapter
from inference_svc.manager_client import MANAGER_AWAY, ManagerClient, engine_error
from inference_svc.membership import Membership, resident_to_proto
from loraserve import errors as format_errors
from loraserve.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterFiles
from loraserve.v1 import adapter_pb2 as pb

log = logging.getLogger(__name__)

# Attempts to load once room was made (another read may take it first).
ROOM_ATTEMPTS = 20
# How long a read waits for the manager to name a victim that can go while the host tier does not
# change: every entry may be in use by requests (they finish, and their adapters become victims)
# or the mirror may lag this replica's reports (they land). Each change of the tier (an entry
# loaded or evicted: the replica is moving) starts the wait again; only a tier stuck this long
# (every entry pinned, or in use by requests that do not finish) fails the read.
ROOM_WAIT_S = 10.0
# Deadline of one ask: the manager holds an AcquireAdapter while entries are still loading, which
# may include loads that wait on this very read; an ask that runs out is asked again.
ROOM_ASK_TIMEOUT_S = 2.0
# First wait between asks, doubled up to ROOM_RETRY_MAX_S.
ROOM_RETRY_S = 0.05
ROOM_RETRY_MAX_S = 0.5
# Loads for requests (acquire, fetch, read) a replica runs at once, at most (`cold_loads_at_once`);
# the requests of later cold adapters wait their turn, in arrival order. Each load in flight holds
# a host-cache reservation at the manager, which counts it against max_cpu_loras, and once read it
# waits for an entry to free: a burst of more distinct cold adapters than the host cache holds made
# them wait on each other for room until ROOM_WAIT_S ran out, and half of such a burst failed with
# RESOURCE_EXHAUSTED (tests/adapter_svc/test_cold_burst.py).
COLD_LOADS_AT_ONCE = 4


def cold_loads_at_once(max_cpu_loras: int) -> int:
    """Request loads a replica runs at once: COLD_LOADS_AT_ONCE, at most half its host cache (the
    reservations of the loads in flight must leave entries to evict), at least one."""
    return max(1, min(COLD_LOADS_AT_ONCE, max_cpu_loras // 2))


class Fetcher:
    """Gets adapters from the manager into the engine.

    Args:
        engine: `AsyncEngine` (runs functions on the engine's thread, loads off it).
        client: the replica's client of the manager.
        membership: this replica's membership (epoch, rejoin, failed-load reports).
        cache_dir: where fetched adapters are written.
    """

    def __init__(self, engine, client: ManagerClient, membership: Membership, cache_dir: Path):
        self.engine = engine
        self.client = client
        self.membership = membership
        self.cache_dir = cache_dir
        self._inflight: dict[str, asyncio.Future] = {}  # the load fetching an adapter, one per adapter
        self._room: dict[str, asyncio.Task] = {}  # needs_room answers in progress
        self._writes: set[asyncio.Future] = set()  # local copies of fetched adapters being written
        self._cold_loads: asyncio.Semaphore | None = None  # request loads running (made at the first)

    async def stop(self) -> None:
        await asyncio.gather(*self._writes)  # never leave a half-written local copy behind

    # --- request-triggered loads --------------------------------------------------------------

    async def ensure_local(self, adapter_id: str) -> None:
        """Make `adapter_id` resident in the engine's host cache, fetching it if needed.

        While the manager is unreachable, an adapter fetched before is loaded from the local copy;
        one never fetched fails with Unavailable.
        """
        if await self.engine.call(lambda e: e.adapters.holds(adapter_id)):
            return
        if not self.membership.joined:
            raise errors.Unavailable("this replica has not joined its adapter manager yet")
        running = self._inflight.get(adapter_id) or self._start(adapter_id, self._in_turn(adapter_id))
        await asyncio.shield(running)

    async def _in_turn(self, adapter_id: str) -> None:
        """`_acquire_and_load` once fewer than `cold_loads_at_once` request loads run."""
        if self._cold_loads is None:
            limit = cold_loads_at_once(await self.engine.call(lambda e: e.config.max_cpu_loras))
            if self._cold_loads is None:  # another first load may have made it meanwhile
                self._cold_loads = asyncio.Semaphore(limit)
        async with self._cold_loads:
            await self._acquire_and_load(adapter_id)

    def _start(self, adapter_id: str, load) -> asyncio.Future:
        """Run `load`, the one load of `adapter_id` in flight that later callers wait for."""
        running = asyncio.ensure_future(load)
        self._inflight[adapter_id] = running
        running.add_done_callback(lambda _: self._inflight.pop(adapter_id, None))
        return running

    async def _acquire_and_load(self, adapter_id: str) -> None:
        residents = await self.engine.call(lambda e: e.list_resident_adapters())
        if any(r.adapter_id == adapter_id for r in residents):
            return
        try:
            acquired = await self._acquire(adapter_id, residents)
        except grpc.aio.AioRpcError as e:
            if e.code() in MANAGER_AWAY and await self._has_copy(adapter_id):
                log.warning("adapter manager unreachable; loading %s from its local copy", adapter_id)
                await self._load(adapter_id)
                return
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                # the manager may have reserved room just after this call gave up: release it now
                # (the report clears the reservation) rather than when it lapses
                self.membership.load_failed(adapter_id, "AcquireAdapter ran past its deadline")
            raise engine_error(adapter_id, e) from e
        await self._fetch_and_load(adapter_id, acquired.sha256, acquired.evict)

    async def _acquire(
        self, adapter_id: str, residents: list[ResidentAdapter], timeout: float | None = None
    ) -> pb.AcquireAdapterResponse:
        """AcquireAdapter; a stale epoch makes the replica join again and ask once more."""
        request = pb.AcquireAdapterRequest(
            replica_id=self.membership.replica_id,
            epoch=self.membership.epoch,
            adapter_id=adapter_id,
            snapshot=[resident_to_proto(r) for r in residents],
        )
        try:
            return await self.client.call("AcquireAdapter", request, timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.ABORTED:
                raise
        await self.membership.rejoin()
        request.epoch = self.membership.epoch
        return await self.client.call("AcquireAdapter", request, timeout)

    # --- the manager's command ----------------------------------------------------------------

    async def load_commanded(
        self, adapter_id: str, sha256: str, evict: list[str], to_slot: bool, pin: bool | None
    ) -> ResidentAdapter:
        """The manager's LoadAdapter: evict its victims, fetch unless a copy with `sha256` is
        registered, load once (into a slot with `to_slot`, pinned or unpinned per `pin`)."""
        running = self._inflight.get(adapter_id)
        if running is None:
            return await asyncio.shield(
                self._start(adapter_id, self._fetch_and_load(adapter_id, sha256, evict, to_slot, pin))
            )
        await asyncio.wait([running])  # another load is fetching it: share that fetch, then load
        return await self._fetch_and_load(adapter_id, sha256, evict, to_slot, pin)

    # --- both ---------------------------------------------------------------------------------

    async def _fetch_and_load(
        self, adapter_id: str, sha256: str, evict, to_slot: bool = False, pin: bool | None = None
    ) -> ResidentAdapter:
        try:
            await self.engine.call(lambda e: _evict_while_full(e, evict))
            if not await self._has_copy(adapter_id, sha256):
                files = await self._download(adapter_id, sha256)
                path = self.cache_dir / f"{sha256}-{hashlib.sha256(files.config_json).hexdigest()[:16]}"
                await self.engine.call(lambda e: _register(e, adapter_id, path, files))
                # The engine loads from memory now; the local copy is written meanwhile.
                write = asyncio.ensure_future(self._write_local_copy(adapter_id, path, files))
                self._writes.add(write)
                write.add_done_callback(self._writes.discard)
            return await self._load(adapter_id, to_slot, pin)
        except Exception as e:
            self.membership.load_failed(adapter_id, str(e))
            raise

    async def _has_copy(self, adapter_id: str, sha256: str | None = None) -> bool:
        """Is `adapter_id` registered with the engine from a copy this fetcher made (of `sha256`)?"""
        path = await self.engine.call(lambda e: e.adapters.source_path(adapter_id))
        if path is None or path.parent != self.cache_dir.resolve():
            return False
        return sha256 is None or path.name.startswith(f"{sha256}-")

    async def _load(self, adapter_id: str, to_slot: bool = False, pin: bool | None = None) -> ResidentAdapter:
        """Load into the engine; a full host cache waits for the room the manager names."""
        for _ in range(ROOM_ATTEMPTS):
            try:
                return await self.engine.load_adapter(adapter_id, to_slot=to_slot, pin=pin)
            except errors.HostCacheFull:
                room = self._room.get(adapter_id)
                if room is None:  # the cache's ask is on its way (or the last one just ended)
                    await asyncio.sleep(ROOM_RETRY_S)
                    continue
                error = await asyncio.shield(room)
                if error is not None:
                    raise error from None
        return await self.engine.load_adapter(adapter_id, to_slot=to_slot, pin=pin)

    async def _download(self, adapter_id: str, sha256: str) -> AdapterFiles:
        """Fetch an adapter's files into memory, verifying their sha256."""
        digest, data, header = hashlib.sha256(), bytearray(), None
        stream = self.client.fetch(adapter_id)
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
            raise engine_error(adapter_id, e) from e
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

    # --- room in the host cache ---------------------------------------------------------------

    def room_for(self, adapter_id: str) -> None:
        """The cache's `needs_room` event (on the event loop): ask the manager for victims."""
        if adapter_id not in self._room:
            task = asyncio.ensure_future(self._make_room(adapter_id))
            self._room[adapter_id] = task
            task.add_done_callback(lambda t: self._forget_room(adapter_id, t))

    def _forget_room(self, adapter_id: str, task: asyncio.Task) -> None:
        if self._room.get(adapter_id) is task:
            del self._room[adapter_id]

    async def _make_room(self, adapter_id: str) -> Exception | None:
        """AcquireAdapter names victims; evict them. The manager's mirror may still count what
        this replica evicted or not count what it loaded: then wait for the reports and ask again.
        -> the error that failed the read, or None."""
        error: Exception | None = None
        try:
            loop = asyncio.get_running_loop()
            delay = ROOM_RETRY_S
            refused: grpc.aio.AioRpcError | None = None  # the manager's last refusal
            seen: set[str] | None = None  # the host tier when the wait last started again
            while True:
                residents = await self.engine.call(lambda e: e.list_resident_adapters())
                tier = {r.adapter_id for r in residents}
                if tier != seen:
                    seen, deadline = tier, loop.time() + ROOM_WAIT_S
                try:
                    victims = (await self._acquire(adapter_id, residents, ROOM_ASK_TIMEOUT_S)).evict
                except grpc.aio.AioRpcError as e:
                    if e.code() not in (
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                    ):
                        raise
                    victims, refused = [], e  # nothing evictable yet: ask again
                room = await self.engine.call(lambda e, v=victims: _evict_while_full(e, v))
                if room or loop.time() + delay > deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(2 * delay, ROOM_RETRY_MAX_S)
            if not room and refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                error = engine_error(adapter_id, refused)  # e.g. every entry pinned
            elif not room:
                error = errors.HostCacheFull(
                    f"the adapter manager named nothing evictable to make room for {adapter_id!r}"
                )
        except grpc.aio.AioRpcError as e:
            error = engine_error(adapter_id, e)
        except errors.LoraServeError as e:
            error = e
        if error is not None:
            self.membership.load_failed(adapter_id, str(error))
        # Forgotten before the cache hears the answer: if the read still finds no room, the cache
        # asks again (`needs_room`) as soon as it has the answer, and that ask must start a new
        # task, not be taken for this one (the read would then wait for an answer never asked for).
        self._forget_room(adapter_id, asyncio.current_task())
        await self.engine.call(lambda e: e.adapters.room_done(adapter_id, error))
        return error


# --- engine-thread helpers ----------------------------------------------------------------------


def _register(engine, adapter_id: str, path: Path, files: AdapterFiles) -> None:
    if engine.adapters.knows(adapter_id):
        engine.unregister_adapter(adapter_id)  # other bytes under the same id
    engine.register_adapter(adapter_id, path, files)


def _evict_quietly(engine, adapter_id: str) -> bool:
    """Evict a victim the manager chose; one that became busy or unknown meanwhile is kept."""
    try:
        return engine.evict_adapter(adapter_id)
    except (errors.AdapterNotFound, errors.AdapterInUse):
        return False


def _evict_while_full(engine, victims) -> bool:
    """Evict the manager's victims, in its order, only while the host tier is full: its mirror may
    still count entries this replica already dropped (their reports are on the way), so it may name
    more than this load needs. -> is there room for one more entry now?"""
    for victim in victims:
        if not engine.adapters.host_full():
            break
        _evict_quietly(engine, victim)
    return not engine.adapters.host_full()


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
