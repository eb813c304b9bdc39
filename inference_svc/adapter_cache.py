"""Adapter residency on one replica: the host-memory tier and the accelerator slots.

Two LRU tiers with pins (DESIGN.md sections 1 and 4):
  - host cache: up to `max_cpu_loras` loaded adapters (`LoraAdapter`, weights in host memory);
  - slots: up to `max_loras` adapters copied into `LoraSlots`; a slot's adapter is always also in
    the host cache.
Reading an adapter (files, sha256, validation) never runs on the engine thread: `prefetch` hands
it to the `AdapterLoader` thread (one read per adapter at a time), and the engine thread installs
finished reads - `install_loaded` at the start of each step, `load` for LoadAdapter. Every dict
here belongs to the engine thread; the loader only completes futures.
An adapter with running requests (refcount > 0) or a pin is never evicted from its tier; when every
candidate is pinned or busy the answer is `NoEvictableSlot` (host, when a finished read is
installed) or "not now" (slots: the scheduler waits). Every residency change is reported to the
`on_change` listener, on the engine thread.

This cache is the replica's one owner of residency: the replica agent asks it (through the engine
thread) or listens to its events; nobody else keeps a copy. Who chooses host-tier victims is fixed
at construction (`host_eviction`):
  - `HOST_LRU` (standalone): installing into a full host tier evicts its least recently used idle,
    unpinned entry;
  - `HOST_BY_MANAGER` (a replica of an adapter manager): the manager's answer names the victims and
    the agent evicts them before the load. A finished read that still finds the tier full (the
    manager's mirror lagged) is never given room by this cache: it stays pending, a `needs_room`
    event asks the agent to get victims from the manager, and `room_done` answers (a failure
    fails the requests waiting for it). A direct `load` raises `HostCacheFull` instead.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from inference_svc import errors
from inference_svc.adapter_loader import AdapterLoader, LoadedAdapter
from inference_svc.adapters import LoraAdapter, inspect_adapter
from inference_svc.config import EngineConfig
from inference_svc.lora_slots import LoraSlots
from loraserve.model_summary import ModelConfig
from loraserve.peft_format import AdapterFiles, AdapterManifest

HOST_LRU, HOST_BY_MANAGER = "lru", "manager"  # who chooses host-tier victims (module docstring)


@dataclass(frozen=True)
class ResidencyEvent:
    # "loaded" (host) | "activated" (slot) | "deactivated" | "evicted" (host); and "needs_room", not
    # a change: a finished read waits for the manager to name victims (HOST_BY_MANAGER only)
    kind: str
    adapter_id: str
    slot: int | None
    at: float  # wall-clock seconds
    seconds: float = 0.0  # "loaded" / "activated": how long reading the files / the slot copy took


@dataclass(frozen=True)
class ResidentAdapter:
    """One row of `ListResidentAdapters`: the replica's truth about an adapter it holds."""

    adapter_id: str
    tier: str  # "slot" | "host"
    slot: int | None
    pinned: bool
    last_used: float  # wall-clock seconds
    in_flight: int  # running requests holding its slot
    rank: int
    size_bytes: int
    sha256: str


