"""Every Redis key of the cluster, built here and nowhere else (the manager writes them; the
front door's endpoint picker reads them).

All keys of a cluster share the prefix `loraserve:v1:{<cluster>}:`; the braces are a Redis Cluster
hash tag, so a cluster's keys live in one slot and every Lua script may touch any of them. The
version segment (`v1`) changes when the layout does.

Layout (`<p>` = the prefix):
  <p>adapter:<id>             HASH   registry record (see `store.RECORD_FIELDS`)
  <p>adapter:<id>:on          HASH   replica id -> LOADING | CACHED | ACTIVE | FAILED (live replicas)
  <p>adapters                 ZSET   every adapter id, score 0 (lexicographic paging)
  <p>adapters:tenant:<t>      ZSET   adapter ids of tenant t, score 0
  <p>adapters:state:<s>       ZSET   adapter ids whose registry state is s, score 0
  <p>pinned                   SET    adapter ids pinned cluster-wide
  <p>replicas                 ZSET   replica id -> last heartbeat (ms)
  <p>replica:<r>              HASH   membership: address, engine, model, status, epoch, seq, ...
                                     and the load of its last heartbeat (`LOAD_FIELDS`)
  <p>replica:<r>:alive        STRING set with a TTL by every heartbeat; gone = lapsed
  <p>replica:<r>:host         ZSET   adapter id -> last use (ms): the replica's host cache
  <p>replica:<r>:slots        HASH   adapter id -> slot index
  <p>replica:<r>:pins         SET    adapter ids pinned on the replica
  <p>replica:<r>:loading      HASH   adapter id -> reservation time (ms) of a load in progress
  <p>aliases                  HASH   alias name -> JSON [[adapter id, weight], ...]
  <p>rules                    STRING JSON list of routing rules
  <p>routing:version          STRING incremented by every alias or rule change
  <p>placement:<id>           STRING replica chosen for an in-progress placement (expires)
  <p>events                   STREAM every state change, capped
  <p>blob:<b>:refs            SET    adapter ids registered with stored copy b (<sha256>-<config sha[:16]>)
  <p>blob:<b>:leases          ZSET   lease token -> expiry (ms): a registration or fetch using b now
  <p>blob:<b>:deleting        STRING the manager deleting b (expires): no lease is granted meanwhile
  <p>blobs:orphaned           ZSET   b -> when its last reference went (ms): garbage to collect
  <p>blobs:refs-version       STRING set once every record's blob reference was counted (migration)

Lua scripts derive per-adapter and per-replica keys from the prefix with the same segments
(`LUA_KEY_FUNCTIONS`, generated from the constants below).
"""

from __future__ import annotations

VERSION = "v1"

ADAPTER = "adapter:"
ON_SUFFIX = ":on"
ADAPTERS = "adapters"
BY_TENANT = "adapters:tenant:"
BY_STATE = "adapters:state:"
PINNED = "pinned"
REPLICAS = "replicas"
REPLICA = "replica:"
ALIVE_SUFFIX = ":alive"
HOST_SUFFIX = ":host"
SLOTS_SUFFIX = ":slots"
PINS_SUFFIX = ":pins"
LOADING_SUFFIX = ":loading"
ALIASES = "aliases"
RULES = "rules"
ROUTING_VERSION = "routing:version"
PLACEMENT = "placement:"
EVENTS = "events"
BLOB = "blob:"
REFS_SUFFIX = ":refs"
LEASES_SUFFIX = ":leases"
DELETING_SUFFIX = ":deleting"
ORPHANED_BLOBS = "blobs:orphaned"
BLOB_REFS_VERSION = "blobs:refs-version"

# Fields of `replica:<r>` set by every heartbeat: requests waiting and running, the free fraction
# of the KV cache, '1' while the replica drains, and when (ms, Redis clock) the load was taken.
LOAD_FIELDS = ("waiting", "running", "kv_free", "draining", "load_at")


def prefix(cluster: str) -> str:
    return f"loraserve:{VERSION}:{{{cluster}}}:"


