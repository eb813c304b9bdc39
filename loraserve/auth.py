"""Bearer-token authentication and role-based access for both gRPC services.

Who may do what is decided here, in one place, for InferenceService and AdapterService alike:

    tokens = TokenTable.load("tokens.json")          # hashes only; see `new-token` below
    server = grpc.aio.server(interceptors=[AuthInterceptor(tokens, MANAGER_POLICY, tenant_of), ...])

Every call but health and reflection (left open so load balancers and grpcurl can probe and list
without a secret) must carry `authorization: Bearer <token>`:

- no or unknown token -> UNAUTHENTICATED;
- a role the method's rule does not admit -> PERMISSION_DENIED;
- a tenant naming another tenant's adapter -> NOT_FOUND with the service's own "unknown adapter"
  message, so a tenant cannot learn that the adapter exists.

Roles: `admin` (everything), `tenant` (generate with its own adapters and the base model, list and
get its own adapters), `service` (a replica calling the manager: bound to one replica id with
`"replica"`, it may join, heartbeat, report, leave and acquire only as that replica; unbound, it
may only read), `metrics` (scrape `/metrics`, no RPC). The manager calls a replica with neither:
it presents the credential that replica chose at its latest JoinReplica (`IssuedCredentials`),
which no other replica accepts. The token file stores sha256 hashes of tokens: the tokens are random
256-bit secrets, so a fast unsalted hash is as safe as a slow one (no dictionary to try) and lets
each call be checked with one lookup.

Token file (JSON):

    {"tokens": [{"name": "ops", "role": "admin", "sha256": "<hex>"},
                {"name": "acme-app", "role": "tenant", "tenant": "acme", "sha256": "<hex>"},
                {"name": "replica-0", "role": "service", "replica": "replica-0", "sha256": "<hex>"},
                {"name": "prometheus", "role": "metrics", "sha256": "<hex>"}],
     "adapters": {"demo-0": "acme"}}

Every refusal is logged (`loraserve.auth`, WARNING: method, peer, token name, reason; never a
token) and reported to the interceptor's `on_refusal(method, reason)` (the services count it).

`adapters` gives standalone replicas (no manager) the owner of each `--lora-modules` adapter;
with a manager, the registry's `tenant` field is the owner. `python -m loraserve.auth new-token
--role tenant --tenant acme --name acme-app` prints a fresh token and the entry to add.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import hashlib
import inspect
import json
import logging
import re
import secrets
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from loraserve.errors import unknown_adapter_message
from loraserve.names import ID_RE, TENANT_HEADER
from loraserve.v1 import adapter_pb2

ADMIN, TENANT, SERVICE, METRICS = "admin", "tenant", "service", "metrics"
ROLES = (ADMIN, TENANT, SERVICE, METRICS)
# The role of the credential a replica gave the manager at its join (never in a token file).
MANAGER = "manager"
AUTHORIZATION = "authorization"
# Methods every caller may use without a token.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
TOKEN_BYTES = 32

# Async lookup of an adapter's owning tenant ("" or None: no tenant / unknown).
TenantOf = Callable[[str], Awaitable[str | None]]
# Told of every refusal: (method name, reason), e.g. ("JoinReplica", "other_replica").
OnRefusal = Callable[[str, str], None]

log = logging.getLogger(__name__)


def hash_token(token: str) -> str:
    """The hex sha256 a token is stored as."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a call comes from."""

    name: str  # the token's label, for logs
    role: str  # admin | tenant | service | metrics | manager
    tenant: str = ""  # the tenant's name, for role tenant
    replica: str = ""  # the one replica id a service token acts as ("" = read-only service)


