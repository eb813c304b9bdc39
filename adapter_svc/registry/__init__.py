"""The control plane's state in Redis: the registry, replica membership and mirrors, routing, events.

The only package that talks to Redis (with `migration.py`, which runs once before it serves). Each
change is a sequence of Lua scripts from `adapter_svc/scripts/` (a module per tag, named after the
part below that runs it), each atomic on the keys of ONE entity's hash tag (layout `v2`,
`loraserve/cluster_keys.py`): the owner's script first (the adapter record for
the registry, the replica's mirror for residency, the blob's references for stored copies), then
the state derived from it on other slots (the adapter's `on` hash, the global indexes, the event
stream) in non-transactional pipelines, which a Redis Cluster client splits per node. Every step
is idempotent, and each sequence is ordered so that a manager dying between two steps leaves only
drift that `reconcile_*` repairs (adapter_svc/README.md lists each invariant and its repair).
Consistent reads of one entity are MULTI/EXEC pipelines (one slot). The client retries commands
with exponential backoff while the connection is lost; after the last retry the error propagates
and the RPC answers UNAVAILABLE (see `errors.STATUS_BY_FAMILY`). Every reply is decoded here into
the typed values of `records.py`; callers never see a raw list.

`Registry` is assembled from one part per entity of the key layout, each on `RegistryBase`:

  module            part            keys
  base.py           RegistryBase    the client, scripts, pipelines, events and derived state after a change
  adapters.py       Adapters        adapter records, their global indexes, pins, placement claims
  blob_refs.py      BlobRefs        stored copies' references and leases, the blob index, garbage
  replicas.py       Replicas        membership, heartbeats, the mirror of each replica's residency
  cluster_wide.py   ClusterWide     routing (aliases, rules), the event stream, the gauges' counts
  reconcile.py      Reconcile       the reconciliation passes over all of them
"""

from __future__ import annotations

from adapter_svc.registry.adapters import Adapters
from adapter_svc.registry.base import connect
from adapter_svc.registry.reconcile import Reconcile
from adapter_svc.registry.replicas import Replicas

__all__ = ["Registry", "connect"]


class Registry(Adapters, Replicas, Reconcile):
    """Typed access to one cluster's keys: every part above (`Adapters` brings `BlobRefs` and
    `ClusterWide`, which it uses), on one client (`RegistryBase.__init__`)."""
