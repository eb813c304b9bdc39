"""Control-plane latency and Redis round trips at 10,000 registered adapters.

    python -m bench.control_plane                 # 10,000 adapters, 200 samples per operation
    python -m bench.control_plane --adapters 20000 --samples 500 --json

Starts a private redis-server (no persistence), an in-process adapter manager and one in-process
inference replica on a tiny model (max_cpu_loras=3, so cold loads also evict), bulk-registers the
adapters through the REGISTER script in pipelines, then times, from a gRPC client:
  - RegisterAdapter from a directory (copy, sha256, validation, one script);
  - LoadAdapter cold (the replica acquires, fetches, verifies, loads) and warm (already resident);
  - ListAdapters, 100 per page, from random positions.
Redis round trips are counted on the manager's own connections (one per command, pipeline or
script) and the commands Redis executed (scripts' inner commands included) from INFO commandstats.
Latencies include the gRPC hop on loopback; the host is shared, so read p50 over p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
import redis
import redis.asyncio.connection

from adapter_svc.config import ManagerConfig
from adapter_svc.records import record_fields
from adapter_svc.server import ManagerServer
from inference_svc.config import EngineConfig
from inference_svc.demo_model import TINY_SHAPE, write_demo_adapter, write_demo_model
from inference_svc.server import InferenceServer, ServerConfig
from loraserve.model_summary import ModelConfig
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import adapter_pb2_grpc

CLUSTER = "bench"


class CountingConnection(redis.asyncio.connection.Connection):
    """Counts what the manager sends Redis: one write per command, pipeline or script call."""

    sent = 0

    async def send_packed_command(self, command, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        await super().send_packed_command(command, check_health)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "p50_ms": round(1000 * statistics.median(ordered), 2),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
        "n": len(ordered),
    }


def commands_executed(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info",))


def measure(name: str, op, samples: int, r: redis.Redis, results: dict) -> None:
    times, trips, commands = [], [], []
    for i in range(samples):
        sent_before, executed_before = CountingConnection.sent, commands_executed(r)
        start = time.perf_counter()
        op(i)
        times.append(time.perf_counter() - start)
        trips.append(CountingConnection.sent - sent_before)
        commands.append(commands_executed(r) - executed_before)
    results[name] = {
        **percentiles(times),
        "redis_round_trips": statistics.median(trips),
        "redis_commands": statistics.median(commands),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.control_plane", description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=10_000, help="adapters registered before measuring")
    parser.add_argument("--samples", type=int, default=200, help="timed calls per operation")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="loraserve-bench-cp-"))
    port = free_port()
    redis_proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(work),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(600)

    try:
        r = redis.Redis(port=port, decode_responses=True)
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        model_dir = write_demo_model(work / "model", **TINY_SHAPE)
        model = ModelConfig.from_dir(model_dir)
        root = work / "adapters"
        dirs = [
            write_demo_adapter(root / f"src-{i}", model, rank=8, seed=i, target_modules=("q_proj", "v_proj"))
            for i in range(20)
        ]
        config = ManagerConfig(
            redis_url=f"redis://127.0.0.1:{port}/0",
            cluster=CLUSTER,
            host="127.0.0.1",
            port=0,
            adapter_roots=(str(root),),
            store_dir=str(work / "store"),
            heartbeat_interval_s=30.0,  # keeps background traffic out of the counts
        )

        async def start_manager():
            server = ManagerServer(config)
            server.redis.connection_pool.connection_class = CountingConnection
            await server.start()
            return server

        manager = run(start_manager())
        target = f"127.0.0.1:{manager.port}"
        engine = EngineConfig(
            max_loras=1, max_cpu_loras=3, max_lora_rank=8, device="cpu", dtype="float32", lora_backend="torch",
            kv_cache_bytes=1 << 20,
        )  # fmt: skip

        async def start_replica():
            server = InferenceServer(
                ServerConfig(
                    model=str(model_dir),
                    engine=engine,
                    host="127.0.0.1",
                    port=0,
                    adapter_manager=target,
                    replica_id="r1",
                )
            )
            await server.start()
            return server

        replica = run(start_replica())
        channel = grpc.insecure_channel(target)
        stub = adapter_pb2_grpc.AdapterServiceStub(channel)

        template = stub.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="template", path=str(dirs[0])))
        config_sha = r.hget(manager.registry.keys.adapter("template"), "config_sha256")
        start = time.perf_counter()
        for first in range(0, args.adapters, 1000):
            items = []
            for i in range(first, min(first + 1000, args.adapters)):
                fields = record_fields(
                    f"bulk-{i:06d}", template.source, template.sha256, config_sha, template.rank,
                    template.lora_alpha, False, tuple(template.target_modules), template.size_bytes,
                    f"tenant-{i % 10}", {},
                )  # fmt: skip
                items.append((f"bulk-{i:06d}", fields))
            run(manager.registry.register_bulk(items))
        bulk_s = time.perf_counter() - start

        results: dict = {}
        rng = random.Random(0)
        measure(
            "RegisterAdapter",
            lambda i: stub.RegisterAdapter(
                pb.RegisterAdapterRequest(adapter_id=f"new-{i}", path=str(dirs[i % 20]))
            ),
            args.samples,
            r,
            results,
        )
        cold_ids = [f"bulk-{i:06d}" for i in rng.sample(range(args.adapters), args.samples)]
        measure(
            "LoadAdapter cold",
            lambda i: stub.LoadAdapter(pb.ClusterLoadAdapterRequest(adapter_id=cold_ids[i])),
            args.samples,
            r,
            results,
        )
        measure(
            "LoadAdapter warm",
            lambda i: stub.LoadAdapter(pb.ClusterLoadAdapterRequest(adapter_id=cold_ids[-1])),
            args.samples,
            r,
            results,
        )
        cursors = [f"bulk-{rng.randrange(args.adapters):06d}" for _ in range(args.samples)]
        measure(
            "ListAdapters (100/page)",
            lambda i: stub.ListAdapters(pb.ListAdaptersRequest(page_size=100, page_token=cursors[i])),
            args.samples,
            r,
            results,
        )
        registered = r.zcard(manager.registry.keys.adapters)
        channel.close()
        run(replica.stop(grace_s=0.5))
        run(manager.stop(grace_s=0.5))
    finally:
        redis_proc.terminate()
        redis_proc.wait(30)
        loop.call_soon_threadsafe(loop.stop)

    report = {"registered_adapters": registered, "bulk_register_s": round(bulk_s, 2), "operations": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{registered} adapters registered (bulk path: {bulk_s:.2f} s for {args.adapters})")
    print(f"{'operation':<26}{'p50 ms':>9}{'p99 ms':>9}{'round trips':>13}{'redis cmds':>12}")
    for name, row in results.items():
        print(
            f"{name:<26}{row['p50_ms']:>9}{row['p99_ms']:>9}{row['redis_round_trips']:>13}{row['redis_commands']:>12}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