class TokenTable:
    """Token hashes -> principals, and the standalone adapter ownership map."""

    def __init__(self, principals: dict[str, Principal], adapter_tenants: dict[str, str] | None = None):
        self._by_hash = dict(principals)
        self.adapter_tenants = dict(adapter_tenants or {})

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        """Parse a token file; ValueError naming the file and the entry that is wrong."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"auth_tokens ({str(path)!r}) cannot be read as JSON: {e}") from e
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "tokens") -> TokenTable:
        if not isinstance(raw, dict) or not isinstance(raw.get("tokens"), list):
            raise ValueError(f"{where}: must be an object with a 'tokens' list")
        principals = {}
        for i, entry in enumerate(raw["tokens"]):
            at = f"{where}: tokens[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{at} must be an object")
            if "token" in entry:
                raise ValueError(f"{at} holds a plain token: store its sha256 instead (new-token prints it)")
            digest, role, tenant = entry.get("sha256", ""), entry.get("role"), entry.get("tenant", "")
            if not isinstance(digest, str) or not HEX64.match(digest):
                raise ValueError(f"{at}.sha256 must be 64 lower-case hex digits")
            if role not in ROLES:
                raise ValueError(f"{at}.role ({role!r}) must be one of {list(ROLES)}")
            if (role == TENANT) != bool(tenant) or (tenant and not ID_RE.match(str(tenant))):
                raise ValueError(
                    f"{at}.tenant ({tenant!r}) must be a tenant name exactly when role is tenant"
                )
            replica = entry.get("replica", "")
            if replica and (role != SERVICE or not isinstance(replica, str) or not ID_RE.match(replica)):
                raise ValueError(f"{at}.replica ({replica!r}) must be a replica id, on a service token only")
            if digest in principals:
                raise ValueError(f"{at} repeats the hash of another entry")
            principals[digest] = Principal(str(entry.get("name") or f"token-{i}"), role, tenant, replica)
        owners = raw.get("adapters", {})
        if not isinstance(owners, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and ID_RE.match(v) for k, v in owners.items()
        ):
            raise ValueError(f"{where}: 'adapters' must map adapter ids to tenant names")
        return cls(principals, owners)

    def authenticate(self, token: str | None) -> Principal | None:
        """The token's principal, or None for a missing or unknown token."""
        return self._by_hash.get(hash_token(token)) if token else None

    def __len__(self) -> int:
        return len(self._by_hash)


class IssuedCredentials:
    """Credentials issued at run time, accepted besides a token table: on a replica, the one it
    chose and gave the manager at its latest join (and the one before, so a command sent just
    before a rejoin still passes). `authenticate` gives the `manager` principal for them."""

    KEEP = 2

    def __init__(self, tokens: TokenTable | None = None, name: str = "manager"):
        self.tokens = tokens
        self.principal = Principal(name, MANAGER)
        self._hashes: list[str] = []

    def issue(self, token: str) -> None:
        """Accept `token` from now on (the oldest one kept stops working)."""
        if token and hash_token(token) not in self._hashes:
            self._hashes = [*self._hashes, hash_token(token)][-self.KEEP :]

    def authenticate(self, token: str | None) -> Principal | None:
        if token and hash_token(token) in self._hashes:
            return self.principal
        return self.tokens.authenticate(token) if self.tokens is not None else None


def new_token() -> str:
    """A fresh random bearer token (256 bits)."""
    return "lsk_" + secrets.token_urlsafe(TOKEN_BYTES)


# --- policy -------------------------------------------------------------------------------------


class Hidden(Exception):
    """A tenant named an adapter it does not own: answer as if it did not exist."""

    def __init__(self, adapter_id: str):
        super().__init__(adapter_id)
        self.adapter_id = adapter_id


# A scope narrows what a tenant sees: it may raise Hidden, edit the request in place, or return a
# response to answer with instead of calling the servicer.
Scope = Callable[[object, Principal, TenantOf], Awaitable[object | None]]


@dataclass(frozen=True)
class Rule:
    roles: frozenset[str]
    scope: Scope | None = None  # applied to tenant principals only
    # The request names a replica (`replica_id`): a service principal may name only its own.
    as_replica: bool = False


