"""Every RPC of both services without a token, with a wrong token, with a tenant (and a service)
token where that role may not call it, and across tenants: each refused with the right code."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from inference_svc import errors
from inference_svc.generation import ROUTED
from loraserve.auth import token_metadata
from loraserve.errors import unknown_adapter_message
from loraserve.security import SecurityConfig
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import inference_pb2

from credentials import authenticated_replica, replica_token, write_tokens
from harness import (
    INFERENCE,
    MANAGER,
    TIMEOUT_S,
    ManagerHandle,
    RedisProcess,
    ReplicaHandle,
    call_method,
    code_of,
    manager_config,
    register,
    wait_for,
)

# What each non-admin role may call; everything else is PERMISSION_DENIED for it.
TENANT_MAY = {
    ("InferenceService", "Generate"),
    ("AdapterService", "GetAdapter"),
    ("AdapterService", "ListAdapters"),
}
# An unbound service token reads; the calls naming a replica need a token bound to that replica
# (tests/reliability/test_trust_boundaries.py). A replica's own methods take the manager's issued
# credential (or an admin), never a service token.
SERVICE_MAY = {
    ("AdapterService", m)
    for m in (
        "GetAdapter",
        "ListAdapters",
        "GetAlias",
        "GetRoutingTable",
        "ResolveAdapter",
        "FetchAdapterWeights",
    )
}
AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@pytest.fixture(scope="module")
def cluster(loop, tmp_path_factory, model_dir, adapters, adapter_root):
    """Redis, a manager and one managed replica, both with authentication on."""
    tmp = tmp_path_factory.mktemp("auth_matrix")
    redis_proc = RedisProcess(tmp / "redis").start()
    tokens = write_tokens(tmp / "tokens.json")
    manager = ManagerHandle(
        loop,
        manager_config(redis_proc.url, tmp, adapter_root, model_dir),
        SecurityConfig(auth_tokens=str(tokens.path)),
    )
    replica = None
    try:
        admin = tokens.md("admin")
        register(manager.stub, "ad-0", adapters["ad-0"], call_metadata=admin, tenant="acme")
        register(manager.stub, "ad-1", adapters["ad-1"], call_metadata=admin, tenant="globex")
        register(manager.stub, "ad-2", adapters["ad-2"], call_metadata=admin)  # no tenant: admins only
        replica = authenticated_replica(manager, model_dir, "r-auth", tokens)
        yield tokens, manager, replica, redis_proc
    finally:
        if replica is not None:
            replica.close()
        manager.close()
        redis_proc.stop()


def every_method():
    for service, channel_of in ((INFERENCE, "replica"), (MANAGER, "manager")):
        for method in service.methods:
            yield pytest.param(channel_of, method, id=f"{service.name}.{method.name}")


def _channel(cluster, which: str) -> grpc.Channel:
    _, manager, replica, _ = cluster
    return (replica if which == "replica" else manager).channel


@pytest.mark.parametrize(("which", "method"), list(every_method()))
def test_every_rpc_refuses_missing_wrong_and_unprivileged_tokens(cluster, which, method):
    tokens = cluster[0]
    channel = _channel(cluster, which)
    key = (method.containing_service.name, method.name)

    code, details = code_of(call_method, channel, method)
    assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
    code, _ = code_of(call_method, channel, method, metadata=token_metadata("not-a-valid-token-0000"))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = code_of(call_method, channel, method, metadata=(("authorization", "Basic YWRtaW4="),))
    assert code == grpc.StatusCode.UNAUTHENTICATED

    for role, allowed in (("acme", TENANT_MAY), ("service", SERVICE_MAY), ("metrics", set())):
        if key in allowed:
            continue
        code, details = code_of(call_method, channel, method, metadata=tokens.md(role))
        assert code == grpc.StatusCode.PERMISSION_DENIED, (role, code, details)
        assert method.name in details

    # An admin passes authentication everywhere (an empty request may still be refused on its merits).
    try:
        call_method(channel, method, metadata=tokens.md("admin"), timeout=2)
    except grpc.RpcError as e:
        assert e.code() not in AUTH_CODES, (e.code(), e.details())


def test_a_tenant_sees_its_own_adapters_and_nothing_of_others(cluster):
    tokens, manager, replica, _ = cluster
    acme, globex = tokens.md("acme"), tokens.md("globex")
    stub = manager.stub

    mine = stub.GetAdapter(pb.GetAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S, metadata=acme)
    assert mine.tenant == "acme"
    # Another tenant's adapter, one with no tenant, and one that does not exist: the same answer.
    for adapter_id in ("ad-1", "ad-2", "no-such-adapter"):
        code, details = code_of(
            stub.GetAdapter, pb.GetAdapterRequest(adapter_id=adapter_id), timeout=TIMEOUT_S, metadata=acme
        )
        assert (code, details) == (grpc.StatusCode.NOT_FOUND, unknown_adapter_message(adapter_id))

    listed = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT_S, metadata=acme)
    assert [a.adapter_id for a in listed.adapters] == ["ad-0"]
    other = stub.ListAdapters(pb.ListAdaptersRequest(tenant="globex"), timeout=TIMEOUT_S, metadata=acme)
    assert list(other.adapters) == [] and other.next_page_token == ""
    everything = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT_S, metadata=tokens.md("admin"))
    assert [a.adapter_id for a in everything.adapters] == ["ad-0", "ad-1", "ad-2"]

    # Generate: own adapter and the base model yes; anything else is "not found", before any load.
    assert replica.generate("ad-0", metadata=acme)[-1].adapter_id == "ad-0"
    assert replica.generate("", metadata=acme, max_tokens=4)[-1].usage.completion_tokens == 4
    for adapter_id in ("ad-1", "ad-2", "no-such-adapter"):
        code, details = code_of(replica.generate, adapter_id, metadata=acme)
        assert (code, details) == (grpc.StatusCode.NOT_FOUND, str(errors.AdapterNotFound(adapter_id)))
    held = {
        a.adapter_id
        for a in replica.stub.ListResidentAdapters(
            inference_pb2.ListResidentAdaptersRequest(), timeout=TIMEOUT_S, metadata=tokens.md("admin")
        ).adapters
    }
    assert "ad-1" not in held and "ad-2" not in held  # refused before anything was fetched
    assert replica.generate("ad-1", metadata=globex)[-1].adapter_id == "ad-1"
    assert replica.generate("ad-2", metadata=tokens.md("admin"))[-1].adapter_id == "ad-2"


def test_routing_cannot_be_used_to_reach_another_tenants_adapter(cluster):
    tokens, manager, replica, _ = cluster
    admin, acme, globex = tokens.md("admin"), tokens.md("acme"), tokens.md("globex")

    def set_rules(*rules: pb.RoutingRule) -> None:
        request = pb.SetRoutingRulesRequest(rules=pb.RoutingRules(rules=rules))
        manager.stub.SetRoutingRules(request, timeout=TIMEOUT_S, metadata=admin)
        table = manager.stub.GetRoutingTable(pb.GetRoutingTableRequest(), timeout=TIMEOUT_S, metadata=admin)
        wait_for(lambda: replica.server.agent.routing.version == table.version, "the replica's routing table")

    globex_rule = pb.RoutingRule(name="globex-default", match_tenant="globex", target="ad-1")
    set_rules(globex_rule)
    try:
        # The tenant header is the token's: acme cannot pose as globex to match globex's rule ...
        spoofed = replica.generate("", metadata=(*acme, ("x-tenant", "globex")))
        assert spoofed[-1].adapter_id == ""
        # ... while globex's own requests match it without sending the header at all.
        assert replica.generate("", metadata=globex)[-1].adapter_id == "ad-1"
        # A rule that would send acme to globex's adapter is refused after routing, as unknown,
        # naming only what acme asked for (the base model), never globex's adapter.
        set_rules(globex_rule, pb.RoutingRule(name="misrouted", match_tenant="acme", target="ad-1"))
        code, details = code_of(replica.generate, "", metadata=acme)
        assert (code, details) == (grpc.StatusCode.NOT_FOUND, str(errors.AdapterNotFound(ROUTED)))
        assert "ad-1" not in details
    finally:
        set_rules()


def test_health_and_reflection_stay_open(cluster):
    _, manager, replica, _ = cluster
    for channel in (manager.channel, replica.channel):
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT_S
        )
        names = {s.name for a in answers for s in a.list_services_response.service}
        assert "grpc.health.v1.Health" in names and len(names) == 3


def test_replicas_must_present_a_service_token(cluster, loop, model_dir):
    tokens, manager, _, _ = cluster
    # The manager's calls to the replica carry its service token too: a manager-driven load works.
    loaded = manager.stub.LoadAdapter(
        pb.ClusterLoadAdapterRequest(adapter_id="ad-0", replica_id="r-auth"),
        timeout=TIMEOUT_S,
        metadata=tokens.md("admin"),
    )
    assert loaded.replica_id == "r-auth"
    for token, code in (
        (None, "missing or invalid bearer token"),
        (tokens.acme, "may not call JoinReplica"),
        (tokens.service, "bound to no replica"),  # an unbound service token joins as nobody
        (replica_token("r-auth"), "acts as replica 'r-auth' only"),  # nor as another replica
    ):
        security = SecurityConfig(auth_tokens=str(tokens.path), service_token=token)
        with pytest.raises(errors.Unavailable, match=code):
            ReplicaHandle(
                loop, model_dir, manager.address, "r-intruder", security=security, join_timeout_s=0.5
            )
    cluster_state = manager.stub.GetClusterState(
        pb.GetClusterStateRequest(), timeout=TIMEOUT_S, metadata=tokens.md("admin")
    )
    assert [r.replica_id for r in cluster_state.replicas] == ["r-auth"]
