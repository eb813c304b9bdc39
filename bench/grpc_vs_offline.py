"""Throughput through gRPC with N concurrent streams versus the offline engine, same workload, one run.

    python -m bench.grpc_vs_offline                        # demo model, 32 streams over 8 adapters
    python -m bench.grpc_vs_offline --streams 32 --max-tokens 64 --repeats 3 --max-loras 4

Both sides get the same requests (prompt, adapter) with greedy decoding and `ignore_eos`, so every
request yields exactly `--max-tokens` tokens. The offline side is `LLMEngine.generate` (all requests
in one continuous batch); the gRPC side is a real `grpc.aio` server on a loopback port in this
process, and the client (every stream started at once, asyncio) is a separate process, as a
remote client would be. Runs alternate, after a warm-up; the result is the ratio of generated
tokens/s (gRPC / offline) per repeat, and the gRPC time to first token (request sent -> first
message received) at p50 and p99 over every stream. On a small machine the client competes with
the server for the same cores, so the ratio is a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc

from inference_svc.cli import add_engine_flags, engine_config_from
from inference_svc.demo_model import write_demo_adapter, write_demo_model
from inference_svc.engine import LLMEngine
from inference_svc.sampling import SamplingParams
from inference_svc.server import InferenceServer, ServerConfig
from loraserve.model_summary import ModelConfig
from loraserve.v1 import inference_pb2, inference_pb2_grpc


def workload(num: int, num_adapters: int, vocab: int, seed: int = 0) -> list[tuple[list[int], str]]:
    """(prompt token ids, adapter) per request: prompt lengths uniform in [8, 64), adapters round-robin."""
    rng = random.Random(seed)
    return [
        ([rng.randrange(vocab - 2) for _ in range(rng.randrange(8, 64))], f"demo-{i % num_adapters}")
        for i in range(num)
    ]


def run_offline(engine: LLMEngine, rows, params: SamplingParams) -> tuple[float, int]:
    start = time.perf_counter()
    done = engine.generate([p for p, _ in rows], params, [a for _, a in rows])
    return time.perf_counter() - start, sum(len(c.token_ids) for c in done)


async def grpc_streams(stub, rows, max_tokens: int) -> tuple[float, int, list[float]]:
    """All streams at once; returns (wall seconds, tokens, time to first token per stream)."""
    params = inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def stream(prompt: list[int], adapter: str) -> tuple[int, float]:
        req = inference_pb2.GenerateRequest(
            adapter_id=adapter, token_ids=inference_pb2.TokenIds(ids=prompt), params=params
        )
        sent, first, tokens = time.perf_counter(), None, 0
        async for response in stub.Generate(req, timeout=600):
            first = first or time.perf_counter()
            tokens += len(response.token_ids)
        return tokens, first - sent

    start = time.perf_counter()
    results = await asyncio.gather(*(stream(p, a) for p, a in rows))
    return time.perf_counter() - start, sum(t for t, _ in results), [ttft for _, ttft in results]


def client_process(address: str, conn) -> None:
    """The gRPC client, in its own process: runs each workload it receives, sends back the timings."""

    async def serve_jobs() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            while (job := await asyncio.to_thread(conn.recv)) is not None:
                conn.send(await grpc_streams(stub, *job))

    asyncio.run(serve_jobs())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class LoopThread:
    """An event loop on a thread, for the in-process server."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


async def _new_server(config: ServerConfig) -> InferenceServer:
    return InferenceServer(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.grpc_vs_offline", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="model directory (default: a generated demo model)")
    parser.add_argument("--json", action="store_true")
    add_engine_flags(parser)
    parser.set_defaults(max_loras=8, max_cpu_loras=8, device="cpu")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="loraserve-bench-"))
    model_dir = Path(args.model) if args.model else write_demo_model(work / "model")
    model = ModelConfig.from_dir(model_dir)
    config = engine_config_from(args)
    adapters = {
        f"demo-{i}": str(write_demo_adapter(work / f"demo-{i}", model, rank=8 * (1 + i % 2), seed=i))
        for i in range(args.adapters)
    }
    rows = workload(args.streams, args.adapters, model.vocab_size)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)

    offline = LLMEngine(model_dir, config)
    for name, path in adapters.items():
        offline.register_adapter(name, path)
    loop = LoopThread()
    server = loop.run(
        _new_server(
            ServerConfig(model=str(model_dir), engine=config, port=0, lora_modules=tuple(adapters.items()))
        )
    )
    loop.run(server.start())
    conn, child_conn = multiprocessing.Pipe()
    client = multiprocessing.get_context("spawn").Process(
        target=client_process, args=(f"127.0.0.1:{server.port}", child_conn), daemon=True
    )
    client.start()

    def run_grpc() -> tuple[float, int, list[float]]:
        conn.send((rows, args.max_tokens))
        return conn.recv()

    run_offline(offline, rows, params)  # warm-up: adapters into slots, allocator and kernels primed
    run_grpc()
    results, ttfts = [], []
    for _ in range(args.repeats):
        off_s, off_tokens = run_offline(offline, rows, params)
        rpc_s, rpc_tokens, ttft = run_grpc()
        assert off_tokens == rpc_tokens == args.streams * args.max_tokens
        ttfts += ttft
        results.append((off_tokens / off_s, rpc_tokens / rpc_s))
    conn.send(None)
    client.join()
    loop.run(server.stop(grace_s=1.0))
    loop.close()
    shutil.rmtree(work, ignore_errors=True)

    ratios = [rpc / off for off, rpc in results]
    summary = {
        "streams": args.streams,
        "adapters": args.adapters,
        "max_tokens": args.max_tokens,
        "max_loras": config.max_loras,
        "offline_tokens_per_s": [round(off, 1) for off, _ in results],
        "grpc_tokens_per_s": [round(rpc, 1) for _, rpc in results],
        "ratio_per_repeat": [round(r, 3) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1),
        "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 1),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"model {model_dir} ({model.num_parameters():,} parameters), {config.max_loras} slots")
        print(
            f"{args.streams} streams over {args.adapters} adapters, {args.max_tokens} tokens each, "
            f"{args.repeats} repeats"
        )
        for i, (off, rpc) in enumerate(results):
            print(f"  repeat {i}: offline {off:8.1f} tok/s   gRPC {rpc:8.1f} tok/s   ratio {rpc / off:.3f}")
        print(f"ratio (median): {summary['ratio_median']:.3f}")
        print(f"gRPC TTFT p50 {summary['ttft_p50_ms']} ms, p99 {summary['ttft_p99_ms']} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
