"""Bearer-token authentication and role-based access for both gRPC services.

Who may do what is decided here, in one place, for InferenceService and AdapterService alike:

    tokens = TokenTable.load("tokens.json")          # hashes only; see `new-token` (cli.py)
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
which no other replica accepts.

Every refusal is logged (`loraserve.auth`, WARNING: method, peer, token name, reason; never a
token) and reported to the interceptor's `on_refusal(method, reason)` (the services count it).

  module           what it holds
  tokens.py        roles, the token file (`TokenTable`, hashes only), `IssuedCredentials`, `new_token`
  policy.py        `Policy` and `Rule` per service (`INFERENCE_POLICY`, `MANAGER_POLICY`), tenant scopes
  errors.py        why a call is refused (`Unauthenticated`, `PermissionDenied`, `Hidden` ...)
  access.py        `admit` (any transport), the audit of its refusals, and the current call's caller
  interceptor.py   `AuthInterceptor`, the gRPC server side
  client.py        the client side: `bearer_interceptors`, `token_metadata`
  cli.py           `python -m loraserve.auth new-token ...` / `hash`

Import the names below from `loraserve.auth`; the modules are how the package is laid out.
"""

from __future__ import annotations

from loraserve.auth.access import (
    Access,
    NotFound,
    OnRefusal,
    admit,
    audit_refusal,
    authorize_adapter,
    caller_tenant,
    current_principal,
    headers_for_routing,
    request_headers,
    routing_headers,
)
from loraserve.auth.cli import main
from loraserve.auth.client import (
    BearerStreamStream,
    BearerStreamUnary,
    BearerUnaryStream,
    BearerUnaryUnary,
    bearer_interceptors,
    token_metadata,
)
from loraserve.auth.errors import (
    AccessDenied,
    AccessUnknown,
    AdapterHidden,
    Hidden,
    PermissionDenied,
    Unauthenticated,
)
from loraserve.auth.interceptor import OPEN_SERVICES, AuthInterceptor, bearer_token
from loraserve.auth.policy import INFERENCE_POLICY, MANAGER_POLICY, Policy, Rule, Scope, TenantOf
from loraserve.auth.tokens import (
    ADMIN,
    AUTHORIZATION,
    HEX64,
    MANAGER,
    METRICS,
    ROLES,
    SERVICE,
    TENANT,
    TOKEN_BYTES,
    IssuedCredentials,
    Principal,
    TokenTable,
    hash_token,
    new_token,
)

__all__ = [
    "ADMIN",
    "AUTHORIZATION",
    "HEX64",
    "INFERENCE_POLICY",
    "MANAGER",
    "MANAGER_POLICY",
    "METRICS",
    "OPEN_SERVICES",
    "ROLES",
    "SERVICE",
    "TENANT",
    "TOKEN_BYTES",
    "Access",
    "AccessDenied",
    "AccessUnknown",
    "AdapterHidden",
    "AuthInterceptor",
    "BearerStreamStream",
    "BearerStreamUnary",
    "BearerUnaryStream",
    "BearerUnaryUnary",
    "Hidden",
    "IssuedCredentials",
    "NotFound",
    "OnRefusal",
    "PermissionDenied",
    "Policy",
    "Principal",
    "Rule",
    "Scope",
    "TenantOf",
    "TokenTable",
    "Unauthenticated",
    "admit",
    "audit_refusal",
    "authorize_adapter",
    "bearer_interceptors",
    "bearer_token",
    "caller_tenant",
    "current_principal",
    "hash_token",
    "headers_for_routing",
    "main",
    "new_token",
    "request_headers",
    "routing_headers",
    "token_metadata",
]
