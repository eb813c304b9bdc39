"""The token file, the policy tables and the security settings, without servers."""

from __future__ import annotations

import json
import pickle

import pytest

from loraserve import auth
from loraserve.auth import INFERENCE_POLICY, MANAGER_POLICY, TokenTable, hash_token
from loraserve.security import SecurityConfig, add_security_flags, security_config_from
from loraserve.v1 import adapter_pb2, inference_pb2


def entry(token: str, role: str, **extra) -> dict:
    return {"sha256": hash_token(token), "role": role, **extra}


def test_tokens_authenticate_by_hash_only(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(
        json.dumps(
            {
                "tokens": [
                    entry("s3cret-admin", "admin", name="ops"),
                    entry("s3cret-acme", "tenant", tenant="acme"),
                ]
            }
        )
    )
    table = TokenTable.load(path)
    assert table.authenticate("s3cret-acme") == auth.Principal("token-1", "tenant", "acme")
    assert table.authenticate("s3cret-admin").role == "admin"
    assert (
        table.authenticate("s3cret") is None
        and table.authenticate(None) is None
        and table.authenticate("") is None
    )
    # Neither stored nor compared as plain text: presenting a stored digest is refused (a table
    # that compared tokens as-is would accept it), and the loaded table holds no token.
    assert table.authenticate(hash_token("s3cret-acme")) is None
    assert table.authenticate(hash_token("s3cret-admin")) is None
    assert b"s3cret" not in pickle.dumps(table)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tokens": [{"token": "plain", "role": "admin"}]}, "holds a plain token"),
        ({"tokens": [{"sha256": "abc", "role": "admin"}]}, "64 lower-case hex"),
        ({"tokens": [entry("t", "root")]}, r"tokens\[0\]\.role \('root'\) must be one of"),
        ({"tokens": [entry("t", "tenant")]}, "exactly when role is tenant"),
        ({"tokens": [entry("t", "admin", tenant="acme")]}, "exactly when role is tenant"),
        ({"tokens": [entry("t", "admin"), entry("t", "service")]}, "repeats the hash"),
        ({"tokens": [], "adapters": {"a": 3}}, "'adapters' must map"),
        ({"token": []}, "'tokens' list"),
    ],
)
def test_a_bad_token_file_is_refused_naming_the_entry(raw, message):
    with pytest.raises(ValueError, match=message):
        TokenTable.from_dict(raw, "tokens.json")


def test_bearer_header_parsing():
    assert auth.bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert auth.bearer_token((("authorization", "bearer  abc "),)) == "abc"
    assert auth.bearer_token((("authorization", "Basic abc"),)) is None
    assert auth.bearer_token((("authorization", "Bearer "),)) is None
    assert auth.bearer_token((("x-other", "Bearer abc"),)) is None and auth.bearer_token(None) is None


@pytest.mark.parametrize(
    ("policy", "service"),
    [
        (INFERENCE_POLICY, inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]),
        (MANAGER_POLICY, adapter_pb2.DESCRIPTOR.services_by_name["AdapterService"]),
    ],
)
def test_every_rpc_has_exactly_one_rule(policy, service):
    assert policy.service == service.full_name
    assert set(policy.rules) == {m.name for m in service.methods}
    assert policy.rule(f"/{service.full_name}/NoSuchMethod") is None
    assert policy.rule(f"/other.Service/{service.methods[0].name}") is None


