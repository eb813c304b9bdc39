"""Credentials for the security tests: token files and certificates (a CA, a node certificate, a
rogue CA), TLS client channels, and a replica that authenticates with its own token. The servers
themselves come from `harness`."""

from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from loraserve.auth import hash_token, token_metadata
from loraserve.security import SecurityConfig

from harness import ManagerHandle, ReplicaHandle

# --- tokens -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    """The plain tokens of a token file the tests wrote, by name."""

    path: Path
    admin: str = "admin-token-0123456789"
    acme: str = "acme-token-0123456789"
    globex: str = "globex-token-0123456789"
    service: str = "service-token-0123456789"

    metrics: str = "metrics-token-0123456789"

    def md(self, name: str) -> tuple:
        """Call metadata with the named token."""
        return token_metadata(getattr(self, name))


# Replica ids the security tests use: each gets a service token bound to it (`replica_token`).
REPLICAS = (
    "r-auth",
    "r-tls",
    "r-bad",
    "r-intruder",
    "r-corpus",
    "r-rogue",
    "r-victim",
    "r-http",
    "r-hard",
    "r-watch",
)


def write_tokens(
    path: Path, adapters: dict[str, str] | None = None, extra_tenants=(), replicas=REPLICAS
) -> Tokens:
    """A token file with an admin, tenants acme and globex (plus `extra_tenants`), an unbound
    (read-only) service token, a service token bound to each of `replicas`, and a metrics token."""
    tokens = Tokens(path)
    entries = [
        {"name": "ops", "role": "admin", "sha256": hash_token(tokens.admin)},
        {"name": "acme", "role": "tenant", "tenant": "acme", "sha256": hash_token(tokens.acme)},
        {"name": "globex", "role": "tenant", "tenant": "globex", "sha256": hash_token(tokens.globex)},
        {"name": "replicas", "role": "service", "sha256": hash_token(tokens.service)},
        {"name": "prometheus", "role": "metrics", "sha256": hash_token(tokens.metrics)},
    ]
    for tenant in extra_tenants:
        entries.append({"role": "tenant", "tenant": tenant, "sha256": hash_token(tenant_token(tenant))})
    for replica in replicas:
        entries.append(
            {
                "name": replica,
                "role": "service",
                "replica": replica,
                "sha256": hash_token(replica_token(replica)),
            }
        )
    path.write_text(json.dumps({"tokens": entries, "adapters": adapters or {}}))
    return tokens


def tenant_token(tenant: str) -> str:
    return f"{tenant}-token-0123456789"


def replica_token(replica_id: str) -> str:
    """The service token bound to `replica_id` (see `write_tokens`)."""
    return f"{replica_id}-replica-token-0123456789"


def authenticated_replica(
    manager: ManagerHandle, model_dir: Path, replica_id: str, tokens: Tokens, **kwargs
) -> ReplicaHandle:
    """A replica joined to `manager` with authentication on: it checks its callers against
    `tokens`' file and calls the manager with the service token bound to `replica_id`; `kwargs`
    are further ReplicaHandle arguments."""
    security = SecurityConfig(auth_tokens=str(tokens.path), service_token=replica_token(replica_id))
    return ReplicaHandle(manager.loop, model_dir, manager.address, replica_id, security=security, **kwargs)


# --- certificates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a certificate for 127.0.0.1/localhost it signed (server and client use),
    and a rogue CA with a client certificate of its own."""

    ca: Path
    cert: Path
    key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key, cert) -> tuple[Path, Path]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path.with_suffix(".crt"), path.with_suffix(".key")


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(cn: str, ca_key, ca_cert):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("loraserve test CA")
    ca, _ = _write(directory / "ca", ca_key, ca_cert)
    cert, key = _write(directory / "node", *_leaf("loraserve node", ca_key, ca_cert))
    rogue_key, rogue_ca_cert = _ca("rogue CA")
    rogue_ca, _ = _write(directory / "rogue-ca", rogue_key, rogue_ca_cert)
    rogue_cert, rogue_leaf_key = _write(directory / "rogue", *_leaf("rogue", rogue_key, rogue_ca_cert))
    return Pki(ca, cert, key, rogue_ca, rogue_cert, rogue_leaf_key)


def tls_channel(address: str, ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(address, credentials)
