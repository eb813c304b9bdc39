"""The registry's Redis plumbing: the client, scripts run on one tag (durably when asked),
pipelines across slots, the events and derived state that follow a change, and reply decoding.

Every part of `Registry` (adapters, blob references, replicas, cluster-wide keys, reconciliation)
is built on `RegistryBase` and issues its commands through it.
"""

from __future__ import annotations

import json

import redis.asyncio as redis
from redis.exceptions import NoScriptError

from adapter_svc import errors
from adapter_svc.config import ManagerConfig
from adapter_svc.records import Refusal, Refused
from adapter_svc.scripts import SCRIPTS, Scripts
from loraserve import redis_connect
from loraserve.cluster_keys import Keys


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


class RegistryBase:
    """Typed access to one cluster's keys: what every part of `Registry` runs its commands through.

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


# Reply decoding and argument encoding shared by the parts (the package's own: callers outside it
# get typed values, never these).


def _refused(answer: list) -> Refused:
    return Refused(Refusal(answer[0]), tuple(str(n) for n in answer[1:]))


def _lua_list(items: list) -> str:
    """JSON for a Lua script: an empty list must be `[]` (cjson would otherwise see `{}`)."""
    return json.dumps(items)


def _hash(reply) -> dict:
    """A HGETALL reply as a dict (a Cluster transaction returns the flat field, value list)."""
    return reply if isinstance(reply, dict) else dict(zip(reply[0::2], reply[1::2]))
