"""Where an adapter should be loaded when the caller does not say: affinity first, then room."""

from __future__ import annotations

from adapter_svc.registry import AdapterRecord, ReplicaRecord


def can_hold(replica: ReplicaRecord, adapter: AdapterRecord) -> bool:
    """A live replica whose slots are big enough and which serves the adapter's target modules."""
    engine = replica.engine
    return (
        replica.up
        and adapter.rank <= int(engine.get("max_lora_rank", 0))
        and set(adapter.target_modules) <= set(engine.get("lora_target_modules", ()))
    )


def choose_replica(adapter: AdapterRecord, replicas: list[ReplicaRecord]) -> ReplicaRecord | None:
    """The best replica for `adapter`, or None if no live replica can hold it.

    Preference, in order: already in a slot > in the host cache > being loaded there > most free
    host-cache room > fewest adapters > replica id (for a deterministic answer).
    """

    def score(replica: ReplicaRecord) -> tuple:
        held = replica.holds(adapter.adapter_id)
        count = len(replica.residents) + len(replica.loading)
        free = int(replica.engine.get("max_cpu_loras", 0)) - count
        return (
            held is not None and held.slot >= 0,
            held is not None,
            adapter.adapter_id in replica.loading,
            free,
            -count,
        )

    candidates = sorted((r for r in replicas if can_hold(r, adapter)), key=lambda r: r.replica_id)
    return max(candidates, key=score, default=None)
