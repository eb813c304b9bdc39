"""`python -m entrypoints.run`: the whole stack on one machine, without Docker (`make run`).

    python -m entrypoints.run [--model DIR] [--replicas N] [--port-base N] [--run-dir DIR] [--no-serve]
                              [ENGINE FLAGS]

Starts, in one process group of its own, with logs in RUN_DIR/logs:
  1. a private redis-server (append-only file in RUN_DIR/redis),
  2. the adapter manager (`python -m adapter_svc serve`),
  3. `--replicas` inference replicas (`python -m inference_svc serve --adapter-manager ...`) on
     `--model`, or on a demo model generated into RUN_DIR/demo,
  4. the front door: the endpoint picker (`python -m endpoint_picker serve`) and Envoy, with the
     configuration `loraserve.front_door` generates (RUN_DIR/envoy.yaml),
then registers demo adapters with the manager, runs a short demo through the door with several
adapters and the base model in flight at once, prints the endpoints and commands to try, and serves
until Ctrl-C (SIGINT, SIGTERM or SIGHUP). Shutdown stops everything in reverse start order, each
with SIGTERM (and, as a last resort, SIGKILL for the process group), so nothing is left running.

Ports: the door gets N (default 50051), the manager N+1, Redis N+2, the first replica's metrics
N+3, the manager's N+4, the picker N+5, its metrics N+6, Envoy's admin N+7, the door's
OpenAI-compatible HTTP API N+8, then each replica's gRPC port, each replica's HTTP API and each
further replica's metrics; a port in use is replaced by the next free one above.
Flags this command does not know (e.g. `--max-loras 8`) are passed to every inference replica.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import hashlib
import io
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from tqdm import tqdm

from loraserve.healthcheck import check
from loraserve.telemetry import REQUEST_ID_HEADER

DEFAULT_PORT_BASE = 50051
# door, manager, redis, replica metrics, manager metrics, picker, picker metrics, envoy admin, door HTTP
NUM_PORTS = 9
NUM_DEMO_ADAPTERS = 4
START_TIMEOUT_S = 300.0  # a large model on a slow disk takes a while
STOP_TIMEOUT_S = 20.0
REPLICA_ID = "local-{}"  # .format(replica index)
MAX_REPLICAS = 16
# The door's health checks here: a killed replica is out of rotation within two of them.
HEALTH_INTERVAL_S = 1.0
DEMO_PROMPTS = ("The quick brown fox", "Multi-LoRA serving", "Hello", "Adapters everywhere")
DEMO_MAX_TOKENS = 12


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: shut down."""


