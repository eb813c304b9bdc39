"""The picker resolves a request the way its replica will: the tenant of the request's token (not
a header the client sets), and an OpenAI body's `user` as the sticky key of alias draws.

Real Redis and a real manager hold the routing table; the picker's ext_proc servicer is driven
with the messages Envoy sends (request headers, then the buffered body), without Envoy: the
x-adapter-id it sets is the adapter it resolved.
"""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from endpoint_picker.extproc import ExternalProcessor
from endpoint_picker.metrics import PickerMetrics
from endpoint_picker.policy import Thresholds
from endpoint_picker.view import ClusterState
from loraserve.auth import TokenTable, hash_token
from loraserve.names import ADAPTER_HEADER, REQUEST_KEY_HEADER, TENANT_HEADER
from loraserve.v1 import adapter_pb2 as pb

from harness import CLUSTER, TIMEOUT_S, ManagerHandle, RedisProcess, manager_config, register

TOKENS = {"acme-token": "acme", "globex-token": "globex"}


@pytest.fixture(scope="module")
def routed(loop, tmp_path_factory, adapters, model_dir):
    """A manager whose routing sends tenant acme's base-model requests to ad-1 and splits alias
    `mix` over ad-2 and ad-3; the picker's view of it."""
    root = tmp_path_factory.mktemp("picker-routing")
    redis_proc = RedisProcess(root / "redis").start()
    adapter_root = next(iter(adapters.values())).parent
    manager = ManagerHandle(loop, manager_config(redis_proc.url, root, adapter_root, model_dir))
    for adapter_id in ("ad-1", "ad-2", "ad-3"):
        register(manager.stub, adapter_id, adapters[adapter_id])
    rule = pb.RoutingRule(name="acme-default", match_tenant="acme", target="ad-1")
    manager.stub.SetRoutingRules(
        pb.SetRoutingRulesRequest(rules=pb.RoutingRules(rules=[rule])), timeout=TIMEOUT_S
    )
    variants = [pb.AliasVariant(adapter_id=a, weight=1) for a in ("ad-2", "ad-3")]
    manager.stub.SetAlias(
        pb.SetAliasRequest(alias=pb.Alias(name="mix", variants=variants)), timeout=TIMEOUT_S
    )

    async def make_state():
        return ClusterState(aioredis.from_url(redis_proc.url, decode_responses=True), CLUSTER, 0.0)

    state = loop.run(make_state())
    yield loop, manager, state
    loop.run(state.client.aclose())
    manager.close()
    redis_proc.stop()


def token_table() -> TokenTable:
    entries = [{"sha256": hash_token(t), "role": "tenant", "tenant": n} for t, n in TOKENS.items()]
    return TokenTable.from_dict({"tokens": entries})


def resolved(loop, state, tokens, headers: dict[str, str], body: dict) -> dict[str, str]:
    """The headers the picker sets for one OpenAI-style request."""
    processor = ExternalProcessor(state, Thresholds(32, 4, 2), PickerMetrics(), tokens=tokens)
    header_map = base_pb2.HeaderMap(
        headers=[
            base_pb2.HeaderValue(key=k, raw_value=v.encode())
            for k, v in {":path": "/v1/completions", "content-type": "application/json", **headers}.items()
        ]
    )
    messages = [
        ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=header_map)),
        ep.ProcessingRequest(request_body=ep.HttpBody(body=json.dumps(body).encode(), end_of_stream=True)),
    ]

    async def run() -> dict[str, str]:
        async def requests():
            for m in messages:
                yield m

        out = {}
        async for response in processor.Process(requests(), None):
            if response.WhichOneof("response") == "request_body":
                for h in response.request_body.response.header_mutation.set_headers:
                    out[h.header.key] = h.header.raw_value.decode()
        return out

    return loop.run(run())


def test_the_token_names_the_tenant_not_a_header_the_client_sets(routed):
    loop, _, state = routed
    tokens = token_table()
    acme = {"authorization": "Bearer acme-token"}
    assert resolved(loop, state, tokens, acme, {"prompt": "hi"}).get(ADAPTER_HEADER) == "ad-1"
    posing = {"authorization": "Bearer globex-token", TENANT_HEADER: "acme"}
    assert ADAPTER_HEADER not in resolved(loop, state, tokens, posing, {"prompt": "hi"})
    # Without the stack's tokens (replicas without authentication) the header is the tenant.
    assert (
        resolved(loop, state, None, {TENANT_HEADER: "acme"}, {"prompt": "hi"}).get(ADAPTER_HEADER) == "ad-1"
    )


def test_an_openai_user_draws_the_alias_variant_the_replica_draws(routed):
    loop, manager, state = routed
    drawn = set()
    for user in ("u1", "u2", "u3", "u4", "u5", "u6"):
        expected = manager.stub.ResolveAdapter(
            pb.ResolveAdapterRequest(adapter_id="mix", request_key=user), timeout=TIMEOUT_S
        ).adapter_id
        sets = resolved(loop, state, None, {}, {"model": "mix", "prompt": "hi", "user": user})
        assert sets[ADAPTER_HEADER] == expected
        assert REQUEST_KEY_HEADER not in sets  # the replica draws with `user` itself
        drawn.add(expected)
    assert drawn == {"ad-2", "ad-3"}  # the six users do not all draw one variant
