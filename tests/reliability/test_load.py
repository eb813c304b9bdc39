"""Bounded load: 64 concurrent streams for a fixed time against one replica process (four tenants,
authentication and a per-tenant limit on), while an admin loads and evicts adapters in a loop.
No request may fail except by a documented limit, every completed stream must be whole, nothing may
be left allocated, and the process's memory must come back near where it started.

The figures are printed (run with -s). LORASERVE_LOAD_TEST_S sets the duration (default 20 s).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections import Counter
from pathlib import Path

import grpc

from loraserve.auth import token_metadata
from loraserve.v1 import inference_pb2, inference_pb2_grpc

from credentials import tenant_token, write_tokens
from harness import TIMEOUT_S, ServeProcess, free_port

DURATION_S = float(os.environ.get("LORASERVE_LOAD_TEST_S", "20"))
STREAMS = 64
TENANTS = ("t0", "t1", "t2", "t3")
PER_TENANT_LIMIT = 15  # 16 streams per tenant: the limit is hit now and then, by design
# Refusals the README documents for this setup; anything else fails the test.
LIMIT_MESSAGES = ("max_concurrent_per_tenant", "max_queue_len")
# The churn loop's own refusals: evicting an adapter with running requests, or every slot busy.
CHURN_REFUSALS = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Load:
    def __init__(self, address: str, admin_md, deadline: float):
        self.address, self.admin_md, self.deadline = address, admin_md, deadline
        self.latencies: list[float] = []
        self.tokens = 0
        self.refused: Counter[str] = Counter()
        self.failures: list[tuple[str, str]] = []
        self.churn: Counter[str] = Counter()

    async def stream(self, stub, tenant: str, adapters: list[str], rng: random.Random) -> None:
        metadata = token_metadata(tenant_token(tenant))
        while time.monotonic() < self.deadline:
            max_tokens = rng.randint(4, 24)
            request = inference_pb2.GenerateRequest(
                adapter_id=rng.choice([*adapters, ""]),
                token_ids=inference_pb2.TokenIds(
                    ids=[rng.randrange(3, 250) for _ in range(rng.randint(4, 32))]
                ),
                params=inference_pb2.SamplingParams(
                    max_tokens=max_tokens, temperature=0.8, seed=rng.randrange(1 << 30), ignore_eos=True
                ),
            )
            started = time.monotonic()
            try:
                responses = [r async for r in stub.Generate(request, timeout=TIMEOUT_S, metadata=metadata)]
            except grpc.aio.AioRpcError as e:
                limit = next((m for m in LIMIT_MESSAGES if m in (e.details() or "")), None)
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and limit:
                    self.refused[limit] += 1
                    await asyncio.sleep(0.2)  # a client backing off, as the message invites
                else:
                    self.failures.append((e.code().name, e.details()))
                continue
            last = responses[-1]
            generated = sum(len(r.token_ids) for r in responses)
            if last.finish_reason != inference_pb2.FINISH_REASON_LENGTH or generated != max_tokens:
                self.failures.append(("INCOMPLETE", f"{generated}/{max_tokens} tokens, {last.finish_reason}"))
            self.latencies.append(time.monotonic() - started)
            self.tokens += generated

    async def churn_loop(self, stub, adapters: list[str], rng: random.Random) -> None:
        while time.monotonic() < self.deadline:
            adapter_id = rng.choice(adapters)
            try:
                if rng.random() < 0.5:
                    request = inference_pb2.LoadAdapterRequest(
                        adapter_id=adapter_id, to_slot=rng.random() < 0.5
                    )
                    await stub.LoadAdapter(request, timeout=TIMEOUT_S, metadata=self.admin_md)
                    self.churn["loaded"] += 1
                else:
                    request = inference_pb2.EvictAdapterRequest(adapter_id=adapter_id)
                    evicted = await stub.EvictAdapter(request, timeout=TIMEOUT_S, metadata=self.admin_md)
                    self.churn["evicted" if evicted.evicted else "not resident"] += 1
            except grpc.aio.AioRpcError as e:
                if e.code() not in CHURN_REFUSALS:
                    self.failures.append(("churn " + e.code().name, e.details()))
                self.churn[e.code().name] += 1
            await asyncio.sleep(0.05)

    async def run(self, owned: dict[str, list[str]]) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            tasks = [
                self.stream(
                    stub, TENANTS[i % len(TENANTS)], owned[TENANTS[i % len(TENANTS)]], random.Random(i)
                )
                for i in range(STREAMS)
            ]
            everything = sorted(a for ids in owned.values() for a in ids)
            await asyncio.gather(*tasks, self.churn_loop(stub, everything, random.Random(-1)))


def test_64_streams_with_adapter_churn(tmp_path, model_dir, adapters):
    owned = {t: [f"ad-{2 * i}", f"ad-{2 * i + 1}"] for i, t in enumerate(TENANTS)}
    tokens = write_tokens(
        tmp_path / "tokens.json",
        adapters={a: t for t, ids in owned.items() for a in ids},
        extra_tenants=TENANTS,
    )
    port = free_port()
    args = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--grace-s", "2"]
    args += ["--lora-modules", *(f"{a}={adapters[a]}" for a in sorted(adapters))]
    args += ["--auth-tokens", str(tokens.path), "--max-concurrent-per-tenant", str(PER_TENANT_LIMIT)]
    args += ["--max-loras", "4", "--max-cpu-loras", "6", "--max-lora-rank", "8", "--max-num-seqs", "64"]
    args += [
        "--kv-cache-bytes",
        str(16 << 20),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--lora-backend",
        "torch",
    ]
    replica = ServeProcess("inference_svc", args, port, tmp_path / "replica.log")
    admin = tokens.md("admin")
    try:
        warm = Load(replica.address, admin, time.monotonic() + 1)  # every code path once, then measure
        asyncio.run(warm.run(owned))
        assert not warm.failures, warm.failures[:5]
        time.sleep(1)
        start_rss = rss_bytes(replica.pid)

        load = Load(replica.address, admin, time.monotonic() + DURATION_S)
        peak = [start_rss]

        async def with_sampling():
            async def sample():
                while time.monotonic() < load.deadline:
                    peak.append(rss_bytes(replica.pid))
                    await asyncio.sleep(0.5)

            await asyncio.gather(load.run(owned), sample())

        began = time.monotonic()
        asyncio.run(with_sampling())
        elapsed = time.monotonic() - began
        time.sleep(2)  # idle: what the load allocated and then freed
        end_rss = rss_bytes(replica.pid)

        with grpc.insecure_channel(replica.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            info = stub.GetEngineInfo(inference_pb2.GetEngineInfoRequest(), timeout=TIMEOUT_S, metadata=admin)
        occupancy = info.occupancy
        latencies = sorted(load.latencies)
        mib = 1 / 2**20
        print(
            f"\nLOAD {STREAMS} streams, {elapsed:.1f} s: {len(latencies)} requests ok "
            f"({len(latencies) / elapsed:.1f}/s), {load.tokens} tokens ({load.tokens / elapsed:.0f}/s), "
            f"latency p50 {statistics.median(latencies):.3f} s p99 {latencies[int(0.99 * len(latencies))]:.3f} s; "
            f"refused by limits {dict(load.refused)}; failures {len(load.failures)}; churn {dict(load.churn)}; "
            f"RSS start {start_rss * mib:.0f} MiB, peak {max(peak) * mib:.0f} MiB, end {end_rss * mib:.0f} MiB"
        )
        assert not load.failures, load.failures[:10]
        assert len(latencies) > STREAMS and load.churn["loaded"] > 0 and load.churn["evicted"] > 0
        assert (occupancy.running, occupancy.waiting) == (0, 0)
        assert occupancy.kv_blocks_free == occupancy.kv_blocks_total  # nothing leaked
        assert end_rss <= start_rss + max(64 << 20, start_rss // 4), (start_rss, end_rss)
    finally:
        assert replica.terminate() == 0
