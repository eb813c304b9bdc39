"""The control plane's state in Redis: the registry, replica membership and mirrors, routing, events.

The only module that talks to Redis. Every method is one or two round trips: a Lua script from `scripts.py` for each change (atomic,
multi-key), a MULTI/EXEC pipeline for each consistent multi-key read. The client retries commands
with exponential backoff while the connection is lost; after the last retry the error propagates
and the RPC answers UNAVAILABLE (see `errors.STATUS_BY_FAMILY`). Every reply is decoded here into
the typed values of `records.py`; callers never see a raw list.
"""

from __future__ import annotations

import json

import redis.asyncio as redis

from adapter_svc import errors
from adapter_svc.blobs import blob_name
from adapter_svc.config import ManagerConfig
from adapter_svc.records import (
    STATES,
    AdapterRecord,
    Change,
    ClusterCounts,
    Event,
    Exhausted,
    HeartbeatAnswer,
    JoinAnswer,
    Load,
    Refusal,
    Refused,
    Registered,
    ReplicaRecord,
    Reservation,
    Resident,
)
from adapter_svc.scripts import Scripts
from loraserve import redis_connect
from loraserve.cluster_keys import Keys

# Index entries one ListAdapters call examines at most (filters may skip many of them).
LIST_SCAN_BUDGET = 5000
# Longest an XREAD waits for new events before the watcher loops (stays under socket_timeout).
EVENTS_BLOCK_MS = 1000


def connect(config: ManagerConfig, max_connections: int | None = None) -> redis.Redis:
    """A client of `config.redis_url` (one server, Sentinel or Cluster: `loraserve.redis_connect`)
    that retries through connection loss and failovers with jittered exponential backoff, with a
    pool of at most `max_connections` (default `config.redis_max_connections`)."""
    return redis_connect.connect(
        config.redis_url,
        retries=config.redis_retries,
        backoff_base_s=config.redis_backoff_base_s,
        backoff_cap_s=config.redis_backoff_cap_s,
        max_connections=max_connections or config.redis_max_connections,
    )


