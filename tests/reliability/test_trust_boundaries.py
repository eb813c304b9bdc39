"""Issue 17's trust-boundary attacks, each done as it was found and refused now: a rogue holding a
service token impersonating a replica (items 7), the symlink race in RegisterAdapter (8), a routing
rule reaching another tenant's adapter (9), and refusals, metrics and request ids (10).

One cluster for the module: Redis, a manager with authentication and metrics, and the victim
replica `r-victim` (its own bound token). Adapters: ad-0 (acme), ad-1 and ad-2 (globex, ad-2
never loaded by anything but the attacks), all under the manager's own adapter root.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import urllib.error

import grpc
import pytest

from inference_svc import errors
from inference_svc.generation import ROUTED
from loraserve.auth import token_metadata
from loraserve.security import SecurityConfig
from loraserve.telemetry import MAX_REQUEST_ID_CHARS
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from credentials import replica_token, write_tokens
from harness import (
    TIMEOUT_S,
    ManagerHandle,
    RedisProcess,
    ReplicaHandle,
    code_of,
    free_port,
    long_request,
    manager_config,
    register,
    replica_state,
    request,
    scrape,
    truth,
    value,
    wait_for,
)

VICTIM, ROGUE = "r-victim", "r-rogue"
ROGUE_CREDENTIAL = "credential-the-rogue-chose-0123456789"
RACE_TRIES = 300


class RogueReplica(inference_pb2_grpc.InferenceServiceServicer):
    """The rogue's own InferenceService: it records the authorization the manager sends it."""

    def __init__(self):
        self.seen: list[str] = []

    async def LoadAdapter(self, request, context):
        self.seen.append(dict(context.invocation_metadata()).get("authorization", ""))
        return inference_pb2.LoadAdapterResponse(
            adapter=common_pb2.ResidentAdapter(adapter_id=request.adapter_id)
        )


@pytest.fixture(scope="module")
def cluster(loop, tmp_path_factory, model_dir, adapters):
    tmp = tmp_path_factory.mktemp("trust")
    root = tmp / "root"
    for name in ("ad-0", "ad-1", "ad-2"):
        shutil.copytree(adapters[name], root / name)
    redis_proc = RedisProcess(tmp / "redis").start()
    tokens = write_tokens(tmp / "tokens.json")
    config = manager_config(
        redis_proc.url, tmp, root, model_dir, heartbeat_interval_s=5.0, metrics_port=free_port()
    )
    manager = ManagerHandle(loop, config, SecurityConfig(auth_tokens=str(tokens.path)))
    victim = None
    try:
        admin = tokens.md("admin")
        register(manager.stub, "ad-0", root / "ad-0", call_metadata=admin, tenant="acme")
        register(manager.stub, "ad-1", root / "ad-1", call_metadata=admin, tenant="globex")
        register(manager.stub, "ad-2", root / "ad-2", call_metadata=admin, tenant="globex")
        victim = ReplicaHandle(
            loop,
            model_dir,
            manager.address,
            VICTIM,
            security=SecurityConfig(auth_tokens=str(tokens.path), service_token=replica_token(VICTIM)),
            server_overrides={"metrics_port": free_port()},
        )
        yield tokens, manager, victim, root, tmp
    finally:
        if victim is not None:
            victim.close()
        manager.close()
        redis_proc.stop()


def victim_state(manager, tokens) -> pb.ReplicaState:
    return replica_state(manager.stub, VICTIM, tokens.md("admin"))


# --- item 7: per-replica identities ------------------------------------------------------------