async def _owned(adapter_id: str, principal: Principal, tenant_of: TenantOf) -> None:
    if adapter_id and await tenant_of(adapter_id) != principal.tenant:
        raise Hidden(adapter_id)


async def _scope_adapter_id(request, principal: Principal, tenant_of: TenantOf) -> None:
    await _owned(request.adapter_id, principal, tenant_of)


async def _scope_get_adapter(request, principal: Principal, tenant_of: TenantOf) -> None:
    if not request.adapter_id:  # let the servicer reject the empty id as it always does
        return
    await _owned(request.adapter_id, principal, tenant_of)


async def _scope_list_adapters(request, principal: Principal, tenant_of: TenantOf):
    if request.tenant and request.tenant != principal.tenant:
        return adapter_pb2.ListAdaptersResponse()  # another tenant's adapters: none to show
    request.tenant = principal.tenant
    return None


def _rule(*roles: str, scope: Scope | None = None, as_replica: bool = False) -> Rule:
    return Rule(frozenset(roles), scope, as_replica)


@dataclass(frozen=True)
class Policy:
    """Which roles may call each method of one service, and how tenants are scoped."""

    service: str  # full service name, e.g. loraserve.v1.AdapterService
    rules: dict[str, Rule]  # method name -> rule

    def rule(self, full_method: str) -> Rule | None:
        """The rule for '/pkg.Service/Method'; None = nobody but admin (deny by default)."""
        service, _, method = full_method.lstrip("/").partition("/")
        return self.rules.get(method) if service == self.service else None


_REPLICA = (ADMIN, SERVICE)  # what replicas read from the manager
_FROM_MANAGER = (ADMIN, MANAGER)  # what the manager commands a replica to do (its issued credential)
INFERENCE_POLICY = Policy(
    service="loraserve.v1.InferenceService",
    rules={
        "Generate": _rule(ADMIN, TENANT, scope=_scope_adapter_id),
        "GetEngineInfo": _rule(*_FROM_MANAGER),
        "LoadAdapter": _rule(*_FROM_MANAGER),
        "EvictAdapter": _rule(*_FROM_MANAGER),
        "ListResidentAdapters": _rule(*_FROM_MANAGER),
    },
)
MANAGER_POLICY = Policy(
    service="loraserve.v1.AdapterService",
    rules={
        "RegisterAdapter": _rule(ADMIN),
        "UploadAdapter": _rule(ADMIN),
        "GetAdapter": _rule(ADMIN, SERVICE, TENANT, scope=_scope_get_adapter),
        "ListAdapters": _rule(ADMIN, SERVICE, TENANT, scope=_scope_list_adapters),  # replicas: /v1/models
        "UnregisterAdapter": _rule(ADMIN),
        "LoadAdapter": _rule(ADMIN),
        "EvictAdapter": _rule(ADMIN),
        "PinAdapter": _rule(ADMIN),
        "UnpinAdapter": _rule(ADMIN),
        "GetClusterState": _rule(ADMIN),
        "SetAlias": _rule(ADMIN),
        "GetAlias": _rule(*_REPLICA),
        "DeleteAlias": _rule(ADMIN),
        "SetRoutingRules": _rule(ADMIN),
        "GetRoutingRules": _rule(ADMIN),
        "GetRoutingTable": _rule(*_REPLICA),
        "ResolveAdapter": _rule(*_REPLICA),
        "WatchEvents": _rule(ADMIN),
        "JoinReplica": _rule(*_REPLICA, as_replica=True),
        "Heartbeat": _rule(*_REPLICA, as_replica=True),
        "ReportResidency": _rule(*_REPLICA, as_replica=True),
        "LeaveReplica": _rule(*_REPLICA, as_replica=True),
        "AcquireAdapter": _rule(*_REPLICA, as_replica=True),
        "FetchAdapterWeights": _rule(*_REPLICA),
    },
)


# --- the caller of the current RPC --------------------------------------------------------------


