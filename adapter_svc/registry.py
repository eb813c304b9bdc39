"""The control plane's state in Redis: the registry, replica membership and mirrors, routing, events.

The only module that talks to Redis (with `migration.py`, which runs once before it serves). Each
change is a sequence of Lua scripts from `scripts.py`, each atomic on the keys of ONE entity's hash
tag (layout `v2`, `loraserve/cluster_keys.py`): the owner's script first (the adapter record for
the registry, the replica's mirror for residency, the blob's references for stored copies), then
the state derived from it on other slots (the adapter's `on` hash, the global indexes, the event
stream) in non-transactional pipelines, which a Redis Cluster client splits per node. Every step
is idempotent, and each sequence is ordered so that a manager dying between two steps leaves only
drift that `reconcile_*` repairs (adapter_svc/README.md lists each invariant and its repair).
Consistent reads of one entity are MULTI/EXEC pipelines (one slot). The client retries commands
with exponential backoff while the connection is lost; after the last retry the error propagates
and the RPC answers UNAVAILABLE (see `errors.STATUS_BY_FAMILY`). Every reply is decoded here into
the typed values of `records.py`; callers never see a raw list.
"""

from __future__ import annotations

import json

import redis.asyncio as redis
from redis.exceptions import NoScriptError

from adapter_svc import errors
from adapter_svc.blobs import blob_name
from adapter_svc.config import ManagerConfig
from adapter_svc.records import (
    STATES,
    AcquireRequest,
    AdapterRecord,
    Change,
    ClusterCounts,
    Event,
    Exhausted,
    HeartbeatAnswer,
    JoinAnswer,
    JoinRequest,
    Load,
    Refusal,
    Refused,
    Registered,
    ReplicaRecord,
    Reservation,
    Resident,
)
from adapter_svc.scripts import SCRIPTS, Scripts
from loraserve import redis_connect
from loraserve.cluster_keys import Keys

