"""Aliases and routing rules kept in the registry, and resolving a request against them
(`loraserve.routing`, the same code the replicas run)."""

from __future__ import annotations

from collections.abc import Mapping

from adapter_svc import errors
from adapter_svc.records import Refusal
from adapter_svc.registry import Registry
from loraserve.routing import Resolution, RoutingTable, Rule, check_alias, check_rules, resolve


class Routes:
    """SetAlias, GetAlias, DeleteAlias, SetRoutingRules, GetRoutingRules, GetRoutingTable and
    ResolveAdapter."""

    def __init__(self, registry: Registry):
        self.registry = registry

    async def routing_table(self) -> RoutingTable:
        return RoutingTable.from_stored(*await self.registry.routing())

    async def set_alias(self, name: str, variants: list[tuple[str, float]]) -> list[tuple[str, float]]:
        check_alias(name, variants)
        refused = await self.registry.set_alias(name, [[a, w] for a, w in variants])
        if refused is not None and refused.reason == Refusal.CONFLICT:
            raise errors.AlreadyExists(
                f"{name!r} is a registered adapter; adapters and aliases share one namespace"
            )
        if refused is not None:
            raise errors.AdapterNotFound(refused.names[0])
        return variants

    async def get_alias(self, name: str) -> list[tuple[str, float]]:
        variants = (await self.routing_table()).aliases.get(name)
        if variants is None:
            raise errors.AliasNotFound(name)
        return list(variants)

    async def delete_alias(self, name: str) -> None:
        refused = await self.registry.delete_alias(name)
        if refused is not None and refused.reason == Refusal.NOT_FOUND:
            raise errors.AliasNotFound(name)
        if refused is not None:
            raise errors.FailedPrecondition(f"alias {name!r} is the target of {', '.join(refused.names)}")

    async def set_rules(self, rules: list[Rule]) -> list[Rule]:
        check_rules(rules)
        refused = await self.registry.set_rules([r.to_dict() for r in rules])
        if refused is not None:
            raise errors.NotFound(
                f"rule target {refused.names[0]!r} is neither a registered adapter nor an alias"
            )
        return rules

    async def resolve(
        self, adapter_id: str, request_key: str, tenant: str, headers: Mapping[str, str]
    ) -> Resolution:
        """ResolveAdapter: the concrete adapter (registered) a request would be served by."""
        resolution = resolve(await self.routing_table(), adapter_id, request_key, tenant, headers)
        if resolution.adapter_id and await self.registry.get(resolution.adapter_id) is None:
            raise errors.AdapterNotFound(resolution.adapter_id)
        return resolution
