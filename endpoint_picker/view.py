"""The cluster as the picker sees it: replicas, their residency and load, and the routing table,
read from the manager's Redis keys (`loraserve.cluster_keys`). The picker's server refreshes it in
the background every `cache_ttl_s`, so a pick never waits for Redis; without the background task
(`refresh_forever`) a pick past `cache_ttl_s` reads it first.

A read costs O(replicas that changed), not O(replicas): the manager marks a replica in
`<G>replicas:changed` (replica id -> Redis time in ms, raised by every mark) after each change to
what the picker reads of it (membership, load, host cache, slots, loads in progress). A read asks
for the marks from `MARK_OVERLAP_MS` below the highest it has seen, with the routing version (one
round trip), then reads the hash, slots, host cache and loads of only the replicas whose mark
differs from the one it last read (a second round trip, none when nothing changed), plus the
routing table when its version moved. Every `full_refresh_s` it reads every replica of the
membership index instead, which repairs what a lost mark hid (a manager that died between a
replica's script and its mark) and drops replicas no longer listed. Every pick in between uses the
cached view, so a request costs O(1) Redis work however many arrive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import redis.asyncio as redis

from endpoint_picker.policy import ReplicaView
from loraserve.cluster_keys import Keys
from loraserve.routing import RoutingTable

log = logging.getLogger(__name__)

# How far below the highest mark already seen a read asks again. Marks are stamped by a script on
# the global tag with that server's clock when they land, so later marks score no lower, except
# when the clock steps back (NTP) or a failover promotes a server whose clock is behind; this
# tolerates such steps up to 1 s. It costs only reply size: a replica whose mark is unchanged since
# it was read is not read again. Larger steps are repaired by the next full read.
MARK_OVERLAP_MS = 1000


# What a pick needs of each replica's hash (its load comes with its heartbeats).
REPLICA_FIELDS = ("address", "status", "engine", "waiting", "running", "draining", "kv_free")


@dataclass(frozen=True)
class ClusterView:
    replicas: tuple[ReplicaView, ...]
    routing: RoutingTable
    read_at: float  # time.monotonic() of the read


class ClusterState:
    """Cached reads of one cluster's state. `view()` never raises: a failed read keeps the last
    view (and counts the failure), since routing on slightly old state beats not routing.

    `full_refresh_s`: how often a read covers every replica instead of the marked ones; `clock`
    times it (a simulation passes its own). `full_reads` counts the full reads so far.
    """

    def __init__(
        self,
        client: redis.Redis,
        cluster: str,
        ttl_s: float,
        on_failure=lambda: None,
        full_refresh_s: float = 5.0,
        clock=time.monotonic,
    ):
        self.client = client
        self.keys = Keys(cluster)
        self.ttl_s = ttl_s
        self.on_failure = on_failure
        self.full_refresh_s = full_refresh_s
        self.clock = clock
        self.full_reads = 0
        self._view = ClusterView((), RoutingTable(), 0.0)
        self._lock = asyncio.Lock()
        self._refreshing = False  # refresh_forever runs: picks never wait for a read
        self._replicas: dict[str, ReplicaView] = {}
        self._marks: dict[str, float] = {}  # replica id -> its mark when its keys were last read
        self._highest = 0.0  # the highest mark seen
        self._full_at: float | None = None  # clock() of the last full read

    async def view(self) -> ClusterView:
        """The cached view; read first if it is older than `ttl_s` and nothing refreshes it in the
        background (and before the first read)."""
        fresh = time.monotonic() - self._view.read_at < self.ttl_s
        if fresh or (self._refreshing and self._view.read_at):
            return self._view
        return await self.refresh(only_if_stale=True)

    async def refresh(self, only_if_stale: bool = False) -> ClusterView:
        """Read the cluster state now (one read at a time; concurrent callers wait for it)."""
        async with self._lock:
            if only_if_stale and time.monotonic() - self._view.read_at < self.ttl_s:
                return self._view  # another caller read it while this one waited
            try:
                self._view = await self._read()
            except (redis.RedisError, OSError, ValueError) as e:
                self.on_failure()
                log.warning("cluster state read failed (%s); picking from the last view", e)
                self._view = ClusterView(self._view.replicas, self._view.routing, time.monotonic())
            return self._view

    async def refresh_forever(self) -> None:
        """Refresh every `ttl_s` until cancelled; picks meanwhile take the cached view at once."""
        self._refreshing = True
        try:
            while True:
                try:
                    await self.refresh()
                except Exception:  # a bug in a read must not stop every later refresh
                    self.on_failure()
                    log.exception("cluster state read failed; picking from the last view")
                await asyncio.sleep(self.ttl_s)
        finally:
            self._refreshing = False

    async def _read(self) -> ClusterView:
        k = self.keys
        full = self._full_at is None or self.clock() - self._full_at >= self.full_refresh_s
        started = self.clock()
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.get(k.routing_version)
            if full:
                pipe.zrange(k.replicas, 0, -1)
                pipe.zrange(k.replicas_changed, 0, -1, withscores=True)
            else:
                pipe.zrangebyscore(
                    k.replicas_changed, self._highest - MARK_OVERLAP_MS, "+inf", withscores=True
                )
            version, *found = await pipe.execute()
        marks = dict(found[-1])
        to_read = found[0] if full else [r for r, mark in marks.items() if self._marks.get(r) != mark]
        read = await self._read_replicas(to_read)
        replicas = {} if full else dict(self._replicas)
        for r in to_read:
            replicas.pop(r, None)
            self._marks.pop(r, None)
            if r in read:
                replicas[r] = read[r]
            if r in marks:
                self._marks[r] = marks[r]
        if full:
            self._marks = {r: m for r, m in self._marks.items() if r in replicas}
            self._full_at = started
            self.full_reads += 1
        self._replicas = replicas
        self._highest = max([self._highest, *marks.values()])
        routing = self._view.routing
        if int(version or 0) != routing.version or routing.version == 0:
            routing = await self._read_routing()
        ordered = tuple(replicas[r] for r in sorted(replicas))
        return ClusterView(ordered, routing, time.monotonic())

    async def _read_replicas(self, replica_ids: list[str]) -> dict[str, ReplicaView]:
        """Each replica's hash, slots, host cache and loads, one pipeline -> the replicas found."""
        if not replica_ids:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for r in replica_ids:
                pipe.hmget(self.keys.replica(r), *REPLICA_FIELDS)
                pipe.hkeys(self.keys.replica_slots(r))
                pipe.zrange(self.keys.replica_host(r), 0, -1)
                pipe.hkeys(self.keys.replica_loading(r))
            found = await pipe.execute()
        out = {}
        for n, r in enumerate(replica_ids):
            (address, status, engine, waiting, running, draining, kv_free), slots, host, loading = found[
                4 * n : 4 * n + 4
            ]
            if not address:
                continue
            out[r] = ReplicaView(
                replica_id=r,
                address=address,
                up=status == "UP",
                draining=draining == "1",
                waiting=int(waiting or 0),
                running=int(running or 0),
                kv_free=float(kv_free or 1.0),
                max_loras=int(json.loads(engine or "{}").get("max_loras", 1)),
                slots=frozenset(slots),
                cached=frozenset(host) | frozenset(loading),
            )
        return out

    async def _read_routing(self) -> RoutingTable:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.get(self.keys.routing_version)
            pipe.hgetall(self.keys.aliases)
            pipe.get(self.keys.rules)
            version, aliases, rules = await pipe.execute()
        return RoutingTable.from_stored(
            int(version or 0), {name: json.loads(v) for name, v in aliases.items()}, json.loads(rules or "[]")
        )
