"""The caller of the RPC being served, and the admission of a call whatever its transport.

`admit` decides a call (the gRPC interceptor and the HTTP API both call it) and records the admitted
caller in a context variable, which `current_principal`, `caller_tenant`, the routing headers and
`authorize_adapter` read while the call is served.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from dataclasses import dataclass

from loraserve.auth.errors import AccessUnknown, AdapterHidden, Hidden, PermissionDenied, Unauthenticated
from loraserve.auth.policy import Policy, TenantOf, _owned
from loraserve.auth.tokens import ADMIN, AUTHORIZATION, SERVICE, TENANT, Principal
from loraserve.names import TENANT_HEADER

# Told of every refusal: (method name, reason), e.g. ("JoinReplica", "other_replica").
OnRefusal = Callable[[str, str], None]

# The package's name: refusals are logged by `loraserve.auth`, as the README says.
log = logging.getLogger("loraserve.auth")


# --- the caller of the current RPC --------------------------------------------------------------


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


def _replica_refusal(principal: Principal, method: str, claimed: str) -> str:
    if not principal.replica:
        return (
            f"service token {principal.name!r} is bound to no replica and may not call {method}: "
            'give its token-file entry "replica": "<replica id>"'
        )
    return f"service token {principal.name!r} acts as replica {principal.replica!r} only, not {claimed!r}"
