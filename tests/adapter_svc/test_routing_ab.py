"""Aliases split traffic by weight, sticky per request key; rules route by tenant and header."""

from __future__ import annotations

import math

import grpc
import pytest

from loraserve.routing import RoutingTable, Rule, pick_variant, resolve
from loraserve.v1 import adapter_pb2 as pb

from harness import TIMEOUT_S, ReplicaHandle, code_of, register

REQUESTS = 1000
SIGMAS = 4


def within_binomial(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= SIGMAS * math.sqrt(n * p * (1 - p))


def test_weighted_split_is_binomial_and_sticky():
    variants = (("v3", 0.9), ("v4", 0.1))
    keyed = [pick_variant("support-bot", variants, f"user-{i}") for i in range(REQUESTS)]
    assert within_binomial(keyed.count("v4"), REQUESTS, 0.1)
    assert keyed == [pick_variant("support-bot", variants, f"user-{i}") for i in range(REQUESTS)]
    unkeyed = [pick_variant("support-bot", variants, "") for _ in range(REQUESTS)]
    assert within_binomial(unkeyed.count("v4"), REQUESTS, 0.1)


def test_rules_first_match_wins_then_aliases():
    table = RoutingTable(
        version=1,
        aliases={"bot": (("v3", 1.0),)},
        rules=(
            Rule("beta", "v4", match_headers=(("x-experiment", "beta"),)),
            Rule("acme", "bot", match_tenant="acme"),
            Rule("legacy", "v3", match_adapter_id="old-bot"),
        ),
    )
    assert resolve(table, "", tenant="acme").adapter_id == "v3"
    assert resolve(table, "", tenant="acme", headers={"X-Experiment": "beta"}).rule == "beta"
    assert resolve(table, "old-bot") == resolve(table, "old-bot", tenant="other")
    assert resolve(table, "old-bot").adapter_id == "v3"
    assert resolve(table, "bot").alias == "bot"
    assert resolve(table, "plain").adapter_id == "plain"
    assert resolve(table, "").adapter_id == ""


@pytest.fixture
def alias(manager, adapters):
    register(manager.stub, "v3", adapters["ad-3"])
    register(manager.stub, "v4", adapters["ad-4"])
    variants = [pb.AliasVariant(adapter_id="v3", weight=90), pb.AliasVariant(adapter_id="v4", weight=10)]
    manager.stub.SetAlias(
        pb.SetAliasRequest(alias=pb.Alias(name="support-bot", variants=variants)), timeout=TIMEOUT_S
    )
    return "support-bot"


def test_alias_split_through_the_manager(manager, alias):
    def resolve_rpc(key: str) -> str:
        request = pb.ResolveAdapterRequest(adapter_id=alias, request_key=key)
        return manager.stub.ResolveAdapter(request, timeout=TIMEOUT_S).adapter_id

    first = [resolve_rpc(f"user-{i}") for i in range(REQUESTS)]
    assert set(first) == {"v3", "v4"}
    assert within_binomial(first.count("v4"), REQUESTS, 0.1)
    assert [resolve_rpc(f"user-{i}") for i in range(0, REQUESTS, 10)] == first[::10]  # sticky


def test_replicas_route_like_the_manager(loop, manager, alias, adapters, model_dir):
    register(manager.stub, "acme-ft", adapters["ad-5"])
    rules = [
        pb.RoutingRule(name="acme", match_tenant="acme", target="acme-ft"),
        pb.RoutingRule(name="beta", match_headers={"x-experiment": "beta"}, target=alias),
    ]
    manager.stub.SetRoutingRules(
        pb.SetRoutingRulesRequest(rules=pb.RoutingRules(rules=rules)), timeout=TIMEOUT_S
    )
    bad = [pb.RoutingRule(name="x", match_tenant="t", target="nowhere")]
    set_bad = pb.SetRoutingRulesRequest(rules=pb.RoutingRules(rules=bad))
    assert code_of(manager.stub.SetRoutingRules, set_bad).code == grpc.StatusCode.NOT_FOUND
    replica = ReplicaHandle(loop, model_dir, manager.address, "r1")
    try:
        for i in range(12):
            key = f"user-{i}"
            expected = manager.stub.ResolveAdapter(
                pb.ResolveAdapterRequest(adapter_id=alias, request_key=key), timeout=TIMEOUT_S
            ).adapter_id
            served = replica.generate(alias, metadata=(("x-request-key", key),))[-1].adapter_id
            assert served == expected  # the response says which adapter actually served it
        assert replica.generate("", metadata=(("x-tenant", "acme"),))[-1].adapter_id == "acme-ft"
        beta = replica.generate("", metadata=(("x-experiment", "beta"), ("x-request-key", "user-0")))
        assert beta[-1].adapter_id in ("v3", "v4")
        assert replica.generate("")[-1].adapter_id == ""  # no rule matches: the base model
    finally:
        replica.close()