class AdapterHidden(LookupError):
    """The default `not_found` error: an adapter a tenant may not see."""

    def __init__(self, adapter_id: str):
        super().__init__(unknown_adapter_message(adapter_id))


# The service's own "unknown adapter" error, raised (NOT_FOUND) for hidden adapters too.
NotFound = Callable[[str], Exception]


@dataclass(frozen=True)
class Access:
    principal: Principal
    tenant_of: TenantOf
    not_found: NotFound
    refused: Callable[[str], None]  # log and count a refusal of this call, by reason


_ACCESS: contextvars.ContextVar[Access | None] = contextvars.ContextVar("loraserve_access", default=None)


def current_principal() -> Principal | None:
    """The authenticated caller of the RPC being served; None when authentication is off."""
    access = _ACCESS.get()
    return access.principal if access else None


def caller_tenant(headers) -> str:
    """The tenant a call is made for: the token's tenant, or (authentication off) the x-tenant
    header among `headers` ((name, value) pairs); "" for admins, services and anonymous calls."""
    access = _ACCESS.get()
    if access is not None:
        return access.principal.tenant
    return dict(headers or ()).get(TENANT_HEADER, "")


def request_headers(context) -> dict[str, str]:
    """The gRPC call's metadata for routing (see `routing_headers`)."""
    return routing_headers(context.invocation_metadata() or ())


def routing_headers(pairs) -> dict[str, str]:
    """A call's (name, value) headers for routing, as `headers_for_routing` makes them for the
    current call's caller."""
    return headers_for_routing(pairs, current_principal())


def headers_for_routing(pairs, principal: Principal | None) -> dict[str, str]:
    """(name, value) headers for routing: without the token, and with x-tenant set to the tenant of
    `principal` if it holds a tenant token (a tenant cannot pose as another to match its routing
    rules). The front door's picker calls it with the principal of the request's token, so it
    resolves a request exactly as the replica will."""
    headers = {k: v for k, v in pairs if k != AUTHORIZATION}
    if principal is not None and principal.role == TENANT:
        headers[TENANT_HEADER] = principal.tenant
    return headers


async def authorize_adapter(adapter_id: str, requested: str | None = None) -> None:
    """Check that the caller may use `adapter_id` (say, the concrete adapter routing chose for the
    `requested` one). Call it before anything about `adapter_id` is fetched or loaded.

    No-op when authentication is off, for admins, and for the base model (""). Raises the
    service's own unknown-adapter error for a tenant's call naming an adapter of another tenant
    (or of none), exactly as if the adapter did not exist. The error names `requested` (default:
    `adapter_id`), never an adapter the caller did not name: a routing rule's target stays unseen.
    """
    access = _ACCESS.get()
    if access is None or access.principal.role != TENANT or not adapter_id:
        return
    try:
        await _owned(adapter_id, access.principal, access.tenant_of)
    except Hidden as e:
        access.refused("not_owner")
        raise access.not_found(adapter_id if requested is None else requested) from e


# --- admission, whatever the transport ------------------------------------------------------------


class AccessDenied(Exception):
    """A call is refused before it reaches the service; each transport maps the subclasses."""


class Unauthenticated(AccessDenied):
    """No token, or one the token table does not know (UNAUTHENTICATED, HTTP 401)."""


class PermissionDenied(AccessDenied):
    """The token's role may not make the call (PERMISSION_DENIED, HTTP 403)."""


class AccessUnknown(AccessDenied):
    """An adapter's owner could not be looked up (the manager is away: UNAVAILABLE, HTTP 503)."""


