"""Replay a trace against a running InferenceService with real concurrency (grpc.aio).

Every request is sent at its trace arrival time on one shared channel, whatever is still in
flight, and streamed to the end; a request is never sent early and its timings start at its
arrival time, so a client that falls behind shows up as latency, not as a gentler workload.

    results = replay_trace("127.0.0.1:50051", requests)     # -> list[RequestResult]
"""

from __future__ import annotations

import asyncio
import time

import grpc

from bench.metrics import RequestResult
from bench.workload import TraceRequest
from loraserve.names import ADAPTER_HEADER
from loraserve.v1 import inference_pb2, inference_pb2_grpc

CONNECT_TIMEOUT_S = 30.0
# Channel options matching the server's limits (inference_svc/server.py).
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
)


def generate_request(r: TraceRequest) -> inference_pb2.GenerateRequest:
    """Greedy, EOS ignored: every request yields exactly `output_len` tokens on every system."""
    return inference_pb2.GenerateRequest(
        request_id=f"trace-{r.index}",
        adapter_id=r.adapter_id,
        token_ids=inference_pb2.TokenIds(ids=list(r.prompt)),
        params=inference_pb2.SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True),
    )


async def replay(
    target: str, requests: list[TraceRequest], timeout_s: float = 600.0, adapter_header: bool = False
) -> list[RequestResult]:
    """Send every request at its arrival time; results in trace order.

    A failed request is recorded with its status code in `error`, never raised. `timeout_s` is
    each call's deadline; `adapter_header` also names the adapter in the `x-adapter-id` header
    (what a front door hashing on it needs). Raises ConnectionError if nothing answers at `target`.
    """
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        try:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise ConnectionError(
                f"no InferenceService reachable at {target} within {CONNECT_TIMEOUT_S} s"
            ) from None
        start = time.perf_counter()

        async def one(r: TraceRequest) -> RequestResult:
            await asyncio.sleep(max(0.0, r.arrival_s - (time.perf_counter() - start)))
            first, tokens, error = None, 0, None
            try:
                metadata = ((ADAPTER_HEADER, r.adapter_id),) if adapter_header and r.adapter_id else ()
                async for response in stub.Generate(
                    generate_request(r), timeout=timeout_s, metadata=metadata
                ):
                    if response.token_ids and first is None:
                        first = time.perf_counter() - start
                    tokens += len(response.token_ids)
            except grpc.aio.AioRpcError as e:
                error = f"{e.code().name}: {e.details()}"
            return RequestResult(
                index=r.index,
                adapter_id=r.adapter_id,
                prompt_tokens=len(r.prompt),
                output_tokens=tokens,
                arrival_s=r.arrival_s,
                first_token_s=first,
                done_s=time.perf_counter() - start,
                error=error,
            )

        return list(await asyncio.gather(*(one(r) for r in requests)))


def replay_trace(
    target: str, requests: list[TraceRequest], timeout_s: float = 600.0, adapter_header: bool = False
) -> list[RequestResult]:
    """`replay` from synchronous code (its own event loop)."""
    return asyncio.run(replay(target, requests, timeout_s, adapter_header))


async def engine_info(target: str, timeout_s: float = 30.0) -> inference_pb2.GetEngineInfoResponse:
    """GetEngineInfo of the server at `target`."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        return await stub.GetEngineInfo(inference_pb2.GetEngineInfoRequest(), timeout=timeout_s)
