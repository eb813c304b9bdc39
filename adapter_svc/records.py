"""The control plane's typed values: registry records, replica mirrors, replicas' requests, and
every script's answer.

`registry.Registry` decodes what Redis returns into these, so no caller indexes a raw reply.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

from adapter_svc import errors

STATES = ("REGISTERED", "LOADING", "CACHED", "ACTIVE", "FAILED")
HOLDING_STATES = ("LOADING", "CACHED", "ACTIVE")


@dataclass(frozen=True)
class AdapterRecord:
    """One registry entry, with its per-replica states."""

    adapter_id: str
    source: str
    sha256: str
    config_sha256: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    size_bytes: int
    tenant: str
    metadata: dict
    state: str
    reason: str
    pinned: bool
    deleting: bool
    created_at_ms: int
    updated_at_ms: int
    placements: dict = field(default_factory=dict)  # replica id -> LOADING | CACHED | ACTIVE

    @classmethod
    def from_fields(cls, f: dict, placements: dict | None = None) -> AdapterRecord:
        return cls(
            adapter_id=f["adapter_id"],
            source=f["source"],
            sha256=f["sha256"],
            config_sha256=f["config_sha256"],
            rank=int(f["rank"]),
            lora_alpha=float(f["lora_alpha"]),
            use_rslora=f["use_rslora"] == "1",
            target_modules=tuple(m for m in f["target_modules"].split(",") if m),
            size_bytes=int(f["size_bytes"]),
            tenant=f.get("tenant", ""),
            metadata=json.loads(f.get("metadata") or "{}"),
            state=f["state"],
            reason=f.get("reason", ""),
            pinned=f.get("pinned") == "1",
            deleting=f.get("deleting") == "1",
            created_at_ms=int(float(f["created_at"])),
            updated_at_ms=int(float(f["updated_at"])),
            placements=dict(placements or {}),
        )


def record_fields(
    adapter_id: str,
    source: str,
    sha256: str,
    config_sha256: str,
    rank: int,
    lora_alpha: float,
    use_rslora: bool,
    target_modules: tuple[str, ...],
    size_bytes: int,
    tenant: str,
    metadata: dict,
) -> dict[str, str]:
    """The string fields REGISTER stores for a new adapter."""
    return {
        "adapter_id": adapter_id,
        "source": source,
        "sha256": sha256,
        "config_sha256": config_sha256,
        "rank": str(rank),
        "lora_alpha": repr(float(lora_alpha)),
        "use_rslora": "1" if use_rslora else "0",
        "target_modules": ",".join(target_modules),
        "size_bytes": str(size_bytes),
        "tenant": tenant,
        "metadata": json.dumps(metadata, sort_keys=True),
        "pinned": "0",
    }


@dataclass(frozen=True)
class Resident:
    """One adapter in a replica's snapshot or mirror."""

    adapter_id: str
    slot: int  # -1 = host cache only
    pinned: bool
    last_used_ms: int
    sha256: str = ""

    def as_lua(self) -> list:
        return [self.adapter_id, self.slot, int(self.pinned), int(self.last_used_ms), self.sha256]


@dataclass(frozen=True)
class ReplicaRecord:
    """A replica's membership and its mirrored residency."""

    replica_id: str
    address: str
    status: str  # UP | DOWN
    epoch: int
    joined_at_ms: int
    last_heartbeat_ms: int
    engine: dict
    model_json: str
    down_reason: str
    residents: tuple[Resident, ...]  # most recently used first
    loading: tuple[str, ...]
    # What the manager presents to this replica (issued at its latest join); never shown.
    credential: str = field(default="", repr=False)

    @property
    def up(self) -> bool:
        return self.status == "UP"

    def holds(self, adapter_id: str) -> Resident | None:
        return next((r for r in self.residents if r.adapter_id == adapter_id), None)


@dataclass(frozen=True)
class JoinRequest:
    """A replica's JOIN: who and where it is, what it serves, and what it holds."""

    replica_id: str
    address: str  # host:port of its InferenceService
    engine: dict  # its EngineConfig fields
    model_json: str  # its model's config
    snapshot: list[Resident]
    snapshot_seq: int  # the residency sequence number the snapshot is at
    # What the manager will present to it (its choice, new each join); never shown.
    credential: str = field(default="", repr=False)


@dataclass(frozen=True)
class AcquireRequest:
    """A replica's ACQUIRE: room in its host cache for `adapter_id`, given what the cache holds."""

    replica_id: str
    epoch: int
    adapter_id: str
    usage: list[Resident]  # its host cache, with last-use times


@dataclass(frozen=True)
class Change:
    """One residency change a replica reports."""

    seq: int
    kind: str  # loaded | activated | deactivated | evicted | load_failed
    adapter_id: str
    slot: int  # -1 when not about a slot
    at_ms: int
    reason: str = ""

    def as_lua(self) -> list:
        return [self.seq, self.kind, self.adapter_id, self.slot, int(self.at_ms), self.reason]