class Keys:
    """The keys of one cluster."""

    def __init__(self, cluster: str):
        self.prefix = prefix(cluster)
        p = self.prefix
        self.adapters = p + ADAPTERS
        self.pinned = p + PINNED
        self.replicas = p + REPLICAS
        self.aliases = p + ALIASES
        self.rules = p + RULES
        self.routing_version = p + ROUTING_VERSION
        self.events = p + EVENTS
        self.orphaned_blobs = p + ORPHANED_BLOBS
        self.blob_refs_version = p + BLOB_REFS_VERSION

    def adapter(self, adapter_id: str) -> str:
        return self.prefix + ADAPTER + adapter_id

    def adapter_on(self, adapter_id: str) -> str:
        return self.prefix + ADAPTER + adapter_id + ON_SUFFIX

    def by_tenant(self, tenant: str) -> str:
        return self.prefix + BY_TENANT + tenant

    def by_state(self, state: str) -> str:
        return self.prefix + BY_STATE + state

    def replica(self, replica_id: str) -> str:
        return self.prefix + REPLICA + replica_id

    def replica_alive(self, replica_id: str) -> str:
        return self.replica(replica_id) + ALIVE_SUFFIX

    def replica_host(self, replica_id: str) -> str:
        return self.replica(replica_id) + HOST_SUFFIX

    def replica_slots(self, replica_id: str) -> str:
        return self.replica(replica_id) + SLOTS_SUFFIX

    def replica_pins(self, replica_id: str) -> str:
        return self.replica(replica_id) + PINS_SUFFIX

    def replica_loading(self, replica_id: str) -> str:
        return self.replica(replica_id) + LOADING_SUFFIX

    def placement(self, adapter_id: str) -> str:
        return self.prefix + PLACEMENT + adapter_id

    def blob_refs(self, blob: str) -> str:
        return self.prefix + BLOB + blob + REFS_SUFFIX

    def blob_leases(self, blob: str) -> str:
        return self.prefix + BLOB + blob + LEASES_SUFFIX

    def blob_deleting(self, blob: str) -> str:
        return self.prefix + BLOB + blob + DELETING_SUFFIX


# Lua mirrors of the builders above; `P` is the prefix (ARGV[1] of every script).
LUA_KEY_FUNCTIONS = f"""
local function k_adapter(id) return P .. '{ADAPTER}' .. id end
local function k_on(id) return P .. '{ADAPTER}' .. id .. '{ON_SUFFIX}' end
local function k_all() return P .. '{ADAPTERS}' end
local function k_tenant(t) return P .. '{BY_TENANT}' .. t end
local function k_state(s) return P .. '{BY_STATE}' .. s end
local function k_pinned() return P .. '{PINNED}' end
local function k_replicas() return P .. '{REPLICAS}' end
local function k_replica(r) return P .. '{REPLICA}' .. r end
local function k_alive(r) return P .. '{REPLICA}' .. r .. '{ALIVE_SUFFIX}' end
local function k_host(r) return P .. '{REPLICA}' .. r .. '{HOST_SUFFIX}' end
local function k_slots(r) return P .. '{REPLICA}' .. r .. '{SLOTS_SUFFIX}' end
local function k_pins(r) return P .. '{REPLICA}' .. r .. '{PINS_SUFFIX}' end
local function k_loading(r) return P .. '{REPLICA}' .. r .. '{LOADING_SUFFIX}' end
local function k_aliases() return P .. '{ALIASES}' end
local function k_rules() return P .. '{RULES}' end
local function k_routing_version() return P .. '{ROUTING_VERSION}' end
local function k_events() return P .. '{EVENTS}' end
local function k_blob_refs(b) return P .. '{BLOB}' .. b .. '{REFS_SUFFIX}' end
local function k_blob_leases(b) return P .. '{BLOB}' .. b .. '{LEASES_SUFFIX}' end
local function k_blob_deleting(b) return P .. '{BLOB}' .. b .. '{DELETING_SUFFIX}' end
local function k_orphaned_blobs() return P .. '{ORPHANED_BLOBS}' end
"""
