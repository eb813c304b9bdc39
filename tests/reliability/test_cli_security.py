"""The `loraserve` CLI against a manager that requires tokens and TLS: refused without a token,
served with one, as one-line errors either way."""

from entrypoints.cli import main
from loraserve.security import SecurityConfig

from credentials import make_pki, tls_channel, write_tokens
from harness import ManagerHandle, manager_config, register


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_sends_its_token_over_tls(loop, redis_proc, model_dir, adapters, adapter_root, tmp_path, capsys):
    pki = make_pki(tmp_path / "pki")
    tokens = write_tokens(tmp_path / "tokens.json")
    security = SecurityConfig(auth_tokens=str(tokens.path), tls_cert=str(pki.cert), tls_key=str(pki.key))
    manager = ManagerHandle(
        loop,
        manager_config(redis_proc.url, tmp_path, adapter_root, model_dir),
        security,
        channel=lambda a: tls_channel(a, pki.ca),
    )
    try:
        register(manager.stub, "ad-0", adapters["ad-0"], call_metadata=tokens.md("admin"), tenant="acme")
        base = ["--manager", manager.address, "--tls-ca", str(pki.ca)]
        code, _, err = run(capsys, *base, "list")
        assert code == 1 and err.strip().splitlines() == [err.strip()] and "UNAUTHENTICATED" in err
        code, _, err = run(capsys, *base, "--token", "not-a-token", "list")
        assert code == 1 and "UNAUTHENTICATED" in err
        code, out, err = run(capsys, *base, "--token", tokens.admin, "list")
        assert code == 0, err
        assert "ad-0" in out
        code, _, err = run(capsys, "--manager", manager.address, "--token", tokens.admin, "list")  # no TLS
        assert code == 1 and "UNAVAILABLE" in err and "Traceback" not in err
    finally:
        manager.close()
