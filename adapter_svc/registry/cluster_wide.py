"""What belongs to no one entity, on the cluster's global tag: routing (aliases and rules; resolved
by `adapter_svc.routes`), the event stream's reads, and the counts behind the gauges.
"""

from __future__ import annotations

import json

from adapter_svc.records import STATES, ClusterCounts, Event, Refusal, Refused
from adapter_svc.registry.base import RegistryBase, _hash, _lua_list, _refused

# Longest an XREAD waits for new events before the watcher loops (stays under socket_timeout).
EVENTS_BLOCK_MS = 1000


class ClusterWide(RegistryBase):
    """Routing, events and counts."""

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
        down = sum(1 for s in statuses if s is not None and s != "UP")  # None: forgotten, unlisted next
        return ClusterCounts(total, dict(zip(STATES, by_state)), pinned, up, down)