@dataclass(frozen=True)
class Event:
    """One entry of the event stream, named as the AdapterEvent message's fields."""

    id: str  # stream id, usable as `after_id` to resume
    type: str
    adapter_id: str
    replica_id: str
    detail: str
    at_ms: int


# --- script answers -------------------------------------------------------------------------------


class Registered(enum.Enum):
    """REGISTER's answer."""

    OK = "ok"
    SAME = "same"  # identical content already registered under that id: a no-op
    EXISTS = "exists"  # the id is taken by other content
    TENANT = "tenant"  # the same content is registered under that id for another tenant
    ALIAS = "alias"  # the id is an alias name


class Forgot(enum.Enum):
    """FORGET's answer, for one replica."""

    FORGOTTEN = "forgotten"  # it was down long enough: its keys are deleted now
    ABSENT = "absent"  # it had no record (forgotten before: only its index entry may be left)
    KEPT = "kept"  # up, or not down long enough


@dataclass(frozen=True)
class ForgetPass:
    """One bounded pass of forgetting down replicas."""

    forgotten: tuple[str, ...]  # the replicas whose record it deleted
    more: bool  # it examined as many as it was allowed and removed some: more may be waiting


class Refusal(enum.Enum):
    """Why a script declined a change."""

    NOT_FOUND = "not_found"  # no such adapter (or alias)
    DELETING = "deleting"  # the adapter is being unregistered
    PINNED = "pinned"
    ACTIVE = "active"  # in a slot on the replicas named
    REFERENCED = "referenced"  # routed to by the aliases / rules named
    HELD = "held"  # loaded again on the replicas named while it was being unregistered
    STALE = "rejoin"  # the replica's epoch is not current (or it is down): it must join again
    CONFLICT = "conflict"  # an alias name that is a registered adapter
    UNKNOWN = "unknown"  # an alias variant or rule target that is not registered (named)


@dataclass(frozen=True)
class Refused:
    """A script's refusal: why, and what it names (replicas, references or a target)."""

    reason: Refusal
    names: tuple[str, ...] = ()

    def error(self, adapter_id: str) -> errors.ManagerError:
        """The typed error of a refusal about adapter `adapter_id`."""
        listed = ", ".join(self.names)
        if self.reason == Refusal.NOT_FOUND:
            return errors.AdapterNotFound(adapter_id)
        if self.reason == Refusal.DELETING:
            return errors.FailedPrecondition(f"adapter {adapter_id!r} is being unregistered")
        if self.reason == Refusal.PINNED:
            return errors.AdapterPinned(f"adapter {adapter_id!r} is pinned; unpin it or use --force")
        if self.reason == Refusal.ACTIVE:
            return errors.AdapterInUse(
                f"adapter {adapter_id!r} is in a slot on {listed}; evict it or use --force"
            )
        if self.reason == Refusal.REFERENCED:
            return errors.AdapterInUse(
                f"adapter {adapter_id!r} is routed to by {listed}; change them or use --force"
            )
        raise AssertionError(f"no adapter error for refusal {self}")


@dataclass(frozen=True)
class Reservation:
    """ACQUIRE granted: room reserved in a replica's host cache (or the adapter is already there)."""

    sha256: str
    size_bytes: int
    pin: bool  # pinned cluster-wide
    resident: bool  # already in the replica's host cache: nothing reserved, nothing to evict
    evict: tuple[str, ...] = ()  # victims, least recently used first


@dataclass(frozen=True)
class Exhausted:
    """ACQUIRE found no room: every host-cache entry is pinned or still loading."""

    held: int  # entries held or loading
    pinned: int  # of which pinned

    @property
    def transient(self) -> bool:
        """Some entries are only loading: they become evictable when their loads land."""
        return self.pinned < self.held


@dataclass(frozen=True)
class JoinAnswer:
    """JOIN's answer."""

    epoch: int
    routing_version: int
    drop: tuple[str, ...]  # snapshot entries the registry does not know with those bytes


@dataclass(frozen=True)
class Load:
    """A replica's load as its heartbeat reports it (stored for the front door's picker)."""

    waiting: int = 0
    running: int = 0
    kv_free: float = 1.0  # free fraction of the KV cache
    draining: bool = False

    def as_args(self) -> list:
        return [self.waiting, self.running, f"{self.kv_free:.4f}", "1" if self.draining else "0"]


Load.IDLE = Load()  # what a heartbeat without a load reports


@dataclass(frozen=True)
class HeartbeatAnswer:
    """HEARTBEAT's answer; `rejoin` alone when the replica must join again."""

    rejoin: bool
    routing_version: int = 0
    unpin: tuple[str, ...] = ()  # pinned there, not cluster-wide
    pin: tuple[str, ...] = ()  # pinned cluster-wide, not there
    drop: tuple[str, ...] = ()  # held, unknown to the registry with those bytes


@dataclass(frozen=True)
class ClusterCounts:
    """Registry and membership sizes, for the manager's gauges."""

    adapters: int
    by_state: dict[str, int]  # every name of STATES
    pinned: int
    replicas_up: int
    replicas_down: int
