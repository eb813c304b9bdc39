"""Every admission limit refuses with its documented code and a message naming the limit, and a
refusal leaks nothing (the engine is idle and the per-tenant counts are zero afterwards)."""

from __future__ import annotations

import grpc
import pytest

from loraserve.security import SecurityConfig
from loraserve.v1 import inference_pb2

from credentials import write_tokens
from harness import TIMEOUT_S, ReplicaHandle, code_of, wait_for

LONG = dict(max_tokens=2000, temperature=0, ignore_eos=True)


def request(adapter_id: str = "", ids=(5, 6, 7, 8), **params) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        adapter_id=adapter_id,
        token_ids=inference_pb2.TokenIds(ids=list(ids)),
        params=inference_pb2.SamplingParams(**{"temperature": 0, **params}),
    )


@pytest.fixture
def tokens(tmp_path):
    return write_tokens(tmp_path / "tokens.json", adapters={"ad-0": "acme", "ad-1": "globex"})


def standalone(loop, model_dir, adapters, security, limit: int = 0, **engine) -> ReplicaHandle:
    overrides = dict(
        lora_modules=(("ad-0", str(adapters["ad-0"])), ("ad-1", str(adapters["ad-1"]))),
        max_concurrent_per_tenant=limit,
    )
    return ReplicaHandle(loop, model_dir, security=security, server_overrides=overrides, **engine)


def occupancy(server: ReplicaHandle, metadata=()):
    info = server.stub.GetEngineInfo(
        inference_pb2.GetEngineInfoRequest(), timeout=TIMEOUT_S, metadata=metadata
    )
    return info.occupancy


def test_prompt_and_output_caps_are_invalid_argument(loop, model_dir, adapters, tokens):
    security = SecurityConfig(auth_tokens=str(tokens.path))
    server = standalone(loop, model_dir, adapters, security, max_prompt_tokens=16, max_output_tokens=32)
    acme = tokens.md("acme")
    try:
        assert len(list(server.stub.Generate(request("ad-0", range(16), max_tokens=32), metadata=acme))) > 0
        code, details = code_of(
            lambda: list(server.stub.Generate(request("ad-0", range(17), max_tokens=4), metadata=acme))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == "prompt: 17 tokens exceed max_prompt_tokens (16)"
        code, details = code_of(
            lambda: list(server.stub.Generate(request("ad-0", max_tokens=33), metadata=acme))
        )
        assert (code, details) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens: 33 exceeds max_output_tokens (32)",
        )
        assert occupancy(server, tokens.md("admin")).running == 0
    finally:
        server.close()


def test_per_tenant_concurrency_and_queue_length_are_resource_exhausted(loop, model_dir, adapters, tokens):
    security = SecurityConfig(auth_tokens=str(tokens.path))
    server = standalone(loop, model_dir, adapters, security, limit=2, max_num_seqs=2, max_queue_len=2)
    admin, acme, globex = tokens.md("admin"), tokens.md("acme"), tokens.md("globex")
    calls = []
    try:
        # acme fills its quota with two running streams; a third is refused, naming the limit.
        for _ in range(2):
            calls.append(server.stub.Generate(request("ad-0", **LONG), metadata=acme))
            next(calls[-1])
        code, details = code_of(lambda: next(server.stub.Generate(request("ad-0", **LONG), metadata=acme)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == "tenant 'acme' already has 2 requests in flight (max_concurrent_per_tenant=2)"
        # globex is not held back by acme's quota: its two requests wait for a place in the batch ...
        calls += [server.stub.Generate(request("ad-1", **LONG), metadata=globex) for _ in range(2)]
        wait_for(lambda: occupancy(server, admin).waiting == 2, "two queued requests")
        # ... and fill the queue (max_queue_len=2): the next request, an admin's, is refused.
        code, details = code_of(lambda: next(server.stub.Generate(request("", **LONG), metadata=admin)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == "the waiting queue is full (max_queue_len=2)"
    finally:
        for call in calls:
            call.cancel()
    limiter = server.server.limiter
    wait_for(lambda: not limiter.in_flight and occupancy(server, admin).running == 0, "everything released")
    assert occupancy(server, admin).waiting == 0 and limiter.refused == 1
    server.close()


def test_without_authentication_the_tenant_is_the_x_tenant_header(loop, model_dir, adapters):
    server = standalone(loop, model_dir, adapters, SecurityConfig(), limit=1)
    calls = []
    try:
        calls.append(server.stub.Generate(request("ad-0", **LONG), metadata=(("x-tenant", "t1"),)))
        next(calls[-1])
        code, details = code_of(
            lambda: next(server.stub.Generate(request("ad-0", **LONG), metadata=(("x-tenant", "t1"),)))
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_per_tenant=1" in details
        assert len(list(server.stub.Generate(request("ad-0", max_tokens=2)))) > 0  # no tenant: not counted
        assert (
            len(list(server.stub.Generate(request("ad-0", max_tokens=2), metadata=(("x-tenant", "t2"),)))) > 0
        )
    finally:
        for call in calls:
            call.cancel()
        server.close()
