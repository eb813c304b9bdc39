"""Who may call each method of a service: one `Policy` per service, and the scopes that narrow what
a tenant sees to its own adapters."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from loraserve.auth.errors import Hidden
from loraserve.auth.tokens import ADMIN, MANAGER, SERVICE, TENANT, Principal
from loraserve.v1 import adapter_pb2

# Async lookup of an adapter's owning tenant ("" or None: no tenant / unknown).
TenantOf = Callable[[str], Awaitable[str | None]]


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
