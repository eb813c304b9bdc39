"""Streams over HTTP: a client that disconnects mid-stream frees its KV blocks and slot reference
at once, and 32 concurrent streaming clients over 8 adapters all get their whole answers."""

import asyncio

import openai

from loraserve.v1 import inference_pb2

from harness import TIMEOUT_S, wait_for
from http_clients import client

LONG = dict(max_tokens=2000, temperature=0, extra_body={"ignore_eos": True})


def occupancy(server) -> inference_pb2.Occupancy:
    return server.stub.GetEngineInfo(inference_pb2.GetEngineInfoRequest(), timeout=TIMEOUT_S).occupancy


def kv_and_requests(server) -> tuple[int, int, int]:
    """(free KV blocks, running, waiting) from GetEngineInfo."""
    o = occupancy(server)
    return o.kv_blocks_free, o.running, o.waiting


def aborted(server, adapter: str) -> float:
    """loraserve:requests_total{adapter, finish_reason="abort"}: the engine's own count, per adapter."""
    labels = {"adapter": adapter, "finish_reason": "abort"}
    return server.server.metrics.registry.get_sample_value("loraserve:requests_total", labels) or 0.0


def test_disconnecting_mid_stream_frees_kv_blocks(served):
    before = occupancy(served)
    assert before.running == 0 and before.kv_blocks_free == before.kv_blocks_total
    idle = kv_and_requests(served)
    labels = ("demo-0", "demo-1", "__base__")
    aborts = [aborted(served, label) for label in labels]
    api = client(served)
    streams = [
        api.completions.create(model="demo-0", prompt="hello", stream=True, **LONG),
        api.chat.completions.create(
            model="demo-1", messages=[{"role": "user", "content": "hi"}], stream=True, **LONG
        ),
        api.completions.create(model="tiny", prompt=[5, 6, 7], stream=True, **LONG),
    ]
    for stream in streams:
        chunks = iter(stream)
        next(chunks), next(chunks)  # generating: it holds KV blocks (and a slot, but the base model)
    during = occupancy(served)
    assert during.running == 3 and during.kv_blocks_free < before.kv_blocks_free
    assert served.on_engine(lambda engine: dict(engine.adapters.refcount)) == {"demo-0": 1, "demo-1": 1}

    for stream in streams:
        stream.close()  # drops the connection mid-stream
    wait_for(lambda: kv_and_requests(served) == idle, "the KV blocks to be free again", timeout=10)
    assert served.on_engine(lambda engine: dict(engine.adapters.refcount)) == {}
    cut = [n + 1 for n in aborts]  # counted after the engine's batch of commands: a moment later
    wait_for(lambda: [aborted(served, label) for label in labels] == cut, "the aborts to be counted")


def test_disconnecting_before_the_first_token_cancels_too(served):
    """A non-streaming request whose client gives up is aborted, not run to its end."""
    idle = kv_and_requests(served)
    aborts = aborted(served, "demo-2")
    impatient = client(served).with_options(timeout=1.0)
    try:
        impatient.completions.create(model="demo-2", prompt="hello", **LONG)
        raise AssertionError("a 2000-token request answered within 1 s")
    except openai.APITimeoutError:
        pass
    wait_for(lambda: kv_and_requests(served) == idle, "the abandoned request to be aborted", timeout=10)
    wait_for(lambda: aborted(served, "demo-2") == aborts + 1, "the abort to be counted")


def test_32_concurrent_streams_over_8_adapters_complete_whole(served):
    max_tokens = 8

    async def one(api: openai.AsyncOpenAI, i: int) -> tuple[int, str, str | None]:
        model = f"demo-{i % 8}"
        stream = await api.completions.create(
            model=model,
            prompt=f"request {i}",
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        pieces, usage, finish = [], None, None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        return usage.completion_tokens, "".join(pieces), finish

    async def everyone():
        async with openai.AsyncOpenAI(
            base_url=served.http_url, api_key="unused", max_retries=0, timeout=TIMEOUT_S
        ) as api:
            return await asyncio.gather(*(one(api, i) for i in range(32)))

    results = asyncio.run(everyone())
    assert [(tokens, finish) for tokens, _, finish in results] == [(max_tokens, "length")] * 32
    greedy = client(served).completions.create(
        model="demo-5",
        prompt="request 13",
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert results[13][1] == greedy.choices[0].text  # each stream is the whole answer, not a mix
    assert occupancy(served).running == 0
