"""Scenario 8, HTTP API vs gRPC: streaming throughput of the OpenAI-compatible API over gRPC's.

One replica in this process (`InferenceServer` with `http_port`, on a loop thread), both faces over
the same engine; the clients run in a separate process, as remote clients would, and start every
stream at once: N streams over A adapters, greedy with `ignore_eos`, so each yields exactly
`max_tokens` tokens. gRPC: a `grpc.aio` channel streaming `Generate`; HTTP: an `httpx2` client
(the transport of the `openai` package) streaming `POST /v1/completions` server-sent events with
token-id prompts, counting tokens from the usage chunk. Runs alternate (which face goes first, too)
after a warm-up of each; the
result is the ratio of generated tokens/s (HTTP / gRPC) per repeat, and the time to first token of
each face. On a small machine the client shares the cores with the server, so the ratio includes
the client's JSON parsing: a lower bound for the server's own. Each run's CPU seconds (client
process; server process, engine included) are reported too, and the ratio of tokens per CPU second,
which other load on a shared machine does not move as it moves wall-clock throughput.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import statistics
import time
from dataclasses import dataclass

import grpc

from bench import assets
from bench.grpc_vs_offline import LoopThread, grpc_streams, percentile, workload
from bench.report import Goal, ScenarioResult, Table
from inference_svc.config import EngineConfig
from inference_svc.server import InferenceServer, ServerConfig
from loraserve.model_summary import ModelConfig
from loraserve.v1 import inference_pb2_grpc

NAME = "http-vs-grpc"
TITLE = "8. OpenAI-compatible HTTP API vs gRPC: streaming throughput, same workload"
GOAL = 0.9  # issue 15: HTTP streaming tokens/s >= 0.9 x gRPC's


@dataclass(frozen=True)
class Params:
    shape: str = "256"  # bench.assets.SHAPES key (256: the demo model)
    streams: int = 32
    adapters: int = 8
    max_tokens: int = 64
    rank: int = 8
    repeats: int = 9  # short runs: the median of many steadies a shared machine's figure
    device: str = "cpu"


SMOKE = Params(shape="tiny", streams=4, adapters=2, max_tokens=4, rank=4, repeats=1)


# --- the client process -------------------------------------------------------------------------


async def _http_streams(client, url: str, rows, max_tokens: int) -> tuple[float, int, list[float]]:
    async def stream(prompt: list[int], adapter: str) -> tuple[int, float]:
        body = {
            "model": adapter,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sent, first, tokens, pending = time.perf_counter(), None, 0, b""
        async with client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for data in response.aiter_bytes():  # events split here: no per-line decoding
                *events, pending = (pending + data).split(b"\n\n")
                for event in events:
                    if event == b"data: [DONE]":
                        continue
                    chunk = json.loads(event[6:])
                    if chunk["choices"]:
                        first = first or time.perf_counter()
                    elif chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        return tokens, first - sent

    start = time.perf_counter()
    results = await asyncio.gather(*(stream(p, a) for p, a in rows))
    return time.perf_counter() - start, sum(t for t, _ in results), [ttft for _, ttft in results]


def client_process(grpc_address: str, http_url: str, conn) -> None:
    """Runs each (face, rows, max_tokens) job it receives; sends back (seconds, tokens, TTFTs, CPU s)."""
    import httpx2

    async def serve_jobs() -> None:
        limits = httpx2.Limits(max_connections=1024, max_keepalive_connections=1024)
        async with (
            grpc.aio.insecure_channel(grpc_address) as channel,
            httpx2.AsyncClient(limits=limits, timeout=600) as http,
        ):
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            while (job := await asyncio.to_thread(conn.recv)) is not None:
                face, rows, max_tokens = job
                cpu = time.process_time()
                if face == "grpc":
                    done = await grpc_streams(stub, rows, max_tokens)
                else:
                    done = await _http_streams(http, f"{http_url}/v1/completions", rows, max_tokens)
                conn.send((*done, time.process_time() - cpu))

    asyncio.run(serve_jobs())


# --- the scenario -------------------------------------------------------------------------------


async def _new_server(config: ServerConfig) -> InferenceServer:
    return InferenceServer(config)


def run(ctx, p: Params) -> ScenarioResult:
    result = ScenarioResult(NAME, TITLE)
    model_dir = assets.model(ctx.work, p.shape)
    adapters = assets.adapters(ctx.work, model_dir, p.adapters, p.rank, prefix="demo-")
    config = EngineConfig(
        max_loras=p.adapters,
        max_cpu_loras=p.adapters,
        max_lora_rank=p.rank,
        max_num_seqs=max(p.streams, 1),
        device=p.device,
        kv_cache_bytes=256 << 20,
    )
    rows = workload(p.streams, p.adapters, ModelConfig.from_dir(model_dir).vocab_size)
    server_config = ServerConfig(
        model=str(model_dir),
        engine=config,
        port=0,
        http_port=0,
        lora_modules=tuple((name, str(path)) for name, path in adapters.items()),
    )
    loop = LoopThread()
    server = loop.run(_new_server(server_config))
    loop.run(server.start())
    conn, child_conn = multiprocessing.Pipe()
    client = multiprocessing.get_context("spawn").Process(
        target=client_process, args=(f"127.0.0.1:{server.port}", server.http.url, child_conn), daemon=True
    )
    client.start()
    bar = ctx.progress(1 + p.repeats, NAME)

    def measure(face: str) -> tuple[float, int, list[float], float, float]:
        """(seconds, tokens, TTFTs, client CPU s, server CPU s: this process, engine included)."""
        cpu = time.process_time()
        conn.send((face, rows, p.max_tokens))
        return (*conn.recv(), time.process_time() - cpu)

    try:
        measure("grpc"), measure("http")  # warm-up: adapters into slots, connections open, kernels primed
        bar.update()
        runs = []
        for i in range(p.repeats):
            first, second = ("grpc", "http") if i % 2 == 0 else ("http", "grpc")  # neither always first
            measured = {first: measure(first), second: measure(second)}
            runs.append(measured)
            tokens = {face: m[1] for face, m in measured.items()}
            assert set(tokens.values()) == {p.streams * p.max_tokens}, tokens
            bar.update()
    finally:
        bar.close()
        conn.send(None)
        client.join(60)
        loop.run(server.stop(grace_s=1.0))
        loop.close()

    tps = {face: [run[face][1] / run[face][0] for run in runs] for face in ("grpc", "http")}
    ratios = [http / rpc for rpc, http in zip(tps["grpc"], tps["http"])]
    ratio = statistics.median(ratios)
    ttft = {
        face: [t for run in runs for t in run[key][2]] for face, key in (("gRPC", "grpc"), ("HTTP", "http"))
    }
    cpu = {face: [(run[face][3], run[face][4]) for run in runs] for face in ("grpc", "http")}
    result.notes.append(
        f"{p.streams} concurrent streams over {p.adapters} adapters, {p.max_tokens} tokens each, model "
        f"`{p.shape}` on {p.device}, max_loras {p.adapters}; a client process streams Generate (grpc.aio) "
        "and POST /v1/completions with SSE (httpx2), alternately (which goes first alternates too), after a "
        "warm-up of each. Ratio = HTTP "
        "tokens/s / gRPC tokens/s per repeat, median."
    )
    rows_out = [
        [
            i,
            round(rpc, 1),
            round(http, 1),
            round(http / rpc, 3),
            *(round(c, 2) for c in cpu["grpc"][i]),
            *(round(c, 2) for c in cpu["http"][i]),
        ]
        for i, (rpc, http) in enumerate(zip(tps["grpc"], tps["http"]))
    ]
    result.tables.append(
        Table(
            "Streaming throughput per repeat, and the CPU seconds each run took (client process, "
            "server process with the engine)",
            [
                "repeat",
                "gRPC tok/s",
                "HTTP tok/s",
                "HTTP / gRPC",
                "gRPC client CPU s",
                "gRPC server CPU s",
                "HTTP client CPU s",
                "HTTP server CPU s",
            ],
            rows_out,
        )
    )
    result.tables.append(
        Table(
            "Time to first token (request sent -> first message), every stream of every repeat",
            ["face", "p50 ms", "p99 ms"],
            [
                [face, round(1000 * percentile(v, 50), 1), round(1000 * percentile(v, 99), 1)]
                for face, v in ttft.items()
            ],
        )
    )
    # The same tokens per CPU second spent, which a busy machine's other load does not move.
    per_cpu = statistics.median(sum(g) / sum(h) for g, h in zip(cpu["grpc"], cpu["http"]))
    per_server_cpu = statistics.median(g[1] / h[1] for g, h in zip(cpu["grpc"], cpu["http"]))
    result.tables.append(
        Table(
            "HTTP / gRPC, medians over the repeats",
            ["tokens/s (wall)", "tokens per CPU s, client + server", "tokens per server CPU s"],
            [[round(ratio, 3), round(per_cpu, 3), round(per_server_cpu, 3)]],
        )
    )
    result.goals.append(Goal("HTTP streaming tokens/s / gRPC streaming tokens/s", ratio, GOAL))
    result.data = {
        "params": p.__dict__,
        "grpc_tokens_per_s": [round(t, 1) for t in tps["grpc"]],
        "http_tokens_per_s": [round(t, 1) for t in tps["http"]],
        "cpu_s": {face: [[round(c, 3) for c in pair] for pair in pairs] for face, pairs in cpu.items()},
        "ratio_per_repeat": [round(r, 3) for r in ratios],
        "ratio_median": round(ratio, 3),
        "per_cpu_ratio_median": round(per_cpu, 3),
        "per_server_cpu_ratio_median": round(per_server_cpu, 3),
    }
    return result
