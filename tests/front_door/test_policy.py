"""The picker's choice: affinity first, skipping what is down, draining or overloaded; hot adapters
spread to a bounded number of copies and concentrate again when demand falls."""

from __future__ import annotations

import pytest

from endpoint_picker.config import PickerConfig
from endpoint_picker.policy import (
    BASE,
    FREE_SLOT,
    HOST,
    LEAST_LOADED,
    SLOT,
    SPREAD,
    ReplicaView,
    Thresholds,
    pick,
)

LIMITS = Thresholds(queue_threshold=8, spread_threshold=2, max_copies=2)


def replica(name: str, slots=(), cached=(), max_loras=2, **fields) -> ReplicaView:
    return ReplicaView(
        name,
        f"10.0.0.{name[-1]}:50051",
        True,
        max_loras=max_loras,
        slots=frozenset(slots),
        cached=frozenset(cached) | frozenset(slots),
        **fields,
    )


def ids(p) -> list[str]:
    return [r.replica_id for r in p.replicas]


def test_preference_slot_then_host_then_free_slot_then_least_loaded():
    full = dict(slots=("x", "y"))
    r1, r2, r3 = replica("r1", **full), replica("r2", cached=("a",), **full), replica("r3", slots=("a", "z"))
    assert (pick([r1, r2, r3], "a", {}, LIMITS).reason, ids(pick([r1, r2, r3], "a", {}, LIMITS))[0]) == (
        SLOT,
        "r3",
    )
    assert pick([r1, r2], "a", {}, LIMITS).reason == HOST and ids(pick([r1, r2], "a", {}, LIMITS))[0] == "r2"
    r4 = replica("r4", slots=("q",))
    assert (
        pick([r1, r4], "a", {}, LIMITS).reason == FREE_SLOT
        and ids(pick([r1, r4], "a", {}, LIMITS))[0] == "r4"
    )
    r5 = replica("r5", **full)
    p = pick([r1, r5], "a", {"r1": 3}, LIMITS)
    assert (p.reason, ids(p)) == (LEAST_LOADED, ["r5", "r1"])
    assert pick([r1, r5], "", {"r5": 1}, LIMITS).reason == BASE


def test_a_replica_short_of_kv_blocks_is_passed_over_while_another_has_room():
    limits = Thresholds(queue_threshold=8, spread_threshold=2, max_copies=2, kv_free_min=0.1)
    holder = replica("r1", slots=("a",), kv_free=0.05)  # its heartbeat: 5% of KV blocks free
    roomy = replica("r2", slots=("q",), kv_free=0.6)
    p = pick([holder, roomy], "a", {}, limits)
    assert (p.reason, ids(p)) == (FREE_SLOT, ["r2", "r1"])  # the holder stays, for retries
    assert ids(pick([holder, roomy], "a", {}, LIMITS))[0] == "r1"  # kv_free_min 0: affinity wins
    short = replica("r2", slots=("q",), kv_free=0.02)
    p = pick([holder, short], "a", {}, limits)  # every replica short: affinity again
    assert (p.reason, ids(p)[0]) == (SLOT, "r1")


def test_down_and_draining_replicas_are_never_chosen_and_overloaded_ones_last():
    holder = replica("r1", slots=("a",))
    down = ReplicaView("r2", "10.0.0.2:1", False, slots=frozenset({"a"}))
    draining = replica("r3", slots=("a",), draining=True)
    assert ids(pick([holder, down, draining], "a", {}, LIMITS)) == ["r1"]
    assert pick([down], "a", {}, LIMITS) is None
    spare = replica("r4")
    p = pick([holder, spare], "a", {"r1": 8}, LIMITS)  # at the queue threshold
    assert ids(p) == ["r4", "r1"]
    queued = replica("r1", slots=("a",), waiting=8)  # its heartbeat says so, too
    assert ids(pick([queued, spare], "a", {}, LIMITS))[0] == "r4"


def test_a_hot_adapter_gains_copies_up_to_the_bound_and_concentrates_again():
    r1, r2, r3 = replica("r1", slots=("a",)), replica("r2"), replica("r3")
    assert ids(pick([r1, r2, r3], "a", {"r1": 1}, LIMITS, {"r1": 1}))[0] == "r1"
    # A replica busy with other adapters keeps the adapter: only its own queue spreads it.
    assert ids(pick([r1, r2, r3], "a", {"r1": 6}, LIMITS, {"r1": 0}))[0] == "r1"
    p = pick([r1, r2, r3], "a", {"r1": 2}, LIMITS, {"r1": 2})
    assert p.reason == SPREAD and ids(p)[0] in ("r2", "r3")
    r2 = replica("r2", slots=("a",))  # the copy loaded
    p = pick([r1, r2, r3], "a", {"r1": 2, "r2": 2}, LIMITS, {"r1": 2, "r2": 2})
    assert p.reason == SLOT and ids(p)[0] in ("r1", "r2")  # max_copies reached: no third copy
    # Demand falls: every request goes to the first holder in the adapter's stable order again.
    first = {ids(pick([r1, r2, r3], "a", {}, LIMITS))[0] for _ in range(5)}
    assert len(first) == 1


def test_a_pick_never_compares_whole_replica_views(monkeypatch):
    """Views are told apart by id: comparing them whole (frozensets of adapters included) once
    made every pick O(replicas^2), 0.16 s at 1,000 replicas (bench placement-scale)."""
    compared = []
    monkeypatch.setattr(ReplicaView, "__eq__", lambda self, other: compared.append(1) or self is other)
    replicas = [replica(f"r{i}", waiting=8 * (i % 3 == 0)) for i in range(300)]
    p = pick(replicas, "a", {}, LIMITS)
    assert not compared
    assert sorted(ids(p)) == sorted(r.replica_id for r in replicas)  # the overloaded ones come last
    assert {r.replica_id for r in p.replicas[-100:]} == {f"r{i}" for i in range(0, 300, 3)}


def test_the_picker_config_rejects_thresholds_out_of_range():
    with pytest.raises(ValueError, match=r"kv_free_threshold \(1.5\) must be in \[0, 1\]"):
        PickerConfig(kv_free_threshold=1.5)
    with pytest.raises(ValueError, match=r"queue_threshold \(0\) must be >= 1"):
        PickerConfig(queue_threshold=0)
    assert PickerConfig(kv_free_threshold=0.0).kv_free_threshold == 0.0  # 0 = never skip for KV