class AdapterCache:
    """Registry of known adapter sources plus the two residency tiers of this replica."""

    def __init__(
        self,
        model: ModelConfig,
        config: EngineConfig,
        slots: LoraSlots,
        dtype: torch.dtype,
        on_change: Callable[[ResidencyEvent], None] | None = None,
        host_eviction: str = HOST_LRU,
    ):
        if host_eviction not in (HOST_LRU, HOST_BY_MANAGER):
            raise ValueError(f"host_eviction ({host_eviction!r}) must be {HOST_LRU!r} or {HOST_BY_MANAGER!r}")
        self.host_eviction = host_eviction
        self.model = model
        self.config = config
        self.slots = slots
        self.on_change = on_change or (lambda event: None)
        self.loader = AdapterLoader(model, config, dtype, pin_memory=config.resolved_device().type == "cuda")
        self.sources: dict[str, tuple[Path, AdapterManifest]] = {}
        # Adapters whose files are held in memory until they are on disk at their path.
        self.in_memory: dict[str, AdapterFiles] = {}
        self.host: OrderedDict[str, LoraAdapter] = OrderedDict()  # LRU first
        self.loading: dict[str, concurrent.futures.Future[LoadedAdapter]] = {}  # reads not installed yet
        self.failed_loads: dict[str, Exception] = {}  # failed installs not yet taken by install_loaded
        self.room_wanted: set[str] = set()  # finished reads waiting for the manager's victims
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # adapter -> slot, LRU first
        self.activation: dict[str, int] = {}  # adapter -> when it took its slot (lower: held longer)
        self._activations = itertools.count()
        self.pinned: set[str] = set()
        self.refcount: dict[str, int] = {}
        self.last_used: dict[str, float] = {}
        self.stats = {
            "host_hits": 0,
            "host_misses": 0,
            "slot_hits": 0,
            "slot_misses": 0,
            "host_evictions": 0,
            "slot_evictions": 0,
        }

    # --- registry -------------------------------------------------------------------------

    def register(
        self, adapter_id: str, path: str | Path, files: AdapterFiles | None = None
    ) -> AdapterManifest:
        """Validate an adapter directory (config + header only) and remember where it lives.

        `files` are the directory's contents held in memory while they are still being written
        to `path`: loads use them until `files_written` says the directory is complete.
        """
        if not adapter_id:
            raise errors.InvalidRequest("adapter_id", "must be non-empty")
        path = Path(path).resolve()
        known = self.sources.get(adapter_id)
        if known is not None:
            if known[0] == path:
                return known[1]
            raise errors.AdapterAlreadyExists(f"adapter {adapter_id!r} is registered from {known[0]}")
        manifest = inspect_adapter(path, self.model, self.config, files)
        self.sources[adapter_id] = (path, manifest)
        if files is not None:
            self.in_memory[adapter_id] = files
        return manifest

    def files_written(self, adapter_id: str, files: AdapterFiles) -> None:
        """`files` of `adapter_id` are on disk at its path now: later loads read the directory."""
        if self.in_memory.get(adapter_id) is files:
            del self.in_memory[adapter_id]

    def unregister(self, adapter_id: str) -> None:
        """Forget an adapter, evicting it first (refused while it has running requests)."""
        self._source(adapter_id)
        self.pinned.discard(adapter_id)
        self.evict(adapter_id)  # also discards a read in flight
        del self.sources[adapter_id]
        self.in_memory.pop(adapter_id, None)

    def _source(self, adapter_id: str) -> tuple[Path, AdapterManifest]:
        try:
            return self.sources[adapter_id]
        except KeyError:
            raise errors.AdapterNotFound(adapter_id) from None

    def knows(self, adapter_id: str) -> bool:
        return adapter_id in self.sources

    # --- host tier ------------------------------------------------------------------------

    def prefetch(self, adapter_id: str) -> concurrent.futures.Future[LoadedAdapter] | None:
        """Start reading `adapter_id` on the loader thread, unless it is in the host tier (None)
        or already being read (that read's future). Raises AdapterNotFound."""
        if adapter_id in self.host:
            return None
        future = self.loading.get(adapter_id)
        if future is None:
            path, _ = self._source(adapter_id)
            self.stats["host_misses"] += 1
            self.failed_loads.pop(adapter_id, None)  # this read's outcome supersedes an older one
            future = self.loader.submit(adapter_id, path, self.in_memory.get(adapter_id))
            self.loading[adapter_id] = future
        return future

    def install_loaded(self) -> dict[str, Exception]:
        """Install every finished read into the host tier (evicting LRU entries to make room).

        Returns the installs that failed since the last call, {adapter_id: the read's error
        (InvalidAdapter, AdapterFilesMissing ...) or NoEvictableSlot when no entry could make room}.
        """
        for adapter_id in [a for a, future in self.loading.items() if future.done()]:
            with contextlib.suppress(Exception):  # recorded in failed_loads, returned below
                self._install(adapter_id)  # False: it waits for room (HOST_BY_MANAGER)
        failed, self.failed_loads = self.failed_loads, {}
        return failed

    def wait_for_load(self, timeout: float | None = None) -> None:
        """Block until a read in flight finishes (for offline drivers with nothing else to run)."""
        concurrent.futures.wait(
            list(self.loading.values()), timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )

    def touch(self, adapter_ids: Iterable[str]) -> None:
        """Mark host entries as just used, in this order (the last one is evicted last)."""
        for adapter_id in adapter_ids:
            if adapter_id in self.host:
                self.host.move_to_end(adapter_id)

    def _ensure_host(self, adapter_id: str, wait: bool) -> bool:
        """Is `adapter_id` in the host tier, after installing its read (waited for if `wait`)?"""
        if adapter_id in self.host:
            self.stats["host_hits"] += 1
            self.host.move_to_end(adapter_id)
            return True
        future = self.prefetch(adapter_id)
        if not wait and not future.done():
            return False
        if not self._install(adapter_id):  # waits for the read if it is still running
            raise errors.HostCacheFull(
                f"all {self.config.max_cpu_loras} host-cache entries (max_cpu_loras) are taken and "
                f"the adapter manager has not named one to evict for {adapter_id!r}"
            )
        return True

    def _install(self, adapter_id: str) -> bool:
        """Move a finished read into the host tier; a failure is raised and kept in failed_loads.

        The read happens before any eviction, so a rejected adapter evicts nothing. False: the tier
        is full and only the manager chooses victims; the read stays pending (see the docstring).
        """
        future = self.loading[adapter_id]
        try:
            loaded = future.result()
            if self.host_full() and not self._room_for(adapter_id):
                return False
        except Exception as e:
            del self.loading[adapter_id]
            self.failed_loads[adapter_id] = e
            raise
        del self.loading[adapter_id]
        self.room_wanted.discard(adapter_id)
        self.host[adapter_id] = loaded.adapter
        self.last_used[adapter_id] = time.time()
        self.on_change(ResidencyEvent("loaded", adapter_id, None, time.time(), loaded.seconds))
        return True

    def _room_for(self, adapter_id: str) -> bool:
        """Make room in the full host tier by this cache's policy; False: wait for the manager."""
        if self.host_eviction == HOST_LRU:
            self._evict_host_lru()
            return True
        if adapter_id not in self.room_wanted:
            self.room_wanted.add(adapter_id)
            self.on_change(ResidencyEvent("needs_room", adapter_id, None, time.time()))
        return False

    def room_done(self, adapter_id: str, error: Exception | None = None) -> None:
        """The agent's answer to `needs_room`: victims were evicted (the next install tries again
        and asks again if still full), or `error` fails the read and the requests waiting for it."""
        self.room_wanted.discard(adapter_id)
        if error is not None and adapter_id in self.loading:
            del self.loading[adapter_id]
            self.failed_loads[adapter_id] = error

    def host_full(self) -> bool:
        """Does the host tier hold `max_cpu_loras` entries (a new one needs an eviction)?"""
        return len(self.host) >= self.config.max_cpu_loras

    def holds(self, adapter_id: str) -> bool:
        """Is `adapter_id` in the host tier?"""
        return adapter_id in self.host

    def source_path(self, adapter_id: str) -> Path | None:
        """The directory `adapter_id` is registered from (None: not registered)."""
        source = self.sources.get(adapter_id)
        return None if source is None else source[0]

    def _evict_host_lru(self) -> None:
        for candidate in self.host:
            if candidate not in self.pinned and not self.refcount.get(candidate):
                self._drop(candidate)
                return
        raise errors.NoEvictableSlot(
            f"all {self.config.max_cpu_loras} host-cache entries (max_cpu_loras) are pinned or in use"
        )

    # --- slot tier ------------------------------------------------------------------------

    def acquire_slot(self, adapter_id: str, keep: Collection[str] = ()) -> int | None:
        """A slot holding `adapter_id` with one more reference, or None if no slot is free.

        A free slot is an unused one, else the least recently used one whose adapter has no
        running requests, no pin and is not in `keep`. An adapter not yet in the host tier is read
        first and the caller waits for it (offline use: the scheduler only asks for adapters in the
        host tier). Raises AdapterNotFound / InvalidAdapter / NoEvictableSlot from that read.
        """
        slot = self.slot_of.get(adapter_id)
        if slot is None:
            if self._free_slot(keep, dry_run=True) is None:
                return None
            self._ensure_host(adapter_id, wait=True)  # a rejected adapter changes no slot
            slot = self._free_slot(keep)
            self.stats["slot_misses"] += 1
            start = time.perf_counter()
            self.slots.set_slot(slot, self.host[adapter_id])
            seconds = time.perf_counter() - start
            self.slot_of[adapter_id] = slot
            self.activation[adapter_id] = next(self._activations)
            self.on_change(ResidencyEvent("activated", adapter_id, slot, time.time(), seconds))
        else:
            self.stats["slot_hits"] += 1
            self.host.move_to_end(adapter_id)
        self.slot_of.move_to_end(adapter_id)
        self.refcount[adapter_id] = self.refcount.get(adapter_id, 0) + 1
        self.last_used[adapter_id] = time.time()
        return slot

    def release_slot(self, adapter_id: str) -> None:
        """Drop one running request's reference to `adapter_id`'s slot."""
        n = self.refcount.get(adapter_id, 0) - 1
        assert n >= 0, f"slot reference of {adapter_id!r} released twice"
        if n:
            self.refcount[adapter_id] = n
        else:
            self.refcount.pop(adapter_id, None)
        self.last_used[adapter_id] = time.time()

    def check_slot_reachable(self, adapter_id: str) -> None:
        """Raise NoEvictableSlot when pins of other adapters hold every slot: a request for
        `adapter_id` would otherwise wait forever."""
        if adapter_id in self.slot_of:
            return
        pinned = sorted(a for a in self.slot_of if a in self.pinned)
        if len(pinned) >= self.config.max_loras:
            raise errors.NoEvictableSlot(
                f"all {self.config.max_loras} slots (max_loras) are pinned by other adapters: {pinned}"
            )

    def free_slots(self, keep: Collection[str] = ()) -> int:
        """How many adapters could take a slot now (see `acquire_slot` for `keep`)."""
        return (
            self.config.max_loras
            - len(self.slot_of)
            + sum(1 for candidate in self.slot_of if self._evictable_slot(candidate, keep))
        )

    def holders_oldest_first(self) -> list[str]:
        """Adapters in slots, the one that has held its slot longest first."""
        return sorted(self.slot_of, key=self.activation.__getitem__)

    def _evictable_slot(self, adapter_id: str, keep: Collection[str]) -> bool:
        return adapter_id not in self.pinned and not self.refcount.get(adapter_id) and adapter_id not in keep

    def _free_slot(self, keep: Collection[str] = (), dry_run: bool = False) -> int | None:
        used = set(self.slot_of.values())
        for i in range(self.config.max_loras):
            if i not in used:
                return i
        for candidate, slot in self.slot_of.items():  # least recently used first
            if self._evictable_slot(candidate, keep):
                if not dry_run:
                    self._deactivate(candidate)
                return slot
        return None

    def _deactivate(self, adapter_id: str) -> None:
        slot = self.slot_of.pop(adapter_id)
        del self.activation[adapter_id]
        self.slots.reset_slot(slot)
        self.stats["slot_evictions"] += 1  # every way out of a slot, as the evictions metric counts
        self.on_change(ResidencyEvent("deactivated", adapter_id, slot, time.time()))

    # --- commands -------------------------------------------------------------------------

    def load(
        self, adapter_id: str, to_slot: bool = False, pin: bool | None = None, wait: bool = True
    ) -> ResidentAdapter | None:
        """LoadAdapter: bring into the host tier (and a slot if asked); `pin` True pins, False
        unpins, None leaves the pin as it is.

        The files are read on the loader thread; with `wait` the caller blocks until the read is
        done. Without it (how the engine thread is asked) the answer is None while the read runs:
        await `prefetch(adapter_id)`'s future, then ask again. Raises AdapterNotFound, the read's
        InvalidAdapter / AdapterFilesMissing, NoEvictableSlot.
        """
        if not self._ensure_host(adapter_id, wait):
            return None
        if to_slot:
            if self.acquire_slot(adapter_id) is None:
                raise errors.NoEvictableSlot(
                    f"all {self.config.max_loras} slots (max_loras) are pinned or in use"
                )
            self.release_slot(adapter_id)
        if pin:
            self.pinned.add(adapter_id)
        elif pin is not None:
            self.pinned.discard(adapter_id)
        return self.resident(adapter_id)

    def evict(self, adapter_id: str) -> bool:
        """EvictAdapter: drop from both tiers, and discard a read in flight. Idempotent: False if
        it was not resident."""
        self._source(adapter_id)
        self.loading.pop(adapter_id, None)
        self.room_wanted.discard(adapter_id)
        if adapter_id not in self.host:
            return False
        if self.refcount.get(adapter_id):
            raise errors.AdapterInUse(
                f"adapter {adapter_id!r} has {self.refcount[adapter_id]} running requests"
            )
        if adapter_id in self.pinned:
            raise errors.AdapterInUse(f"adapter {adapter_id!r} is pinned; unpin it first")
        self._drop(adapter_id)
        return True

    def pin(self, adapter_id: str) -> None:
        self.load(adapter_id, pin=True)

    def unpin(self, adapter_id: str) -> None:
        self._source(adapter_id)
        self.pinned.discard(adapter_id)

    def purge(self) -> None:
        """Drop every unpinned, idle adapter from both tiers and discard reads in flight (a
        restart's clean slate)."""
        self.loading.clear()
        self.room_wanted.clear()
        for adapter_id in list(self.host):
            if not self.refcount.get(adapter_id):
                self.pinned.discard(adapter_id)
                self._drop(adapter_id)

    def close(self) -> None:
        """Stop the loader thread (reads not started yet are cancelled)."""
        self.loader.close()

    def _drop(self, adapter_id: str) -> None:
        if adapter_id in self.slot_of:
            self._deactivate(adapter_id)
        del self.host[adapter_id]
        self.stats["host_evictions"] += 1  # policy, command or purge: as the evictions metric counts
        self.on_change(ResidencyEvent("evicted", adapter_id, None, time.time()))

    # --- views ----------------------------------------------------------------------------

    def resident(self, adapter_id: str) -> ResidentAdapter:
        adapter = self.host[adapter_id]
        slot = self.slot_of.get(adapter_id)
        return ResidentAdapter(
            adapter_id=adapter_id,
            tier="slot" if slot is not None else "host",
            slot=slot,
            pinned=adapter_id in self.pinned,
            last_used=self.last_used.get(adapter_id, 0.0),
            in_flight=self.refcount.get(adapter_id, 0),
            rank=adapter.rank,
            size_bytes=adapter.manifest.size_bytes,
            sha256=adapter.sha256,
        )

    def list_resident(self) -> list[ResidentAdapter]:
        return [self.resident(a) for a in reversed(self.host)]  # most recently used first

    @property
    def slots_in_use(self) -> int:
        return len(self.slot_of)