async def admit(
    policy: Policy,
    method: str,
    principal: Principal | None,
    request,
    tenant_of: TenantOf,
    not_found: NotFound = AdapterHidden,
    client_streams: bool = False,
    *,
    has_token: bool = True,
    refused: Callable[[str], None] | None = None,
):
    """Decide whether `principal` may call `method` ('/pkg.Service/Method') with `request`.

    On success the principal becomes the current call's (`current_principal`, `authorize_adapter`)
    and the return value is None, or the response a tenant scope answers with instead of the
    service. Raises Unauthenticated (no principal), PermissionDenied (the role's rule, or a
    replica-bound service token naming another replica), Hidden (a tenant naming an adapter it does
    not own) or AccessUnknown (the owner could not be looked up). `refused(reason)` is told of each
    refusal first (the audit record; `has_token` tells a wrong token from none). Tenant scopes and
    replica bindings look at the request, so they apply to methods with a single request only.
    """
    report = refused or _ignore_refusal
    if principal is None:
        report("unknown_token" if has_token else "no_token")
        raise Unauthenticated("missing or invalid bearer token")
    rule = policy.rule(method)
    name = method.rsplit("/", 1)[-1]
    if principal.role != ADMIN and (rule is None or principal.role not in rule.roles):
        who = f"tenant {principal.tenant!r}" if principal.tenant else f"role {principal.role!r}"
        report("role")
        raise PermissionDenied(f"{who} may not call {name}")
    if principal.role == SERVICE and rule.as_replica and not client_streams:
        claimed = getattr(request, "replica_id", "")
        if not principal.replica or claimed != principal.replica:
            report("other_replica")
            raise PermissionDenied(_replica_refusal(principal, name, claimed))
    _ACCESS.set(Access(principal, tenant_of, not_found, report))
    if principal.role == TENANT and rule.scope is not None and not client_streams:
        try:
            return await rule.scope(request, principal, tenant_of)
        except Hidden:
            report("not_owner")
            raise
        except Exception as e:  # the owner could not be looked up (the manager is away)
            raise AccessUnknown(f"cannot check access: {e}") from e
    return None


def _ignore_refusal(reason: str) -> None:
    pass


def audit_refusal(
    method: str, principal: Principal | None, peer: str, reason: str, on_refusal: OnRefusal | None = None
) -> None:
    """The audit record of one refusal, whatever the transport: a log line (the token's name, never
    the token) and `on_refusal(method name, reason)` (the service's counter)."""
    name = method.rsplit("/", 1)[-1]
    who = principal.name if principal is not None else "-"
    log.warning("auth refused: method=%s peer=%s token=%s reason=%s", name, peer, who, reason)
    if on_refusal is not None:
        on_refusal(name, reason)


# --- the interceptor ----------------------------------------------------------------------------


def bearer_token(metadata) -> str | None:
    """The token of an `authorization: Bearer <token>` header, else None."""
    for key, value in metadata or ():
        if key == AUTHORIZATION and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


