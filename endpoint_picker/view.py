"""The cluster as the picker sees it: replicas, their residency and load, and the routing table,
read from the manager's Redis keys (`loraserve.cluster_keys`) at most once per `cache_ttl_s`.

One read is two pipelined round trips (replica ids, then every replica's hash, slots, host cache
and loads) plus a third when the routing table's version changed; every pick in between uses the
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


@dataclass(frozen=True)
class ClusterView:
    replicas: tuple[ReplicaView, ...]
    routing: RoutingTable
    read_at: float  # time.monotonic() of the read


class ClusterState:
    """Cached reads of one cluster's state. `view()` never raises: a failed read keeps the last
    view (and counts the failure), since routing on slightly old state beats not routing."""

    def __init__(self, client: redis.Redis, cluster: str, ttl_s: float, on_failure=lambda: None):
        self.client = client
        self.keys = Keys(cluster)
        self.ttl_s = ttl_s
        self.on_failure = on_failure
        self._view = ClusterView((), RoutingTable(), 0.0)
        self._lock = asyncio.Lock()

    async def view(self) -> ClusterView:
        if time.monotonic() - self._view.read_at < self.ttl_s:
            return self._view
        async with self._lock:  # one read at a time; the others wait for it
            if time.monotonic() - self._view.read_at < self.ttl_s:
                return self._view
            try:
                self._view = await self._read()
            except (redis.RedisError, OSError, ValueError) as e:
                self.on_failure()
                log.warning("cluster state read failed (%s); picking from the last view", e)
                self._view = ClusterView(self._view.replicas, self._view.routing, time.monotonic())
            return self._view

    async def _read(self) -> ClusterView:
        k = self.keys
        replica_ids = await self.client.zrange(k.replicas, 0, -1)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.get(k.routing_version)
            for r in replica_ids:
                pipe.hmget(k.replica(r), "address", "status", "engine", "waiting", "running", "draining")
                pipe.hkeys(k.replica_slots(r))
                pipe.zrange(k.replica_host(r), 0, -1)
                pipe.hkeys(k.replica_loading(r))
            version, *found = await pipe.execute()
        replicas = []
        for n, r in enumerate(replica_ids):
            (address, status, engine, waiting, running, draining), slots, host, loading = found[
                4 * n : 4 * n + 4
            ]
            if not address:
                continue
            replicas.append(
                ReplicaView(
                    replica_id=r,
                    address=address,
                    up=status == "UP",
                    draining=draining == "1",
                    waiting=int(waiting or 0),
                    running=int(running or 0),
                    max_loras=int(json.loads(engine or "{}").get("max_loras", 1)),
                    slots=frozenset(slots),
                    cached=frozenset(host) | frozenset(loading),
                )
            )
        routing = self._view.routing
        if int(version or 0) != routing.version or routing.version == 0:
            routing = await self._read_routing()
        return ClusterView(tuple(replicas), routing, time.monotonic())

    async def _read_routing(self) -> RoutingTable:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.get(self.keys.routing_version)
            pipe.hgetall(self.keys.aliases)
            pipe.get(self.keys.rules)
            version, aliases, rules = await pipe.execute()
        return RoutingTable.from_stored(
            int(version or 0), {name: json.loads(v) for name, v in aliases.items()}, json.loads(rules or "[]")
        )
