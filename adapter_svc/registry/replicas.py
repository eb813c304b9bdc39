"""Replicas, each on its own tag: membership (join, heartbeat, mark down), the mirror of what each
holds (reports, the host-cache policy), and their reads; with the global membership index.
"""

from __future__ import annotations

import json

from adapter_svc import errors
from adapter_svc.records import (
    AcquireRequest,
    Change,
    Exhausted,
    ForgetPass,
    Forgot,
    HeartbeatAnswer,
    JoinAnswer,
    JoinRequest,
    Load,
    Refused,
    ReplicaRecord,
    Reservation,
    Resident,
)
from adapter_svc.registry.base import RegistryBase, _hash, _lua_list, _refused


class Replicas(RegistryBase):
    """Each change is the replica's script (the truth for residency), then `_settle`."""

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

    async def forget_down(self, down_for_ms: int, limit: int) -> ForgetPass:
        """Forget replicas down for longer than `down_for_ms`: of the first `limit` in the
        membership index last seen that long ago (its score; a replica goes down after it was last
        seen), `forget_replica` then `unlist_replica` each. Ones not down long enough stay at the
        head of that range until they are (within `down_for_ms`), so a pass may examine them again;
        `more` only when a full batch removed some (a pass right after would make progress)."""
        cutoff = await self.now_ms() - down_for_ms
        seen = await self.client.zrangebyscore(
            self.keys.replicas, "-inf", cutoff, start=0, num=limit, withscores=True
        )
        forgotten, removed = [], 0
        for replica_id, score in seen:
            answer = await self.forget_replica(replica_id, down_for_ms)
            if answer is Forgot.FORGOTTEN:
                forgotten.append(replica_id)
            if answer is not Forgot.KEPT:
                removed += await self.unlist_replica(replica_id, int(score))
        return ForgetPass(tuple(forgotten), len(seen) == limit and removed > 0)

    async def forget_replica(self, replica_id: str, down_for_ms: int) -> Forgot:
        """Step one of forgetting a replica, on its own slot: delete its record and every key of
        it if it is down and went down longer than `down_for_ms` ago (checked by the script, so a
        replica that joined again is kept). Its entry in the membership index stays until
        `unlist_replica`; readers skip an entry without a record meanwhile."""
        answer, events, _ = await self._run_on_replica(self.scripts.forget, replica_id, down_for_ms)
        await self._publish(events)
        return Forgot(answer)

    async def unlist_replica(self, replica_id: str, seen_score: int) -> bool:
        """Step two, on the global slot: take the replica out of the membership index and the
        picker's change marks, unless its score rose above `seen_score` (what the index said when
        it was chosen): a join raises it after the join's script, and one whose raise lands after
        this puts the entry back. -> whether it was taken out."""
        answer, _, _ = await self._run(
            self.scripts.unlist_replica, self.keys.replicas, replica_id, seen_score
        )
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
                # flat (member, score) list: see `RegistryBase`'s note on transactions
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

    async def held_by(self, replica_id: str) -> list[str]:
        """Ids a replica holds or is loading, per the mirror, sorted."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.execute_command("ZRANGE", self.keys.replica_host(replica_id), 0, -1)
            pipe.execute_command("HKEYS", self.keys.replica_loading(replica_id))
            host, loading = await pipe.execute()
        return sorted(set(host) | set(loading))

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


def _pairs(reply) -> list[tuple[str, float]]:
    """A ZRANGE ... WITHSCORES reply as (member, score) pairs, flat or already paired."""
    if reply and isinstance(reply[0], list | tuple):
        return [(member, float(score)) for member, score in reply]
    return [(member, float(score)) for member, score in zip(reply[0::2], reply[1::2])]