class StartupFailed(Exception):
    """A child failed to start or died; the message names it and the tail of its log."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise StartupFailed(f"{self.name} exited with code {self.proc.returncode}\n{log_tail(self.log)}")


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join(f"    {line}" for line in text) + f"\n  (full log: {path})"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(base: int, count: int = NUM_PORTS) -> list[int]:
    """`count` free loopback ports: base, base+1, ... skipping any that are taken."""
    ports, port = [], base
    while len(ports) < count:
        if port > 65535:
            raise StartupFailed(f"no {count} free ports at or above {base}")
        if port_free(port):
            ports.append(port)
        port += 1
    return ports


class RunDirBusy(Exception):
    """Another stack holds the run directory."""


def lock_run_dir(run_dir: Path) -> int:
    """Hold `run_dir` for this stack alone (an exclusive lock on run_dir/.lock, released by the
    kernel when this process ends, however it ends); -> the lock's descriptor. RunDirBusy naming the
    holder when another stack has it: two stacks never share Redis data, the store or logs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunDirBusy(
            f"another loraserve stack (pid {holder}) is using {run_dir}: stop it, or give this one "
            f"its own directory (make run RUN_ARGS='--run-dir .run-2 --port-base 51051')"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class Stack:
    """The children, all in one process group, stopped in reverse start order."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.pgid: int | None = None

    def spawn(self, name: str, args: list[str]) -> Child:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:  # this run's lines only: a failure's tail is this run's
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=self.pgid or 0,  # Ctrl-C in the terminal reaches only this process
                env={**os.environ, "PYTHONPATH": _pythonpath()},
            )
        if self.pgid is None:
            self.pgid = proc.pid
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        for child in self.children:
            child.check_alive()

    def stop(self) -> None:
        """SIGTERM each child, newest first, waiting for it; then SIGKILL whatever is left."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                try:
                    child.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    print(f"{child.name} did not stop within {STOP_TIMEOUT_S:.0f} s: killing it", flush=True)
                    child.proc.kill()
                    child.proc.wait()
        if self.pgid is not None:
            try:
                os.killpg(self.pgid, signal.SIGKILL)  # grandchildren, if any child left some
            except (ProcessLookupError, PermissionError):
                pass


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


def wait_until(predicate, what: str, stack: Stack, timeout: float = START_TIMEOUT_S) -> None:
    """Poll `predicate()` (with a progress line on a terminal) until true; the stack must stay up."""
    deadline = time.monotonic() + timeout
    with tqdm(desc=what, total=None, bar_format="{desc}: {elapsed}", disable=None, leave=False) as bar:
        while not predicate():
            stack.check_alive()
            if time.monotonic() > deadline:
                raise StartupFailed(f"timed out after {timeout:.0f} s: {what}")
            time.sleep(0.1)
            bar.update()


def grpc_serving(target: str) -> bool:
    try:
        return check(target, timeout_s=1.0) == "SERVING"
    except grpc.RpcError:
        return False


def redis_answers(port: int) -> bool:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


# --- demo files -----------------------------------------------------------------------------------


def demo_files(run_dir: Path, model: str | None, num_adapters: int) -> tuple[Path, Path]:
    """(model dir, adapter root): the demo model if none is given, and demo adapters shaped for it."""
    model_dir = Path(model).resolve() if model else run_dir / "demo" / "model"
    if not (model_dir / "config.json").is_file():
        if model:
            raise StartupFailed(f"--model {model}: no config.json in {model_dir}")
        print(f"writing a demo model to {model_dir}", flush=True)
        from inference_svc.demo_model import write_demo_model

        write_demo_model(model_dir)
    adapter_root = run_dir / "demo" / "adapters" / model_key(model_dir)
    missing = [
        i for i in range(num_adapters) if not (adapter_root / f"demo-{i}" / "adapter_config.json").is_file()
    ]
    if missing:
        from inference_svc.demo_model import write_demo_adapter
        from loraserve.model_summary import ModelConfig

        shape = ModelConfig.from_dir(model_dir)
        for i in tqdm(missing, desc="writing demo adapters", disable=None, leave=False):
            write_demo_adapter(adapter_root / f"demo-{i}", shape, rank=8 if i % 2 == 0 else 4, seed=i)
    return model_dir, adapter_root


def model_key(model_dir: Path) -> str:
    """A short id of the model's config.json: demo adapters and the Redis keyspace are per model."""
    return hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:10]


# --- the stack ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    door: str
    replicas: tuple[str, ...]
    manager: str
    redis_url: str
    replica_metrics: tuple[str, ...]
    manager_metrics: str
    picker: str
    picker_metrics: str
    envoy_admin: str
    http: str  # base URL of the OpenAI-compatible API through the door, ending in /v1
    replica_http: tuple[str, ...]  # each replica's own HTTP API (host:port)


