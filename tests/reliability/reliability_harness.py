"""What the reliability and security tests share: tokens, certificates, servers with security on.

Builds on `manager_harness` (Redis, the event-loop thread, processes) and `grpc_harness`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import message_factory
from manager_harness import TIMEOUT_S, LoopThread, ReplicaHandle, _Process, engine_config

from adapter_svc.config import ManagerConfig
from adapter_svc.server import ManagerServer
from inference_svc.server import InferenceServer, ServerConfig
from loraserve.auth import hash_token, token_metadata
from loraserve.security import SecurityConfig
from loraserve.v1 import adapter_pb2, adapter_pb2_grpc, inference_pb2, inference_pb2_grpc

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
MANAGER = adapter_pb2.DESCRIPTOR.services_by_name["AdapterService"]


# --- tokens -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    """The plain tokens of a token file the tests wrote, by name."""

    path: Path
    admin: str = "admin-token-0123456789"
    acme: str = "acme-token-0123456789"
    globex: str = "globex-token-0123456789"
    service: str = "service-token-0123456789"

    def md(self, name: str) -> tuple:
        """Call metadata with the named token."""
        return token_metadata(getattr(self, name))


def write_tokens(path: Path, adapters: dict[str, str] | None = None, extra_tenants=()) -> Tokens:
    """A token file with an admin, tenants acme and globex (plus `extra_tenants`), and a service."""
    tokens = Tokens(path)
    entries = [
        {"name": "ops", "role": "admin", "sha256": hash_token(tokens.admin)},
        {"name": "acme", "role": "tenant", "tenant": "acme", "sha256": hash_token(tokens.acme)},
        {"name": "globex", "role": "tenant", "tenant": "globex", "sha256": hash_token(tokens.globex)},
        {"name": "replicas", "role": "service", "sha256": hash_token(tokens.service)},
    ]
    for tenant in extra_tenants:
        entries.append({"role": "tenant", "tenant": tenant, "sha256": hash_token(tenant_token(tenant))})
    path.write_text(json.dumps({"tokens": entries, "adapters": adapters or {}}))
    return tokens


def tenant_token(tenant: str) -> str:
    return f"{tenant}-token-0123456789"


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


# --- in-process servers with security ------------------------------------------------------------


async def _create(cls, config, security):
    return cls(config, security)  # grpc.aio servers bind to the loop they are created on


class SecureManager:
    """An in-process ManagerServer with `security`; `channel` is plaintext or TLS as given."""

    def __init__(self, loop: LoopThread, config: ManagerConfig, security: SecurityConfig, channel=None):
        self.loop = loop
        self.server: ManagerServer = loop.run(_create(ManagerServer, config, security))
        loop.run(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = channel(self.address) if channel else grpc.insecure_channel(self.address)
        self.stub = adapter_pb2_grpc.AdapterServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.loop.run(self.server.stop(grace_s=0.5))


class SecureReplica(ReplicaHandle):
    """An in-process inference server with `security` (managed when `manager_address` is set)."""

    def __init__(
        self,
        loop: LoopThread,
        model_dir: Path,
        security: SecurityConfig,
        manager_address: str | None = None,
        replica_id: str = "",
        channel=None,
        join_timeout_s: float = 30.0,
        server_overrides: dict | None = None,
        **engine,
    ):
        self.loop = loop
        config = ServerConfig(
            model=str(model_dir),
            engine=engine_config(**engine),
            host="127.0.0.1",
            port=0,
            grace_s=1.0,
            adapter_manager=manager_address,
            replica_id=replica_id,
            **(server_overrides or {}),
        )
        self.server: InferenceServer = loop.run(_create(InferenceServer, config, security))
        if self.server.agent is not None:  # a join meant to fail gives up quickly
            self.server.agent.join_timeout_s = join_timeout_s
            self.server.agent.rpc_timeout_s = min(self.server.agent.rpc_timeout_s, join_timeout_s)
        try:
            loop.run(self.server.start())
        except BaseException:
            loop.run(self.server.stop(grace_s=0))
            raise
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = channel(self.address) if channel else grpc.insecure_channel(self.address)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    def generate(self, adapter_id: str, metadata=(), max_tokens: int = 4, **kw) -> list:
        request = inference_pb2.GenerateRequest(
            adapter_id=adapter_id,
            token_ids=inference_pb2.TokenIds(ids=[5, 6, 7, 8]),
            params=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
            **kw,
        )
        return list(self.stub.Generate(request, timeout=TIMEOUT_S, metadata=metadata))


# --- calling any method generically --------------------------------------------------------------


def call_method(channel: grpc.Channel, method, request=None, metadata=(), timeout: float = TIMEOUT_S):
    """Call `method` (a MethodDescriptor) with `request` (default: an empty one); -> the responses.

    Streams are read to the end; a client stream sends the one request.
    """
    path = f"/{method.containing_service.full_name}/{method.name}"
    request = request if request is not None else message_factory.GetMessageClass(method.input_type)()
    response_class = message_factory.GetMessageClass(method.output_type)
    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    multicallable = kinds[(method.client_streaming, method.server_streaming)](
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_class.FromString,
    )
    argument = iter([request]) if method.client_streaming else request
    result = multicallable(argument, metadata=metadata, timeout=timeout)
    return list(result) if method.server_streaming else [result]


def register_as(stub, call_metadata, adapter_id: str, path: Path, **fields) -> adapter_pb2.RegisteredAdapter:
    """RegisterAdapter with call metadata (the request's own `metadata` field is in `fields`)."""
    request = adapter_pb2.RegisterAdapterRequest(adapter_id=adapter_id, path=str(path), **fields)
    return stub.RegisterAdapter(request, timeout=TIMEOUT_S, metadata=call_metadata)


def code_of(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    """(status code, details) `fn` fails with; AssertionError if it succeeds."""
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    raise AssertionError(f"{getattr(fn, '__name__', fn)} succeeded")


# --- processes with flags ------------------------------------------------------------------------


class ServeProcess(_Process):
    """`python -m inference_svc serve ...` or `python -m adapter_svc serve ...` with extra flags."""

    def __init__(self, module: str, args: list[str], port: int, log: Path, timeout: float = TIMEOUT_S):
        super().__init__([sys.executable, "-m", module, "serve", *args], log)
        self.address = f"127.0.0.1:{port}"
        self.wait_serving(self.address, timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid
