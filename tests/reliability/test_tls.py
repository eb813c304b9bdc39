"""TLS and mutual TLS on both services and on the replica <-> manager channels, with certificates
made here (a CA, a node certificate, and a rogue CA with its own client certificate)."""

from __future__ import annotations

import grpc
import pytest

from inference_svc import errors
from loraserve import healthcheck
from loraserve.security import SecurityConfig
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import inference_pb2, inference_pb2_grpc

from credentials import make_pki, replica_token, tls_channel, write_tokens
from harness import TIMEOUT_S, ManagerHandle, RedisProcess, ReplicaHandle, code_of, manager_config, register


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def engine_info(channel: grpc.Channel, metadata=()):
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    return stub.GetEngineInfo(inference_pb2.GetEngineInfoRequest(), timeout=5, metadata=metadata)


def test_tls_and_mutual_tls_refuse_what_they_must(loop, model_dir, pki):
    tls = SecurityConfig(tls_cert=str(pki.cert), tls_key=str(pki.key))
    server = ReplicaHandle(loop, model_dir, security=tls, channel=lambda a: tls_channel(a, pki.ca))
    try:
        assert engine_info(server.channel).config.max_loras == 2
        with grpc.insecure_channel(server.address) as plaintext:
            assert code_of(engine_info, plaintext)[0] == grpc.StatusCode.UNAVAILABLE
        with tls_channel(server.address, pki.rogue_ca) as untrusted:  # the server's CA is not trusted
            assert code_of(engine_info, untrusted)[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        server.close()

    mutual = SecurityConfig(tls_cert=str(pki.cert), tls_key=str(pki.key), tls_client_ca=str(pki.ca))
    good = lambda a: tls_channel(a, pki.ca, pki.cert, pki.key)  # noqa: E731
    server = ReplicaHandle(loop, model_dir, security=mutual, channel=good)
    try:
        assert engine_info(server.channel).config.max_loras == 2
        with tls_channel(server.address, pki.ca) as no_client_cert:
            assert code_of(engine_info, no_client_cert)[0] == grpc.StatusCode.UNAVAILABLE
        with tls_channel(server.address, pki.ca, pki.rogue_cert, pki.rogue_key) as rogue_client:
            assert code_of(engine_info, rogue_client)[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        server.close()


def test_the_healthcheck_command_speaks_tls(loop, model_dir, pki):
    """The probe Kubernetes and compose run (`python -m loraserve.healthcheck`) against a TLS
    server: SERVING with the CA (and the certificate's name when dialling an IP), refused without."""
    tls = SecurityConfig(tls_cert=str(pki.cert), tls_key=str(pki.key))
    server = ReplicaHandle(loop, model_dir, security=tls, channel=lambda a: tls_channel(a, pki.ca))
    try:
        assert healthcheck.main([server.address, "--tls-ca", str(pki.ca)]) == 0
        port = server.address.rsplit(":", 1)[1]
        named = [f"localhost:{port}", "--tls-ca", str(pki.ca), "--tls-server-name", "localhost"]
        assert healthcheck.main(named) == 0
        assert healthcheck.main([server.address, "--timeout-s", "1"]) == 1  # plaintext to a TLS port
        assert healthcheck.main([server.address, "--tls-ca", str(pki.rogue_ca), "--timeout-s", "1"]) == 1
    finally:
        server.close()


def test_a_cluster_on_mutual_tls_with_tokens(loop, tmp_path, model_dir, adapters, adapter_root, pki):
    """Manager and replica both on mutual TLS and tokens: the replica joins and fetches over it,
    the manager commands the replica over it, and clients reach both only with a certificate."""
    redis_proc = RedisProcess(tmp_path / "redis").start()
    tokens = write_tokens(tmp_path / "tokens.json")
    node = dict(tls_cert=str(pki.cert), tls_key=str(pki.key), tls_client_ca=str(pki.ca))
    security = SecurityConfig(
        auth_tokens=str(tokens.path), tls_ca=str(pki.ca), service_token=replica_token("r-tls"), **node
    )
    client = lambda a: tls_channel(a, pki.ca, pki.cert, pki.key)  # noqa: E731
    manager = ManagerHandle(
        loop, manager_config(redis_proc.url, tmp_path, adapter_root, model_dir), security, channel=client
    )
    replica = None
    try:
        register(manager.stub, "ad-0", adapters["ad-0"], call_metadata=tokens.md("admin"), tenant="acme")
        replica = ReplicaHandle(loop, model_dir, manager.address, "r-tls", security=security, channel=client)
        loaded = manager.stub.LoadAdapter(
            pb.ClusterLoadAdapterRequest(adapter_id="ad-0", to_slot=True),
            timeout=TIMEOUT_S,
            metadata=tokens.md("admin"),
        )
        assert loaded.replica_id == "r-tls" and loaded.adapter.slot == 0
        assert replica.generate("ad-0", metadata=tokens.md("acme"))[-1].adapter_id == "ad-0"
        with grpc.insecure_channel(manager.address) as plaintext:
            stub = inference_pb2_grpc.InferenceServiceStub(plaintext)
            code, _ = code_of(stub.GetEngineInfo, inference_pb2.GetEngineInfoRequest(), timeout=5)
            assert code == grpc.StatusCode.UNAVAILABLE

        # A replica that trusts the wrong CA, or calls the manager in plaintext, cannot join.
        for bad in (
            SecurityConfig(
                auth_tokens=str(tokens.path),
                tls_ca=str(pki.rogue_ca),
                service_token=replica_token("r-bad"),
                **node,
            ),
            SecurityConfig(auth_tokens=str(tokens.path), service_token=replica_token("r-bad"), **node),
        ):
            with pytest.raises(errors.Unavailable):
                ReplicaHandle(loop, model_dir, manager.address, "r-bad", security=bad, join_timeout_s=0.5)
    finally:
        if replica is not None:
            replica.close()
        manager.close()
        redis_proc.stop()
