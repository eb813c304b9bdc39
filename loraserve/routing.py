"""Request routing: metadata rules, then aliases with weighted variants. Pure functions.

The manager stores the table in Redis and answers ResolveAdapter with it; replicas cache the same
table (refreshed when its version changes) and resolve every request locally with the same code.

A request names an adapter id, an alias, or nothing (the base model). Rules are tried in order; the
first whose every non-empty condition matches replaces the requested id with its target. If the
result is an alias, a variant is drawn by weight: with a request key, from a stable hash of
(alias, key), so one key always gets one variant while the weights stay unchanged; without a key,
at random.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from loraserve import errors
from loraserve.names import ID_RE

MAX_VARIANTS = 64
MAX_RULES = 1000


@dataclass(frozen=True)
class Rule:
    name: str
    target: str  # adapter id or alias
    match_tenant: str = ""
    match_headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, value)
    match_adapter_id: str = ""

    def matches(self, adapter_id: str, tenant: str, headers: Mapping[str, str]) -> bool:
        if self.match_tenant and self.match_tenant != tenant:
            return False
        if self.match_adapter_id and self.match_adapter_id != adapter_id:
            return False
        return all(headers.get(name) == value for name, value in self.match_headers)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "target": self.target,
            "match_tenant": self.match_tenant,
            "match_headers": [list(h) for h in self.match_headers],
            "match_adapter_id": self.match_adapter_id,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Rule:
        return cls(
            name=d["name"],
            target=d["target"],
            match_tenant=d.get("match_tenant", ""),
            match_headers=tuple((k, v) for k, v in d.get("match_headers", [])),
            match_adapter_id=d.get("match_adapter_id", ""),
        )


@dataclass(frozen=True)
class RoutingTable:
    version: int = 0
    aliases: dict = field(default_factory=dict)  # name -> ((adapter id, weight), ...)
    rules: tuple[Rule, ...] = ()

    @classmethod
    def from_stored(cls, version: int, aliases: dict, rules: list[dict]) -> RoutingTable:
        return cls(
            version=version,
            aliases={name: tuple((a, float(w)) for a, w in v) for name, v in aliases.items()},
            rules=tuple(Rule.from_dict(r) for r in rules),
        )


@dataclass(frozen=True)
class Resolution:
    adapter_id: str  # concrete; "" = the base model
    alias: str = ""
    rule: str = ""


def resolve(
    table: RoutingTable,
    adapter_id: str,
    request_key: str = "",
    tenant: str = "",
    headers: Mapping[str, str] | None = None,
    rng: random.Random | None = None,
) -> Resolution:
    """The concrete adapter a request is served by (no registry check)."""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    target, rule_name = adapter_id, ""
    for rule in table.rules:
        if rule.matches(adapter_id, tenant, headers):
            target, rule_name = rule.target, rule.name
            break
    variants = table.aliases.get(target)
    if variants is None:
        return Resolution(target, "", rule_name)
    return Resolution(pick_variant(target, variants, request_key, rng), target, rule_name)


def pick_variant(
    alias: str, variants: tuple[tuple[str, float], ...], request_key: str, rng: random.Random | None = None
) -> str:
    """Weighted choice; a stable hash of (alias, request_key) when there is a key."""
    if request_key:
        digest = hashlib.sha256(f"{alias}\x00{request_key}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
    else:
        u = (rng or random).random()
    total = sum(w for _, w in variants)
    acc = 0.0
    for adapter_id, weight in variants:
        acc += weight / total
        if u < acc:
            return adapter_id
    return variants[-1][0]


def check_alias(name: str, variants: list[tuple[str, float]]) -> None:
    """Raise InvalidArgument unless the alias is well-formed (existence is checked in Redis)."""
    if not ID_RE.match(name):
        raise errors.InvalidArgument(f"alias name {name!r} must match {ID_RE.pattern}")
    if not 1 <= len(variants) <= MAX_VARIANTS:
        raise errors.InvalidArgument(f"alias {name!r} needs 1..{MAX_VARIANTS} variants, got {len(variants)}")
    seen = set()
    for adapter_id, weight in variants:
        if adapter_id in seen:
            raise errors.InvalidArgument(f"alias {name!r} lists variant {adapter_id!r} twice")
        seen.add(adapter_id)
        if not (math.isfinite(weight) and weight > 0):
            raise errors.InvalidArgument(f"alias {name!r}: weight of {adapter_id!r} ({weight}) must be > 0")


def check_rules(rules: list[Rule]) -> None:
    """Raise InvalidArgument unless every rule is well-formed (targets are checked in Redis)."""
    if len(rules) > MAX_RULES:
        raise errors.InvalidArgument(f"at most {MAX_RULES} routing rules, got {len(rules)}")
    names = set()
    for i, rule in enumerate(rules):
        if not rule.name or rule.name in names:
            raise errors.InvalidArgument(f"rule {i}: name {rule.name!r} must be non-empty and unique")
        names.add(rule.name)
        if not rule.target:
            raise errors.InvalidArgument(f"rule {rule.name!r}: target must be set")
        if not (rule.match_tenant or rule.match_headers or rule.match_adapter_id):
            raise errors.InvalidArgument(f"rule {rule.name!r} matches nothing: set at least one condition")