def test_a_service_token_acts_only_as_its_own_replica(cluster, model_dir):
    tokens, manager, victim, _, _ = cluster
    before = victim_state(manager, tokens)
    epoch = before.epoch
    engine, model_json = before.engine, (model_dir / "config.json").read_text()

    def join(replica_id: str, address: str):
        return pb.JoinReplicaRequest(
            replica_id=replica_id, address=address, engine=engine, model_config_json=model_json
        )

    attacks = {
        "JoinReplica": join(VICTIM, "127.0.0.1:1"),
        "Heartbeat": pb.HeartbeatRequest(replica_id=VICTIM, epoch=epoch),
        "ReportResidency": pb.ReportResidencyRequest(
            replica_id=VICTIM,
            epoch=epoch,
            changes=[pb.ResidencyChange(seq=1, kind=pb.RESIDENCY_CHANGE_KIND_LOADED, adapter_id="ad-2")],
        ),
        "AcquireAdapter": pb.AcquireAdapterRequest(replica_id=VICTIM, epoch=epoch, adapter_id="ad-2"),
        "LeaveReplica": pb.LeaveReplicaRequest(replica_id=VICTIM, epoch=epoch),
    }
    # The rogue's own bound token, and the unbound (read-only) service token.
    for token in (replica_token(ROGUE), tokens.service):
        for method, attack in attacks.items():
            code, details = code_of(getattr(manager.stub, method), attack, metadata=token_metadata(token))
            assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code, details)
    # Its own id is fine, but not with the victim's address: commands for the victim stay the victim's.
    code, details = code_of(
        manager.stub.JoinReplica, join(ROGUE, victim.address), metadata=token_metadata(replica_token(ROGUE))
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and VICTIM in details
    # Even the victim's own (stolen) token cannot move the live victim to another address.
    code, details = code_of(
        manager.stub.JoinReplica, join(VICTIM, "127.0.0.1:1"), metadata=token_metadata(replica_token(VICTIM))
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and "is live at" in details

    after = victim_state(manager, tokens)
    assert after.status == pb.REPLICA_STATUS_UP and after.epoch == epoch and after.address == victim.address
    assert "ad-2" not in {a.adapter_id for a in after.adapters} and list(after.loading) == []
    assert replica_state(manager.stub, ROGUE, tokens.md("admin")) is None


def test_the_manager_credential_is_useless_anywhere_but_at_its_replica(cluster, loop, model_dir):
    tokens, manager, victim, _, _ = cluster
    admin = tokens.md("admin")

    async def start_rogue():
        server = grpc.aio.server()
        servicer = RogueReplica()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, servicer, port

    server, rogue, port = loop.run(start_rogue())
    try:
        # The rogue joins as itself, at its own address, and gets a load sent its way.
        joined = manager.stub.JoinReplica(
            pb.JoinReplicaRequest(
                replica_id=ROGUE,
                address=f"127.0.0.1:{port}",
                engine=victim_state(manager, tokens).engine,
                model_config_json=(model_dir / "config.json").read_text(),
                manager_credential=ROGUE_CREDENTIAL,
            ),
            timeout=TIMEOUT_S,
            metadata=token_metadata(replica_token(ROGUE)),
        )
        assert joined.epoch >= 1
        loaded = manager.stub.LoadAdapter(
            pb.ClusterLoadAdapterRequest(adapter_id="ad-1", replica_id=ROGUE),
            timeout=TIMEOUT_S,
            metadata=admin,
        )
        assert loaded.replica_id == ROGUE
        # All the rogue receives is the credential it chose itself: no token of the manager's.
        assert rogue.seen == [f"Bearer {ROGUE_CREDENTIAL}"]
        for stolen in (ROGUE_CREDENTIAL, replica_token(ROGUE), tokens.service):
            md = token_metadata(stolen)
            for call, req in (
                (victim.stub.LoadAdapter, inference_pb2.LoadAdapterRequest(adapter_id="ad-2")),
                (victim.stub.EvictAdapter, inference_pb2.EvictAdapterRequest(adapter_id="ad-0")),
                (victim.stub.ListResidentAdapters, inference_pb2.ListResidentAdaptersRequest()),
            ):
                code, details = code_of(call, req, metadata=md)
                assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), details
        # ... while the manager's own commands to the victim carry the victim's credential and work.
        loaded = manager.stub.LoadAdapter(
            pb.ClusterLoadAdapterRequest(adapter_id="ad-0", replica_id=VICTIM),
            timeout=TIMEOUT_S,
            metadata=admin,
        )
        assert loaded.replica_id == VICTIM and "ad-0" in truth(victim.stub, admin)
        assert "ad-2" not in truth(victim.stub, admin)
    finally:
        manager.stub.LeaveReplica(
            pb.LeaveReplicaRequest(replica_id=ROGUE, epoch=joined.epoch),
            timeout=TIMEOUT_S,
            metadata=token_metadata(replica_token(ROGUE)),
        )
        loop.run(server.stop(0))


# --- item 8: open, then verify -------------------------------------------------------------------


def test_a_symlink_swapped_in_during_register_stores_nothing_from_outside(cluster, adapters):
    tokens, manager, _, root, tmp = cluster
    race = root / "race"
    shutil.copytree(root / "ad-0", race)
    weights = race / "adapter_model.safetensors"
    inside_copy = root / "inside-weights.safetensors"  # the real bytes, hard-linked back in each flip
    shutil.copyfile(weights, inside_copy)
    outside = tmp / "outside"
    outside.mkdir()
    secret = outside / "adapter_model.safetensors"  # valid weights of the same shapes, never registered
    shutil.copyfile(adapters["ad-3"] / "adapter_model.safetensors", secret)
    outside_sha = hashlib.sha256(secret.read_bytes()).hexdigest()
    inside_sha = register(manager.stub, "race-ref", race, call_metadata=tokens.md("admin")).sha256
    assert inside_sha != outside_sha

    stop = threading.Event()
    flips = [0]

    def flip():
        link, file = race / ".link", race / ".file"
        while not stop.is_set():
            os.symlink(secret, link)
            os.replace(link, weights)
            os.link(inside_copy, file)
            os.replace(file, weights)
            flips[0] += 1

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    stored, refused = [], []
    try:
        for i in range(RACE_TRIES):
            try:
                stored.append(
                    register(manager.stub, f"race-{i}", race, call_metadata=tokens.md("admin")).sha256
                )
            except grpc.RpcError as e:
                refused.append((e.code(), e.details()))
    finally:
        stop.set()
        flipper.join(TIMEOUT_S)
    print(f"symlink race: {len(stored)} stored (all inside), {len(refused)} refused, {flips[0]} flips")
    assert flips[0] > 0 and len(stored) + len(refused) == RACE_TRIES
    assert outside_sha not in stored and set(stored) <= {inside_sha}
    # Refused as a path outside the root or a link that appeared: never INTERNAL, never read.
    assert {code for code, _ in refused} <= {grpc.StatusCode.INVALID_ARGUMENT}, refused[:3]
    assert refused, "the flipper never raced a registration: the test proved nothing"
    assert not list((tmp / "store" / "blobs").glob(f"*/{outside_sha}-*"))


# --- item 9: ownership before any fetch -------------------------------------------------------


def set_rules(manager, victim, tokens, *rules: pb.RoutingRule) -> None:
    admin = tokens.md("admin")
    manager.stub.SetRoutingRules(
        pb.SetRoutingRulesRequest(rules=pb.RoutingRules(rules=rules)), timeout=TIMEOUT_S, metadata=admin
    )
    table = manager.stub.GetRoutingTable(pb.GetRoutingTableRequest(), timeout=TIMEOUT_S, metadata=admin)
    wait_for(lambda: victim.server.agent.routing.version == table.version, "the replica's routing table")


def test_a_routing_rule_cannot_fetch_another_tenants_adapter(cluster):
    tokens, manager, victim, _, _ = cluster
    acme = tokens.md("acme")
    fetches = manager.manager.catalog.fetches
    set_rules(manager, victim, tokens, pb.RoutingRule(name="misrouted", match_tenant="acme", target="ad-2"))
    try:
        code, details = code_of(victim.generate, "", metadata=acme)
        assert (code, details) == (grpc.StatusCode.NOT_FOUND, str(errors.AdapterNotFound(ROUTED)))
        assert "ad-2" not in details and "globex" not in details
        # Naming it outright: unknown, and not fetched either.
        code, details = code_of(victim.generate, "ad-2", metadata=acme)
        assert (code, details) == (grpc.StatusCode.NOT_FOUND, str(errors.AdapterNotFound("ad-2")))
    finally:
        set_rules(manager, victim, tokens)
    assert manager.manager.catalog.fetches == fetches  # FetchAdapterWeights never served it
    assert "ad-2" not in truth(victim.stub, tokens.md("admin"))
    assert "ad-2" not in {a.adapter_id for a in victim_state(manager, tokens).adapters}


# --- item 10: audit, metrics, request ids ------------------------------------------------------


def test_refusals_are_logged_and_counted_without_secrets(cluster, caplog):
    tokens, manager, victim, _, _ = cluster
    caplog.set_level(logging.WARNING, logger="loraserve.auth")
    rogue = token_metadata(replica_token(ROGUE))
    code_of(manager.stub.Heartbeat, pb.HeartbeatRequest(replica_id=VICTIM, epoch=1), metadata=rogue)
    code_of(manager.stub.RegisterAdapter, pb.RegisterAdapterRequest(adapter_id="x", path="/x"))
    code_of(victim.stub.EvictAdapter, inference_pb2.EvictAdapterRequest(adapter_id="ad-0"), metadata=rogue)
    stolen = token_metadata(ROGUE_CREDENTIAL)  # the rogue's own credential, outside its replica
    code_of(victim.stub.LoadAdapter, inference_pb2.LoadAdapterRequest(adapter_id="ad-0"), metadata=stolen)
    lines = [r.getMessage() for r in caplog.records if r.name == "loraserve.auth"]
    assert any(
        "method=Heartbeat" in line
        and "token=r-rogue" in line
        and "reason=other_replica" in line
        and "peer=" in line
        for line in lines
    ), lines
    assert any("method=RegisterAdapter" in line and "reason=no_token" in line for line in lines), lines
    assert any("method=EvictAdapter" in line and "reason=role" in line for line in lines), lines
    assert any("method=LoadAdapter" in line and "reason=unknown_token" in line for line in lines), lines
    assert not any(replica_token(ROGUE) in line or ROGUE_CREDENTIAL in line for line in lines)

    for server in (manager.server, victim.server):
        url = server.metrics_server.url
        for token in (None, tokens.acme, replica_token(ROGUE), "not-a-token-0000"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                scrape(url, token)
            assert refused.value.code == 401
        for token in (tokens.metrics, tokens.admin):
            assert scrape(url, token)
    samples = scrape(manager.server.metrics_server.url, tokens.metrics)
    name = "loraserve:manager_auth_refusals_total"
    assert value(samples, name, method="Heartbeat", reason="other_replica") >= 1
    assert value(samples, name, method="RegisterAdapter", reason="no_token") >= 1
    samples = scrape(victim.server.metrics_server.url, tokens.metrics)
    assert value(samples, "loraserve:auth_refusals_total", method="EvictAdapter", reason="role") >= 1
    assert value(samples, "loraserve:auth_refusals_total", method="LoadAdapter", reason="unknown_token") >= 1
    # Adapter ids are in the replica's metrics, which is why only these tokens read them.
    assert value(samples, "loraserve:requests_total", adapter="ad-0", finish_reason="length") >= 0


def test_request_ids_are_bounded_and_per_tenant(cluster):
    tokens, _, victim, _, _ = cluster
    acme, globex = tokens.md("acme"), tokens.md("globex")
    for bad in ("x" * (MAX_REQUEST_ID_CHARS + 1), "y" * (1 << 20), "line\nbreak", "nul\x00"):
        code, details = code_of(victim.generate, "", metadata=acme, request_id=bad)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 200, details[:200]
    longest = "z" * MAX_REQUEST_ID_CHARS
    assert victim.generate("", metadata=acme, request_id=longest)[-1].request_id == longest

    running = victim.stub.Generate(long_request("ad-0", "job-1"), timeout=TIMEOUT_S, metadata=acme)
    try:
        assert next(running).request_id == "job-1"
        # Another tenant's same id is another request: no ALREADY_EXISTS that would reveal acme's.
        done = victim.generate("", metadata=globex, request_id="job-1")
        assert done[-1].request_id == "job-1" and done[-1].finish_reason
        # Within acme the id is taken while the first runs.
        code, details = code_of(
            lambda: list(
                victim.stub.Generate(request("hi", request_id="job-1"), timeout=TIMEOUT_S, metadata=acme)
            )
        )
        assert code == grpc.StatusCode.ALREADY_EXISTS and "job-1" in details and "acme" not in details
    finally:
        running.cancel()