async def _no_owner(adapter_id: str) -> str | None:
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call (but health and reflection) and enforces `policy`.

    Args:
        tokens: the token table (or anything with its `authenticate`, e.g. `IssuedCredentials`).
        policy: the served service's rules.
        tenant_of: async adapter id -> owning tenant, for tenant scopes (None: tenants own nothing).
        not_found: the service's unknown-adapter error (its message is reused for hidden adapters).
        on_refusal: told (method, reason) of every refusal, after it is logged; None = log only.
    """

    def __init__(
        self,
        tokens: TokenTable | IssuedCredentials,
        policy: Policy,
        tenant_of: TenantOf | None = None,
        not_found: NotFound = AdapterHidden,
        on_refusal: OnRefusal | None = None,
    ):
        self.tokens = tokens
        self.policy = policy
        self.tenant_of = tenant_of or _no_owner
        self.not_found = not_found
        self.on_refusal = on_refusal

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        token = bearer_token(details.invocation_metadata)
        principal = self.tokens.authenticate(token)
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                admit = functools.partial(
                    self._admit, details.method, principal, token is not None, kind.startswith("stream")
                )
                streams = kind.endswith("_stream") and inspect.isasyncgenfunction(behavior)
                return handler._replace(**{kind: _admitted(admit, behavior, streams)})
        return handler

    def _refused(self, method: str, principal: Principal | None, context, reason: str) -> None:
        peer = context.peer() if context is not None else "-"
        audit_refusal(method, principal, peer, reason, self.on_refusal)

    async def _admit(
        self,
        method: str,
        principal: Principal | None,
        has_token: bool,
        client_streams: bool,
        request,
        context,
    ):
        """Abort the call unless `principal` may make it (`admit`); -> a response to answer with, or None."""
        refused = functools.partial(self._refused, method, principal, context)
        try:
            return await admit(
                self.policy,
                method,
                principal,
                request,
                self.tenant_of,
                self.not_found,
                client_streams,
                has_token=has_token,
                refused=refused,
            )
        except Unauthenticated as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except PermissionDenied as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except Hidden as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(self.not_found(e.adapter_id)))
        except AccessUnknown as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))


def _replica_refusal(principal: Principal, method: str, claimed: str) -> str:
    if not principal.replica:
        return (
            f"service token {principal.name!r} is bound to no replica and may not call {method}: "
            'give its token-file entry "replica": "<replica id>"'
        )
    return f"service token {principal.name!r} acts as replica {principal.replica!r} only, not {claimed!r}"


def _admitted(admit, behavior, streams: bool):
    """`behavior` behind `admit`: it runs when `admit` returns None; a response `admit` returns (a
    tenant scope's) answers the call instead. `streams`: `behavior` yields its responses."""
    if streams:

        @functools.wraps(behavior)
        async def stream_wrapper(request, context):
            answer = await admit(request, context)
            responses = behavior(request, context) if answer is None else _only(answer)
            async for response in responses:
                yield response

        return stream_wrapper

    @functools.wraps(behavior)
    async def wrapper(request, context):
        answer = await admit(request, context)
        return await behavior(request, context) if answer is None else answer

    return wrapper


async def _only(response):
    yield response


# --- clients ------------------------------------------------------------------------------------


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = [(k, v) for k, v in (details.metadata or ()) if k != AUTHORIZATION]
    metadata.append((AUTHORIZATION, f"Bearer {token}"))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _Bearer:
    def __init__(self, token: str):
        self.token = token

    async def _call(self, continuation, details, request):
        return await continuation(_with_token(details, self.token), request)


class BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _Bearer._call


class BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _Bearer._call


class BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


class BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


def bearer_interceptors(token: str) -> list:
    """grpc.aio client interceptors that send `authorization: Bearer <token>` on every call."""
    return [
        cls(token) for cls in (BearerUnaryUnary, BearerUnaryStream, BearerStreamUnary, BearerStreamStream)
    ]


def token_metadata(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying `token`, for synchronous stubs: `stub.X(req, metadata=...)`."""
    return ((AUTHORIZATION, f"Bearer {token}"),)


# --- `python -m loraserve.auth` ----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraserve.auth")
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new-token", help="print a new random token and its token-file entry")
    new.add_argument("--role", choices=ROLES, required=True)
    new.add_argument("--tenant", default="", help="the tenant's name (role tenant)")
    new.add_argument("--replica", default="", help="the replica id a service token acts as (role service)")
    new.add_argument("--name", default="", help="a label for logs")
    hashed = sub.add_parser("hash", help="print the sha256 of a token read from stdin")
    hashed.set_defaults(role=None)
    args = parser.parse_args(argv)
    if args.command == "hash":
        print(hash_token(sys.stdin.readline().strip()))
        return 0
    token = new_token()
    entry = {
        "name": args.name or args.tenant or args.replica or args.role,
        "role": args.role,
        "sha256": hash_token(token),
    }
    if args.tenant:
        entry["tenant"] = args.tenant
    if args.replica:
        entry["replica"] = args.replica
    try:
        TokenTable.from_dict({"tokens": [entry]}, "new entry")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"token (give it to the caller; it is not stored): {token}")
    print(f"token-file entry: {json.dumps(entry)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
