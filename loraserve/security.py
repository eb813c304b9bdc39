"""Transport security and authentication settings, shared by both services: parsed once, then used
to listen (TLS or mutual TLS), to authenticate callers (`loraserve.auth`), and to call the other
service (a TLS channel and the service token).

Every setting is a flag on both `serve` commands and an environment variable, the flag first:

| flag | env | meaning |
|---|---|---|
| `--auth-tokens FILE` | `LORASERVE_AUTH_TOKENS` | token file (hashes, roles); unset = authentication off |
| `--tls-cert FILE` / `--tls-key FILE` | `LORASERVE_TLS_CERT` / `_KEY` | serve TLS with this PEM chain and key |
| `--tls-client-ca FILE` | `LORASERVE_TLS_CLIENT_CA` | require client certificates signed by this CA (mutual TLS) |
| `--tls-ca FILE` | `LORASERVE_TLS_CA` | CA to verify the other service when calling it (unset = plaintext) |
| `--tls-server-name NAME` | `LORASERVE_TLS_SERVER_NAME` | name the other service's certificate must carry (default: the host dialled) |
| `--service-token-file FILE` | `LORASERVE_SERVICE_TOKEN` (the token itself) | a replica's token for the manager (bound to its replica id) |
| `--insecure` | `LORASERVE_INSECURE=1` | allow listening beyond loopback with authentication off (warns) |

Listening beyond loopback (`--host 0.0.0.0`) needs `--auth-tokens` or `--insecure`
(`check_exposure`). The manager sends no service token to replicas: each call carries the
credential it issued that replica at JoinReplica.

With mutual TLS, calls to the other service present `--tls-cert`/`--tls-key` as the client
certificate, so one certificate (with both serverAuth and clientAuth usage) serves both ends.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from loraserve.auth import (
    ADMIN,
    METRICS,
    AdapterHidden,
    AuthInterceptor,
    IssuedCredentials,
    NotFound,
    OnRefusal,
    Policy,
    TenantOf,
    TokenTable,
    bearer_interceptors,
)
from loraserve.errors import AddressUnavailable
from loraserve.telemetry import MetricsServer

log = logging.getLogger(__name__)

ENV = {
    "auth_tokens": "LORASERVE_AUTH_TOKENS",
    "tls_cert": "LORASERVE_TLS_CERT",
    "tls_key": "LORASERVE_TLS_KEY",
    "tls_client_ca": "LORASERVE_TLS_CLIENT_CA",
    "tls_ca": "LORASERVE_TLS_CA",
    "tls_server_name": "LORASERVE_TLS_SERVER_NAME",
}
FILES = ("auth_tokens", "tls_cert", "tls_key", "tls_client_ca", "tls_ca")
SERVICE_TOKEN_ENV = "LORASERVE_SERVICE_TOKEN"
INSECURE_ENV = "LORASERVE_INSECURE"


@dataclass(frozen=True)
class SecurityConfig:
    """Who may call this process, over what transport, and how it calls the other service."""

    # Token file with hashed bearer tokens and roles; None = authentication off (all calls allowed).
    auth_tokens: str | None = None
    # PEM certificate chain this process serves with (and presents as a client for mutual TLS).
    tls_cert: str | None = None
    # PEM private key of tls_cert; set exactly when tls_cert is.
    tls_key: str | None = None
    # PEM CA bundle client certificates must chain to; set = mutual TLS. Needs tls_cert.
    tls_client_ca: str | None = None
    # PEM CA bundle that verifies the other service's certificate when calling it; None = plaintext.
    tls_ca: str | None = None
    # Name the other service's certificate must carry, instead of the host dialled (replicas
    # advertised by IP, one certificate for the stack); None = the host dialled.
    tls_server_name: str | None = None
    # Bearer token sent on calls to the other service (a `service` token there); None = none.
    service_token: str | None = field(default=None, repr=False)
    # Allow listening beyond loopback with authentication off (a loud warning instead of a refusal).
    insecure: bool = False
    # The parsed token file (set from auth_tokens).
    tokens: TokenTable | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in FILES:
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"{name} ({value!r}) must be an existing file")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"tls_cert ({self.tls_cert!r}) and tls_key ({self.tls_key!r}) go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(f"tls_client_ca ({self.tls_client_ca!r}) needs tls_cert and tls_key")
        if self.service_token is not None and not self.service_token.strip():
            raise ValueError("service_token must not be empty")
        if self.auth_tokens is not None:
            object.__setattr__(self, "tokens", TokenTable.load(self.auth_tokens))

    @property
    def auth_enabled(self) -> bool:
        return self.tokens is not None

    # --- serving ------------------------------------------------------------------------------

    def interceptors(
        self,
        policy: Policy,
        tenant_of: TenantOf | None = None,
        not_found: NotFound = AdapterHidden,
        on_refusal: OnRefusal | None = None,
        issued: IssuedCredentials | None = None,
    ) -> list:
        """The authentication interceptor for `policy` (none when authentication is off).

        `tenant_of`, `not_found` and `on_refusal` are `AuthInterceptor`'s; `issued` (a replica's
        credentials from the manager) is accepted besides the token file. Put the interceptor
        first: it must run before any other interceptor sees the call.
        """
        if not self.auth_enabled:
            return []
        tokens = self.tokens
        if issued is not None:
            issued.tokens = self.tokens
            tokens = issued
        return [AuthInterceptor(tokens, policy, tenant_of, not_found, on_refusal)]

    def metrics_authorizer(self):
        """Who may read `/metrics`: with authentication on, admin and metrics tokens only (the
        metrics name adapters, so tenants' adapter ids stay private); None = anyone."""
        if not self.auth_enabled:
            return None
        tokens = self.tokens

        def authorize(token: str | None) -> bool:
            principal = tokens.authenticate(token)
            return principal is not None and principal.role in (ADMIN, METRICS)

        return authorize

    def metrics_tls(self) -> tuple[str, str] | None:
        """(cert, key) when this process serves TLS: `/metrics` is then HTTPS too."""
        return (self.tls_cert, self.tls_key) if self.tls_cert is not None else None

    def metrics_server(self, registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
        """Serve `registry` at `http(s)://host:port/metrics` to the readers `metrics_authorizer`
        admits, over TLS when this process serves TLS. Raises OSError if the port is taken."""
        return MetricsServer(registry, host, port, self.metrics_authorizer(), self.metrics_tls())

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None:
            return None
        key_pair = [(_read(self.tls_key), _read(self.tls_cert))]
        if self.tls_client_ca is None:
            return grpc.ssl_server_credentials(key_pair)
        return grpc.ssl_server_credentials(
            key_pair, root_certificates=_read(self.tls_client_ca), require_client_auth=True
        )

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Listen on `address` (TLS when configured); -> the bound port."""
        credentials = self.server_credentials()
        try:
            if credentials is None:
                return server.add_insecure_port(address)
            return server.add_secure_port(address, credentials)
        except RuntimeError as e:  # grpc's "Failed to bind to address ..."
            raise AddressUnavailable(address) from e

    # --- calling the other service ------------------------------------------------------------

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls_ca is None:
            return None
        if self.tls_cert is not None:
            return grpc.ssl_channel_credentials(
                _read(self.tls_ca), private_key=_read(self.tls_key), certificate_chain=_read(self.tls_cert)
            )
        return grpc.ssl_channel_credentials(_read(self.tls_ca))

    def aio_channel(
        self, target: str, options=(), interceptors=(), send_service_token: bool = True
    ) -> grpc.aio.Channel:
        """A channel to the other service: TLS if tls_ca is set, the service token on every call
        (after `interceptors`, so they see the call first) unless `send_service_token` is False
        (the manager calling replicas: each call carries that replica's own credential)."""
        interceptors = list(interceptors)
        if self.service_token and send_service_token:
            interceptors += bearer_interceptors(self.service_token)
        credentials = self.channel_credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors or None)
        if self.tls_server_name:
            options = (*options, ("grpc.ssl_target_name_override", self.tls_server_name))
        return grpc.aio.secure_channel(
            target, credentials, options=options, interceptors=interceptors or None
        )


def aio_channel(
    security: SecurityConfig | None,
    target: str,
    options=(),
    interceptors=(),
    send_service_token: bool = True,
) -> grpc.aio.Channel:
    """`security.aio_channel`, or a plaintext channel without a token when `security` is None."""
    return (security or SecurityConfig()).aio_channel(target, options, interceptors, send_service_token)


# --- exposure -------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps a server reachable from this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(what: str, host: str, security: SecurityConfig) -> None:
    """Refuse to listen beyond loopback with authentication off, unless `security.insecure` (warn).

    Raises ValueError with what to do. Warns when tokens would cross the network in plaintext.
    """
    if is_loopback(host):
        return
    if not security.auth_enabled:
        if not security.insecure:
            raise ValueError(
                f"{what} would listen on {host} with authentication off: anyone who can reach it could "
                "call every RPC. Pass --auth-tokens FILE (see README, Security), listen on 127.0.0.1, "
                "or pass --insecure to accept the risk"
            )
        log.warning(
            "INSECURE: %s listens on %s with authentication OFF (--insecure): anyone who can reach it "
            "can register, load, evict and join replicas. Use --auth-tokens outside a trusted network.",
            what,
            host,
        )
    elif security.tls_cert is None:
        log.warning(
            "%s listens on %s with bearer tokens but without TLS: tokens cross the network in plaintext "
            "(pass --tls-cert/--tls-key)",
            what,
            host,
        )


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


# --- flags and environment ----------------------------------------------------------------------


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("authentication and TLS (flag, or env LORASERVE_<NAME>)")
    group.add_argument(
        "--auth-tokens", metavar="FILE", help=f"token file; unset = auth off (env {ENV['auth_tokens']})"
    )
    group.add_argument(
        "--tls-cert", metavar="FILE", help=f"PEM certificate chain to serve TLS with (env {ENV['tls_cert']})"
    )
    group.add_argument(
        "--tls-key", metavar="FILE", help=f"PEM private key of --tls-cert (env {ENV['tls_key']})"
    )
    group.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help=f"require client certificates signed by this CA: mutual TLS (env {ENV['tls_client_ca']})",
    )
    group.add_argument(
        "--tls-ca",
        metavar="FILE",
        help=f"CA verifying the other service when calling it; unset = plaintext (env {ENV['tls_ca']})",
    )
    group.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name the other service's certificate must carry instead of the host dialled "
        f"(env {ENV['tls_server_name']})",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help=f"allow listening beyond loopback with authentication off; warns (env {INSECURE_ENV}=1)",
    )
    group.add_argument(
        "--service-token-file",
        metavar="FILE",
        help=f"file holding the token sent to the other service (env {SERVICE_TOKEN_ENV}: the token)",
    )


def security_config_from(args: argparse.Namespace, environ=os.environ) -> SecurityConfig:
    """flag > environment variable > off; ValueError naming the setting that is wrong."""
    values = {name: getattr(args, name, None) or environ.get(env) or None for name, env in ENV.items()}
    token_file = getattr(args, "service_token_file", None)
    if token_file:
        try:
            values["service_token"] = Path(token_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"service_token_file ({token_file!r}) cannot be read: {e}") from e
    else:
        values["service_token"] = environ.get(SERVICE_TOKEN_ENV) or None
    insecure = getattr(args, "insecure", None)
    if insecure is None:
        insecure = environ.get(INSECURE_ENV, "").lower() in ("1", "true", "yes", "on")
    values["insecure"] = bool(insecure)
    return SecurityConfig(**values)