# Index entries one ListAdapters call examines at most (filters may skip many of them).
LIST_SCAN_BUDGET = 5000
# Records one ListAdapters round trip reads.
LIST_CHUNK = 200
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

    Consistent multi-key reads are MULTI/EXEC pipelines of plain `execute_command`s on the keys of
    one tag: redis-py's Redis Cluster transactions pass the key list to reply parsers that do not
    take it, so its typed helpers (hgetall, smembers, zrange ...) fail there.

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
        self._common = [cluster, events_maxlen]
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._loaded = False

    # --- plumbing -----------------------------------------------------------------------------

    async def _run(self, script, key: str, *args) -> list:
        """One script on the slot of `key` -> [answer, events, residency]."""
        return await script(keys=[key], args=[*self._common, *args])

    async def _run_on_replica(self, script, replica_id: str, *args) -> list:
        """`_run` of a replica script: on the slot of the replica's keys, its id the first argument."""
        return await self._run(script, self.keys.replica(replica_id), replica_id, *args)

    async def _durable(self, script, key: str, *args) -> list:
        """`_run`, acknowledged by `wait_replicas` Redis replicas before it counts as done: the
        script and `WAIT` on one connection to the primary that owns `key`'s slot (on a Cluster,
        the shard's primary: `redis_connect.on_owner`). Unavailable when fewer acknowledge in time
        (the write may then be lost in a failover: the caller retries, and every write here is
        idempotent or refused the second time). The owner's step of a sequence is the one made
        durable; the derived steps after it are repaired by reconciliation if a failover loses them."""
        if not self.wait_replicas:
            return await self._run(script, key, *args)
        if not self._loaded:
            await self._load_scripts()
        evalsha = ("EVALSHA", script.sha, 1, key, *self._common, *args)
        wait = ("WAIT", self.wait_replicas, self.wait_timeout_ms)
        for attempt in (0, 1):
            out, acknowledged = await redis_connect.on_owner(self.client, key, [evalsha, wait])
            if not (isinstance(out, NoScriptError) and not attempt):
                break
            await self._load_scripts()  # a failover lost the scripts: load them, resend
        for reply in (out, acknowledged):
            if isinstance(reply, Exception):
                raise reply
        if acknowledged < self.wait_replicas:
            raise errors.Unavailable(
                f"Redis applied the change but only {acknowledged} of {self.wait_replicas} replicas "
                f"acknowledged it within {self.wait_timeout_ms} ms (redis_wait_replicas); retry"
            )
        return out

    async def _many(self, calls: list[tuple], commands=None) -> list:
        """Scripts [(script, key, args), ...] (then `commands(pipe)` queues plain commands) in one
        non-transactional pipeline, which may span slots -> their replies in order. Scripts Redis
        lost (a failover, a restart) are loaded again and the pipeline resent: every script here
        is idempotent."""
        if not calls and commands is None:
            return []
        if not self._loaded:  # scripts may be queued by `commands` too
            await self._load_scripts()
        for attempt in (0, 1):
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for script, key, args in calls:
                        # execute_command: the Cluster pipeline blocks its evalsha helper, not the command
                        pipe.execute_command("EVALSHA", script.sha, 1, key, *self._common, *args)
                    if commands is not None:
                        commands(pipe)
                    return await pipe.execute()
            except NoScriptError:
                if attempt:
                    raise
                await self._load_scripts()
        raise AssertionError("unreachable")

    async def _load_scripts(self) -> None:
        """SCRIPT LOAD every script (on every primary of a Cluster), so that pipelines may EVALSHA
        them; again after a failover lost them (a resent pipeline may then repeat an event)."""
        for source in SCRIPTS.values():
            await self.client.script_load(source)
        self._loaded = True

    def _queue_events(self, pipe, events) -> None:
        for kind, adapter, replica, detail, at in events:
            pipe.xadd(
                self.keys.events,
                {"type": kind, "adapter": adapter, "replica": replica, "detail": detail, "at": at},
                maxlen=self._common[1],
                approximate=True,
            )

    async def _publish(self, events, commands=None, changed_replica: str = "") -> list:
        """Add a script's events to the global stream (with more global `commands`, then the
        change mark of `changed_replica` when named: one round trip) -> the events' and commands'
        replies. A manager that dies before this loses them: the change itself stands."""

        def queue(pipe):
            self._queue_events(pipe, events)
            if commands is not None:
                commands(pipe)
            if changed_replica:  # last: after a join's ZADD to `replicas`, which pruning compares with
                sha, key = self.scripts.touch_replica.sha, self.keys.replicas_changed
                pipe.execute_command("EVALSHA", sha, 1, key, *self._common, changed_replica)

        if not (events or commands is not None or changed_replica):
            return []
        replies = await self._many([], queue)
        return replies[:-1] if changed_replica else replies

    async def _settle(
        self, replica_id: str, residency: list, events, commands=None, changed: bool = False
    ) -> list:
        """After a replica's script (the truth for residency): copy the residency it reports into
        each adapter's `on` hash (RESIDE, ordered by mirror version), move the adapters whose
        registry state changed between the state indexes, add the events, and mark the replica
        changed for the picker (`<G>replicas:changed`) when its residency or, per `changed`, its
        membership or load moved; -> the replies of `commands` (global ones run with the events).
        A manager that dies before the mark leaves the picker's view stale until its next full
        read (`PickerConfig.full_refresh_s`)."""
        if residency:
            version, *entries = residency
            replies = await self._many(
                [
                    (
                        self.scripts.reside,
                        self.keys.adapter(a),
                        [a, replica_id, state, version, failed, reason],
                    )
                    for a, state, failed, reason in entries
                ]
            )
            await self._move_states([(a, out[0]) for (a, *_), out in zip(entries, replies)])
        start = len(events)
        marked = replica_id if changed or residency else ""
        return (await self._publish(events, commands, marked))[start:]

    async def _move_states(self, changes: list[tuple[str, list]]) -> None:
        """STATE_INDEX for each (adapter id, RESIDE's answer) that changed its registry state."""
        await self._many(
            [
                (self.scripts.state_index, self.keys.adapters, [a, moved[0], moved[1]])
                for a, moved in changes
                if moved
            ]
        )

    async def now_ms(self) -> int:
        seconds, micros = await self.client.time()
        return seconds * 1000 + micros // 1000

    async def ping(self) -> bool:
        return await self.client.ping()

    async def _records_for(self, adapter_ids: list[str]) -> dict[str, list]:
        """What replica scripts check of each adapter: id -> [sha256, deleting, cluster-pinned];
        unknown ids are left out. Read before the script, so a record that changes in between is
        caught by the replica's next heartbeat."""
        ids = sorted(set(adapter_ids))
        if not ids:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for adapter_id in ids:
                pipe.hmget(self.keys.adapter(adapter_id), "sha256", "deleting", "pinned")
            found = await pipe.execute()
        return {
            a: [sha, int(deleting == "1"), int(pinned == "1")]
            for a, (sha, deleting, pinned) in zip(ids, found)
            if sha
        }

    # --- registry -----------------------------------------------------------------------------

    async def register(self, adapter_id: str, fields: dict[str, str]) -> tuple[Registered, str]:
        """(REGISTER's answer, the registered tenant when it is TENANT, else ""). Three round
        trips: see `register_bulk`."""
        [(status, *owner)], _ = await self.register_bulk([(adapter_id, fields)], durable=True)
        return status, owner[0] if owner else ""

    async def register_bulk(
        self, items: list[tuple[str, dict[str, str]]], durable: bool = False
    ) -> tuple[list, int]:
        """Register adapters in three pipelined round trips -> ([(Registered, owner...) per
        item], how many were new). `durable`: one item, its record written through `_durable`.

        Sequence per adapter: alias check (read) with the blob reference (before the record, so a
        crash leaves at worst a reference too many, never a record whose copy may be collected)
        -> the record -> indexes and event, with the alias re-check (write, then re-check:
        SET_ALIAS re-checks records after its write, so of two racing changes one sees the
        other; a registration that finds the alias after undoes itself). Retrying repairs every
        step after the record."""
        blobs = [blob_name(f["sha256"], f["config_sha256"]) for _, f in items]

        def refs(pipe):
            for (adapter_id, _), blob in zip(items, blobs):
                pipe.hexists(self.keys.aliases, adapter_id)
                self._queue_blob_ref(pipe, blob, adapter_id)

        found = await self._many([], refs)
        aliased = {a for (a, _), alias in zip(items, found[0::4]) if alias}
        for (adapter_id, _), blob in zip(items, blobs):
            if adapter_id in aliased:  # the reference just added is not needed
                await self._blob_release(blob, "", adapter_id)
        todo = [(a, f) for a, f in items if a not in aliased]
        if durable and len(todo) == 1:
            adapter_id, fields = todo[0]
            replies = [
                await self._durable(
                    self.scripts.register, self.keys.adapter(adapter_id), adapter_id, json.dumps(fields)
                )
            ]
        else:
            replies = await self._many(
                [(self.scripts.register, self.keys.adapter(a), [a, json.dumps(f)]) for a, f in todo]
            )
        index, events, answers = [], [], {a: (Registered.ALIAS,) for a in aliased}
        for (adapter_id, _), (answer, emitted, _) in zip(todo, replies):
            status = Registered(answer[0])
            answers[adapter_id] = (
                (status,) if status in (Registered.OK, Registered.SAME) else (status, *answer[1:])
            )
            if status in (Registered.OK, Registered.SAME):
                index.append((self.scripts.index, self.keys.adapters, [adapter_id, *answer[1:5]]))
                events += emitted
        new = [a for a, _ in todo if answers[a][0] == Registered.OK]

        def events_and_aliases(pipe):
            self._queue_events(pipe, events)
            for adapter_id in new:
                pipe.hexists(self.keys.aliases, adapter_id)

        replies = await self._many(index, events_and_aliases)
        for adapter_id, alias in zip(new, replies[len(replies) - len(new) :]):
            if alias:
                await self._delete(adapter_id)
                answers[adapter_id] = (Registered.ALIAS,)
        out = [answers[a] for a, _ in items]
        return out, sum(1 for s, *_ in out if s == Registered.OK)

    def _queue_blob_ref(self, pipe, blob: str, adapter_id: str) -> None:
        pipe.zadd(self.keys.blobs, {blob: 0})
        pipe.sadd(self.keys.blob_refs(blob), adapter_id)
        pipe.zrem(self.keys.orphaned_blobs, blob)

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
        """One page in id order after `cursor`, and the next cursor ('' when done): ids from the
        global index, records from their own slots (an index entry whose record is gone or no
        longer matches the filters is skipped)."""
        index = self.keys.adapters
        if tenant:
            index = self.keys.by_tenant(tenant)
        elif state:
            index = self.keys.by_state(state)
        start, examined, last, records = ("(" + cursor) if cursor else "-", 0, None, []
        while examined < LIST_SCAN_BUDGET and len(records) < page_size:
            ids = await self.client.zrangebylex(
                index, start, "+", start=0, num=min(LIST_CHUNK, LIST_SCAN_BUDGET - examined)
            )
            if not ids:
                break
            async with self.client.pipeline(transaction=False) as pipe:
                for adapter_id in ids:
                    pipe.hgetall(self.keys.adapter(adapter_id))
                found = await pipe.execute()
            for adapter_id, fields in zip(ids, found):
                examined, last = examined + 1, adapter_id
                if (
                    fields
                    and (not tenant or fields.get("tenant") == tenant)
                    and (not state or fields.get("state") == state)
                ):
                    records.append(AdapterRecord.from_fields(fields))
                    if len(records) >= page_size:
                        break
            start = "(" + last
        more = last is not None and bool(
            await self.client.zrangebylex(index, "(" + last, "+", start=0, num=1)
        )
        return records, last if more else ""

    async def held_by(self, replica_id: str) -> list[str]:
        """Ids a replica holds or is loading, per the mirror, sorted."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.execute_command("ZRANGE", self.keys.replica_host(replica_id), 0, -1)
            pipe.execute_command("HKEYS", self.keys.replica_loading(replica_id))
            host, loading = await pipe.execute()
        return sorted(set(host) | set(loading))

    async def get_many(self, adapter_ids: list[str]) -> list[AdapterRecord]:
        async with self.client.pipeline(transaction=False) as pipe:
            for adapter_id in adapter_ids:
                pipe.hgetall(self.keys.adapter(adapter_id))
            found = await pipe.execute()
        return [AdapterRecord.from_fields(f) for f in found if f]

    async def _references(self, adapter_id: str) -> tuple[str, ...]:
        """Alias names and rule names that route to `adapter_id`."""
        _, aliases, rules = await self.routing()
        refs = [
            f"alias {name}" for name, variants in aliases.items() if any(v[0] == adapter_id for v in variants)
        ]
        return tuple(refs + [f"rule {r['name']}" for r in rules if r.get("target") == adapter_id])

    async def unregister_begin(self, adapter_id: str, force: bool) -> tuple[str, ...] | Refused:
        """Mark the adapter `deleting` (no new loads); -> the replicas that hold it, or the refusal
        (NOT_FOUND, PINNED, ACTIVE or REFERENCED). References are checked after the mark (write,
        then re-check: SET_ALIAS / SET_RULES re-check `deleting` after their write)."""
        key = self.keys.adapter(adapter_id)
        answer, _, _ = await self._run(self.scripts.unregister_begin, key, adapter_id, "1" if force else "0")
        if answer[0] != "ok":
            return _refused(answer)
        if force:
            await self.client.srem(self.keys.pinned, adapter_id)  # the record is unpinned already
        elif refs := await self._references(adapter_id):
            await self.unregister_abort(adapter_id)
            return Refused(Refusal.REFERENCED, refs)
        return tuple(answer[1:])

    async def unregister_abort(self, adapter_id: str) -> None:
        await self._run(self.scripts.unregister_abort, self.keys.adapter(adapter_id), adapter_id)

    async def unregister_finish(self, adapter_id: str, force: bool) -> Refused | None:
        """Delete the adapter; None when done, else the refusal (NOT_FOUND, HELD or REFERENCED).
        Forced: routes to it go first (UNROUTE, idempotent), then the record, then its blob
        reference and index entries (a crash in between leaves index entries without a record,
        or a reference too many: both repaired by reconciliation)."""
        if not await self.client.exists(self.keys.adapter(adapter_id)):
            await self._run(self.scripts.unindex, self.keys.adapters, adapter_id, "")
            return Refused(Refusal.NOT_FOUND)
        if force:
            await self._run(self.scripts.unroute, self.keys.aliases, adapter_id)
        elif refs := await self._references(adapter_id):
            await self.unregister_abort(adapter_id)
            return Refused(Refusal.REFERENCED, refs)
        return await self._delete(adapter_id, durable=True)

    async def _delete(self, adapter_id: str, durable: bool = False) -> Refused | None:
        run = self._durable if durable else self._run
        key = self.keys.adapter(adapter_id)
        answer, _, _ = await run(self.scripts.unregister_finish, key, adapter_id)
        if answer[0] != "ok":
            return _refused(answer)
        _, tenant, _, sha256, config_sha256 = answer
        await self._blob_release(blob_name(sha256, config_sha256), "", adapter_id)
        await self._run(self.scripts.unindex, self.keys.adapters, adapter_id, tenant)
        return None

    # --- stored copies (blobs) -------------------------------------------------------------------

    async def blob_hold(self, blob: str, token: str, lease_ms: int) -> bool:
        """Lease `blob` (kept from collection until released or `lease_ms`); False while a manager
        is deleting it."""
        answer, _, _ = await self._run(
            self.scripts.blob_hold, self.keys.blob_refs(blob), blob, token, lease_ms
        )
        return answer == 1

    async def blob_release(self, blob: str, token: str) -> None:
        await self._blob_release(blob, token, "")

    async def _blob_release(self, blob: str, token: str, adapter_id: str, only_unleased: bool = False) -> int:
        """Drop a lease and/or a reference; a blob left with neither becomes garbage (the global
        orphaned set, after the blob's own slot: a crash in between is repaired by reconciliation).
        -> the references left."""
        answer, _, _ = await self._run(
            self.scripts.blob_release, self.keys.blob_refs(blob), blob, token, adapter_id, int(only_unleased)
        )
        orphan, now, refs = answer
        if orphan:
            await self.client.zadd(self.keys.orphaned_blobs, {blob: now}, nx=True)
        return refs

    async def orphaned_blobs(self, before_ms: int, limit: int) -> list[str]:
        """Blobs with no reference since before `before_ms`, oldest first."""
        return await self.client.zrangebyscore(
            self.keys.orphaned_blobs, "-inf", before_ms, start=0, num=limit
        )

    async def blob_claim(self, blob: str, owner: str, claim_ms: int) -> str:
        """'claimed' (delete it, then `blob_deleted`), 'referenced', 'leased' or 'busy'."""
        answer, _, _ = await self._run(
            self.scripts.blob_claim, self.keys.blob_refs(blob), blob, owner, claim_ms
        )
        if answer == "referenced":
            await self.client.zrem(self.keys.orphaned_blobs, blob)
        return answer

    async def blob_deleted(self, blob: str, owner: str) -> bool:
        answer, events, _ = await self._run(self.scripts.blob_deleted, self.keys.blob_refs(blob), blob, owner)
        if answer == 1:

            def forget(pipe):
                pipe.zrem(self.keys.orphaned_blobs, blob)
                pipe.zrem(self.keys.blobs, blob)

            await self._publish(events, forget)
        return answer == 1

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
            await self._reference_blobs(ids)
            cursor = "(" + ids[-1]
        return bool(await self.client.set(self.keys.blob_refs_version, "1", nx=True))

    async def _reference_blobs(self, adapter_ids: list[str]) -> None:
        """Add each record's reference to its blob (idempotent)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for adapter_id in adapter_ids:
                pipe.hmget(self.keys.adapter(adapter_id), "sha256", "config_sha256")
            digests = await pipe.execute()

        def refs(pipe):
            for adapter_id, (sha256, config_sha256) in zip(adapter_ids, digests):
                if sha256 and config_sha256:
                    self._queue_blob_ref(pipe, blob_name(sha256, config_sha256), adapter_id)

        await self._many([], refs)

    async def set_pinned(self, adapter_id: str, pinned: bool) -> dict[str, str] | Refused:
        """Pin or unpin cluster-wide; -> its live holders {replica id: state}, or the refusal
        (NOT_FOUND or DELETING). The record's `pinned` is the truth; the global `pinned` set
        follows it (reconciliation repairs it after a crash in between)."""
        answer, events, _ = await self._durable(
            self.scripts.pin, self.keys.adapter(adapter_id), adapter_id, "1" if pinned else "0"
        )
        if answer[0] != "ok":
            return _refused(answer)

        def pin(pipe):
            (pipe.sadd if pinned else pipe.srem)(self.keys.pinned, adapter_id)

        await self._publish(events, pin)
        return dict(zip(answer[1::2], answer[2::2]))

    async def pinned_ids(self) -> list[str]:
        return sorted(await self.client.smembers(self.keys.pinned))

    # --- replicas -----------------------------------------------------------------------------

    async def join(self, join: JoinRequest, ttl_ms: int) -> JoinAnswer:
        """Replace the replica's mirror with its snapshot. Raises AddressTaken while another live
        replica has its address, or this replica is live at another address. The other replicas'
        addresses are read before the script (two replicas joining at one address within that
        read's round trip could both pass: a window this accepts)."""
        replica_id, address = join.replica_id, join.address
        others = [r for r in await self.client.zrange(self.keys.replicas, 0, -1) if r != replica_id]
        async with self.client.pipeline(transaction=False) as pipe:
            for other in others:
                pipe.hget(self.keys.replica(other), "address")
                pipe.exists(self.keys.replica_alive(other))
            found = await pipe.execute()
        for other, held, alive in zip(others, found[0::2], found[1::2]):
            if alive and held == address:
                raise errors.AddressTaken(replica_id, address, other, held)
        recs = await self._records_for([r.adapter_id for r in join.snapshot])
        answer, events, residency = await self._run_on_replica(
            self.scripts.join,
            replica_id,
            address,
            json.dumps(join.engine, sort_keys=True),
            join.model_json,
            _lua_list([r.as_lua() for r in join.snapshot]),
            join.snapshot_seq,
            ttl_ms,
            join.credential,
            json.dumps(recs),
        )
        if int(answer[0]) < 0:
            raise errors.AddressTaken(replica_id, address, answer[1], answer[2])
        epoch, drop, now = answer
        _, version = await self._settle(
            replica_id, residency, events, self._seen(replica_id, now), changed=True
        )
        return JoinAnswer(int(epoch), int(version or 0), tuple(drop))

    def _seen(self, replica_id: str, now: int):
        """Global commands after a replica's join or heartbeat: its place in the membership index
        (its last heartbeat), then the routing version it is told."""

        def queue(pipe):
            pipe.zadd(self.keys.replicas, {replica_id: now})
            pipe.get(self.keys.routing_version)

        return queue

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
        recs = await self._records_for([r.adapter_id for r in snapshot])
        answer, events, residency = await self._run_on_replica(
            self.scripts.heartbeat,
            replica_id,
            epoch,
            _lua_list([r.as_lua() for r in snapshot]),
            snapshot_seq,
            ttl_ms,
            *load.as_args(),
            load_timeout_ms,
            json.dumps(recs),
        )
        if answer[0] == "rejoin":
            return HeartbeatAnswer(rejoin=True)
        _, unpin, pin, drop, now, moved = answer
        _, version = await self._settle(
            replica_id, residency, events, self._seen(replica_id, now), changed=moved == 1
        )
        return HeartbeatAnswer(False, int(version or 0), tuple(unpin), tuple(pin), tuple(drop))

    async def report(self, replica_id: str, epoch: int, changes: list[Change]) -> bool:
        """Apply changes in order; False when the replica must rejoin."""
        known = {a: 1 for a in await self._records_for([c.adapter_id for c in changes])}
        answer, events, residency = await self._run_on_replica(
            self.scripts.report,
            replica_id,
            epoch,
            _lua_list([c.as_lua() for c in changes]),
            json.dumps(known),
        )
        await self._settle(replica_id, residency, events)
        return answer == "ok"

    async def acquire(
        self, ask: AcquireRequest, max_cpu_loras: int, timeout_ms: int
    ) -> Reservation | Exhausted | Refused:
        """The host-cache policy: reserve room for the adapter on the replica, naming LRU victims;
        a refusal is STALE, NOT_FOUND or DELETING. The record and the cluster's pins are read just
        before (an unregistration that begins in between finds the reservation among the holders)."""
        adapter_id = ask.adapter_id
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.adapter(adapter_id), "sha256", "size_bytes", "deleting", "pinned")
            pipe.smembers(self.keys.pinned)
            (sha256, size, deleting, pinned), cluster_pinned = await pipe.execute()
        record = [sha256 or "", int(size or 0), int(deleting == "1"), int(pinned == "1")]
        answer, events, residency = await self._run_on_replica(
            self.scripts.acquire,
            ask.replica_id,
            ask.epoch,
            adapter_id,
            _lua_list([[r.adapter_id, int(r.last_used_ms), int(r.pinned)] for r in ask.usage]),
            max_cpu_loras,
            timeout_ms,
            json.dumps(record),
            _lua_list(sorted(cluster_pinned)),
        )
        await self._settle(ask.replica_id, residency, events)
        kind = answer[0]
        if kind == "ok":
            return Reservation(answer[1], int(answer[2]), bool(answer[3]), False, tuple(answer[4]))
        if kind == "resident":
            return Reservation(answer[1], int(answer[2]), bool(answer[3]), True)
        if kind == "exhausted":
            return Exhausted(int(answer[1]), int(answer[2]))
        return _refused(answer)

    async def mark_down(
        self, replica_id: str, reason: str, only_if_lapsed: bool, epoch: int | None = None
    ) -> bool:
        answer, events, residency = await self._run_on_replica(
            self.scripts.mark_down,
            replica_id,
            reason,
            "1" if only_if_lapsed else "0",
            "" if epoch is None else str(epoch),
        )
        await self._settle(replica_id, residency, events, changed=answer == 1)
        return answer == 1

    async def mirror_evicted(self, replica_id: str, adapter_id: str) -> None:
        answer, events, residency = await self._run_on_replica(
            self.scripts.mirror_evicted, replica_id, adapter_id
        )
        await self._settle(replica_id, residency, events)

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
        """Each replica's keys read in one pipeline across their slots (each replica's script
        changes them atomically; a read may fall between two of them: placement re-checks in
        ACQUIRE)."""
        async with self.client.pipeline(transaction=False) as pipe:
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

    async def _live(self, adapter_ids: list[str]) -> tuple[set[str], set[str]]:
        """(ids that are registered, ids that are registered and not being unregistered)."""
        ids = sorted(set(adapter_ids))
        async with self.client.pipeline(transaction=False) as pipe:
            for adapter_id in ids:
                pipe.hmget(self.keys.adapter(adapter_id), "sha256", "deleting")
            found = await pipe.execute()
        registered = {a for a, (sha, _) in zip(ids, found) if sha}
        return registered, {a for a, (sha, deleting) in zip(ids, found) if sha and deleting != "1"}

    async def _alias_problem(self, name: str, variants: list[list]) -> Refused | None:
        ids = [v[0] for v in variants]
        registered, live = await self._live([name, *ids])
        if name in registered:
            return Refused(Refusal.CONFLICT)
        unknown = [a for a in ids if a not in live]
        return Refused(Refusal.UNKNOWN, (unknown[0],)) if unknown else None

    async def set_alias(self, name: str, variants: list[list]) -> Refused | None:
        """None when stored, else the refusal (CONFLICT, or UNKNOWN naming the variant).

        The records are checked before the write and again after it (write, then re-check:
        REGISTER re-checks aliases after writing its record, UNREGISTER_BEGIN references after
        marking `deleting`, so of two racing changes at least one sees the other); a problem
        found after undoes the write."""
        problem = await self._alias_problem(name, variants)
        stored = json.dumps(variants)
        answer, _, _ = await self._durable(
            self.scripts.set_alias,
            self.keys.aliases,
            name,
            stored,
            "1" if problem and problem.reason == Refusal.CONFLICT else "0",
            problem.names[0] if problem and problem.reason == Refusal.UNKNOWN else "",
        )
        if answer[0] != "ok":
            return _refused(answer)
        if problem := await self._alias_problem(name, variants):
            await self._run(self.scripts.revert_alias, self.keys.aliases, name, stored, answer[2])
            return problem
        return None

    async def delete_alias(self, name: str) -> Refused | None:
        """None when deleted, else the refusal (NOT_FOUND, or REFERENCED naming the rules)."""
        answer, _, _ = await self._durable(self.scripts.delete_alias, self.keys.aliases, name)
        return None if answer[0] == "ok" else _refused(answer)

    async def set_rules(self, rules: list[dict]) -> Refused | None:
        """None when stored, else the refusal (UNKNOWN naming the target). Targets that are
        adapters are checked before and after the write, as `set_alias` does."""
        targets = [r["target"] for r in rules]
        _, live = await self._live(targets)
        stored = _lua_list(rules)
        answer, _, _ = await self._durable(
            self.scripts.set_rules, self.keys.rules, stored, _lua_list(sorted(live))
        )
        if answer[0] != "ok":
            return _refused(answer)
        _, still = await self._live(sorted(live))
        if gone := sorted(live - still):
            await self._run(self.scripts.revert_rules, self.keys.rules, stored, answer[2])
            return Refused(Refusal.UNKNOWN, (gone[0],))
        return None

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

    # --- reconciliation -----------------------------------------------------------------------
    # Each pass examines at most `limit` entities after `cursor` and answers the next cursor ('' =
    # it wrapped around). Every repair is an idempotent step of the sequences above, so a pass may
    # run concurrently with the changes it repairs, and on several managers at once.

    async def reconcile_adapters(self, cursor: str, limit: int) -> str:
        """Per listed adapter: the global indexes (all, tenant, state, pinned) and its blob
        reference follow its record; an index entry without a record goes; each `on` field
        follows the mirror of the replica it names (none for a down or unknown replica)."""
        ids = await self.client.zrangebylex(
            self.keys.adapters, ("(" + cursor) if cursor else "-", "+", start=0, num=limit
        )
        await self.repair_adapters(ids)
        return ids[-1] if len(ids) == limit else ""

    async def repair_adapters(self, ids: list[str]) -> None:
        """`reconcile_adapters` for these ids (migration indexes copied records with it): reads
        first, and writes only where something drifted."""
        async with self.client.pipeline(transaction=False) as pipe:
            for adapter_id in ids:
                pipe.hmget(
                    self.keys.adapter(adapter_id),
                    "tenant",
                    "state",
                    "state_seq",
                    "pinned",
                    "sha256",
                    "config_sha256",
                )
                pipe.hkeys(self.keys.adapter_on(adapter_id))
            found = await pipe.execute()
        records = {a: f for a, f in zip(ids, found[0::2]) if f[1] is not None}
        checks = 9  # commands queued per record below
        async with self.client.pipeline(transaction=False) as pipe:
            for adapter_id, (tenant, _, _, _, sha256, config_sha256) in records.items():
                pipe.zscore(self.keys.adapters, adapter_id)
                pipe.zscore(self.keys.by_tenant(tenant or "-"), adapter_id)
                for state in STATES:
                    pipe.zscore(self.keys.by_state(state), adapter_id)
                pipe.sismember(self.keys.pinned, adapter_id)
                pipe.sismember(self.keys.blob_refs(blob_name(sha256, config_sha256)), adapter_id)
            seen = await pipe.execute()
        fixes, unreferenced = [], []
        for n, (adapter_id, (tenant, state, seq, pinned, _, _)) in enumerate(records.items()):
            listed, in_tenant, *in_states, is_pinned, referenced = seen[checks * n : checks * n + checks]
            indexed = [s for s, score in zip(STATES, in_states) if score is not None]
            if (
                listed is None
                or (tenant and in_tenant is None)
                or indexed != [state]
                or bool(is_pinned) != (pinned == "1")
            ):
                fixes.append(
                    (
                        self.scripts.index,
                        self.keys.adapters,
                        [adapter_id, tenant or "", state, seq or "0", pinned or "0"],
                    )
                )
            if not referenced:
                unreferenced.append(adapter_id)
        gone = [(self.scripts.unindex, self.keys.adapters, [a, ""]) for a in ids if a not in records]
        await self._many(fixes + gone)
        if unreferenced:
            await self._reference_blobs(unreferenced)
        on: dict[str, list[str]] = {}
        for adapter_id, holders in zip(ids, found[1::2]):
            for replica_id in holders:
                on.setdefault(replica_id, []).append(adapter_id)
        for replica_id, adapter_ids in on.items():
            await self._reconcile_on(replica_id, adapter_ids)

    async def reconcile_replicas(self, cursor: int, limit: int) -> int:
        """Per replica (by position in the membership index): every adapter its mirror holds or
        loads has the mirror's state in its `on` hash. Where the pass wraps, change marks of ids
        no longer in the membership index go. -> the next position (0 = wrapped)."""
        replica_ids = await self.client.zrange(self.keys.replicas, cursor, cursor + limit - 1)
        for replica_id in replica_ids:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.execute_command("ZRANGE", self.keys.replica_host(replica_id), 0, -1)
                pipe.execute_command("HKEYS", self.keys.replica_loading(replica_id))
                host, loading = await pipe.execute()
            await self._reconcile_on(replica_id, sorted(set(host) | set(loading)))
        if len(replica_ids) == limit:
            return cursor + limit
        if gone := await self.client.zdiff([self.keys.replicas_changed, self.keys.replicas]):
            await self.client.zrem(self.keys.replicas_changed, *gone)
        return 0

    async def _reconcile_on(self, replica_id: str, adapter_ids: list[str]) -> None:
        """RESIDE, at the mirror's current version, each adapter whose `on` field for the replica
        differs from what the replica's mirror says."""
        if not adapter_ids:
            return
        (states, _, _), *fields = await self._many(
            [
                (
                    self.scripts.mirror_states,
                    self.keys.replica(replica_id),
                    [replica_id, _lua_list(adapter_ids)],
                )
            ],
            lambda pipe: [pipe.hget(self.keys.adapter_on(a), replica_id) for a in adapter_ids],
        )
        version, *mirror = states
        fixes = [
            (self.scripts.reside, self.keys.adapter(a), [a, replica_id, state, version, "", ""])
            for (a, state), held in zip(mirror, fields)
            if (held or "") != state
        ]
        replies = await self._many(fixes)
        await self._move_states([(fix[2][0], out[0]) for fix, out in zip(fixes, replies)])

    async def reconcile_blobs(self, cursor: str, limit: int) -> str:
        """Per known blob: a reference whose adapter no longer uses the blob goes (unless a lease
        is live: a registration in progress); a blob with no reference and no lease is garbage
        (orphaned), one with references is not. A referencing record missing from the global
        index (its registration died after the record) is indexed: a registration references
        its blob before it writes the record, so every record is found from some blob."""
        blobs = await self.client.zrangebylex(
            self.keys.blobs, ("(" + cursor) if cursor else "-", "+", start=0, num=limit
        )
        async with self.client.pipeline(transaction=False) as pipe:
            for blob in blobs:
                pipe.smembers(self.keys.blob_refs(blob))
            refs = await pipe.execute()
        for blob, ids in zip(blobs, refs):
            async with self.client.pipeline(transaction=False) as pipe:
                for adapter_id in ids:
                    pipe.hmget(self.keys.adapter(adapter_id), "sha256", "config_sha256")
                digests = await pipe.execute()
            live = []
            for adapter_id, (sha256, config_sha256) in zip(ids, digests):
                if not sha256 or blob_name(sha256, config_sha256) != blob:
                    await self._blob_release(blob, "", adapter_id, only_unleased=True)
                else:
                    live.append(adapter_id)
            if live:
                async with self.client.pipeline(transaction=False) as pipe:
                    for adapter_id in live:
                        pipe.zscore(self.keys.adapters, adapter_id)
                    listed = await pipe.execute()
                await self.repair_adapters([a for a, score in zip(live, listed) if score is None])
            if await self._blob_release(blob, "", ""):
                await self.client.zrem(self.keys.orphaned_blobs, blob)
        return blobs[-1] if len(blobs) == limit else ""


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
