"""Real Redis Sentinel and Redis Cluster deployments on loopback, for the control plane's tests.

`SentinelDeployment`: a primary, two replicas and three sentinels (quorum 2); `ClusterDeployment`:
six nodes, three primaries each with one replica. Both offer what the tests use of `RedisProcess`
(`url`, `client()`, `keys`, `stop()`), plus `flush()` (tests share one deployment) and
`kill_primary()` (SIGKILL the primary holding the control plane's keys, then wait until another
node serves them); the Cluster also `pause()`s and `resume()`s a node (SIGSTOP, SIGCONT).
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from harness import CLUSTER, TIMEOUT_S, Keys, RedisProcess, free_port, wait_for

SERVICE = "loraserve"


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (and below 65536)."""
    while True:
        port = random.randrange(20000, 45000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


def _spawn(port: int, directory: Path, *extra: str) -> subprocess.Popen:
    directory.mkdir(parents=True, exist_ok=True)
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    args += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning", *extra]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _node(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5)


def _answers(port: int, check=lambda c: c.ping()) -> bool:
    try:
        with _node(port) as c:
            return bool(check(c))
    except redis.RedisError:
        return False


class SentinelDeployment:
    keys = Keys(CLUSTER)

    def __init__(self, directory: Path):
        self.directory = directory
        self.ports = {"primary": free_port(), "replica": free_port(), "replica2": free_port()}
        self.sentinels = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen] = {}
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
        self.url = f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> SentinelDeployment:
        primary, replicas = self.ports["primary"], [self.ports["replica"], self.ports["replica2"]]
        self.procs[primary] = _spawn(primary, self.directory / "primary")
        for replica in replicas:
            self.procs[replica] = _spawn(
                replica, self.directory / str(replica), "--replicaof", "127.0.0.1", str(primary)
            )
        for port in self.sentinels:
            conf = self.directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 500\n"
                f"sentinel failover-timeout {SERVICE} 2000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.procs[port] = subprocess.Popen(
                ["redis-server", str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for replica in replicas:
            wait_for(
                lambda r=replica: _answers(r, lambda c: c.info("replication")["master_link_status"] == "up"),
                "the Sentinel replicas to sync",
            )
        wait_for(
            lambda: all(_answers(p, self._knows_replicas) for p in self.sentinels),
            "the sentinels to see both replicas",
        )
        return self

    def _knows_replicas(self, c: redis.Redis) -> bool:
        master = c.sentinel_master(SERVICE)
        return int(master["num-slaves"]) >= 2 and int(master["num-other-sentinels"]) >= 2

    def primary_port(self) -> int:
        with _node(self.sentinels[0]) as c:
            return int(c.sentinel_get_master_addr_by_name(SERVICE)[1])

    def client(self) -> redis.Redis:
        sentinel = Sentinel([("127.0.0.1", p) for p in self.sentinels], socket_timeout=5)
        return sentinel.master_for(SERVICE, decode_responses=True, socket_timeout=5)

    def flush(self) -> None:
        with _node(self.primary_port()) as c:
            c.flushall()

    def kill_primary(self) -> None:
        """SIGKILL the primary; return once the sentinels name the promoted replica."""
        old = self.primary_port()
        self.procs.pop(old).kill()
        wait_for(lambda: self.primary_port() != old, "the sentinels to fail over", timeout=TIMEOUT_S * 2)
        wait_for(
            lambda: _answers(self.primary_port(), lambda c: c.info("replication")["role"] == "master"),
            "the promoted replica to accept writes",
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(TIMEOUT_S)
        self.procs.clear()


class ClusterDeployment:
    keys = Keys(CLUSTER)

    def __init__(self, directory: Path):
        self.directory = directory
        self.ports = [_free_cluster_port() for _ in range(6)]
        self.procs: dict[int, subprocess.Popen] = {}
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3]) + "/0"

    def start(self) -> ClusterDeployment:
        for port in self.ports:
            self.procs[port] = _spawn(
                port,
                self.directory / str(port),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
            )
        for port in self.ports:
            wait_for(lambda port=port: _answers(port), f"cluster node {port} to answer")
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=TIMEOUT_S,
        )
        wait_for(self._healthy, "the cluster to be ok with every replica linked", timeout=TIMEOUT_S * 2)
        return self

    def _healthy(self) -> bool:
        def ok(c: redis.Redis) -> bool:
            if c.cluster("info").get("cluster_state") != "ok":
                return False
            role = c.info("replication")
            return role["role"] == "master" or role.get("master_link_status") == "up"

        return all(_answers(p, ok) for p in self.procs)

    def client(self) -> RedisCluster:
        live = [ClusterNode("127.0.0.1", p) for p in self.procs]
        return RedisCluster(startup_nodes=live, decode_responses=True, socket_timeout=5)

    def primary_port(self, key: str | None = None) -> int:
        """The primary serving `key`'s slot (default: the control plane's global hash tag)."""
        with self.client() as c:
            return c.get_node_from_key(key or self.keys.events).port

    def primary_ports(self, keys: list[str]) -> list[int]:
        """The primary serving each key's slot."""
        with self.client() as c:
            return [c.get_node_from_key(key).port for key in keys]

    def replica_port(self, primary: int) -> int:
        """The port of `primary`'s replica."""
        with _node(primary) as c:
            info = c.info("replication")
        return int(info["slave0"]["port"])

    def pause(self, port: int) -> None:
        """SIGSTOP the node (it holds its connections but answers and acknowledges nothing)."""
        self.procs[port].send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGCONT)

    def flush(self) -> None:
        with self.client() as c:
            c.flushall(target_nodes=RedisCluster.PRIMARIES)

    def kill_primary(self) -> None:
        old = self.primary_port()
        self.procs.pop(old).kill()
        wait_for(lambda: self._serves_elsewhere(old), "the cluster to fail over", timeout=TIMEOUT_S * 2)

    def _serves_elsewhere(self, old: int) -> bool:
        try:
            return self._healthy() and self.primary_port() != old
        except redis.RedisError:
            return False

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(TIMEOUT_S)
        self.procs.clear()


def single_redis_only(redis_proc) -> None:
    """For tests that stop and restart the one redis-server process (Sentinel and Cluster
    failovers have their own tests)."""
    if not isinstance(redis_proc, RedisProcess):
        pytest.skip("restarts the single redis-server; test_redis_failover.py covers Sentinel and Cluster")


def all_keys(client, pattern: str) -> list[str]:
    """KEYS on every node that holds data (a Cluster client asks one random node by default)."""
    if isinstance(client, RedisCluster):
        return client.keys(pattern, target_nodes=RedisCluster.PRIMARIES)
    return client.keys(pattern)
