"""Moving a Redis from an older key layout to the current one (`loraserve.cluster_keys`), once.

A manager calls `migrate` before it serves. Layout `v1` kept every key of a cluster under one
hash tag (`loraserve:v1:{<cluster>}:...`, the names below); `v2` gives each adapter, replica and
stored copy a tag of its own. The global `layout` key says which layout a Redis holds: absent with
v1 keys present, the first manager to take the `layout:lock` (SET NX PX) copies, then sets
`layout` to `v2`, then deletes the v1 keys; the others wait for the marker. Copying is idempotent,
so a manager that dies mid-way leaves a lock that lapses and a copy the next one redoes.

What is copied: every registry record (its state reset to REGISTERED, or FAILED after a failed
load), the indexes (rebuilt from the records), cluster pins, aliases, rules and the routing
version, blob references (rebuilt from the records), live blob leases, the orphaned-blob set, and
the last `EVENTS_COPIED` events (same ids). What is not: replica membership and residency, and
placement claims. A replica's next heartbeat finds no membership and is told to rejoin; its join
sends a full snapshot, which rebuilds its mirror and every adapter's `on` hash. Stop managers of
the old version first: one still writing v1 keys after the migration writes where no one reads.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from adapter_svc.blobs import blob_name
from adapter_svc.records import STATES
from adapter_svc.registry import Registry

log = logging.getLogger(__name__)

VERSION = "v2"
LOCK_MS = 120_000  # a migration longer than this can be redone by another manager (idempotent)
BATCH = 500
EVENTS_COPIED = 1000


class V1Keys:
    """The keys of layout v1 (every one under the tag `{<cluster>}`), as far as migration needs them."""

    def __init__(self, cluster: str):
        self.prefix = p = f"loraserve:v1:{{{cluster}}}:"
        self.adapters = p + "adapters"
        self.pinned = p + "pinned"
        self.replicas = p + "replicas"
        self.aliases = p + "aliases"
        self.rules = p + "rules"
        self.routing_version = p + "routing:version"
        self.events = p + "events"
        self.orphaned_blobs = p + "blobs:orphaned"
        self.blob_refs_version = p + "blobs:refs-version"

    def adapter(self, adapter_id: str) -> str:
        return self.prefix + "adapter:" + adapter_id

    def adapter_keys(self, adapter_id: str) -> list[str]:
        return [
            self.adapter(adapter_id),
            self.adapter(adapter_id) + ":on",
            self.prefix + "placement:" + adapter_id,
        ]

    def by_tenant(self, tenant: str) -> str:
        return self.prefix + "adapters:tenant:" + tenant

    def by_state(self, state: str) -> str:
        return self.prefix + "adapters:state:" + state

    def replica_keys(self, replica_id: str) -> list[str]:
        r = self.prefix + "replica:" + replica_id
        return [r] + [r + s for s in (":alive", ":host", ":slots", ":pins", ":loading")]

    def blob_keys(self, blob: str) -> list[str]:
        return [self.prefix + "blob:" + blob + s for s in (":refs", ":leases", ":deleting")]

    def blob_leases(self, blob: str) -> str:
        return self.prefix + "blob:" + blob + ":leases"


async def migrate(registry: Registry, wait_s: float = LOCK_MS / 1000) -> bool:
    """Bring this Redis to the current layout; -> True if this call migrated it."""
    client, keys = registry.client, registry.keys
    if await client.get(keys.layout) == VERSION:
        return False
    old = V1Keys(keys.cluster)
    if not await client.exists(old.adapters, old.replicas, old.aliases, old.rules, old.routing_version):
        await client.set(keys.layout, VERSION, nx=True)  # a new (or empty) Redis
        return False
    token = uuid.uuid4().hex
    deadline = asyncio.get_running_loop().time() + wait_s
    while not await client.set(keys.layout_lock, token, nx=True, px=LOCK_MS):
        if await client.get(keys.layout) == VERSION:
            return False
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError("another manager has been migrating the Redis layout for too long")
        await asyncio.sleep(0.2)
    try:
        if await client.get(keys.layout) == VERSION:  # done while we waited for the lock
            return False
        adapters = await _copy(registry, old)
        await client.set(keys.layout, VERSION)
        await _delete_v1(registry, old, adapters)
        log.warning("migrated the Redis key layout v1 -> %s (%d adapters)", VERSION, len(adapters))
        return True
    finally:
        if await client.get(keys.layout_lock) == token:
            await client.delete(keys.layout_lock)


async def _copy(registry: Registry, old: V1Keys) -> list[str]:
    client, keys = registry.client, registry.keys
    adapters, cursor = [], "-"
    pinned = set(await client.smembers(old.pinned))
    while ids := await client.zrangebylex(old.adapters, cursor, "+", start=0, num=BATCH):
        async with client.pipeline(transaction=False) as pipe:
            for adapter_id in ids:
                pipe.hgetall(old.adapter(adapter_id))
            records = await pipe.execute()
        async with client.pipeline(transaction=False) as pipe:
            for adapter_id, fields in zip(ids, records):
                if not fields:
                    continue
                fields.update(
                    state="FAILED" if fields.get("failed") == "1" else "REGISTERED",
                    state_seq="0",
                    pinned="1" if fields.get("pinned") == "1" or adapter_id in pinned else "0",
                )
                pipe.delete(keys.adapter(adapter_id))
                pipe.hset(keys.adapter(adapter_id), mapping=fields)
            await pipe.execute()
        adapters += [a for a, f in zip(ids, records) if f]
        await registry.repair_adapters(ids)  # indexes and blob references, from the records
        cursor = "(" + ids[-1]
    async with client.pipeline(transaction=True) as pipe:
        pipe.execute_command("HGETALL", old.aliases)
        pipe.execute_command("GET", old.rules)
        pipe.execute_command("GET", old.routing_version)
        aliases, rules, version = await pipe.execute()
    orphaned = await client.zrange(old.orphaned_blobs, 0, -1, withscores=True)
    events = await client.xrevrange(old.events, count=EVENTS_COPIED)
    async with client.pipeline(transaction=True) as pipe:
        pipe.delete(keys.aliases, keys.rules, keys.routing_version)
        if aliases:
            pipe.hset(keys.aliases, mapping=_mapping(aliases))
        if rules is not None:
            pipe.set(keys.rules, rules)
        if version is not None:
            pipe.set(keys.routing_version, version)
        for blob, score in orphaned:
            pipe.zadd(keys.orphaned_blobs, {blob: float(score)})
            pipe.zadd(keys.blobs, {blob: 0})
        pipe.set(keys.blob_refs_version, "1")
        if not await client.exists(keys.events):
            for event_id, fields in reversed(events):
                pipe.xadd(keys.events, _mapping(fields), id=event_id)
        await pipe.execute()
    await _copy_leases(registry, old, adapters)
    return adapters


async def _blobs(registry: Registry, old: V1Keys, adapters: list[str]) -> set[str]:
    """Every stored copy a v1 key may name: those of the records and the orphaned ones."""
    client = registry.client
    async with client.pipeline(transaction=False) as pipe:
        for adapter_id in adapters:
            pipe.hmget(registry.keys.adapter(adapter_id), "sha256", "config_sha256")
        digests = await pipe.execute()
    return {blob_name(*d) for d in digests if d[0]} | set(await client.zrange(old.orphaned_blobs, 0, -1))


async def _copy_leases(registry: Registry, old: V1Keys, adapters: list[str]) -> None:
    client, keys = registry.client, registry.keys
    blobs = sorted(await _blobs(registry, old, adapters))
    async with client.pipeline(transaction=False) as pipe:
        for blob in blobs:
            pipe.zrange(old.blob_leases(blob), 0, -1, withscores=True)
            pipe.pttl(old.blob_leases(blob))
        found = await pipe.execute()
    async with client.pipeline(transaction=False) as pipe:
        for blob, leases, ttl in zip(blobs, found[0::2], found[1::2]):
            if leases:
                pipe.zadd(keys.blob_leases(blob), dict(leases))
                if ttl and ttl > 0:
                    pipe.pexpire(keys.blob_leases(blob), ttl)
                pipe.zadd(keys.blobs, {blob: 0})
        await pipe.execute()


async def _delete_v1(registry: Registry, old: V1Keys, adapters: list[str]) -> None:
    client = registry.client
    tenants = set()
    replicas = await client.zrange(old.replicas, 0, -1)
    blobs = await _blobs(registry, old, adapters)
    async with client.pipeline(transaction=False) as pipe:
        for adapter_id in adapters:
            pipe.hget(registry.keys.adapter(adapter_id), "tenant")
        tenants = {t for t in await pipe.execute() if t}
    doomed = [old.adapters, old.pinned, old.replicas, old.aliases, old.rules, old.routing_version]
    doomed += [old.events, old.orphaned_blobs, old.blob_refs_version]
    doomed += [old.by_state(s) for s in STATES] + [old.by_tenant(t) for t in tenants]
    for adapter_id in adapters:
        doomed += old.adapter_keys(adapter_id)
    for replica_id in replicas:
        doomed += old.replica_keys(replica_id)
    for blob in blobs:
        doomed += old.blob_keys(blob)
    for n in range(0, len(doomed), BATCH):  # one slot (the v1 tag): plain multi-key DELs
        await client.delete(*doomed[n : n + BATCH])


def _mapping(reply) -> dict:
    """A flat [k, v, k, v ...] reply (or a dict) as a dict."""
    return reply if isinstance(reply, dict) else dict(zip(reply[0::2], reply[1::2]))
