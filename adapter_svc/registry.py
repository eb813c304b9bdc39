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
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

from adapter_svc import errors
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
from loraserve.cluster_keys import Keys

# Index entries one ListAdapters call examines at most (filters may skip many of them).
LIST_SCAN_BUDGET = 5000
# Longest an XREAD waits for new events before the watcher loops (stays under socket_timeout).
EVENTS_BLOCK_MS = 1000


def connect(config: ManagerConfig) -> redis.Redis:
    """A client that retries on connection loss with exponential backoff (jittered)."""
    retry = Retry(
        ExponentialWithJitterBackoff(base=config.redis_backoff_base_s, cap=config.redis_backoff_cap_s),
        config.redis_retries,
        supported_errors=(ConnectionError, TimeoutError, BusyLoadingError),
    )
    return redis.from_url(
        config.redis_url,
        decode_responses=True,
        retry=retry,
        socket_timeout=10,
        socket_connect_timeout=2,
        health_check_interval=10,
    )


class Registry:
    """Typed access to one cluster's keys."""

    def __init__(self, client: redis.Redis, cluster: str, events_maxlen: int):
        self.client = client
        self.keys = Keys(cluster)
        self.scripts = Scripts(client)
        self._common = [self.keys.prefix, events_maxlen]

    async def _call(self, script, *args, routing_key: str | None = None):
        return await script(keys=[routing_key or self.keys.events], args=[*self._common, *args])

    async def now_ms(self) -> int:
        seconds, micros = await self.client.time()
        return seconds * 1000 + micros // 1000

    async def ping(self) -> bool:
        return await self.client.ping()

    # --- registry -----------------------------------------------------------------------------

    async def register(self, adapter_id: str, fields: dict[str, str]) -> Registered:
        (status,) = await self._call(self.scripts.register, adapter_id, json.dumps(fields))
        return Registered(status)

    async def get(self, adapter_id: str) -> AdapterRecord | None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.keys.adapter(adapter_id))
            pipe.hgetall(self.keys.adapter_on(adapter_id))
            fields, on = await pipe.execute()
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
            pipe.zrange(self.keys.replica_host(replica_id), 0, -1)
            pipe.hkeys(self.keys.replica_loading(replica_id))
            host, loading = await pipe.execute()
        return sorted(set(host) | set(loading))

    async def get_many(self, adapter_ids: list[str]) -> list[AdapterRecord]:
        async with self.client.pipeline(transaction=True) as pipe:
            for adapter_id in adapter_ids:
                pipe.hgetall(self.keys.adapter(adapter_id))
            found = await pipe.execute()
        return [AdapterRecord.from_fields(f) for f in found if f]

    async def unregister_begin(self, adapter_id: str, force: bool) -> tuple[str, ...] | Refused:
        """Mark the adapter `deleting` (no new loads); -> the replicas that hold it, or the refusal
        (NOT_FOUND, PINNED, ACTIVE or REFERENCED)."""
        out = await self._call(self.scripts.unregister_begin, adapter_id, "1" if force else "0")
        return tuple(out[1:]) if out[0] == "ok" else _refused(out)

    async def unregister_abort(self, adapter_id: str) -> None:
        await self._call(self.scripts.unregister_abort, adapter_id)

    async def unregister_finish(self, adapter_id: str, force: bool) -> Refused | None:
        """Delete the adapter; None when done, else the refusal (NOT_FOUND, HELD or REFERENCED)."""
        out = await self._call(self.scripts.unregister_finish, adapter_id, "1" if force else "0")
        return None if out[0] == "ok" else _refused(out)

    async def set_pinned(self, adapter_id: str, pinned: bool) -> dict[str, str] | Refused:
        """Pin or unpin cluster-wide; -> its live holders {replica id: state}, or the refusal
        (NOT_FOUND or DELETING)."""
        out = await self._call(self.scripts.pin, adapter_id, "1" if pinned else "0")
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
    ) -> JoinAnswer:
        """Replace the replica's mirror with its snapshot."""
        epoch, version, drop = await self._call(
            self.scripts.join,
            replica_id,
            address,
            json.dumps(engine, sort_keys=True),
            model_json,
            _lua_list([r.as_lua() for r in snapshot]),
            snapshot_seq,
            ttl_ms,
        )
        return JoinAnswer(int(epoch), int(version), tuple(drop))

    async def heartbeat(
        self,
        replica_id: str,
        epoch: int,
        snapshot: list[Resident],
        snapshot_seq: int,
        ttl_ms: int,
        load: Load = Load.IDLE,
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
                pipe.hgetall(self.keys.replica(r))
                pipe.zrange(self.keys.replica_host(r), 0, -1, desc=True, withscores=True)
                pipe.hgetall(self.keys.replica_slots(r))
                pipe.smembers(self.keys.replica_pins(r))
                pipe.hkeys(self.keys.replica_loading(r))
            found = await pipe.execute()
        out = []
        for n, r in enumerate(replica_ids):
            meta, host, slots, pins, loading = found[5 * n : 5 * n + 5]
            if not meta:
                continue
            residents = tuple(Resident(a, int(slots.get(a, -1)), a in pins, int(score)) for a, score in host)
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
            pipe.get(self.keys.routing_version)
            pipe.hgetall(self.keys.aliases)
            pipe.get(self.keys.rules)
            version, aliases, rules = await pipe.execute()
        return (
            int(version or 0),
            {name: json.loads(v) for name, v in aliases.items()},
            json.loads(rules or "[]"),
        )

    async def set_alias(self, name: str, variants: list[list]) -> Refused | None:
        """None when stored, else the refusal (CONFLICT, or UNKNOWN naming the variant)."""
        out = await self._call(self.scripts.set_alias, name, json.dumps(variants))
        return None if out[0] == "ok" else _refused(out)

    async def delete_alias(self, name: str) -> Refused | None:
        """None when deleted, else the refusal (NOT_FOUND, or REFERENCED naming the rules)."""
        out = await self._call(self.scripts.delete_alias, name)
        return None if out[0] == "ok" else _refused(out)

    async def set_rules(self, rules: list[dict]) -> Refused | None:
        """None when stored, else the refusal (UNKNOWN naming the target)."""
        out = await self._call(self.scripts.set_rules, _lua_list(rules))
        return None if out[0] == "ok" else _refused(out)

    # --- events -------------------------------------------------------------------------------

    async def last_event_id(self) -> str:
        last = await self.client.xrevrange(self.keys.events, count=1)
        return last[0][0] if last else "0-0"

    async def read_events(self, after_id: str, count: int = 100) -> list[Event]:
        """Events after `after_id`, waiting up to EVENTS_BLOCK_MS for the first."""
        found = await self.client.xread({self.keys.events: after_id}, count=count, block=EVENTS_BLOCK_MS)
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
