"""Proto <-> domain conversions that more than one service needs (the rest stay in each servicer)."""

from __future__ import annotations

from loraserve.routing import RoutingTable, Rule
from loraserve.v1 import adapter_pb2, common_pb2


def resident_proto(
    adapter_id: str,
    slot: int | None,
    pinned: bool,
    last_used_ns: int,
    sha256: str,
    in_flight: int = 0,
    rank: int = 0,
    size_bytes: int = 0,
) -> common_pb2.ResidentAdapter:
    """One adapter a replica holds: in slot `slot`, or in the host cache when `slot` is None."""
    out = common_pb2.ResidentAdapter(
        adapter_id=adapter_id,
        tier=common_pb2.ADAPTER_TIER_HOST if slot is None else common_pb2.ADAPTER_TIER_SLOT,
        slot=slot,
        pinned=pinned,
        in_flight=in_flight,
        rank=rank,
        size_bytes=size_bytes,
        sha256=sha256,
    )
    out.last_used.FromNanoseconds(last_used_ns)
    return out


def rule_proto(r: Rule) -> adapter_pb2.RoutingRule:
    return adapter_pb2.RoutingRule(
        name=r.name,
        match_tenant=r.match_tenant,
        match_headers=dict(r.match_headers),
        match_adapter_id=r.match_adapter_id,
        target=r.target,
    )


def rule_from(r: adapter_pb2.RoutingRule) -> Rule:
    """A rule from the wire; header names are matched lower-case."""
    return Rule(
        name=r.name,
        target=r.target,
        match_tenant=r.match_tenant,
        match_headers=tuple(sorted((k.lower(), v) for k, v in r.match_headers.items())),
        match_adapter_id=r.match_adapter_id,
    )


def routing_table_from(table: adapter_pb2.RoutingTable) -> RoutingTable:
    """The table a replica resolves requests with, as GetRoutingTable sent it."""
    return RoutingTable(
        version=table.version,
        aliases={a.name: tuple((v.adapter_id, v.weight) for v in a.variants) for a in table.aliases},
        rules=tuple(rule_from(r) for r in table.rules),
    )
