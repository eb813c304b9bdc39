"""Client cancellation and deadlines free the request's KV blocks and slot reference."""

import grpc
import pytest

from harness import long_request, resources, wait_for


def test_cancelled_streams_release_kv_blocks_and_slots(served):
    start = served.on_engine(resources)
    assert start[1:] == ({}, False)
    calls = [served.stub.Generate(long_request(adapter)) for adapter in ("demo-0", "demo-1", "")]
    for call in calls:
        next(call)  # running: it holds KV blocks (and a slot reference, unless base)
    free, refcounts, busy = served.on_engine(resources)
    assert free < start[0] and refcounts == {"demo-0": 1, "demo-1": 1} and busy

    for call in calls:
        call.cancel()
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.CANCELLED
    wait_for(lambda: served.on_engine(resources) == start, "KV blocks and slot references to return")
    resident = served.on_engine(lambda engine: engine.list_resident_adapters())
    assert all(r.in_flight == 0 for r in resident)


def test_deadline_exceeded_releases_kv_blocks_and_slots(served):
    start = served.on_engine(resources)
    calls = [served.stub.Generate(long_request(adapter), timeout=0.5) for adapter in ("demo-6", "demo-7", "")]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            for _ in call:
                pass
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: served.on_engine(resources) == start, "KV blocks and slot references to return")