def test_new_token_prints_a_token_and_its_entry(capsys):
    assert auth.main(["new-token", "--role", "tenant", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out.splitlines()
    token = out[0].rsplit(" ", 1)[1]
    line = json.loads(out[1].split(": ", 1)[1])
    assert line == {"name": "acme", "role": "tenant", "sha256": hash_token(token), "tenant": "acme"}
    assert TokenTable.from_dict({"tokens": [line]}).authenticate(token).tenant == "acme"
    assert auth.main(["new-token", "--role", "tenant"]) == 2  # a tenant token needs its tenant


def test_security_settings_are_validated_and_read_from_flags_then_env(tmp_path):
    cert, key, tokens = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "t.json"
    for p in (cert, key):
        p.write_text("-")
    tokens.write_text(json.dumps({"tokens": [entry("x", "admin")]}))
    with pytest.raises(ValueError, match="go together"):
        SecurityConfig(tls_cert=str(cert))
    with pytest.raises(ValueError, match="needs tls_cert"):
        SecurityConfig(tls_client_ca=str(cert))
    with pytest.raises(ValueError, match="must be an existing file"):
        SecurityConfig(auth_tokens=str(tmp_path / "missing.json"))
    assert not SecurityConfig().auth_enabled and SecurityConfig().interceptors(INFERENCE_POLICY) == []

    import argparse

    parser = argparse.ArgumentParser()
    add_security_flags(parser)
    (tmp_path / "svc").write_text("service-token\n")
    args = parser.parse_args(["--tls-cert", str(cert), "--service-token-file", str(tmp_path / "svc")])
    environ = {
        "LORASERVE_TLS_CERT": "ignored",
        "LORASERVE_TLS_KEY": str(key),
        "LORASERVE_AUTH_TOKENS": str(tokens),
    }
    config = security_config_from(args, environ)
    assert (config.tls_cert, config.tls_key, config.service_token) == (str(cert), str(key), "service-token")
    assert config.auth_enabled and len(config.tokens) == 1
    assert "service-token" not in repr(config)
    assert security_config_from(parser.parse_args([]), {"LORASERVE_SERVICE_TOKEN": "t"}).service_token == "t"


def test_service_tokens_bind_to_one_replica_and_metrics_tokens_call_nothing():
    table = TokenTable.from_dict(
        {
            "tokens": [
                entry("r0", "service", replica="replica-0"),
                entry("svc", "service"),
                entry("prom", "metrics"),
            ]
        }
    )
    assert table.authenticate("r0") == auth.Principal("token-0", "service", "", "replica-0")
    assert table.authenticate("svc").replica == "" and table.authenticate("prom").role == "metrics"
    for raw in (
        {"tokens": [entry("t", "admin", replica="replica-0")]},
        {"tokens": [entry("t", "service", replica="bad id")]},
    ):
        with pytest.raises(ValueError, match=r"\.replica .* on a service token only"):
            TokenTable.from_dict(raw)
    for policy in (INFERENCE_POLICY, MANAGER_POLICY):
        assert not any("metrics" in rule.roles for rule in policy.rules.values())
    bound = {name for name, rule in MANAGER_POLICY.rules.items() if rule.as_replica}
    assert bound == {"JoinReplica", "Heartbeat", "ReportResidency", "LeaveReplica", "AcquireAdapter"}
    # A replica's commands come from the manager's issued credential (or an admin) only.
    assert all(
        rule.roles == {"admin", "manager"} for n, rule in INFERENCE_POLICY.rules.items() if n != "Generate"
    )


def test_issued_credentials_keep_the_latest_two_and_fall_back_to_the_table():
    table = TokenTable.from_dict({"tokens": [entry("adm", "admin")]})
    issued = auth.IssuedCredentials(table)
    assert issued.authenticate("first") is None
    for credential in ("first", "second", "third"):
        issued.issue(credential)
    assert issued.authenticate("first") is None
    assert issued.authenticate("second").role == issued.authenticate("third").role == "manager"
    assert issued.authenticate("adm").role == "admin" and issued.authenticate(None) is None


def test_new_token_binds_a_service_token_to_a_replica(capsys):
    assert auth.main(["new-token", "--role", "service", "--replica", "gpu-0"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[1].split(": ", 1)[1])
    assert (line["role"], line["replica"], line["name"]) == ("service", "gpu-0", "gpu-0")
    assert auth.main(["new-token", "--role", "admin", "--replica", "gpu-0"]) == 2


def test_metrics_need_an_admin_or_metrics_token_with_auth_on(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps(
            {"tokens": [entry("adm", "admin"), entry("prom", "metrics"), entry("t", "tenant", tenant="a")]}
        )
    )
    assert SecurityConfig().metrics_authorizer() is None
    allow = SecurityConfig(auth_tokens=str(path)).metrics_authorizer()
    assert allow("adm") and allow("prom") and not allow("t") and not allow(None) and not allow("nope")