def start_stack(stack: Stack, args, replica_flags: list[str]) -> tuple[Endpoints, Path, Path]:
    if shutil.which("redis-server") is None:
        raise StartupFailed("redis-server is not installed: `apt-get install redis-server` (or `make run`)")
    model_dir, adapter_root = demo_files(stack.run_dir, args.model, args.num_adapters)
    n = args.replicas
    ports = pick_ports(args.port_base, NUM_PORTS + 3 * n - 1)
    door, manager_port, redis_port, metrics_0, manager_metrics, picker, picker_metrics, admin, door_http = (
        ports[:9]
    )
    replica_ports, http_ports, more_metrics = ports[9 : 9 + n], ports[9 + n : 9 + 2 * n], ports[9 + 2 * n :]
    host = "127.0.0.1"
    ends = Endpoints(
        door=f"{host}:{door}",
        replicas=tuple(f"{host}:{p}" for p in replica_ports),
        manager=f"{host}:{manager_port}",
        redis_url=f"redis://{host}:{redis_port}/0",
        replica_metrics=tuple(f"http://{host}:{p}/metrics" for p in (metrics_0, *more_metrics)),
        manager_metrics=f"http://{host}:{manager_metrics}/metrics",
        picker=f"{host}:{picker}",
        picker_metrics=f"http://{host}:{picker_metrics}/metrics",
        envoy_admin=f"http://{host}:{admin}",
        http=f"http://{host}:{door_http}/v1",
        replica_http=tuple(f"{host}:{p}" for p in http_ports),
    )
    cluster = f"local-{model_key(model_dir)}"
    redis_dir = stack.run_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    stack.spawn(
        "redis",
        ["redis-server", "--port", str(redis_port), "--bind", host, "--dir", str(redis_dir)]
        + ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no"],
    )
    wait_until(lambda: redis_answers(redis_port), "starting redis", stack)
    stack.spawn(
        "manager",
        [sys.executable, "-m", "adapter_svc", "serve", "--redis-url", ends.redis_url]
        + ["--cluster", cluster, "--host", host, "--port", str(manager_port)]
        + ["--metrics-port", str(manager_metrics), "--adapter-root", str(adapter_root)]
        + ["--store-dir", str(stack.run_dir / "store"), "--model-config", str(model_dir)]
        + ["--shutdown-grace-s", "2"],
    )
    wait_until(lambda: grpc_serving(ends.manager), "starting the adapter manager", stack)
    for i, (address, http, metrics) in enumerate(
        zip(ends.replicas, ends.replica_http, (metrics_0, *more_metrics))
    ):
        stack.spawn(
            "inference" if n == 1 else f"inference-{i}",
            [sys.executable, "-m", "inference_svc", "serve", "--model", str(model_dir), "--host", host]
            + ["--port", address.rsplit(":", 1)[1], "--metrics-port", str(metrics)]
            + ["--http-port", http.rsplit(":", 1)[1]]
            + ["--adapter-manager", ends.manager, "--replica-id", REPLICA_ID.format(i), "--grace-s", "3"]
            + ["--adapter-cache-dir", str(stack.run_dir / f"adapter-cache-{i}"), *replica_flags],
        )
    for address in ends.replicas:
        wait_until(
            lambda a=address: grpc_serving(a), "starting the inference replicas (loading the model)", stack
        )
    start_door(stack, ends, cluster, (door, admin, picker, picker_metrics, door_http))
    return ends, model_dir, adapter_root


