"""Adapter residency on one replica: the host-memory tier and the accelerator slots.

Two LRU tiers with pins (DESIGN.md sections 1 and 4):
  - host cache: up to `max_cpu_loras` loaded adapters (`LoraAdapter`, weights in host memory);
  - slots: up to `max_loras` adapters copied into `LoraSlots`; a slot's adapter is always also in
    the host cache.
An adapter with running requests (refcount > 0) or a pin is never evicted from its tier; when every
candidate is pinned or busy the answer is `NoEvictableSlot` (host) or "not now" (slots: the
scheduler waits). Every residency change is reported to the `on_change` listener.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from inference_svc import errors
from inference_svc.adapters import AdapterFiles, AdapterManifest, LoraAdapter, inspect_adapter, load_adapter
from inference_svc.config import EngineConfig
from inference_svc.lora_slots import LoraSlots
from inference_svc.model_config import ModelConfig


@dataclass(frozen=True)
class ResidencyEvent:
    kind: str  # "loaded" (host) | "activated" (slot) | "deactivated" | "evicted" (host)
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
    ):
        self.model = model
        self.config = config
        self.slots = slots
        self.dtype = dtype
        self.on_change = on_change or (lambda event: None)
        self.sources: dict[str, tuple[Path, AdapterManifest]] = {}
        # Adapters whose files are held in memory until they are on disk at their path.
        self.in_memory: dict[str, AdapterFiles] = {}
        self.host: OrderedDict[str, LoraAdapter] = OrderedDict()  # LRU first
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # adapter -> slot, LRU first
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
        self.evict(adapter_id)
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

    def ensure_host(self, adapter_id: str) -> LoraAdapter:
        """The adapter in host memory, reading it from its source (and evicting LRU) if needed."""
        adapter = self.host.get(adapter_id)
        if adapter is not None:
            self.stats["host_hits"] += 1
            self.host.move_to_end(adapter_id)
            return adapter
        self.stats["host_misses"] += 1
        path, _ = self._source(adapter_id)
        start = time.perf_counter()
        files = self.in_memory.get(adapter_id)
        adapter = load_adapter(adapter_id, path, self.model, self.config, self.dtype, files)  # may reject
        seconds = time.perf_counter() - start
        if len(self.host) >= self.config.max_cpu_loras:
            self._evict_host_lru()
        self.host[adapter_id] = adapter
        self.last_used[adapter_id] = time.time()
        self.on_change(ResidencyEvent("loaded", adapter_id, None, time.time(), seconds))
        return adapter

    def _evict_host_lru(self) -> None:
        for candidate in self.host:
            if candidate not in self.pinned and not self.refcount.get(candidate):
                self._drop(candidate)
                self.stats["host_evictions"] += 1
                return
        raise errors.NoEvictableSlot(
            f"all {self.config.max_cpu_loras} host-cache entries (max_cpu_loras) are pinned or in use"
        )

    # --- slot tier ------------------------------------------------------------------------

    def acquire_slot(self, adapter_id: str) -> int | None:
        """A slot holding `adapter_id` with one more reference, or None if every slot is busy.

        Raises AdapterNotFound / InvalidAdapter / NoEvictableSlot from loading into the host tier.
        """
        slot = self.slot_of.get(adapter_id)
        if slot is None:
            if self._free_slot(dry_run=True) is None:
                return None
            adapter = self.ensure_host(adapter_id)  # a rejected adapter changes no slot
            slot = self._free_slot()
            self.stats["slot_misses"] += 1
            start = time.perf_counter()
            self.slots.set_slot(slot, adapter)
            seconds = time.perf_counter() - start
            self.slot_of[adapter_id] = slot
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

    def _free_slot(self, dry_run: bool = False) -> int | None:
        used = set(self.slot_of.values())
        for i in range(self.config.max_loras):
            if i not in used:
                return i
        for candidate, slot in self.slot_of.items():  # least recently used first
            if candidate not in self.pinned and not self.refcount.get(candidate):
                if not dry_run:
                    self._deactivate(candidate)
                    self.stats["slot_evictions"] += 1
                return slot
        return None

    def _deactivate(self, adapter_id: str) -> None:
        slot = self.slot_of.pop(adapter_id)
        self.slots.reset_slot(slot)
        self.on_change(ResidencyEvent("deactivated", adapter_id, slot, time.time()))

    # --- commands -------------------------------------------------------------------------

    def load(self, adapter_id: str, to_slot: bool = False, pin: bool | None = None) -> ResidentAdapter:
        """LoadAdapter: bring into the host tier (and a slot if asked); `pin` True pins, False
        unpins, None leaves the pin as it is."""
        self.ensure_host(adapter_id)
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
        """EvictAdapter: drop from both tiers. Idempotent: False if it was not resident."""
        self._source(adapter_id)
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
        """Drop every unpinned, idle adapter from both tiers (a restart's clean slate)."""
        for adapter_id in list(self.host):
            if not self.refcount.get(adapter_id):
                self.pinned.discard(adapter_id)
                self._drop(adapter_id)

    def _drop(self, adapter_id: str) -> None:
        if adapter_id in self.slot_of:
            self._deactivate(adapter_id)
        del self.host[adapter_id]
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
