"""Every refusal of the HTTP API comes from a real request, in OpenAI's JSON error shape with its
HTTP status, and the official client raises its documented exception for it; tokens, tenants and
TLS follow the gRPC rules."""

import io
import json
import logging
import ssl
import threading

import httpx2
import openai
import pytest

from loraserve.errors import unknown_adapter_message
from loraserve.security import SecurityConfig
from loraserve.telemetry import JsonFormatter
from loraserve.v1 import inference_pb2

from credentials import make_pki, write_tokens
from harness import TIMEOUT_S, start_server, wait_for
from http_clients import client

OWNERS = {"demo-0": "acme", "demo-1": "globex"}
LONG = dict(max_tokens=2000, temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return write_tokens(tmp_path_factory.mktemp("tokens") / "tokens.json", adapters=OWNERS)


@pytest.fixture(scope="module")
def secured(http_model, tokens):
    """A standalone replica with tokens, a per-tenant limit of 1 and the HTTP API."""
    overrides = {"http_port": 0, "served_model_name": "tiny", "max_concurrent_per_tenant": 1}
    server = start_server(
        *http_model, server_overrides=overrides, security=SecurityConfig(auth_tokens=str(tokens.path))
    )
    yield server
    server.close()


def refusal(call, kind: type[openai.APIStatusError], status: int) -> dict:
    """Make the call; it must raise `kind` with `status`; -> the OpenAI error object."""
    with pytest.raises(kind) as caught:
        call()
    assert caught.value.status_code == status
    error = caught.value.body
    assert set(error) == {"message", "type", "param", "code"}, error  # the client hands over body["error"]
    return error


def test_unknown_model_and_invalid_parameters(served):
    api = client(served)
    error = refusal(lambda: api.completions.create(model="nope", prompt="hi"), openai.NotFoundError, 404)
    assert error == {
        "message": unknown_adapter_message("nope"),
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    cases = [
        (lambda: api.completions.create(model="demo-0", prompt="hi", temperature=-1), "temperature"),
        (lambda: api.completions.create(model="demo-0", prompt="hi", top_p=0), "top_p"),
        (lambda: api.completions.create(model="demo-0", prompt="hi", n=2), "n"),
        (lambda: api.completions.create(model="demo-0", prompt="hi", max_tokens=0), "max_tokens"),
        (lambda: api.completions.create(model="demo-0", prompt="hi", logprobs=21), "logprobs"),
        (lambda: api.completions.create(model="demo-0", prompt=["a", "b"]), "prompt"),
        (lambda: api.completions.create(model="demo-0", prompt="hi", echo=True), "echo"),
        (lambda: api.completions.create(model="demo-0", prompt="hi", seed=-1), "seed"),
        (lambda: api.chat.completions.create(model="demo-0", messages=[]), "messages"),
        (
            lambda: api.chat.completions.create(model="demo-0", messages=[{"role": "tool", "content": "42"}]),
            "messages",  # the template's raise_exception
        ),
        (
            lambda: api.chat.completions.create(
                model="demo-0", messages=[{"role": "user", "content": "hi"}], top_logprobs=2
            ),
            "top_logprobs",
        ),
        (
            lambda: api.chat.completions.create(
                model="demo-0", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=30
            ),
            "top_logprobs",
        ),
    ]
    for call, param in cases:
        error = refusal(call, openai.BadRequestError, 400)
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param, error
        assert error["message"].startswith((param, "chat template: unknown role tool")), error
    assert served.on_engine(lambda engine: not engine.has_unfinished_requests())


def test_unknown_fields_are_ignored_and_bad_json_is_a_400(served):
    api = client(served)
    answer = api.completions.create(
        model="demo-0", prompt="hi", max_tokens=2, extra_body={"no_such_field": {"x": 1}, "metadata": "y"}
    )
    assert answer.usage.completion_tokens == 2
    raw = httpx2.post(f"{served.http_url}/completions", content=b"{not json", timeout=TIMEOUT_S)
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "body"


def test_tokens_roles_and_tenants(secured, tokens):
    prompt = dict(prompt="hi", max_tokens=2)
    no_token = httpx2.get(f"{secured.http_url}/models", timeout=TIMEOUT_S)  # the client insists on a key
    assert no_token.status_code == 401
    assert no_token.json()["error"]["message"] == "missing or invalid bearer token"
    wrong = client(secured, api_key="not-a-token")
    error = refusal(lambda: wrong.completions.create(model="tiny", **prompt), openai.AuthenticationError, 401)
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    service = client(secured, api_key=tokens.service)
    error = refusal(
        lambda: service.completions.create(model="tiny", **prompt), openai.PermissionDeniedError, 403
    )
    assert error["message"] == "role 'service' may not call Generate"

    acme = client(secured, api_key=tokens.acme)
    assert [m.id for m in acme.models.list().data] == ["tiny", "demo-0"]  # its own and the base model
    assert acme.models.list().data[1].owned_by == "acme"
    assert acme.completions.create(model="demo-0", **prompt).usage.completion_tokens == 2
    assert acme.completions.create(model="tiny", **prompt).usage.completion_tokens == 2
    for other in ("demo-1", "demo-2"):  # another tenant's, and nobody's: as if it did not exist
        error = refusal(lambda o=other: acme.completions.create(model=o, **prompt), openai.NotFoundError, 404)
        assert error["message"] == unknown_adapter_message(other)
    admin = client(secured, api_key=tokens.admin)
    assert len(admin.models.list().data) == 9
    assert admin.completions.create(model="demo-1", **prompt).usage.completion_tokens == 2


def test_per_tenant_limit_is_a_429_shared_with_grpc(secured, tokens):
    acme = client(secured, api_key=tokens.acme)
    held = acme.completions.create(model="demo-0", prompt="hi", stream=True, **LONG)
    next(iter(held))  # running: acme's one stream
    try:
        error = refusal(
            lambda: acme.completions.create(model="demo-0", prompt="hi", max_tokens=2),
            openai.RateLimitError,
            429,
        )
        assert error["message"] == (
            "tenant 'acme' already has 1 requests in flight (max_concurrent_per_tenant=1)"
        )
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        grpc_call = inference_pb2.GenerateRequest(
            adapter_id="demo-0", text="hi", params=inference_pb2.SamplingParams(max_tokens=2)
        )
        with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):  # the same counter refuses gRPC
            list(secured.stub.Generate(grpc_call, timeout=TIMEOUT_S, metadata=tokens.md("acme")))
    finally:
        held.close()
    limiter = secured.server.limiter
    wait_for(lambda: not limiter.in_flight, "the tenant's stream to be released")
    assert acme.completions.create(model="demo-0", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_draining_replica_answers_503(http_model):
    server = start_server(*http_model, server_overrides={"http_port": 0, "grace_s": 30.0})
    api = client(server)
    held = api.completions.create(model="demo-0", prompt="hi", stream=True, **LONG)
    next(iter(held))
    stopping = threading.Thread(target=lambda: server.run(server.server.stop(grace_s=30.0)), daemon=True)
    stopping.start()
    try:
        wait_for(lambda: server.server.engine.state == "draining", "the drain to begin")
        error = refusal(
            lambda: api.completions.create(model="demo-0", prompt="hi", max_tokens=2),
            openai.InternalServerError,
            503,
        )
        assert error["type"] == "service_unavailable_error"
        assert "accepts no new requests" in error["message"]
    finally:
        held.close()  # the drain ends as soon as the last stream does
        stopping.join(TIMEOUT_S)
        server.channel.close()
        server.loop.close()


def test_tls_like_grpc(http_model, tmp_path):
    pki = make_pki(tmp_path / "pki")
    security = SecurityConfig(tls_cert=str(pki.cert), tls_key=str(pki.key))
    server = start_server(*http_model, server_overrides={"http_port": 0}, security=security)
    try:
        assert server.http_url.startswith("https://")
        trusted = client(
            server, http_client=openai.DefaultHttpx2Client(verify=ssl.create_default_context(cafile=pki.ca))
        )
        assert (
            trusted.completions.create(model="demo-0", prompt="hi", max_tokens=2).usage.completion_tokens == 2
        )
        untrusted = client(
            server,
            http_client=openai.DefaultHttpx2Client(verify=ssl.create_default_context(cafile=pki.rogue_ca)),
        )
        with pytest.raises(openai.APIConnectionError):
            untrusted.models.list()
        with pytest.raises(openai.APIConnectionError):
            openai.OpenAI(
                base_url=server.http_url.replace("https://", "http://"), api_key="x", max_retries=0
            ).models.list()
    finally:
        server.close()


def test_http_requests_carry_request_ids(served):
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter("inference"))
    logger = logging.getLogger("loraserve.http")
    logger.addHandler(handler)
    logger.setLevel("INFO")
    try:
        api = client(served)
        raw = api.completions.with_raw_response.create(
            model="demo-0", prompt="hi", max_tokens=2, extra_headers={"x-request-id": "http-req-7"}
        )
        assert raw.headers["x-request-id"] == "http-req-7"
        fresh = api.completions.with_raw_response.create(model="demo-0", prompt="hi", max_tokens=2)
        assert len(fresh.headers["x-request-id"]) == 16
    finally:
        logger.removeHandler(handler)
    logged = [json.loads(line) for line in lines.getvalue().splitlines()]
    mine = next(line for line in logged if line.get("request_id") == "http-req-7")
    assert (mine["method"], mine["status"], mine["code"]) == ("POST /v1/completions", 200, "OK")
    assert any(line.get("request_id") == fresh.headers["x-request-id"] for line in logged)
