"""The services under test as child processes, started through their public command lines.

    with RedisServer(workdir / "redis") as redis_srv, \
         Service.manager(redis_srv.url, ..., log=...) as manager, \
         Service.inference(model_dir, engine_flags, manager=manager.address, log=...) as replica:
        replay_trace(replica.address, requests)

Each child listens on a free loopback port and is waited for until its gRPC health service says
SERVING; leaving the `with` block sends SIGTERM and waits (SIGKILL after a bound). Logs go to files
in the results directory, and a child that dies while being waited for raises with its log tail.
Children get the caller's environment minus `LORASERVE_*`: every setting under test is a flag.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300.0  # a big model on a busy machine takes a while to load
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_args(port: int, directory: Path) -> list[str]:
    """A redis-server on loopback `port`, files in `directory`, no persistence, in the foreground."""
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    return args + ["--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]


def poll(ready, transient: type[Exception], alive, timeout_s: float, interval_s: float, failure: str) -> None:
    """Call `alive()` (it raises when a child died), then `ready()`, until `ready()` is true; an
    exception of type `transient` counts as not yet. RuntimeError(`failure`) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive()
        try:
            if ready():
                return
        except transient:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(failure)
        time.sleep(interval_s)


class _Child:
    """A child process whose output goes to a log file; a context manager that stops it."""

    def __init__(self, args: list[str], log: Path):
        self.args = args
        self.log = Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log.open("ab")
        # LORASERVE_* variables would silently change the configuration under test: drop them.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.args[0]} exited with {self.proc.returncode}; log {self.log}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        self._log_file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisServer(_Child):
    """A private redis-server (no persistence) on a free loopback port, files in `directory`."""

    def __init__(self, directory: Path, log: Path | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        super().__init__(redis_server_args(self.port, directory), log or directory / "redis.log")
        self._wait_ready()

    def _wait_ready(self) -> None:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        failure = f"redis-server on port {self.port} did not answer within 30 s"
        try:
            poll(client.ping, redis.RedisError, self.check_alive, 30, 0.05, failure)
        finally:
            client.close()


class Service(_Child):
    """`python -m inference_svc serve` or `python -m adapter_svc serve`, SERVING when returned."""

    def __init__(self, module: str, flags: list[str], log: Path, port: int):
        super().__init__([sys.executable, "-m", module, "serve", *flags], log)
        self.port = port
        self.address = f"127.0.0.1:{port}"
        try:
            self._wait_serving()
        except BaseException:
            self.stop()
            raise

    @classmethod
    def inference(
        cls,
        model_dir: Path,
        engine: dict,
        log: Path,
        lora_modules: dict[str, Path] | None = None,
        adapter_manager: str | None = None,
        extra: list[str] = (),
    ) -> Service:
        """An inference replica; `engine` maps EngineConfig field names to flag values."""
        port = free_port()
        flags = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--grace-s", "2"]
        flags += ["--log-level", "warning"]
        for name, value in engine.items():
            flags += ["--" + name.replace("_", "-"), str(value)]
        if lora_modules:
            flags += ["--lora-modules", *(f"{name}={path}" for name, path in lora_modules.items())]
        if adapter_manager:
            flags += ["--adapter-manager", adapter_manager, "--replica-id", f"bench-{port}"]
        return cls("inference_svc", [*flags, *extra], log, port)

    @classmethod
    def manager(cls, redis_url: str, adapter_root: Path, store_dir: Path, log: Path, extra: list[str] = ()):
        """An adapter manager on `redis_url`, registering adapters from under `adapter_root`."""
        port = free_port()
        flags = ["--redis-url", redis_url, "--cluster", "bench", "--host", "127.0.0.1", "--port", str(port)]
        flags += ["--adapter-root", str(adapter_root), "--store-dir", str(store_dir)]
        flags += ["--log-level", "WARNING", *extra]
        return cls("adapter_svc", flags, log, port)

    def _wait_serving(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                return status == health_pb2.HealthCheckResponse.SERVING

            failure = f"{self.args[2]} on {self.address} not SERVING after {START_TIMEOUT_S} s"
            poll(serving, grpc.RpcError, self.check_alive, START_TIMEOUT_S, 0.1, failure)


class RedisClusterServer:
    """A private six-node Redis Cluster (three primaries, one replica each, no persistence) on free
    loopback ports, files in `directory`; `url` is its `redis+cluster://` URL and `primary_ports`
    the nodes that hold slots. A context manager that stops every node."""

    NODES = 6

    def __init__(self, directory: Path):
        import redis

        self.directory = directory
        self.ports = [_free_cluster_port() for _ in range(self.NODES)]
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3]) + "/0"
        self.nodes: list[_Child] = []
        try:
            for port in self.ports:
                node_dir = directory / str(port)
                node_dir.mkdir(parents=True, exist_ok=True)
                args = redis_server_args(port, node_dir)
                args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                args += ["--cluster-node-timeout", "5000"]
                self.nodes.append(_Child(args, node_dir / "redis.log"))
            for port in self.ports:
                self._wait(lambda p=port: redis.Redis(port=p, socket_timeout=1).ping(), f"node {port}")
            create = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)]
            subprocess.run(
                [*create, "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True
            )
            self._wait(self._healthy, "the cluster to be ok with every replica linked")
        except BaseException:
            self.stop()
            raise

    def _wait(self, check, what: str, timeout_s: float = 60.0) -> None:
        import redis

        def alive() -> None:
            for node in self.nodes:
                node.check_alive()

        failure = f"Redis Cluster in {self.directory}: no {what} after {timeout_s} s"
        poll(check, redis.RedisError, alive, timeout_s, 0.1, failure)

    def _healthy(self) -> bool:
        import redis

        for port in self.ports:
            with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as c:
                if c.cluster("info").get("cluster_state") != "ok":
                    return False
                role = c.info("replication")
                if role["role"] != "master" and role.get("master_link_status") != "up":
                    return False
        return True

    @property
    def primary_ports(self) -> list[int]:
        import redis

        out = []
        for port in self.ports:
            with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as c:
                if c.info("replication")["role"] == "master":
                    out.append(port)
        return out

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_cluster_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