class Registry:
    """Typed access to one cluster's keys.

    Consistent multi-key reads are MULTI/EXEC pipelines of plain `execute_command`s: redis-py's
    Redis Cluster transactions pass the key list to reply parsers that do not take it, so its
    typed helpers (hgetall, smembers, zrange ...) fail there.

    `watch_client` serves the event stream's blocking reads (WatchEvents) from a pool of its own,
    so that watchers, however many, never take the connections every other call needs; None =
    `client`.
    """

    def __init__(
        self,
        client: redis.Redis,
        cluster: str,
        events_maxlen: int,
        watch_client: redis.Redis | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ):
        self.client = client
        self.watch_client = watch_client or client
        self.keys = Keys(cluster)
        self.scripts = Scripts(client)
        self._common = [self.keys.prefix, events_maxlen]
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms

    async def _durable(self, script, *args):
        """A registry write acknowledged by `wait_replicas` Redis replicas (WAIT, on the script's
        own connection) before it counts as done; Unavailable when fewer acknowledge in time (the
        write may then be lost in a failover: the caller retries, and every write here is
        idempotent or refused the second time)."""
        if not self.wait_replicas:
            return await self._call(script, *args)
        async with self.client.pipeline(transaction=False) as pipe:
            await script(keys=[self.keys.events], args=[*self._common, *args], client=pipe)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            out, acknowledged = await pipe.execute()
        if acknowledged < self.wait_replicas:
            raise errors.Unavailable(
                f"Redis applied the change but only {acknowledged} of {self.wait_replicas} replicas "
                f"acknowledged it within {self.wait_timeout_ms} ms (redis_wait_replicas); retry"
            )
        return out

    async def _call(self, script, *args, routing_key: str | None = None):
        return await script(keys=[routing_key or self.keys.events], args=[*self._common, *args])

    async def now_ms(self) -> int:
        seconds, micros = await self.client.time()
        return seconds * 1000 + micros // 1000

    async def ping(self) -> bool:
        return await self.client.ping()

    # --- registry -----------------------------------------------------------------------------

    async def register(self, adapter_id: str, fields: dict[str, str]) -> tuple[Registered, str]:
        """(REGISTER's answer, the registered tenant when it is TENANT, else "")."""
        status, *owner = await self._durable(self.scripts.register, adapter_id, json.dumps(fields))
        return Registered(status), owner[0] if owner else ""

    async def get(self, adapter_id: str) -> AdapterRecord | None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.execute_command("HGETALL", self.keys.adapter(adapter_id))
            pipe.execute_command("HGETALL", self.keys.adapter_on(adapter_id))
            fields, on = map(_hash, await pipe.execute())
        return AdapterRecord.from_fields(fields, on) if fields else None

    async def require(self, adapter_id: str, live: bool = False) -> AdapterRecord:
        """The adapter's record. Raises AdapterNotFound; with `live`, FailedPrecondition while it is
        being unregistered."""
        record = await self.get(adapter_id)
        if record is None:
            raise errors.AdapterNotFound(adapter_id)
        if live and record.deleting:
            raise errors.FailedPrecondition(f"adapter {adapter_id!r} is being unregistered")
        return record

    async def list_page(
        self, cursor: str, page_size: int, tenant: str, state: str
    ) -> tuple[list[AdapterRecord], str]:
        """One page in id order after `cursor`, and the next cursor ('' when done)."""
        index = self.keys.adapters
        if tenant:
            index = self.keys.by_tenant(tenant)
        elif state:
            index = self.keys.by_state(state)
        out = await self._call(
            self.scripts.list_page, cursor, page_size, LIST_SCAN_BUDGET, tenant, state, routing_key=index
        )
        records = [AdapterRecord.from_fields(dict(zip(f[::2], f[1::2]))) for f in out[1:]]
        return records, out[0]

    async def held_by(self, replica_id: str) -> list[str]:
        """Ids a replica holds or is loading, per the mirror, sorted."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.execute_command("ZRANGE", self.keys.replica_host(replica_id), 0, -1)
            pipe.execute_command("HKEYS", self.keys.replica_loading(replica_id))
            host, loading = await pipe.execute()
        return sorted(set(host) | set(loading))

    async def get_many(self, adapter_ids: list[str]) -> list[AdapterRecord]:
        async with self.client.pipeline(transaction=True) as pipe:
            for adapter_id in adapter_ids:
                pipe.execute_command("HGETALL", self.keys.adapter(adapter_id))
            found = await pipe.execute()
        return [AdapterRecord.from_fields(_hash(f)) for f in found if f]

    async def unregister_begin(self, adapter_id: str, force: bool) -> tuple[str, ...] | Refused:
        """Mark the adapter `deleting` (no new loads); -> the replicas that hold it, or the refusal
        (NOT_FOUND, PINNED, ACTIVE or REFERENCED)."""
        out = await self._call(self.scripts.unregister_begin, adapter_id, "1" if force else "0")
        return tuple(out[1:]) if out[0] == "ok" else _refused(out)

    async def unregister_abort(self, adapter_id: str) -> None:
        await self._call(self.scripts.unregister_abort, adapter_id)

    async def unregister_finish(self, adapter_id: str, force: bool) -> Refused | None:
        """Delete the adapter; None when done, else the refusal (NOT_FOUND, HELD or REFERENCED)."""
        out = await self._durable(self.scripts.unregister_finish, adapter_id, "1" if force else "0")
        return None if out[0] == "ok" else _refused(out)

    # --- stored copies (blobs) -------------------------------------------------------------------

    async def blob_hold(self, blob: str, token: str, lease_ms: int) -> bool:
        """Lease `blob` (kept from collection until released or `lease_ms`); False while a manager
        is deleting it."""
        return await self._call(self.scripts.blob_hold, blob, token, lease_ms) == 1

    async def blob_release(self, blob: str, token: str) -> None:
        await self._call(self.scripts.blob_release, blob, token)

    async def orphaned_blobs(self, before_ms: int, limit: int) -> list[str]:
        """Blobs with no reference since before `before_ms`, oldest first."""
        return await self.client.zrangebyscore(
            self.keys.orphaned_blobs, "-inf", before_ms, start=0, num=limit
        )

    async def blob_claim(self, blob: str, owner: str, claim_ms: int) -> str:
        """'claimed' (delete it, then `blob_deleted`), 'referenced', 'leased' or 'busy'."""
        return await self._call(self.scripts.blob_claim, blob, owner, claim_ms)

    async def blob_deleted(self, blob: str, owner: str) -> bool:
        return await self._call(self.scripts.blob_deleted, blob, owner) == 1

    async def count_blob_refs(self) -> bool:
        """Once per Redis: add every record's reference to its blob (records made before blobs
        were counted). A reference counted twice is harmless; one missing would let a blob go.
        -> True if this call did the counting."""
        if await self.client.exists(self.keys.blob_refs_version):
            return False
        cursor = "-"
        while True:
            ids = await self.client.zrangebylex(self.keys.adapters, cursor, "+", start=0, num=1000)
            if not ids:
                break
            async with self.client.pipeline(transaction=False) as pipe:
                for adapter_id in ids:
                    pipe.hmget(self.keys.adapter(adapter_id), "sha256", "config_sha256")
                digests = await pipe.execute()
            async with self.client.pipeline(transaction=False) as pipe:
                for adapter_id, (sha256, config_sha256) in zip(ids, digests):
                    if sha256 and config_sha256:
                        pipe.sadd(self.keys.blob_refs(blob_name(sha256, config_sha256)), adapter_id)
                await pipe.execute()
            cursor = "(" + ids[-1]
        return bool(await self.client.set(self.keys.blob_refs_version, "1", nx=True))

    async def set_pinned(self, adapter_id: str, pinned: bool) -> dict[str, str] | Refused:
        """Pin or unpin cluster-wide; -> its live holders {replica id: state}, or the refusal
        (NOT_FOUND or DELETING)."""
        out = await self._durable(self.scripts.pin, adapter_id, "1" if pinned else "0")
        return dict(zip(out[1::2], out[2::2])) if out[0] == "ok" else _refused(out)

    async def pinned_ids(self) -> list[str]:
        return sorted(await self.client.smembers(self.keys.pinned))

    # --- replicas -----------------------------------------------------------------------------

    async def join(
        self,
        replica_id: str,
        address: str,
        engine: dict,
        model_json: str,
        snapshot: list[Resident],
        snapshot_seq: int,
        ttl_ms: int,
        credential: str,
    ) -> JoinAnswer:
        """Replace the replica's mirror with its snapshot; `credential` is what the manager will
        present to it. Raises AddressTaken while another live replica has `address`, or this
        replica is live at another address."""
        out = await self._call(
            self.scripts.join,
            replica_id,
            address,
            json.dumps(engine, sort_keys=True),
            model_json,
            _lua_list([r.as_lua() for r in snapshot]),
            snapshot_seq,
            ttl_ms,
            credential,
        )
        if int(out[0]) < 0:
            raise errors.AddressTaken(replica_id, address, out[1], out[2])
        epoch, version, drop = out
        return JoinAnswer(int(epoch), int(version), tuple(drop))

    async def heartbeat(
        self,
        replica_id: str,
        epoch: int,
        snapshot: list[Resident],
        snapshot_seq: int,
        ttl_ms: int,
        load: Load = Load.IDLE,
        load_timeout_ms: int = 120_000,
    ) -> HeartbeatAnswer:
        """Renew the replica's membership, store its load, and reconcile its pins and mirror."""
        out = await self._call(
            self.scripts.heartbeat,
            replica_id,
            epoch,
            _lua_list([r.as_lua() for r in snapshot]),
            snapshot_seq,
            ttl_ms,
            *load.as_args(),
            load_timeout_ms,
        )
        if out[0] == "rejoin":
            return HeartbeatAnswer(rejoin=True)
        return HeartbeatAnswer(False, int(out[1]), tuple(out[2]), tuple(out[3]), tuple(out[4]))

    async def report(self, replica_id: str, epoch: int, changes: list[Change]) -> bool:
        """Apply changes in order; False when the replica must rejoin."""
        out = await self._call(
            self.scripts.report, replica_id, epoch, _lua_list([c.as_lua() for c in changes])
        )
        return out == "ok"

    async def acquire(
        self,
        replica_id: str,
        epoch: int,
        adapter_id: str,
        usage: list[Resident],
        max_cpu_loras: int,
        timeout_ms: int,
    ) -> Reservation | Exhausted | Refused:
        """The host-cache policy: reserve room for `adapter_id` on the replica, naming LRU victims;
        a refusal is STALE, NOT_FOUND or DELETING."""
        out = await self._call(
            self.scripts.acquire,
            replica_id,
            epoch,
            adapter_id,
            _lua_list([[r.adapter_id, int(r.last_used_ms), int(r.pinned)] for r in usage]),
            max_cpu_loras,
            timeout_ms,
        )
        kind = out[0]
        if kind == "ok":
            return Reservation(out[1], int(out[2]), bool(out[3]), False, tuple(out[4]))
        if kind == "resident":
            return Reservation(out[1], int(out[2]), bool(out[3]), True)
        if kind == "exhausted":
            return Exhausted(int(out[1]), int(out[2]))
        return _refused(out)

    async def mark_down(
        self, replica_id: str, reason: str, only_if_lapsed: bool, epoch: int | None = None
    ) -> bool:
        out = await self._call(
            self.scripts.mark_down,
            replica_id,
            reason,
            "1" if only_if_lapsed else "0",
            "" if epoch is None else str(epoch),
        )
        return out == 1

    async def mirror_evicted(self, replica_id: str, adapter_id: str) -> None:
        await self._call(self.scripts.mirror_evicted, replica_id, adapter_id)

    async def lapsed_replicas(self, ttl_ms: int) -> list[str]:
        """Replicas still marked UP whose last heartbeat is older than the TTL."""
        cutoff = await self.now_ms() - ttl_ms
        candidates = await self.client.zrangebyscore(self.keys.replicas, "-inf", cutoff)
        if not candidates:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for replica_id in candidates:
                pipe.hget(self.keys.replica(replica_id), "status")
            statuses = await pipe.execute()
        return [r for r, s in zip(candidates, statuses) if s == "UP"]

    async def live_engines(self) -> list[tuple[str, str, str]]:
        """(replica id, engine JSON, model config JSON) of every replica that is up."""
        replica_ids = await self.client.zrange(self.keys.replicas, 0, -1)
        async with self.client.pipeline(transaction=False) as pipe:
            for replica_id in replica_ids:
                pipe.hmget(self.keys.replica(replica_id), "status", "engine", "model")
            found = await pipe.execute()
        return [
            (r, engine, model) for r, (status, engine, model) in zip(replica_ids, found) if status == "UP"
        ]

    async def replica(self, replica_id: str) -> ReplicaRecord | None:
        found = await self._replicas([replica_id])
        return found[0] if found else None

    async def replicas(self) -> list[ReplicaRecord]:
        return await self._replicas(await self.client.zrange(self.keys.replicas, 0, -1))

    async def _replicas(self, replica_ids: list[str]) -> list[ReplicaRecord]:
        async with self.client.pipeline(transaction=True) as pipe:
            for r in replica_ids:
                pipe.execute_command("HGETALL", self.keys.replica(r))
                # flat (member, score) list: see `Registry`'s note on transactions
                pipe.execute_command("ZRANGE", self.keys.replica_host(r), 0, -1, "REV", "WITHSCORES")
                pipe.execute_command("HGETALL", self.keys.replica_slots(r))
                pipe.execute_command("SMEMBERS", self.keys.replica_pins(r))
                pipe.execute_command("HKEYS", self.keys.replica_loading(r))
            found = await pipe.execute()
        out = []
        for n, r in enumerate(replica_ids):
            meta, host, slots, pins, loading = found[5 * n : 5 * n + 5]
            meta, slots, pins = _hash(meta), _hash(slots), set(pins)
            if not meta:
                continue
            pairs = _pairs(host)
            residents = tuple(Resident(a, int(slots.get(a, -1)), a in pins, int(float(s))) for a, s in pairs)
            out.append(
                ReplicaRecord(
                    replica_id=r,
                    address=meta.get("address", ""),
                    status=meta.get("status", "DOWN"),
                    epoch=int(meta.get("epoch", 0)),
                    joined_at_ms=int(float(meta.get("joined_at", 0))),
                    last_heartbeat_ms=int(float(meta.get("last_heartbeat", 0))),
                    engine=json.loads(meta.get("engine") or "{}"),
                    model_json=meta.get("model", ""),
                    down_reason=meta.get("down_reason", ""),
                    credential=meta.get("credential", ""),
                    residents=residents,
                    loading=tuple(sorted(loading)),
                )
            )
        return sorted(out, key=lambda rec: rec.replica_id)

    # --- placement ----------------------------------------------------------------------------

    async def claim_placement(self, adapter_id: str, replica_id: str, ttl_ms: int) -> tuple[str, bool]:
        """(the replica placing `adapter_id`, whether this call claimed it): ours unless another
        placement of the same adapter is in progress, then theirs."""
        previous = await self.client.set(
            self.keys.placement(adapter_id), replica_id, nx=True, px=ttl_ms, get=True
        )
        return previous or replica_id, previous is None

    async def release_placement(self, adapter_id: str) -> None:
        await self.client.delete(self.keys.placement(adapter_id))

    # --- gauges -------------------------------------------------------------------------------

    async def counts(self) -> ClusterCounts:
        """Registry and membership sizes (two pipelines, not one snapshot: for gauges only)."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.adapters)
            for state in STATES:
                pipe.zcard(self.keys.by_state(state))
            pipe.scard(self.keys.pinned)
            pipe.zrange(self.keys.replicas, 0, -1)
            total, *by_state, pinned, replica_ids = await pipe.execute()
        async with self.client.pipeline(transaction=False) as pipe:
            for replica_id in replica_ids:
                pipe.hget(self.keys.replica(replica_id), "status")
            statuses = await pipe.execute()
        up = sum(1 for s in statuses if s == "UP")
        return ClusterCounts(total, dict(zip(STATES, by_state)), pinned, up, len(statuses) - up)

    # --- routing ------------------------------------------------------------------------------

    async def routing(self) -> tuple[int, dict[str, list], list[dict]]:
        """(version, {alias: [[adapter id, weight], ...]}, [rule dict, ...]), read atomically."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.execute_command("GET", self.keys.routing_version)
            pipe.execute_command("HGETALL", self.keys.aliases)
            pipe.execute_command("GET", self.keys.rules)
            version, aliases, rules = await pipe.execute()
            aliases = _hash(aliases)
        return (
            int(version or 0),
            {name: json.loads(v) for name, v in aliases.items()},
            json.loads(rules or "[]"),
        )

    async def set_alias(self, name: str, variants: list[list]) -> Refused | None:
        """None when stored, else the refusal (CONFLICT, or UNKNOWN naming the variant)."""
        out = await self._durable(self.scripts.set_alias, name, json.dumps(variants))
        return None if out[0] == "ok" else _refused(out)

    async def delete_alias(self, name: str) -> Refused | None:
        """None when deleted, else the refusal (NOT_FOUND, or REFERENCED naming the rules)."""
        out = await self._durable(self.scripts.delete_alias, name)
        return None if out[0] == "ok" else _refused(out)

    async def set_rules(self, rules: list[dict]) -> Refused | None:
        """None when stored, else the refusal (UNKNOWN naming the target)."""
        out = await self._durable(self.scripts.set_rules, _lua_list(rules))
        return None if out[0] == "ok" else _refused(out)

    # --- events -------------------------------------------------------------------------------

    async def last_event_id(self) -> str:
        last = await self.watch_client.xrevrange(self.keys.events, count=1)
        return last[0][0] if last else "0-0"

    async def read_events(self, after_id: str, count: int = 100) -> list[Event]:
        """Events after `after_id`, waiting up to EVENTS_BLOCK_MS for the first."""
        found = await self.watch_client.xread(
            {self.keys.events: after_id}, count=count, block=EVENTS_BLOCK_MS
        )
        events = []
        for _, entries in found or []:
            for event_id, f in entries:
                events.append(
                    Event(
                        event_id,
                        f.get("type", ""),
                        f.get("adapter", ""),
                        f.get("replica", ""),
                        f.get("detail", ""),
                        int(float(f.get("at", 0))),
                    )
                )
        return events


def _refused(answer: list) -> Refused:
    return Refused(Refusal(answer[0]), tuple(str(n) for n in answer[1:]))


def _lua_list(items: list) -> str:
    """JSON for a Lua script: an empty list must be `[]` (cjson would otherwise see `{}`)."""
    return json.dumps(items)


def _hash(reply) -> dict:
    """A HGETALL reply as a dict (a Cluster transaction returns the flat field, value list)."""
    return reply if isinstance(reply, dict) else dict(zip(reply[0::2], reply[1::2]))


def _pairs(reply) -> list[tuple[str, float]]:
    """A ZRANGE ... WITHSCORES reply as (member, score) pairs, flat or already paired."""
    if reply and isinstance(reply[0], list | tuple):
        return [(member, float(score)) for member, score in reply]
    return [(member, float(score)) for member, score in zip(reply[0::2], reply[1::2])]