def start_door(stack: Stack, ends: Endpoints, cluster: str, ports: tuple[int, int, int, int, int]) -> None:
    """The endpoint picker, then Envoy in front of the replicas (gRPC and HTTP); ready when a call
    through it works. `ports`: the door's, Envoy admin's, the picker's, the picker's metrics and the
    door's HTTP API."""
    from loraserve.front_door import FrontDoorConfig, envoy_binary, render

    door_port, admin_port, picker_port, picker_metrics, http_port = ports
    http_endpoints = [f"{g}={h}" for g, h in zip(ends.replicas, ends.replica_http)]
    stack.spawn(
        "picker",
        [
            sys.executable,
            "-m",
            "endpoint_picker",
            "serve",
            "--redis-url",
            ends.redis_url,
            "--cluster",
            cluster,
        ]
        + ["--host", "127.0.0.1", "--port", str(picker_port), "--metrics-port", str(picker_metrics)]
        + [flag for pair in http_endpoints for flag in ("--http-endpoint", pair)],
    )
    wait_until(lambda: grpc_serving(ends.picker), "starting the endpoint picker", stack)
    config = FrontDoorConfig(
        host="127.0.0.1",
        port=door_port,
        admin_port=admin_port,
        replicas=ends.replicas,
        http_port=http_port,
        replica_http=ends.replica_http,
        picker=ends.picker,
        health_interval_s=HEALTH_INTERVAL_S,
    )
    path = stack.run_dir / "envoy.yaml"
    path.write_text(render(config))
    stack.spawn("envoy", [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--log-level", "warning"])
    wait_until(lambda: grpc_serving(ends.door), "starting the front door (Envoy)", stack)


def register_demo_adapters(manager: str, adapter_root: Path, count: int) -> list[str]:
    from loraserve.v1 import adapter_pb2, adapter_pb2_grpc

    names = [f"demo-{i}" for i in range(count)]
    with grpc.insecure_channel(manager) as channel:
        stub = adapter_pb2_grpc.AdapterServiceStub(channel)
        for name in tqdm(names, desc="registering demo adapters", disable=None, leave=False):
            request = adapter_pb2.RegisterAdapterRequest(adapter_id=name, path=str(adapter_root / name))
            stub.RegisterAdapter(request, timeout=60, metadata=((REQUEST_ID_HEADER, f"run-register-{name}"),))
    return names


def run_demo(door: str, adapters: list[str]) -> None:
    """Adapters and the base model at once, each on two prompts; print who served what.

    At most `max_cpu_loras` distinct adapters take part (the replica's host cache holds no more at
    a time); a request that fails is reported on its line, and the stack keeps serving.
    """
    from loraserve.v1 import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(door) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        info = stub.GetEngineInfo(inference_pb2.GetEngineInfoRequest(), timeout=30)
        mixed = adapters[: info.config.max_cpu_loras]
        asks = [
            (adapter, DEMO_PROMPTS[(i + j) % len(DEMO_PROMPTS)])
            for j in range(2)
            for i, adapter in enumerate(["", *mixed])
        ]
        print(
            f"demo: {len(asks)} requests, {len(mixed)} adapters + the base model, all in flight at once "
            f"(max_loras={info.config.max_loras}, max_cpu_loras={info.config.max_cpu_loras})"
        )

        def one(n: int) -> str:
            adapter, prompt = asks[n]
            request = inference_pb2.GenerateRequest(
                adapter_id=adapter,
                text=prompt,
                params=inference_pb2.SamplingParams(
                    max_tokens=DEMO_MAX_TOKENS, temperature=0, ignore_eos=True
                ),
            )
            began, served, text, tokens = time.perf_counter(), "", "", []
            asked = f"  asked {adapter or 'base':<8}"
            try:
                for response in stub.Generate(
                    request, timeout=120, metadata=((REQUEST_ID_HEADER, f"run-demo-{n}"),)
                ):
                    served = response.adapter_id or served
                    text += response.text
                    tokens += response.token_ids
            except grpc.RpcError as e:
                return f"{asked} failed: {e.code().name}: {e.details()}"
            readable = text.isprintable() and "\ufffd" not in text  # random demo weights make byte soup
            shown = repr(text[:32]) if text and readable else f"token ids {list(tokens[:6])}"
            return (
                f"{asked} served by {served or 'base':<8} {prompt!r:<24} -> {shown} "
                f"({len(tokens)} tokens, {time.perf_counter() - began:.2f} s)"
            )

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
            lines = list(pool.map(one, range(len(asks))))
    print("\n".join(lines))
    print(f"demo done in {time.perf_counter() - start:.2f} s")


def print_endpoints(stack: Stack, ends: Endpoints, adapters: list[str], serving: bool) -> None:
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    cli = "loraserve" if shutil.which("loraserve") else f"{sys.executable} -m entrypoints"
    adapter = adapters[1 % len(adapters)] if adapters else ""
    generate = (
        f'{{"adapter_id": "{adapter}", "text": "Hello", "params": {{"max_tokens": 8, "temperature": 0}}}}'
    )
    completion = f'{{"model": "{adapter}", "prompt": "Hello", "max_tokens": 8, "temperature": 0}}'
    chat = (
        f'{{"model": "{adapter}", "messages": [{{"role": "user", "content": "Hello"}}], '
        '"max_tokens": 8, "stream": true}'
    )
    pids = ", ".join(f"{c.name} {c.proc.pid}" for c in stack.children)
    n = len(ends.replicas)
    lines = [
        "",
        f"loraserve is up (run directory {stack.run_dir}):",
        f"  door       {ends.door:<22} loraserve.v1.InferenceService through Envoy to {n} replica(s)",
        f"  openai     {ends.http:<22} OpenAI-compatible HTTP API through the door: /models, /completions, /chat/completions",
        f"  inference  {' '.join(ends.replicas):<22} the replicas (direct), health, reflection; HTTP {' '.join(ends.replica_http)}",
        f"  manager    {ends.manager:<22} loraserve.v1.AdapterService, health, reflection",
        f"  redis      {ends.redis_url:<22} append-only file in {stack.run_dir / 'redis'}",
        f"  metrics    {ends.replica_metrics[0]} (inference)  {ends.manager_metrics} (manager)",
        f"  picker     {ends.picker:<22} endpoint picker (ext_proc), metrics {ends.picker_metrics}",
        f"  envoy      {ends.envoy_admin:<22} admin: /stats, /clusters (config {stack.run_dir / 'envoy.yaml'})",
        f"  logs       {stack.logs}/{{redis,manager,inference*,picker,envoy}}.log",
        f"  processes  {pids} (process group {stack.pgid})",
        "",
        "Try:",
        f"  {grpcurl} -plaintext -d {shlex.quote(generate)} {ends.door} loraserve.v1.InferenceService/Generate",
        f"  {grpcurl} -plaintext {ends.replicas[0]} loraserve.v1.InferenceService/ListResidentAdapters",
        f"  {grpcurl} -plaintext -d '{{\"page_size\": 10}}' {ends.manager} loraserve.v1.AdapterService/ListAdapters",
        f"  {grpcurl} -plaintext {ends.manager} loraserve.v1.AdapterService/GetClusterState",
        f"  curl -s {ends.http}/models",
        f"  curl -s {ends.http}/completions -H 'content-type: application/json' -d {shlex.quote(completion)}",
        f"  curl -sN {ends.http}/chat/completions -H 'content-type: application/json' -d {shlex.quote(chat)}",
        f"  export LORASERVE_ADAPTER_MANAGER={ends.manager} LORASERVE_REPLICA={ends.door}",
        f"  {cli} status",
        f"  {cli} generate --adapter {adapters[0] if adapters else ''} 'Hello there'",
        f"  {cli} generate --chat --system 'Answer briefly.' 'Hello there'",
        f"  {cli} events --after 0",
        "",
        "From Python, with the openai client (pip install openai):",
        *(f"  {line}" for line in openai_snippet(ends.http, adapter).splitlines()),
        "",
        "Serving until Ctrl-C." if serving else "--no-serve: shutting down.",
    ]
    print("\n".join(lines), flush=True)


def openai_snippet(base_url: str, adapter: str) -> str:
    """A few lines of Python with the official client: a completion, then a streamed chat reply."""
    return f"""from openai import OpenAI
client = OpenAI(base_url="{base_url}", api_key="unused")
print(client.completions.create(model="{adapter}", prompt="Hello", max_tokens=8).choices[0].text)
for chunk in client.chat.completions.create(
        model="{adapter}", messages=[{{"role": "user", "content": "Hello"}}], max_tokens=8, stream=True):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()"""


# --- entry point ----------------------------------------------------------------------------------


def _interrupt(signum, frame) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # one shutdown; it is bounded by STOP_TIMEOUT_S per child
    raise Interrupted(signal.Signals(signum).name)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m entrypoints.run",
        description="Run Redis, the adapter manager, inference replicas and the front door locally, with a demo.",
        epilog="Other flags (e.g. --max-loras 8, --device cuda) are passed to the inference replica.",
    )
    parser.add_argument("--model", help="model directory (default: a demo model generated into RUN_DIR/demo)")
    parser.add_argument(
        "--port-base",
        type=int,
        default=int(os.environ.get("LORASERVE_PORT_BASE", DEFAULT_PORT_BASE)),
        help="first of the ports (door, manager, redis, replica metrics, manager metrics, picker, "
        "picker metrics, envoy admin, door HTTP API, then the replicas); "
        "taken ones are skipped (env LORASERVE_PORT_BASE; default %(default)s)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=int(os.environ.get("LORASERVE_REPLICAS", 1)),
        help=f"inference replicas behind the door, 1..{MAX_REPLICAS} (env LORASERVE_REPLICAS; default %(default)s)",
    )
    parser.add_argument(
        "--run-dir", default=".run", help="logs, Redis data, demo files (default %(default)s)"
    )
    parser.add_argument(
        "--num-adapters", type=int, default=NUM_DEMO_ADAPTERS, help="demo adapters to register"
    )
    parser.add_argument("--no-serve", action="store_true", help="stop after the demo instead of serving")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, replica_flags = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress reaches a pipe (tests, `tee`) at once
    if not 1 <= args.port_base <= 65535 - NUM_PORTS:
        print(f"error: --port-base ({args.port_base}) must be in 1..{65535 - NUM_PORTS}", file=sys.stderr)
        return 2
    if not 1 <= args.replicas <= MAX_REPLICAS:
        print(f"error: --replicas ({args.replicas}) must be in 1..{MAX_REPLICAS}", file=sys.stderr)
        return 2
    if args.num_adapters < 1:
        print(f"error: --num-adapters ({args.num_adapters}) must be >= 1", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir).resolve()
    try:
        check_replica_flags(args, replica_flags)  # before anything starts
        lock = lock_run_dir(run_dir)  # noqa: F841 (held until this process ends)
    except (ValueError, RunDirBusy) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, ValueError) else 1
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    stack = Stack(run_dir)
    code = 0
    try:
        ends, _, adapter_root = start_stack(stack, args, replica_flags)
        adapters = register_demo_adapters(ends.manager, adapter_root, args.num_adapters)
        run_demo(ends.door, adapters)
        print_endpoints(stack, ends, adapters, serving=not args.no_serve)
        while not args.no_serve:
            stack.check_alive()
            time.sleep(0.5)
    except Interrupted as e:
        print(f"\n{e}: shutting down", flush=True)
    except StartupFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 1
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr, flush=True)
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        stack.stop()
    if stack.children:
        print(f"stopped: {', '.join(c.name for c in reversed(stack.children))} are down", flush=True)
    return code


def check_replica_flags(args, replica_flags: list[str]) -> None:
    """The flags meant for the replicas, parsed and turned into an engine configuration (and the
    device checked) as each replica will: ValueError with the one line to print."""
    from inference_svc.cli import build_parser, engine_config_from

    model = args.model or "demo-model"
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            parsed, unknown = build_parser().parse_known_args(["serve", "--model", model, *replica_flags])
    except SystemExit:  # argparse's usage and its one `error:` line
        reason = said.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise ValueError(
            f"{reason} (flags this command does not know go to the inference replicas)"
        ) from None
    if unknown:
        raise ValueError(
            f"unknown flags {' '.join(unknown)}: neither this command's nor a replica's (see --help)"
        )
    engine_config_from(parsed).check_runtime()


if __name__ == "__main__":
    sys.exit(main())
