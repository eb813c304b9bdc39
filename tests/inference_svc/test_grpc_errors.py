"""Every status code of the contract, triggered by a real request; and the health service."""

import re

import grpc
import pytest
from grpc_health.v1 import health_pb2

from inference_svc import errors
from inference_svc.errors_grpc import status_for
from inference_svc.servicer import SERVICE_NAME
from loraserve import errors as shared_errors
from loraserve.v1 import inference_pb2

from harness import TIMEOUT_S, long_request, request, resources, start_server, wait_for


def status_of(call) -> grpc.RpcError:
    """The RpcError that `call()` raises."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def generate_error(served, req) -> grpc.RpcError:
    return status_of(lambda: list(served.stub.Generate(req, timeout=TIMEOUT_S)))


@pytest.fixture(scope="module")
def tight(grpc_model):
    """One running sequence, one waiting: the queue fills with two requests."""
    server = start_server(*grpc_model, max_num_seqs=1, max_queue_len=1)
    yield server
    server.close()


def test_unknown_adapter_is_not_found(served):
    e = generate_error(served, request("Hello", "no-such-adapter"))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "no-such-adapter" in e.details()
    load = inference_pb2.LoadAdapterRequest(adapter_id="no-such-adapter")
    assert status_of(lambda: served.stub.LoadAdapter(load)).code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "params, field",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),  # set to 0 (unset means 1.0)
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_k=-1), "top_k"),
        (dict(logprobs=21), "logprobs"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),  # set to 0 (unset means 1.0)
        (dict(frequency_penalty=2.5), "frequency_penalty"),
        (dict(presence_penalty=float("nan")), "presence_penalty"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[258]), "stop_token_ids"),
        (dict(max_tokens=100_000), "max_tokens"),  # prompt + max_tokens beyond max_model_len
    ],
)
def test_bad_sampling_parameter_is_invalid_argument_naming_the_field(served, params, field):
    e = generate_error(served, request("Hello", "demo-0", **params))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith(f"{field}:"), e.details()


@pytest.mark.parametrize(
    "req, field",
    [
        (request([1, 2, 258]), "token_ids"),  # outside the vocabulary (258 tokens)
        (request([]), "prompt"),
        (request(""), "prompt"),
        (inference_pb2.GenerateRequest(adapter_id="demo-0"), "prompt"),  # neither text nor ids
    ],
)
def test_bad_prompt_is_invalid_argument(served, req, field):
    e = generate_error(served, req)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith(f"{field}:"), e.details()


def test_adapter_path_outside_the_roots_is_invalid_argument(served, tmp_path):
    for path in (str(tmp_path), "relative/dir", "/etc"):
        load = inference_pb2.LoadAdapterRequest(adapter_id="elsewhere", path=path)
        e = status_of(lambda load=load: served.stub.LoadAdapter(load))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("path:")


def test_taken_ids_are_already_exists(served, grpc_model):
    _, adapters = grpc_model
    load = inference_pb2.LoadAdapterRequest(adapter_id="demo-0", path=str(adapters["demo-1"]))
    assert status_of(lambda: served.stub.LoadAdapter(load)).code() == grpc.StatusCode.ALREADY_EXISTS

    start = served.on_engine(resources)
    first = served.stub.Generate(long_request("demo-2", request_id="same-id"))
    next(first)
    e = generate_error(served, request("Hello", request_id="same-id"))
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS and "same-id" in e.details()
    first.cancel()
    wait_for(lambda: served.on_engine(resources) == start, "the first request to be aborted")


def test_full_queue_is_resource_exhausted(tight):
    running = tight.stub.Generate(long_request("demo-0"))
    next(running)  # max_num_seqs=1: the only running sequence
    waiting = tight.stub.Generate(long_request("demo-1"))
    wait_for(
        lambda: tight.on_engine(lambda engine: len(engine.scheduler.waiting)) == 1,
        "the second request to queue",
    )
    e = generate_error(tight, request("Hello", "demo-0"))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_len" in e.details()
    running.cancel()
    waiting.cancel()
    wait_for(lambda: not tight.on_engine(resources)[2], "both requests to be aborted")


def test_all_slots_pinned_is_resource_exhausted_and_pins_are_failed_precondition(tight):
    for adapter in ("demo-0", "demo-1"):  # max_loras=2
        tight.stub.LoadAdapter(inference_pb2.LoadAdapterRequest(adapter_id=adapter, to_slot=True, pin=True))
    try:
        load = inference_pb2.LoadAdapterRequest(adapter_id="demo-2", to_slot=True)
        e = status_of(lambda: tight.stub.LoadAdapter(load))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in e.details()
        e = generate_error(tight, request("Hello", "demo-2"))  # would wait for a slot forever
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in e.details()
        ok = list(tight.stub.Generate(request("Hello", "demo-0", max_tokens=2), timeout=TIMEOUT_S))
        assert ok[-1].finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED

        evict = inference_pb2.EvictAdapterRequest(adapter_id="demo-0")
        e = status_of(lambda: tight.stub.EvictAdapter(evict))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "pinned" in e.details()
    finally:
        for adapter in ("demo-0", "demo-1"):
            tight.stub.EvictAdapter(inference_pb2.EvictAdapterRequest(adapter_id=adapter, unpin=True))


def test_health_reports_serving_per_service(served):
    assert served.health_status("") == health_pb2.HealthCheckResponse.SERVING
    assert served.health_status(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        served.health_status("no.such.Service")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_draining_server_is_unavailable_and_not_serving(grpc_model):
    server = start_server(*grpc_model)
    try:
        server.run(server.server.health.enter_graceful_shutdown())
        server.run(server.server.engine.drain(timeout=0))
        assert server.health_status("") == health_pb2.HealthCheckResponse.NOT_SERVING
        e = generate_error(server, request("Hello"))
        assert e.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.close()


@pytest.mark.parametrize(
    "error, code",
    [
        (shared_errors.RankTooLarge("r=64"), grpc.StatusCode.INVALID_ARGUMENT),
        (shared_errors.PathNotAllowed("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.PromptTooLong("max_tokens", "too long"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.AdapterNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.AdapterAlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.NoEvictableSlot("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.AdapterInUse("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Draining("x"), grpc.StatusCode.UNAVAILABLE),
        (KeyError("a bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_family_maps_to_one_code(error, code):
    assert status_for(error) == code


def test_a_failing_step_is_internal_and_frees_the_request(grpc_model, caplog):
    server = start_server(*grpc_model)
    try:
        start = server.on_engine(resources)

        def broken_step():
            raise RuntimeError("injected failure")

        server.on_engine(lambda engine: setattr(engine, "run_step", broken_step))
        e = generate_error(server, request("Hello", "demo-0"))
        # the client gets a reference, never the exception's text; the log has both
        assert e.code() == grpc.StatusCode.INTERNAL and "injected failure" not in e.details()
        reference = re.search(r"reference ([0-9a-f]{12})", e.details()).group(1)
        assert "injected failure" in caplog.text and f"[ref {reference}]" in caplog.text
        server.on_engine(lambda engine: delattr(engine, "run_step"))
        assert server.on_engine(resources) == start
        ok = list(server.stub.Generate(request("Hello", "demo-0", max_tokens=2), timeout=TIMEOUT_S))
        assert ok[-1].usage.completion_tokens == 2
    finally:
        server.close()
