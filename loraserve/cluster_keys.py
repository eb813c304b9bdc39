"""Every Redis key of the cluster, built here and nowhere else (the manager writes them; the
front door's endpoint picker reads them).

Layout `v2` shards: each entity's keys share a Redis Cluster hash tag of their own, so a Redis
Cluster spreads a deployment over every primary, and every atomic (Lua) change touches the keys of
one tag, hence one slot:

  tag                      holds
  {<cluster>}              the global set: indexes, membership index, routing, events, blob index
  {<cluster>/a/<id>}       one adapter: record, residency, placement claim
  {<cluster>/r/<id>}       one replica: membership, heartbeat, host cache, slots, pins, loading
  {<cluster>/b/<blob>}     one stored copy: references, leases, deletion claim

A cluster name matches `config.CLUSTER_RE` (no '/', '{', '}') and an id `names.ID_RE` (no '{',
'}', ':'), so a tag ends where it should and the kind segment (`a`, `r`, `b`) keeps tags of
different kinds apart even when ids are equal. `<G>` = `loraserve:v2:{<cluster>}:`,
`<A>` = `loraserve:v2:{<cluster>/a/<id>}:`, `<R>` = `...{<cluster>/r/<id>}:`, `<B>` = `...{<cluster>/b/<b>}:`.

  key                         type    owner (the truth)     atomic operations that touch it
  <A>record                   HASH    registry record       REGISTER, UNREGISTER_*, PIN, RESIDE
  <A>on                       HASH    derived: replica id -> LOADING|CACHED|ACTIVE   RESIDE, UNREGISTER_FINISH
  <A>on-version               HASH    replica id -> mirror version of the last RESIDE (orders them);
                                      DROP_VERSIONS of replicas forgotten
  <A>placement                STRING  placement claim (expires)        SET NX PX / DEL
  <R>member                   HASH    membership (address, engine, model, status, epoch, seq, mv,
                                      load `LOAD_FIELDS`)  every replica script (mv: residency);
                                      FORGET deletes every <R> key of a replica long down
  <R>alive                    STRING  heartbeat TTL; gone = lapsed      JOIN, HEARTBEAT, MARK_DOWN
  <R>host                     ZSET    adapter id -> last use (ms)       JOIN, HEARTBEAT, REPORT, ACQUIRE,
  <R>slots                    HASH    adapter id -> slot index            MARK_DOWN, MIRROR_EVICTED
  <R>pins                     SET     adapter ids pinned on the replica   (the replica's mirror)
  <R>loading                  HASH    adapter id -> reservation time (ms) of a load in progress
  <B>refs                     SET     adapter ids using copy b          SADD (register), BLOB_RELEASE, BLOB_CLAIM
  <B>leases                   ZSET    lease token -> expiry (ms)        BLOB_HOLD, BLOB_RELEASE, BLOB_CLAIM
  <B>deleting                 STRING  the manager deleting b (expires)  BLOB_CLAIM, BLOB_DELETED
  <G>adapters                 ZSET    index of every adapter id (score 0)   INDEX, UNINDEX
  <G>adapters:tenant:<t>      ZSET    index by tenant                      INDEX, UNINDEX
  <G>adapters:state:<s>       ZSET    index by registry state              INDEX, STATE_INDEX, UNINDEX
  <G>adapters:state-seq       HASH    id -> record `state_seq` the state index reflects (orders moves)
  <G>pinned                   SET     derived from records' `pinned`        SADD/SREM after PIN, INDEX, UNINDEX
  <G>replicas                 ZSET    replica id -> last heartbeat (ms)     ZADD after JOIN/HEARTBEAT,
                                                                          UNLIST_REPLICA after FORGET
  <G>replicas:changed         ZSET    replica id -> Redis time (ms) of the last change to what the
                                      picker reads of it (member fields, host, slots, loading)
                                      TOUCH_REPLICA after a replica script that changed it;
                                      ZREM by the replica pass for ids gone from <G>replicas,
                                      and by UNLIST_REPLICA
  <G>aliases                  HASH    alias -> JSON [[adapter id, weight], ...]  SET_ALIAS, REVERT_ALIAS,
                                                                          DELETE_ALIAS, UNROUTE
  <G>rules                    STRING  JSON list of routing rules            SET_RULES, REVERT_RULES, UNROUTE
  <G>routing:version          STRING  incremented by every alias or rule change
  <G>events                   STREAM  every state change, capped (XADD by the registry)
  <G>blobs                    ZSET    every stored copy with references or leases (reconciliation)
  <G>blobs:orphaned           ZSET    b -> when its last reference went (ms)
  <G>blobs:refs-version       STRING  set once every record's blob reference was counted
  <G>layout                   STRING  the layout version of this Redis ('v2'); see `adapter_svc.migration`
  <G>layout:lock              STRING  the manager migrating (SET NX PX)

Lua scripts get the cluster name as ARGV[1] and build keys with `LUA_KEY_FUNCTIONS`, generated from
the same constants; each script touches the keys of the tag of its KEYS[1] only.
"""

