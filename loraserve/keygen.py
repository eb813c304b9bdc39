"""`python -m loraserve.keygen {init,as-replica}`: tokens and TLS certificates for a stack, generated
where it runs (the compose file's one-shot `secrets` service), so no deployment starts open.

    python -m loraserve.keygen init --server-dir /secrets --client-dir /client --replicas 8
    python -m loraserve.keygen as-replica --server-dir /secrets -- python -m inference_svc serve ...

`init` writes, once (an existing `tokens.json` is kept, so restarts keep their credentials):

- server dir (mounted by the services): `tokens.json` (hashes only), `tokens/replica-N` (the token
  bound to replica id `replica-N`, one per replica), `tls/ca.crt`, `tls/node.crt`, `tls/node.key`;
- client dir (for the operator, not mounted by any service): `admin.token`, `metrics.token`,
  `tenant-<name>.token`, `ca.crt`.

The node certificate carries `--name` (the name every service verifies the others by, see
`--tls-server-name`) plus `--hosts`; the CA's private key is never written, so nobody can issue
another certificate from it.

`as-replica` gives a replica container one `replica-N` identity for as long as it runs: it takes an
exclusive lock on `claims/replica-N` (the first one free), then replaces itself with the command,
adding `--replica-id replica-N --service-token-file tokens/replica-N`; the command inherits the
lock, and the kernel releases it when the process ends, however it ends, so a dead replica's
identity is free again and two live replicas never share one.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import ipaddress
import json
import os
import sys
from pathlib import Path

from loraserve.auth import hash_token, new_token
from loraserve.names import ID_RE

REPLICA_PREFIX = "replica-"
DEFAULT_NAME = "loraserve.internal"
CERT_DAYS = 825


def init(
    server: Path,
    client: Path,
    replicas: int,
    tenants: list[str],
    name: str,
    hosts: list[str],
    replica_ids: list[str] | None = None,
) -> bool:
    """Write the stack's secrets unless they exist; -> True if written now. `replica_ids` names
    the replica identities instead of replica-1..`replicas` (e.g. a StatefulSet's pod names)."""
    if (server / "tokens.json").exists():
        return False
    for directory in (server / "tokens", server / "tls", server / "claims", client):
        directory.mkdir(parents=True, exist_ok=True)
    entries = []

    def token(path: Path, **entry) -> None:
        secret = new_token()
        _write(path, secret + "\n", 0o600)
        entries.append({**entry, "sha256": hash_token(secret)})

    token(client / "admin.token", name="admin", role="admin")
    token(client / "metrics.token", name="prometheus", role="metrics")
    for tenant in tenants:
        token(client / f"tenant-{tenant}.token", name=tenant, role="tenant", tenant=tenant)
    for replica in replica_ids or [f"{REPLICA_PREFIX}{i}" for i in range(1, replicas + 1)]:
        token(server / "tokens" / replica, name=replica, role="service", replica=replica)
    ca, cert, key = _certificates(name, hosts)
    _write(server / "tls" / "ca.crt", ca, 0o644)
    _write(client / "ca.crt", ca, 0o644)
    _write(server / "tls" / "node.crt", cert, 0o644)
    _write(server / "tls" / "node.key", key, 0o600)
    _write(server / "tokens.json", json.dumps({"tokens": entries}, indent=1) + "\n", 0o644)  # last: "done"
    return True


def claim(server: Path) -> tuple[str, int]:
    """(a free replica identity, the descriptor holding its lock); the lock lasts while the
    descriptor (inheritable, so an exec'd command keeps it) stays open.

    Raises LookupError when every identity is held by a live process.
    """
    claims = server / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    names = sorted(
        (p.name for p in (server / "tokens").iterdir() if p.name.startswith(REPLICA_PREFIX)),
        key=lambda n: int(n.removeprefix(REPLICA_PREFIX)),
    )
    for replica in names:
        fd = os.open(claims / replica, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.set_inheritable(fd, True)
        return replica, fd
    raise LookupError(
        f"all {len(names)} replica identities are in use: run init with a larger --replicas "
        "(remove tokens.json first to start over)"
    )


def replica_command(server: Path, replica: str, command: list[str]) -> list[str]:
    """`command` run as `replica`: its id and token file appended."""
    return [*command, "--replica-id", replica, "--service-token-file", str(server / "tokens" / replica)]


def _write(path: Path, text: str | bytes, mode: int) -> None:
    data = text.encode() if isinstance(text, str) else text
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _certificates(name: str, hosts: list[str]) -> tuple[bytes, bytes, bytes]:
    """(CA certificate, node certificate, node key) PEM; the CA key is dropped."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loraserve stack CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = []
    for host in [name, *hosts]:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraserve.keygen", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    first = sub.add_parser("init", help="write tokens and certificates unless they exist")
    first.add_argument("--server-dir", type=Path, required=True, help="what the services mount")
    first.add_argument("--client-dir", type=Path, required=True, help="the operator's tokens and CA")
    first.add_argument("--replicas", type=int, default=8, help="replica identities (replica-1..N)")
    first.add_argument(
        "--replica-ids", default="", help="comma-separated replica ids instead of replica-1..N (pod names)"
    )
    first.add_argument("--tenant", action="append", default=[], help="a tenant token to make (repeat)")
    first.add_argument("--name", default=DEFAULT_NAME, help="the name services verify each other by")
    first.add_argument(
        "--hosts", default="localhost,127.0.0.1", help="more names/IPs in the certificate, comma-separated"
    )
    take = sub.add_parser(
        "as-replica", help="run a command as a free replica identity (locked while it runs)"
    )
    take.add_argument("--server-dir", type=Path, required=True)
    take.add_argument("command", nargs=argparse.REMAINDER, help="-- then the replica's command line")
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            if args.replicas < 1:
                raise ValueError(f"--replicas ({args.replicas}) must be >= 1")
            hosts = [h for h in args.hosts.split(",") if h]
            ids = [i for i in args.replica_ids.split(",") if i]
            for replica_id in ids:
                if not ID_RE.match(replica_id):
                    raise ValueError(f"--replica-ids: {replica_id!r} is not an id ({ID_RE.pattern})")
            written = init(
                args.server_dir, args.client_dir, args.replicas, args.tenant, args.name, hosts, ids
            )
            print(f"secrets {'written to' if written else 'kept in'} {args.server_dir} and {args.client_dir}")
        else:
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not command:
                raise ValueError("as-replica needs a command after --")
            replica, _ = claim(args.server_dir)
            print(f"running as {replica}", file=sys.stderr, flush=True)
            os.execvp(command[0], replica_command(args.server_dir, replica, command))
    except (OSError, ValueError, LookupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
