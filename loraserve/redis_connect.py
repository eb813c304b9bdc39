"""One way for every process (the manager, the endpoint picker, benchmarks) to reach Redis:

  redis://[[user]:password@]host:port/db   (also rediss:// for TLS, unix://path)   one server
  redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]         Sentinel
  redis+cluster://[[user]:password@]host:port[,host:port...][/0]                  Cluster
  (redis+sentinels:// and redis+clusters:// speak TLS to the Redis nodes)

Every client retries a command on connection loss, timeouts, a loading or read-only node, with
jittered exponential backoff, and reconnects meanwhile: through a Sentinel failover it asks the
sentinels for the new primary, through a Cluster failover it re-reads the slot map. What a write
acknowledged before a failover promises is the durability setting's business (`WAIT`, see
adapter_svc/README.md): `on_owner` sends a write and its WAIT on one connection to the primary
that owns the write's key, on every deployment.
"""

from __future__ import annotations

import copy
import urllib.parse
from dataclasses import dataclass

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ConnectionError,
    MaxConnectionsError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+sentinels", "redis+cluster", "redis+clusters")
# What a failover looks like to a client: the node went away, is still loading, or was demoted.
RETRY_ON = [ConnectionError, TimeoutError, BusyLoadingError, ReadOnlyError, TryAgainError]
# ... and what it looks like to commands sent to the node a stale slot map names (MovedError is an
# AskError): the slot moved, or has no primary until a replica is promoted.
MOVED_ON = [AskError, ClusterDownError, SlotNotCoveredError]


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL."""

    kind: str  # "single" | "sentinel" | "cluster"
    url: str  # the single server's URL, as redis-py reads it
    hosts: tuple[tuple[str, int], ...] = ()  # sentinels or cluster seed nodes
    service: str = ""  # the Sentinel service (primary) name
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_redis_url(url: str) -> RedisTarget:
    """ValueError naming what is wrong with `url`."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"redis URL {url!r}: the scheme must be one of {', '.join(s + '://' for s in SCHEMES)}"
        )
    if parts.scheme in ("redis", "rediss", "unix"):
        return RedisTarget("single", url)
    credentials, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    hosts = []
    for item in hostlist.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"redis URL {url!r}: {item!r} is not host:port")
        hosts.append((host, int(port)))
    path = [p for p in parts.path.split("/") if p]
    kind = "sentinel" if parts.scheme.startswith("redis+sentinel") else "cluster"
    if kind == "sentinel" and not path:
        raise ValueError(
            f"redis URL {url!r}: name the Sentinel service: redis+sentinel://HOST:PORT/SERVICE[/DB]"
        )
    db_text = (path[1:2] if kind == "sentinel" else path[:1]) or ["0"]
    if not db_text[0].isdigit() or (kind == "cluster" and db_text[0] != "0"):
        raise ValueError(f"redis URL {url!r}: the database must be a number (0 on a Cluster)")
    return RedisTarget(
        kind,
        url,
        tuple(hosts),
        path[0] if kind == "sentinel" else "",
        int(db_text[0]),
        urllib.parse.unquote(username) or None,
        urllib.parse.unquote(password) or None,
        parts.scheme.endswith("s"),
    )


def connect(
    url: str,
    *,
    retries: int = 6,
    backoff_base_s: float = 0.05,
    backoff_cap_s: float = 2.0,
    max_connections: int | None = None,
    socket_timeout_s: float = 10.0,
) -> redis.Redis | RedisCluster:
    """An asyncio client of the deployment `url` names (strings decoded), retrying as above."""
    target = parse_redis_url(url)
    retry = Retry(ExponentialWithJitterBackoff(base=backoff_base_s, cap=backoff_cap_s), retries)
    common = dict(
        decode_responses=True,
        retry=retry,
        retry_on_error=RETRY_ON,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=2,
    )
    if target.kind == "single":
        return redis.Redis.from_url(url, health_check_interval=10, max_connections=max_connections, **common)
    auth = dict(username=target.username, password=target.password)
    if target.kind == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
            max_connections=max_connections or 100,
            ssl=target.tls,
            **auth,
            **common,
        )
    sentinel = Sentinel(
        list(target.hosts),
        sentinel_kwargs=dict(socket_timeout=2, socket_connect_timeout=2, ssl=target.tls),
        ssl=target.tls,
    )
    return sentinel.master_for(
        target.service,
        db=target.db,
        max_connections=max_connections,
        health_check_interval=10,
        **auth,
        **common,
    )


async def on_owner(client: redis.Redis | RedisCluster, key: str, commands: list[tuple]) -> list:
    """`commands` in order on ONE connection to the primary that owns `key`'s slot -> their
    replies, each command's error in its place (so that a WAIT after a write counts the
    replication of that write, on that primary). The commands may be sent more than once: each
    must be idempotent.

    One server or Sentinel: a non-transactional pipeline on the client's primary (its retry
    resends it on connection loss, after asking the sentinels for the primary). Cluster: the
    slot's primary from the client's slot map, on a connection of the cluster client's own pool
    (its credentials, TLS and timeouts). A connection loss, a timeout or a redirection (MOVED,
    ASK, CLUSTERDOWN: a failover or a slot migration since the map was read) re-reads the map
    and resends every command to the slot's primary then, with the client's backoff, at most
    its retry count times; no command is redirected alone (a WAIT sent to a node that did not
    take the write would count another node's replication)."""
    if not isinstance(client, RedisCluster):
        async with client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute(raise_on_error=False)
    failed: list[str] = []

    async def send() -> list:
        await client.initialize()  # no-op unless a failover made the client drop its map
        node = client.get_node_from_key(key)
        stack = [PipelineCommand(i, *command) for i, command in enumerate(commands)]
        try:
            await node.execute_pipeline(stack)
        except (ConnectionError, TimeoutError):
            failed.append(node.name)
            raise
        for command in stack:
            if isinstance(command.result, tuple(MOVED_ON)):
                raise command.result
        return [command.result for command in stack]

    async def reread(error: Exception) -> None:
        try:
            await client.nodes_manager.initialize(last_failed_node_name=failed[-1] if failed else None)
        except (RedisError, RedisClusterException):
            pass  # no node answers yet: the next attempt fails and waits again

    retry = copy.copy(client.retry)
    retry.update_supported_errors([*RETRY_ON, *MOVED_ON])
    return await retry.call_with_retry(
        send, reread, is_retryable=lambda e: not isinstance(e, MaxConnectionsError)
    )