from __future__ import annotations

VERSION = "v2"
ROOT = "loraserve:"

# entity kinds inside a tag
ADAPTER_KIND = "/a/"
REPLICA_KIND = "/r/"
BLOB_KIND = "/b/"

# adapter keys
RECORD = "record"
ON = "on"
ON_VERSION = "on-version"
PLACEMENT = "placement"
# replica keys
MEMBER = "member"
ALIVE = "alive"
HOST = "host"
SLOTS = "slots"
PINS = "pins"
LOADING = "loading"
# blob keys
REFS = "refs"
LEASES = "leases"
DELETING = "deleting"
# global keys
ADAPTERS = "adapters"
BY_TENANT = "adapters:tenant:"
BY_STATE = "adapters:state:"
STATE_SEQ = "adapters:state-seq"
PINNED = "pinned"
REPLICAS = "replicas"
REPLICAS_CHANGED = "replicas:changed"
ALIASES = "aliases"
RULES = "rules"
ROUTING_VERSION = "routing:version"
EVENTS = "events"
BLOBS = "blobs"
ORPHANED_BLOBS = "blobs:orphaned"
BLOB_REFS_VERSION = "blobs:refs-version"
LAYOUT = "layout"
LAYOUT_LOCK = "layout:lock"

# Fields of `<R>member` set by every heartbeat: requests waiting and running, the free fraction
# of the KV cache, '1' while the replica drains, and when (ms, Redis clock) the load was taken.
LOAD_FIELDS = ("waiting", "running", "kv_free", "draining", "load_at")


def _tag(cluster: str, kind: str = "", entity: str = "") -> str:
    return f"{ROOT}{VERSION}:{{{cluster}{kind}{entity}}}:"


def prefix(cluster: str) -> str:
    """The prefix of the cluster's global keys."""
    return _tag(cluster)


