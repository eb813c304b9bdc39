"""Issue 17 item 6: nothing starts open where it is exposed. Both services listen on loopback by
default and refuse to listen beyond it with authentication off unless `--insecure` (then a loud
warning); the compose stack generates its tokens and certificates (`loraserve.keygen`), serves
TLS with tokens everywhere and publishes on loopback only."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys

import grpc
import pytest
import yaml

from adapter_svc.config import ManagerConfig
from loraserve import keygen
from loraserve.auth import TokenTable, token_metadata
from loraserve.security import SecurityConfig, is_loopback
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import adapter_pb2_grpc

from harness import REPO, TIMEOUT_S, ManagerHandle, ReplicaHandle, manager_config, register

COMPOSE = REPO / "docker-compose.yml"


def test_loopback_is_the_default_for_both_services():
    assert ManagerConfig().host == "127.0.0.1"
    import argparse

    parser = argparse.ArgumentParser()
    from inference_svc.cli import add_serve_parser

    add_serve_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["serve", "--model", "m"]).host == "127.0.0.1"
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.com", ""))


@pytest.mark.parametrize(
    "argv",
    [
        [
            "-m",
            "adapter_svc",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--redis-url",
            "redis://127.0.0.1:1/0",
        ],
        ["-m", "inference_svc", "serve", "--model", "MODEL", "--host", "0.0.0.0", "--port", "0"],
    ],
    ids=["manager", "replica"],
)
def test_exposed_without_auth_is_refused_with_one_line(argv, model_dir, tmp_path):
    argv = [str(model_dir) if a == "MODEL" else a for a in argv]
    if "adapter_svc" in argv:
        argv += ["--store-dir", str(tmp_path / "adapter-store")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
    proc = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "0.0.0.0" in errors[0] and "--auth-tokens" in errors[0] and "--insecure" in errors[0]
    assert not (tmp_path / "adapter-store").exists()  # refused before anything was created


def test_insecure_warns_loudly_and_auth_alone_is_enough(
    loop, redis_proc, tmp_path, adapter_root, model_dir, caplog
):
    caplog.set_level(logging.WARNING, logger="loraserve.security")
    exposed = manager_config(redis_proc.url, tmp_path, adapter_root, model_dir, host="0.0.0.0")
    manager = ManagerHandle(loop, exposed, SecurityConfig(insecure=True))
    try:
        assert manager.health_status() == 1  # SERVING, reachable beyond loopback
    finally:
        manager.close()
    assert any("INSECURE" in r.getMessage() and "0.0.0.0" in r.getMessage() for r in caplog.records)

    caplog.clear()
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": []}))
    manager = ManagerHandle(loop, exposed, SecurityConfig(auth_tokens=str(tokens)))
    manager.close()
    messages = [r.getMessage() for r in caplog.records]
    assert not any("INSECURE" in m for m in messages)
    assert any("plaintext" in m for m in messages)  # tokens without TLS: still said


def test_insecure_is_a_flag_and_an_environment_variable():
    import argparse

    from loraserve.security import add_security_flags, security_config_from

    parser = argparse.ArgumentParser()
    add_security_flags(parser)
    assert not security_config_from(parser.parse_args([]), {}).insecure
    assert security_config_from(parser.parse_args([]), {"LORASERVE_INSECURE": "1"}).insecure
    assert security_config_from(parser.parse_args(["--insecure"]), {}).insecure


# --- generated secrets and the compose stack ------------------------------------------------


def test_keygen_writes_tokens_and_a_certificate_once(tmp_path):
    server, client = tmp_path / "server", tmp_path / "client"
    assert keygen.main(["init", "--server-dir", str(server), "--client-dir", str(client), "--replicas", "2",
                        "--tenant", "demo"]) == 0  # fmt: skip
    table = TokenTable.load(server / "tokens.json")
    admin = (client / "admin.token").read_text().strip()
    assert table.authenticate(admin).role == "admin"
    assert table.authenticate((client / "metrics.token").read_text().strip()).role == "metrics"
    assert table.authenticate((client / "tenant-demo.token").read_text().strip()).tenant == "demo"
    replica = table.authenticate((server / "tokens" / "replica-2").read_text().strip())
    assert (replica.role, replica.replica) == ("service", "replica-2")
    assert admin not in (server / "tokens.json").read_text()  # hashes only where services look
    assert not any(p.name.startswith("admin") for p in server.rglob("*"))  # the admin token stays out
    for secret in (server / "tls" / "node.key", server / "tokens" / "replica-1", client / "admin.token"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert not list(tmp_path.rglob("ca.key"))  # the CA key is never written

    before = (server / "tokens.json").read_text()
    assert keygen.main(["init", "--server-dir", str(server), "--client-dir", str(client)]) == 0
    assert (server / "tokens.json").read_text() == before  # kept

    first, held = keygen.claim(server)
    second, other = keygen.claim(server)
    assert (first, second) == ("replica-1", "replica-2")  # a live holder keeps its identity
    with pytest.raises(LookupError, match="larger --replicas"):
        keygen.claim(server)
    os.close(held)  # the holder ended (however: the kernel drops the lock)
    again, held = keygen.claim(server)
    assert again == "replica-1"
    os.close(held)
    os.close(other)


def test_as_replica_runs_the_command_as_a_free_identity_holding_its_lock(tmp_path):
    server, client = tmp_path / "server", tmp_path / "client"
    keygen.init(server, client, 2, [], keygen.DEFAULT_NAME, [])
    _, held = keygen.claim(server)  # replica-1 is taken by a live process
    # The command checks that its identity is still locked (by the descriptor it inherited).
    show = (
        "import sys, json, fcntl, os\n"
        "fd = os.open(sys.argv[-1].replace('/tokens/', '/claims/'), os.O_RDWR)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); locked = False\n"
        "except BlockingIOError:\n    locked = True\n"
        "print(json.dumps([locked, *sys.argv[1:]]))"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "loraserve.keygen", "as-replica", "--server-dir", str(server), "--",
         sys.executable, "-c", show],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    token_file = str(server / "tokens" / "replica-2")
    assert json.loads(proc.stdout) == [True, "--replica-id", "replica-2", "--service-token-file", token_file]
    assert keygen.claim(server)[0] == "replica-2"  # free again once the command ended
    os.close(held)


def test_a_stack_on_generated_secrets(loop, redis_proc, tmp_path, adapters, adapter_root, model_dir):
    """Manager and replica on keygen's certificate (named only `loraserve.internal`, so both sides
    verify by --tls-server-name) and tokens: the replica joins, the manager commands it, a client
    reaches both only with TLS and a token."""
    server, client = tmp_path / "server", tmp_path / "client"
    keygen.init(server, client, 1, [], keygen.DEFAULT_NAME, [])
    node = dict(
        auth_tokens=str(server / "tokens.json"),
        tls_cert=str(server / "tls" / "node.crt"),
        tls_key=str(server / "tls" / "node.key"),
        tls_ca=str(server / "tls" / "ca.crt"),
        tls_server_name=keygen.DEFAULT_NAME,
    )
    credentials = grpc.ssl_channel_credentials((client / "ca.crt").read_bytes())
    options = (("grpc.ssl_target_name_override", keygen.DEFAULT_NAME),)
    channel = lambda a: grpc.secure_channel(a, credentials, options=options)  # noqa: E731
    admin = token_metadata((client / "admin.token").read_text().strip())
    manager = ManagerHandle(
        loop,
        manager_config(redis_proc.url, tmp_path, adapter_root, model_dir),
        SecurityConfig(**node),
        channel,
    )
    replica = None
    replica_id, held = keygen.claim(server)
    try:
        register(manager.stub, "ad-0", adapters["ad-0"], call_metadata=admin)
        security = SecurityConfig(**node, service_token=(server / "tokens" / replica_id).read_text().strip())
        replica = ReplicaHandle(
            loop, model_dir, manager.address, replica_id, security=security, channel=channel
        )
        loaded = manager.stub.LoadAdapter(
            pb.ClusterLoadAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S, metadata=admin
        )
        assert loaded.replica_id == replica_id
        assert replica.generate("ad-0", metadata=admin)[-1].adapter_id == "ad-0"
        with grpc.insecure_channel(manager.address) as plaintext:
            stub = adapter_pb2_grpc.AdapterServiceStub(plaintext)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListAdapters(pb.ListAdaptersRequest(), timeout=5, metadata=admin)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if replica is not None:
            replica.close()
        manager.close()
        os.close(held)


def compose_config() -> dict:
    proc = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "--profile", "cpu", "--profile", "gpu", "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_compose_runs_with_tokens_and_tls_and_publishes_on_loopback_only():
    services = compose_config()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port['published']}"
            assert published.startswith("127.0.0.1:"), (name, port)
    assert "loraserve.keygen" in services["secrets"]["command"]
    assert services["adapter-svc"]["depends_on"]["secrets"]["condition"] == "service_completed_successfully"
    for name in ("adapter-svc", "inference-cpu", "inference-gpu"):
        env = services[name]["environment"]
        for key in ("LORASERVE_AUTH_TOKENS", "LORASERVE_TLS_CERT", "LORASERVE_TLS_KEY", "LORASERVE_TLS_CA"):
            assert env[key].startswith("/secrets/"), (name, key)
        assert "--tls-ca" in services[name]["healthcheck"]["test"]
        assert "LORASERVE_INSECURE" not in env
    command = " ".join(services["inference-cpu"]["command"])
    assert "loraserve.keygen as-replica" in command and "inference_svc serve" in command
