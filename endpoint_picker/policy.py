"""Which replica serves a request for an adapter. Pure functions over one view of the cluster.

Order of preference (GAIE's LoRA-affinity scorer, ModelMesh's copies-by-load):
  1. a replica with the adapter in an accelerator slot ("slot"),
  2. one with it in its host cache or loading it ("host"),
  3. one with a free slot ("free_slot"),
  4. the least loaded ("least_loaded").
Replicas that are down or draining are never chosen; those at `queue_threshold` requests, or with
less than `kv_free_min` of their KV cache free at their last heartbeat (a new request would wait
there for blocks), only when every replica is. Among holders of the adapter the order is a stable hash of (adapter,
replica), not their load, so requests concentrate on one copy while it keeps up: when every holder
has `spread_threshold` requests *for this adapter* in flight and fewer than `max_copies` hold it,
the next request goes to a new replica ("spread"), which loads it; when demand falls, the first
holder takes all requests again and the other copies age out of their caches. Ties break by the
same stable hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

SLOT, HOST, FREE_SLOT, LEAST_LOADED, SPREAD, BASE = (
    "slot",
    "host",
    "free_slot",
    "least_loaded",
    "spread",
    "base",
)
REASONS = (SLOT, HOST, FREE_SLOT, LEAST_LOADED, SPREAD, BASE)


@dataclass(frozen=True)
class ReplicaView:
    """One replica as the picker sees it (Redis state at the last read)."""

    replica_id: str
    address: str  # host:port of its InferenceService, as it advertised
    up: bool
    draining: bool = False
    waiting: int = 0
    running: int = 0
    kv_free: float = 1.0  # fraction of its KV cache blocks free at the last heartbeat
    max_loras: int = 1
    slots: frozenset[str] = frozenset()  # adapters in accelerator slots
    cached: frozenset[str] = frozenset()  # adapters in the host cache or being loaded


@dataclass(frozen=True)
class Thresholds:
    queue_threshold: int
    spread_threshold: int
    max_copies: int
    kv_free_min: float = 0.0


@dataclass(frozen=True)
class Pick:
    replicas: tuple[ReplicaView, ...]  # first choice first, then the others for retries
    reason: str


def busy(replica: ReplicaView, in_flight: Mapping[str, int]) -> int:
    """Requests on a replica: the picker's own count of those in flight, or its last heartbeat's
    queue, whichever is larger (another door, or a direct client, may load it too)."""
    return max(in_flight.get(replica.replica_id, 0), replica.waiting + replica.running)


def rank(adapter_id: str, replica_id: str) -> int:
    """A stable pseudo-random order of the replicas for one adapter (rendezvous hashing)."""
    return int.from_bytes(
        hashlib.blake2b(f"{adapter_id}\x00{replica_id}".encode(), digest_size=8).digest(), "big"
    )


def pick(
    replicas: list[ReplicaView] | tuple[ReplicaView, ...],
    adapter_id: str,
    in_flight: Mapping[str, int],
    limits: Thresholds,
    adapter_in_flight: Mapping[str, int] | None = None,
) -> Pick | None:
    """The replicas to try for a request for `adapter_id` ("" = the base model), best first;
    None when no replica is up. `in_flight`: requests in flight per replica id;
    `adapter_in_flight`: those for `adapter_id` alone, per replica id."""
    live = [r for r in replicas if r.up and not r.draining]
    if not live:
        return None
    under = [
        r for r in live if busy(r, in_flight) < limits.queue_threshold and r.kv_free >= limits.kv_free_min
    ]
    candidates = under or live
    load = {r.replica_id: busy(r, in_flight) for r in candidates}
    order = {r.replica_id: rank(adapter_id, r.replica_id) for r in candidates}
    queued = {r.replica_id: (adapter_in_flight or {}).get(r.replica_id, 0) for r in candidates}

    def tier(r: ReplicaView) -> int:
        if adapter_id and adapter_id in r.slots:
            return 0
        if adapter_id and adapter_id in r.cached:
            return 1
        return 2 if len(r.slots) < r.max_loras else 3

    def key(r: ReplicaView) -> tuple:
        t = tier(r)
        if t <= 1:  # holders: a stable order while they keep up with the adapter's requests
            return (t, queued[r.replica_id] >= limits.spread_threshold, order[r.replica_id])
        return (t, load[r.replica_id], order[r.replica_id])

    ranked = sorted(candidates, key=key)
    rest = [r for r in live if r.replica_id not in load]  # those at queue_threshold or short of KV
    if not adapter_id:
        ranked = sorted(candidates, key=lambda r: (load[r.replica_id], order[r.replica_id]))
        return Pick(tuple(ranked + rest), BASE)
    holders = [r for r in ranked if tier(r) <= 1]
    others = [r for r in ranked if tier(r) > 1]
    all_busy = holders and all(queued[r.replica_id] >= limits.spread_threshold for r in holders)
    if all_busy and others and len(holders) < limits.max_copies:
        return Pick(tuple(others + holders + rest), SPREAD)
    first = ranked[0]
    reason = (SLOT, HOST, FREE_SLOT, LEAST_LOADED)[tier(first)]
    return Pick(tuple(ranked + rest), reason)
