"""The adapter manager: its four parts wired to one registry, store and replica client.

| part | module | job |
|---|---|---|
| `catalog` | `catalog.py` | registry operations: register, upload, get, list, unregister, fetch bytes, events |
| `routes` | `routes.py` | aliases and routing rules, and resolving a request against them |
| `placement` | `placement.py` | where adapters go: load, evict, pin, the host-cache policy; commands to replicas |
| `membership` | `membership.py` | replicas join, heartbeat, report and leave; sweeps; pins placed again |

State lives in Redis (`Registry`), bytes in the content-addressed store (`BlobStore`); replicas are
told what to load and evict through their InferenceService (`ReplicaClient`). Any number of
managers may run against one Redis: everything they share is in Redis, and what they keep in memory
(single-flight loads, parsed engine profiles) is only an optimisation.
"""

from __future__ import annotations

from adapter_svc.blobs import BlobStore
from adapter_svc.catalog import Catalog
from adapter_svc.config import ManagerConfig
from adapter_svc.membership import Membership
from adapter_svc.placement import Placement
from adapter_svc.registry import Registry
from adapter_svc.replica_client import ReplicaClient
from adapter_svc.routes import Routes


class AdapterManager:
    """The control plane's domain logic, one part per group of RPCs; no protobuf, no Redis commands."""

    def __init__(self, config: ManagerConfig, registry: Registry, blobs: BlobStore, replicas: ReplicaClient):
        self.replicas = replicas
        self.placement = Placement(config, registry, replicas)
        self.catalog = Catalog(config, registry, blobs, self.placement)
        self.routes = Routes(registry)
        self.membership = Membership(config, registry, self.placement)

    async def close(self) -> None:
        self.membership.close()
        await self.replicas.close()
