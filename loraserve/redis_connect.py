"""One way for every process (the manager, the endpoint picker, benchmarks) to reach Redis:

  redis://[[user]:password@]host:port/db   (also rediss:// for TLS, unix://path)   one server
  redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]         Sentinel
  redis+cluster://[[user]:password@]host:port[,host:port...][/0]                  Cluster
  (redis+sentinels:// and redis+clusters:// speak TLS to the Redis nodes)

Every client retries a command on connection loss, timeouts, a loading or read-only node, with
jittered exponential backoff, and reconnects meanwhile: through a Sentinel failover it asks the
sentinels for the new primary, through a Cluster failover it re-reads the slot map. What a write
acknowledged before a failover promises is the durability setting's business (`WAIT`, see
adapter_svc/README.md).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, ReadOnlyError, TimeoutError, TryAgainError

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+sentinels", "redis+cluster", "redis+clusters")
# What a failover looks like to a client: the node went away, is still loading, or was demoted.
RETRY_ON = [ConnectionError, TimeoutError, BusyLoadingError, ReadOnlyError, TryAgainError]


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