class Keys:
    """The keys of one cluster."""

    def __init__(self, cluster: str):
        self.cluster = cluster
        self.prefix = p = prefix(cluster)
        self.adapters = p + ADAPTERS
        self.state_seq = p + STATE_SEQ
        self.pinned = p + PINNED
        self.replicas = p + REPLICAS
        self.replicas_changed = p + REPLICAS_CHANGED
        self.aliases = p + ALIASES
        self.rules = p + RULES
        self.routing_version = p + ROUTING_VERSION
        self.events = p + EVENTS
        self.blobs = p + BLOBS
        self.orphaned_blobs = p + ORPHANED_BLOBS
        self.blob_refs_version = p + BLOB_REFS_VERSION
        self.layout = p + LAYOUT
        self.layout_lock = p + LAYOUT_LOCK

    def by_tenant(self, tenant: str) -> str:
        return self.prefix + BY_TENANT + tenant

    def by_state(self, state: str) -> str:
        return self.prefix + BY_STATE + state

    def adapter_prefix(self, adapter_id: str) -> str:
        return _tag(self.cluster, ADAPTER_KIND, adapter_id)

    def adapter(self, adapter_id: str) -> str:
        return self.adapter_prefix(adapter_id) + RECORD

    def adapter_on(self, adapter_id: str) -> str:
        return self.adapter_prefix(adapter_id) + ON

    def adapter_on_version(self, adapter_id: str) -> str:
        return self.adapter_prefix(adapter_id) + ON_VERSION

    def placement(self, adapter_id: str) -> str:
        return self.adapter_prefix(adapter_id) + PLACEMENT

    def replica_prefix(self, replica_id: str) -> str:
        return _tag(self.cluster, REPLICA_KIND, replica_id)

    def replica(self, replica_id: str) -> str:
        return self.replica_prefix(replica_id) + MEMBER

    def replica_alive(self, replica_id: str) -> str:
        return self.replica_prefix(replica_id) + ALIVE

    def replica_host(self, replica_id: str) -> str:
        return self.replica_prefix(replica_id) + HOST

    def replica_slots(self, replica_id: str) -> str:
        return self.replica_prefix(replica_id) + SLOTS

    def replica_pins(self, replica_id: str) -> str:
        return self.replica_prefix(replica_id) + PINS

    def replica_loading(self, replica_id: str) -> str:
        return self.replica_prefix(replica_id) + LOADING

    def blob_prefix(self, blob: str) -> str:
        return _tag(self.cluster, BLOB_KIND, blob)

    def blob_refs(self, blob: str) -> str:
        return self.blob_prefix(blob) + REFS

    def blob_leases(self, blob: str) -> str:
        return self.blob_prefix(blob) + LEASES

    def blob_deleting(self, blob: str) -> str:
        return self.blob_prefix(blob) + DELETING


# Lua mirrors of the builders above; `C` is the cluster name (ARGV[1] of every script).
LUA_KEY_FUNCTIONS = f"""
local G = '{ROOT}{VERSION}:{{' .. C .. '}}:'
local function tag(kind, e) return '{ROOT}{VERSION}:{{' .. C .. kind .. e .. '}}:' end
local function k_adapter(id) return tag('{ADAPTER_KIND}', id) .. '{RECORD}' end
local function k_on(id) return tag('{ADAPTER_KIND}', id) .. '{ON}' end
local function k_on_version(id) return tag('{ADAPTER_KIND}', id) .. '{ON_VERSION}' end
local function k_placement(id) return tag('{ADAPTER_KIND}', id) .. '{PLACEMENT}' end
local function k_replica(r) return tag('{REPLICA_KIND}', r) .. '{MEMBER}' end
local function k_alive(r) return tag('{REPLICA_KIND}', r) .. '{ALIVE}' end
local function k_host(r) return tag('{REPLICA_KIND}', r) .. '{HOST}' end
local function k_slots(r) return tag('{REPLICA_KIND}', r) .. '{SLOTS}' end
local function k_pins(r) return tag('{REPLICA_KIND}', r) .. '{PINS}' end
local function k_loading(r) return tag('{REPLICA_KIND}', r) .. '{LOADING}' end
local function k_blob_refs(b) return tag('{BLOB_KIND}', b) .. '{REFS}' end
local function k_blob_leases(b) return tag('{BLOB_KIND}', b) .. '{LEASES}' end
local function k_blob_deleting(b) return tag('{BLOB_KIND}', b) .. '{DELETING}' end
local function k_all() return G .. '{ADAPTERS}' end
local function k_tenant(t) return G .. '{BY_TENANT}' .. t end
local function k_state(s) return G .. '{BY_STATE}' .. s end
local function k_state_seq() return G .. '{STATE_SEQ}' end
local function k_pinned() return G .. '{PINNED}' end
local function k_replicas() return G .. '{REPLICAS}' end
local function k_replicas_changed() return G .. '{REPLICAS_CHANGED}' end
local function k_aliases() return G .. '{ALIASES}' end
local function k_rules() return G .. '{RULES}' end
local function k_routing_version() return G .. '{ROUTING_VERSION}' end
local function k_events() return G .. '{EVENTS}' end
"""
