"""The Lua scripts behind every multi-key change, each atomic in Redis, registered once.

Layout `v2` (`loraserve/cluster_keys.py`) gives each adapter, replica and stored copy a Redis
Cluster hash tag of its own, so each script touches the keys of ONE tag: KEYS[1] is a key of that
tag (what a Cluster client routes by), and every other key it uses is built from the same entity.
Changes that span entities are sequences of these scripts run by `registry.Registry`, owner first;
`adapter_svc/README.md` lists each sequence and the reconciliation that repairs a crash between
its steps.

Contract shared by every script:
  KEYS[1]  a key of the tag the script works on
  ARGV[1]  the cluster name; keys are built by the Lua mirrors of `loraserve/cluster_keys.py`
           (`cluster_keys.LUA_KEY_FUNCTIONS`), so one module still defines the layout
  ARGV[2]  the event stream's approximate maximum length
Script-specific ARGV start at 3 and are listed above each script. Times come from Redis `TIME`, so
every manager (and the replica TTLs) share one clock.

Every script answers {answer, events, residency}: `events` are the stream entries
{type, adapter, replica, detail, at} the change makes (the registry adds them to the global stream
right after: a manager that dies in between loses them, the change stands), and `residency` (replica
scripts only) is {mirror version, {adapter id, state, failed, reason}...}: the state ('' = none)
the replica's mirror now gives each adapter it touched, which `RESIDE` copies into the adapter's
`on` hash. Global scripts (aliases, rules, indexes) add their events to the stream themselves.

Registry state of an adapter (`state` field) is derived, never set directly: the best of its live
replicas' states (ACTIVE > CACHED > LOADING), else FAILED if its last load failed, else REGISTERED.
"""

from __future__ import annotations

import redis.asyncio as redis

from loraserve.cluster_keys import LUA_KEY_FUNCTIONS

PRELUDE = (
    """
local C = ARGV[1]
local MAXLEN = tonumber(ARGV[2])
"""
    + LUA_KEY_FUNCTIONS
    + """
local _t = redis.call('TIME')
local NOW = tonumber(_t[1]) * 1000 + math.floor(tonumber(_t[2]) / 1000)
local EVENTS = {}
local TOUCHED, TOUCHED_LIST, FAILED = {}, {}, {}

-- A stream event for the registry to add to the global stream (this script's tag holds no stream).
local function emit(kind, adapter, replica, detail)
  table.insert(EVENTS, {kind, adapter or '', replica or '', detail or '', NOW})
end

-- Global scripts only: add the event to the stream now.
local function xadd(kind, adapter, replica, detail)
  redis.call('XADD', k_events(), 'MAXLEN', '~', MAXLEN, '*', 'type', kind,
    'adapter', adapter or '', 'replica', replica or '', 'detail', detail or '', 'at', NOW)
end

local RANK = {REGISTERED = 0, FAILED = 1, LOADING = 2, CACHED = 3, ACTIVE = 4}

-- Replica scripts: adapter `id`'s residency on this replica may have changed.
local function touch(id)
  if not TOUCHED[id] then
    TOUCHED[id] = true
    table.insert(TOUCHED_LIST, id)
  end
end

-- What replica r's mirror says of adapter id: ACTIVE, CACHED, LOADING or '' (not held).
local function mirror_state(r, id)
  if redis.call('ZSCORE', k_host(r), id) then
    return redis.call('HEXISTS', k_slots(r), id) == 1 and 'ACTIVE' or 'CACHED'
  end
  return redis.call('HEXISTS', k_loading(r), id) == 1 and 'LOADING' or ''
end

-- {mirror version, {id, state, failed, reason}...} of the touched adapters; the version (a
-- counter of replica r that never goes back) orders RESIDE calls from concurrent scripts.
local function residency(r)
  if #TOUCHED_LIST == 0 then return {} end
  local out = {redis.call('HINCRBY', k_replica(r), 'mv', 1)}
  for _, id in ipairs(TOUCHED_LIST) do
    local f = FAILED[id] or {'', ''}
    table.insert(out, {id, mirror_state(r, id), f[1], f[2]})
  end
  return out
end

local function replica_ok(r, epoch)
  local st = redis.call('HMGET', k_replica(r), 'status', 'epoch', 'seq')
  return st[1] == 'UP' and st[2] == epoch, st
end

-- Forget what a replica holds (host cache, slots, pins) and, if `with_loading`, its reservations.
local function drop_mirror(r, with_loading)
  for _, id in ipairs(redis.call('ZRANGE', k_host(r), 0, -1)) do touch(id) end
  redis.call('DEL', k_host(r), k_slots(r), k_pins(r))
  if with_loading then
    for _, id in ipairs(redis.call('HKEYS', k_loading(r))) do touch(id) end
    redis.call('DEL', k_loading(r))
  end
end

-- Is snapshot entry e {id, slot, pinned, last_used_ms, sha256} an adapter the registry knows with
-- those bytes? `recs` (read by the registry just before the script): id -> {sha256 or '',
-- deleting 0/1, cluster-pinned 0/1}. A record that changes in between is caught by the next
-- heartbeat (which reads it again).
local function known(recs, e, live)
  local rec = recs[e[1]]
  return rec and rec[1] == e[5] and (not live or rec[2] == 0)
end

-- Mirror one snapshot entry; false when the registry does not know the adapter with those bytes
-- (the replica must drop it).
local function admit(r, e, recs)
  if not known(recs, e, true) then return false end
  redis.call('ZADD', k_host(r), e[4], e[1])
  redis.call('HDEL', k_loading(r), e[1])
  if e[2] >= 0 then redis.call('HSET', k_slots(r), e[1], e[2]) end
  if e[3] == 1 then redis.call('SADD', k_pins(r), e[1]) end
  touch(e[1])
  return true
end

-- Drop replica r's load reservations older than timeout_ms: a load that neither landed nor
-- failed within it (its replica gave up, or its report was lost) holds no room.
local function lapse_loading(r, timeout_ms)
  local loading = redis.call('HGETALL', k_loading(r))
  for i = 1, #loading, 2 do
    if NOW - tonumber(loading[i + 1]) > timeout_ms then
      redis.call('HDEL', k_loading(r), loading[i])
      touch(loading[i])
    end
  end
end

-- Recompute an adapter's registry state from its `on` hash; -> {new state, state_seq} when it
-- changed (the registry then moves it between the global state indexes), else {}.
local function refresh_state(id)
  local key = k_adapter(id)
  local cur = redis.call('HMGET', key, 'state', 'failed')
  if not cur[1] then return {} end
  local best = 'REGISTERED'
  for _, s in ipairs(redis.call('HVALS', k_on(id))) do
    if RANK[s] > RANK[best] then best = s end
  end
  if best == 'REGISTERED' and cur[2] == '1' then best = 'FAILED' end
  if best == cur[1] then return {} end
  redis.call('HSET', key, 'state', best, 'updated_at', NOW)
  return {best, redis.call('HINCRBY', key, 'state_seq', 1)}
end

local function bump_routing(kind, detail)
  local v = redis.call('INCR', k_routing_version())
  xadd(kind, '', '', detail)
  return v
end
"""
)


def _script(body: str, replica: bool = False) -> str:
    """A script: PRELUDE, the body as `main()`, then the {answer, events, residency} reply."""
    tail = "residency(ARGV[3])" if replica else "{}"
    return (
        f"{PRELUDE}\nlocal function main()\n{body}\nend\nlocal out = main()\nreturn {{out, EVENTS, {tail}}}\n"
    )


# --- adapter tag: KEYS[1] = the adapter's record ------------------------------------------------

# ARGV[3] adapter id, ARGV[4] JSON object of the record's string fields.
# -> {'ok'|'same', tenant, state, state_seq, pinned} | {'exists'} (other content) |
#    {'tenant', registered tenant} (identical content, another tenant)
REGISTER = _script("""
local id = ARGV[3]
local rec = cjson.decode(ARGV[4])
local key = k_adapter(id)
local cur = redis.call('HMGET', key, 'sha256', 'config_sha256', 'tenant', 'state', 'state_seq', 'pinned')
if cur[1] then
  if cur[1] ~= rec.sha256 or cur[2] ~= rec.config_sha256 then return {'exists'} end
  if (cur[3] or '') ~= rec.tenant then return {'tenant', cur[3] or ''} end
  return {'same', cur[3] or '', cur[4], cur[5] or '0', cur[6] or '0'}
end
local flat = {'state', 'REGISTERED', 'state_seq', 0, 'created_at', NOW, 'updated_at', NOW}
for k, v in pairs(rec) do
  table.insert(flat, k)
  table.insert(flat, v)
end
redis.call('HSET', key, unpack(flat))
emit('registered', id, '', rec.source)
return {'ok', rec.tenant, 'REGISTERED', '0', '0'}
""")

# ARGV[3] adapter id, ARGV[4] '1' = force.
# Marks the adapter `deleting` (no new loads) and answers who holds it, unless refused. The
# registry checks aliases and rules after marking (write, then re-check: a concurrent SET_ALIAS
# does the reverse, so one of the two sees the other) and undoes the mark if referenced.
# -> {'ok', holder...} | {'not_found'} | {'pinned'} | {'active', replica...}
UNREGISTER_BEGIN = _script("""
local id, force = ARGV[3], ARGV[4] == '1'
local key = k_adapter(id)
local rec = redis.call('HMGET', key, 'sha256', 'pinned')
if not rec[1] then return {'not_found'} end
if not force then
  if rec[2] == '1' then return {'pinned'} end
  local on = redis.call('HGETALL', k_on(id))
  local active = {'active'}
  for i = 1, #on, 2 do
    if on[i + 1] == 'ACTIVE' then table.insert(active, on[i]) end
  end
  if #active > 1 then return active end
else
  redis.call('HSET', key, 'pinned', '0')
end
redis.call('HSET', key, 'deleting', '1')
local holders = redis.call('HKEYS', k_on(id))
table.insert(holders, 1, 'ok')
return holders
""")

# ARGV[3] adapter id. Undo UNREGISTER_BEGIN after a failed eviction or a reference. -> 1
UNREGISTER_ABORT = _script("""
redis.call('HDEL', k_adapter(ARGV[3]), 'deleting')
return 1
""")

# ARGV[3] adapter id. Deletes the adapter's keys unless a replica still holds it.
# -> {'ok', tenant, state, sha256, config_sha256} | {'not_found'} | {'held', replica...}
UNREGISTER_FINISH = _script("""
local id = ARGV[3]
local key = k_adapter(id)
local rec = redis.call('HMGET', key, 'tenant', 'state', 'sha256', 'config_sha256')
if not rec[2] then return {'not_found'} end
local holders = redis.call('HKEYS', k_on(id))
if #holders > 0 then
  redis.call('HDEL', key, 'deleting')
  table.insert(holders, 1, 'held')
  return holders
end
redis.call('DEL', key, k_on(id), k_on_version(id), k_placement(id))
return {'ok', rec[1] or '', rec[2], rec[3], rec[4]}
""")

# ARGV[3] adapter id, ARGV[4] '1' = pin, '0' = unpin. The registry then updates the global
# `pinned` set (derived; reconciliation repairs it from the records).
# -> {'ok', replica, state, ...} (its live holders) | {'not_found'} | {'deleting'}
PIN = _script("""
local id = ARGV[3]
local key = k_adapter(id)
local rec = redis.call('HMGET', key, 'sha256', 'deleting', 'pinned')
if not rec[1] then return {'not_found'} end
if rec[2] == '1' then return {'deleting'} end
if ARGV[4] == '1' and rec[3] ~= '1' then emit('pinned', id, '', '') end
if ARGV[4] == '0' and rec[3] == '1' then emit('unpinned', id, '', '') end
redis.call('HSET', key, 'pinned', ARGV[4], 'updated_at', NOW)
local on = redis.call('HGETALL', k_on(id))
table.insert(on, 1, 'ok')
return on
""")

# ARGV[3] adapter id, ARGV[4] replica id, ARGV[5] state ('' = not held), ARGV[6] the replica's
# mirror version, ARGV[7] '1' = mark the last load failed, '0' = clear that, '' = leave it,
# ARGV[8] the failure's reason. Copies one replica's residency into the adapter's `on` hash,
# unless a newer version already did (concurrent scripts of one replica may land out of order).
# -> {new state, state_seq} when the registry state changed, else {}
RESIDE = _script("""
local id, r, state, mv = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local key = k_adapter(id)
if redis.call('EXISTS', key) == 0 then return {} end
if mv < tonumber(redis.call('HGET', k_on_version(id), r) or '-1') then return {} end
redis.call('HSET', k_on_version(id), r, mv)
if state == '' then redis.call('HDEL', k_on(id), r) else redis.call('HSET', k_on(id), r, state) end
if ARGV[7] == '1' then
  redis.call('HSET', key, 'failed', '1', 'reason', ARGV[8])
elseif ARGV[7] == '0' then
  redis.call('HDEL', key, 'failed', 'reason')
end
return refresh_state(id)
""")

# --- replica tag: KEYS[1] = the replica's membership hash, ARGV[3] = replica id ----------------

# ARGV[4] address, ARGV[5] engine JSON, ARGV[6] model config JSON, ARGV[7] snapshot JSON
# [[id, slot, pinned, last_used_ms, sha256], ...], ARGV[8] snapshot seq, ARGV[9] membership TTL
# (ms), ARGV[10] the credential the manager presents to this replica, ARGV[11] records JSON (see
# `known`). Refused while this replica is live at another address (the registry checks, before,
# that no other live replica has this address). Replaces the replica's mirror with the snapshot.
# -> {epoch, {drop id...}, NOW} | {-1, the live replica, its address}
JOIN = _script(
    """
local r = ARGV[3]
local held = redis.call('HGET', k_replica(r), 'address')
if held and held ~= ARGV[4] and redis.call('EXISTS', k_alive(r)) == 1 then return {-1, r, held} end
drop_mirror(r, true)
local epoch = redis.call('HINCRBY', k_replica(r), 'epoch', 1)
redis.call('HSET', k_replica(r), 'address', ARGV[4], 'engine', ARGV[5], 'model', ARGV[6],
  'status', 'UP', 'joined_at', NOW, 'last_heartbeat', NOW, 'seq', ARGV[8], 'down_reason', '',
  'credential', ARGV[10])
local recs = cjson.decode(ARGV[11])
local drop = {}
for _, e in ipairs(cjson.decode(ARGV[7])) do
  if not admit(r, e, recs) then table.insert(drop, e[1]) end
end
redis.call('SET', k_alive(r), epoch, 'PX', ARGV[9])
emit('replica_joined', '', r, 'epoch ' .. epoch)
return {epoch, drop, NOW}
""",
    replica=True,
)

# ARGV[4] epoch, ARGV[5] snapshot JSON (as JOIN), ARGV[6] snapshot seq, ARGV[7] membership TTL
# (ms), ARGV[8..11] load: waiting, running, KV free fraction, draining ('1'/'0'), ARGV[12] load
# timeout (ms), ARGV[13] records JSON (see `known`). Renews the TTL, stores the load
# (`LOAD_FIELDS`), lapses old reservations. When the snapshot is at the mirror's seq, refreshes
# last-use times and pins (which no change reports) and, if the mirror drifted, replaces it.
# Answers which local pins the cluster no longer holds, and which held adapters the registry does
# not know with those bytes, and whether the load the picker reads (waiting, running, draining) moved.
# -> {'rejoin'} | {'ok', {unpin id...}, {pin id...}, {drop id...}, NOW, 1|0 (load moved)}
HEARTBEAT = _script(
    """
local r = ARGV[3]
local ok, st = replica_ok(r, ARGV[4])
if not ok then return {'rejoin'} end
redis.call('SET', k_alive(r), ARGV[4], 'PX', ARGV[7])
local was = redis.call('HMGET', k_replica(r), 'waiting', 'running', 'draining')
local moved = (was[1] ~= ARGV[8] or was[2] ~= ARGV[9] or was[3] ~= ARGV[11]) and 1 or 0
redis.call('HSET', k_replica(r), 'last_heartbeat', NOW, 'waiting', ARGV[8], 'running', ARGV[9],
  'kv_free', ARGV[10], 'draining', ARGV[11], 'load_at', NOW)
lapse_loading(r, tonumber(ARGV[12]))  -- reservations lapse even when no new load asks for room
local snap = cjson.decode(ARGV[5])
local recs = cjson.decode(ARGV[13])
local unpin, pin, drop = {}, {}, {}
for _, e in ipairs(snap) do
  if not known(recs, e, true) then
    table.insert(drop, e[1])
  elseif e[3] == 1 and recs[e[1]][3] == 0 then
    table.insert(unpin, e[1])
  elseif e[3] == 0 and recs[e[1]][3] == 1 then
    table.insert(pin, e[1])
  end
end
if st[3] == ARGV[6] then
  local drift, seen = false, 0
  for _, e in ipairs(snap) do
    if known(recs, e, false) then
      seen = seen + 1
      if not redis.call('ZSCORE', k_host(r), e[1]) then
        drift = true
      else
        redis.call('ZADD', k_host(r), 'XX', e[4], e[1])
        if e[3] == 1 then redis.call('SADD', k_pins(r), e[1]) else redis.call('SREM', k_pins(r), e[1]) end
        local slot = tonumber(redis.call('HGET', k_slots(r), e[1]) or '-1')
        if slot ~= e[2] then drift = true end
      end
    end
  end
  if drift or seen ~= redis.call('ZCARD', k_host(r)) then
    drop_mirror(r, false)
    for _, e in ipairs(snap) do admit(r, e, recs) end
    emit('resynced', '', r, 'mirror replaced by the replica snapshot')
  end
end
return {'ok', unpin, pin, drop, NOW, moved}
""",
    replica=True,
)

# ARGV[4] epoch, ARGV[5] changes JSON [[seq, kind, id, slot, at_ms, reason]...] with kind one of
# loaded / activated / deactivated / evicted / load_failed, ARGV[6] JSON {id: 1} of the changed
# adapters the registry knows (read just before).
# Applies changes with seq = mirror seq + 1, in order; skips ones already applied.
# -> 'ok' | 'rejoin' (stale epoch, replica down, or a gap in seq)
REPORT = _script(
    """
local r = ARGV[3]
local ok, st = replica_ok(r, ARGV[4])
if not ok then return 'rejoin' end
local seq = tonumber(st[3])
local recs = cjson.decode(ARGV[6])

local function apply(kind, id, slot, at, reason)
  local known = recs[id] == 1
  local in_host = redis.call('ZSCORE', k_host(r), id)
  touch(id)
  if kind == 'loaded' then
    redis.call('HDEL', k_loading(r), id)
    if known then
      redis.call('ZADD', k_host(r), at, id)
      FAILED[id] = {'0', ''}
    end
  elseif kind == 'activated' then
    if in_host then
      redis.call('HSET', k_slots(r), id, slot)
      redis.call('ZADD', k_host(r), at, id)
    end
  elseif kind == 'deactivated' then
    redis.call('HDEL', k_slots(r), id)
  elseif kind == 'evicted' then
    redis.call('ZREM', k_host(r), id)
    redis.call('HDEL', k_slots(r), id)
    redis.call('HDEL', k_loading(r), id)
    redis.call('SREM', k_pins(r), id)
  elseif kind == 'load_failed' then
    redis.call('HDEL', k_loading(r), id)
    if known and not in_host then FAILED[id] = {'1', reason} end
  end
  emit(kind, id, r, reason ~= '' and reason or (slot >= 0 and ('slot ' .. slot) or ''))
end

for _, c in ipairs(cjson.decode(ARGV[5])) do
  if c[1] > seq then
    if c[1] ~= seq + 1 then
      redis.call('HSET', k_replica(r), 'seq', seq)
      return 'rejoin'
    end
    apply(c[2], c[3], c[4], c[5], c[6])
    seq = c[1]
  end
end
redis.call('HSET', k_replica(r), 'seq', seq)
return 'ok'
""",
    replica=True,
)

# ARGV[4] epoch, ARGV[5] adapter id, ARGV[6] the replica's host cache now, JSON
# [[id, last_used_ms, pinned (0/1)]...] (refreshes last use and pins of mirrored entries),
# ARGV[7] max_cpu_loras, ARGV[8] load timeout (ms), ARGV[9] the adapter's record JSON
# [sha256 or '', size_bytes, deleting 0/1, pinned 0/1] and ARGV[10] the cluster-pinned ids JSON,
# both read just before (a pin set in between protects its adapter from the next ACQUIRE on).
# The host-cache policy: reserve room for the adapter, choosing LRU victims among unpinned entries.
# -> {'rejoin'} | {'not_found'} | {'deleting'} | {'resident', sha256, size, pin}
#    | {'exhausted', entries, pinned} | {'ok', sha256, size, pin, {victim...}}
ACQUIRE = _script(
    """
local r, id = ARGV[3], ARGV[5]
local ok = replica_ok(r, ARGV[4])
if not ok then return {'rejoin'} end
local rec = cjson.decode(ARGV[9])
if rec[1] == '' then return {'not_found'} end
if rec[3] == 1 then return {'deleting'} end
local cluster_pinned = {}
for _, p in ipairs(cjson.decode(ARGV[10])) do cluster_pinned[p] = true end
for _, u in ipairs(cjson.decode(ARGV[6])) do
  redis.call('ZADD', k_host(r), 'XX', u[2], u[1])
  if redis.call('ZSCORE', k_host(r), u[1]) then
    if u[3] == 1 then redis.call('SADD', k_pins(r), u[1]) else redis.call('SREM', k_pins(r), u[1]) end
  end
end
if redis.call('ZSCORE', k_host(r), id) then return {'resident', rec[1], rec[2], rec[4]} end
lapse_loading(r, tonumber(ARGV[8]))
local held = redis.call('ZCARD', k_host(r)) + redis.call('HLEN', k_loading(r))
  - redis.call('HEXISTS', k_loading(r), id)
local need = held + 1 - tonumber(ARGV[7])
local victims = {}
if need > 0 then
  local pinned = 0
  for _, cand in ipairs(redis.call('ZRANGE', k_host(r), 0, -1)) do
    if #victims >= need then break end
    if redis.call('SISMEMBER', k_pins(r), cand) == 1 or cluster_pinned[cand] then
      pinned = pinned + 1
    else
      table.insert(victims, cand)
    end
  end
  if #victims < need then return {'exhausted', held, pinned} end
end
redis.call('HSET', k_loading(r), id, NOW)
touch(id)
emit('loading', id, r, #victims > 0 and ('evicting ' .. table.concat(victims, ',')) or '')
return {'ok', rec[1], rec[2], rec[4], victims}
""",
    replica=True,
)

# ARGV[4] reason, ARGV[5] '1' = only if its heartbeat lapsed, ARGV[6] epoch ('' = any).
# Marks the replica down and drops its mirror. -> 1 if it was up, else 0
MARK_DOWN = _script(
    """
local r = ARGV[3]
local st = redis.call('HMGET', k_replica(r), 'status', 'epoch')
if st[1] ~= 'UP' then return 0 end
if ARGV[6] ~= '' and st[2] ~= ARGV[6] then return 0 end
if ARGV[5] == '1' and redis.call('EXISTS', k_alive(r)) == 1 then return 0 end
drop_mirror(r, true)
redis.call('HSET', k_replica(r), 'status', 'DOWN', 'down_reason', ARGV[4], 'down_at', NOW)
redis.call('DEL', k_alive(r))
emit('replica_down', '', r, ARGV[4])
return 1
""",
    replica=True,
)

# ARGV[4] adapter id. Records an eviction the replica just confirmed to the manager (its own
# report follows and re-applies it harmlessly). -> 1
MIRROR_EVICTED = _script(
    """
local r, id = ARGV[3], ARGV[4]
local held = redis.call('ZREM', k_host(r), id) + redis.call('HDEL', k_loading(r), id)
redis.call('HDEL', k_slots(r), id)
redis.call('SREM', k_pins(r), id)
touch(id)
if held > 0 then emit('evicted', id, r, 'confirmed to the manager') end
return 1
""",
    replica=True,
)

# ARGV[4] adapter ids JSON. The mirror's state of each (for reconciliation).
# -> {mirror version, {id, state}...}
MIRROR_STATES = _script(
    """
local out = {tonumber(redis.call('HGET', k_replica(ARGV[3]), 'mv') or '0')}
for _, id in ipairs(cjson.decode(ARGV[4])) do table.insert(out, {id, mirror_state(ARGV[3], id)}) end
return out
"""
)

# --- stored-copy tag: KEYS[1] = the blob's references, ARGV[3] = blob ---------------------------

# ARGV[4] lease token, ARGV[5] lease length (ms).
# A lease keeps the blob from being collected while a registration commits it or a fetch reads it.
# -> 1 | 0 (a manager is deleting it right now: ask again shortly)
BLOB_HOLD = _script("""
local b = ARGV[3]
if redis.call('EXISTS', k_blob_deleting(b)) == 1 then return 0 end
redis.call('ZADD', k_blob_leases(b), NOW + tonumber(ARGV[5]), ARGV[4])
redis.call('PEXPIRE', k_blob_leases(b), 2 * tonumber(ARGV[5]))
return 1
""")

# ARGV[4] lease token ('' = none), ARGV[5] adapter id ('' = none) that no longer uses the blob,
# ARGV[6] '1' = drop that reference only while no lease is live (reconciliation: a registration
# holds a lease from before it adds its reference until its record exists).
# -> {1, NOW, 0} when the blob has no reference and no live lease left (garbage from NOW on: the
#    registry adds it to the global orphaned set), else {0, NOW, references left}
BLOB_RELEASE = _script("""
local b = ARGV[3]
if ARGV[4] ~= '' then redis.call('ZREM', k_blob_leases(b), ARGV[4]) end
redis.call('ZREMRANGEBYSCORE', k_blob_leases(b), '-inf', NOW)
local leased = redis.call('ZCARD', k_blob_leases(b)) > 0
if ARGV[5] ~= '' and not (ARGV[6] == '1' and leased) then redis.call('SREM', k_blob_refs(b), ARGV[5]) end
local refs = redis.call('SCARD', k_blob_refs(b))
local orphan = refs == 0 and not leased and redis.call('EXISTS', k_blob_deleting(b)) == 0
return {orphan and 1 or 0, NOW, refs}
""")

# ARGV[4] owner (the collecting manager), ARGV[5] claim length (ms).
# -> 'claimed' (delete the files, then BLOB_DELETED) | 'referenced' (no longer garbage: the
#    registry drops it from the orphaned set) | 'leased' (in use: later) | 'busy' (another
#    manager is deleting it)
BLOB_CLAIM = _script("""
local b = ARGV[3]
if redis.call('SCARD', k_blob_refs(b)) > 0 then return 'referenced' end
redis.call('ZREMRANGEBYSCORE', k_blob_leases(b), '-inf', NOW)
if redis.call('ZCARD', k_blob_leases(b)) > 0 then return 'leased' end
if not redis.call('SET', k_blob_deleting(b), ARGV[4], 'NX', 'PX', tonumber(ARGV[5])) then return 'busy' end
return 'claimed'
""")

# ARGV[4] owner. The files are gone: forget the blob. -> 1 | 0 (the claim lapsed)
BLOB_DELETED = _script("""
local b = ARGV[3]
if redis.call('GET', k_blob_deleting(b)) ~= ARGV[4] then return 0 end
redis.call('DEL', k_blob_deleting(b), k_blob_leases(b))
emit('blob_deleted', '', '', b)
return 1
""")

# --- the global tag: KEYS[1] = a global key -----------------------------------------------------

STATES_LUA = "{'REGISTERED', 'FAILED', 'LOADING', 'CACHED', 'ACTIVE'}"

# ARGV[3] adapter id, ARGV[4] tenant, ARGV[5] state, ARGV[6] state_seq, ARGV[7] pinned ('1'/'0').
# Lists a registered adapter in the indexes (idempotent: a retried registration repairs them).
# -> 1
INDEX = _script(f"""
local id, tenant = ARGV[3], ARGV[4]
redis.call('ZADD', k_all(), 0, id)
if tenant ~= '' then redis.call('ZADD', k_tenant(tenant), 0, id) end
local seq = tonumber(ARGV[6])
if seq >= tonumber(redis.call('HGET', k_state_seq(), id) or '-1') then
  redis.call('HSET', k_state_seq(), id, seq)
  for _, s in ipairs({STATES_LUA}) do redis.call('ZREM', k_state(s), id) end
  redis.call('ZADD', k_state(ARGV[5]), 0, id)
end
if ARGV[7] == '1' then redis.call('SADD', k_pinned(), id) else redis.call('SREM', k_pinned(), id) end
return 1
""")

# ARGV[3] replica id. Marks what the picker reads of the replica as changed: its entry in
# `replicas:changed` becomes the Redis time (ms), or its previous score + 1 when that is not
# earlier, so each mark raises the score (a reader that remembers the score it read sees every
# later mark, even within one millisecond). -> the new score
TOUCH_REPLICA = _script("""
local key, r = k_replicas_changed(), ARGV[3]
local at = math.max(NOW, tonumber(redis.call('ZSCORE', key, r) or '0') + 1)
redis.call('ZADD', key, at, r)
return at
""")

# ARGV[3] adapter id, ARGV[4] state, ARGV[5] state_seq. Moves a listed adapter to the state index
# of `state` unless a later move (higher seq) already happened. -> 1 | 0 (skipped)
STATE_INDEX = _script(f"""
local id, seq = ARGV[3], tonumber(ARGV[5])
if not redis.call('ZSCORE', k_all(), id) then return 0 end
if seq < tonumber(redis.call('HGET', k_state_seq(), id) or '-1') then return 0 end
redis.call('HSET', k_state_seq(), id, seq)
for _, s in ipairs({STATES_LUA}) do redis.call('ZREM', k_state(s), id) end
redis.call('ZADD', k_state(ARGV[4]), 0, id)
return 1
""")

# ARGV[3] adapter id, ARGV[4] tenant ('' = none). Drops an unregistered adapter from every index.
# -> 1 | 0 (it was not listed)
UNINDEX = _script(f"""
local id = ARGV[3]
local listed = redis.call('ZREM', k_all(), id)
if ARGV[4] ~= '' then redis.call('ZREM', k_tenant(ARGV[4]), id) end
for _, s in ipairs({STATES_LUA}) do redis.call('ZREM', k_state(s), id) end
redis.call('HDEL', k_state_seq(), id)
redis.call('SREM', k_pinned(), id)
if listed == 1 then xadd('unregistered', id, '', '') end
return listed
""")

# ARGV[3] alias name, ARGV[4] variants JSON [[adapter id, weight], ...], ARGV[5] '1' when a
# registered adapter has that id, ARGV[6] the first variant that is not a live adapter ('' = none),
# both read just before; the registry re-reads them after (see `Registry.set_alias`).
# -> {'ok', version, previous variants JSON or ''} | {'conflict'} | {'unknown', adapter id}
SET_ALIAS = _script("""
local name = ARGV[3]
if ARGV[5] == '1' then return {'conflict'} end
if ARGV[6] ~= '' then return {'unknown', ARGV[6]} end
local previous = redis.call('HGET', k_aliases(), name) or ''
redis.call('HSET', k_aliases(), name, ARGV[4])
return {'ok', bump_routing('alias_set', name), previous}
""")

# ARGV[3] alias name, ARGV[4] the variants SET_ALIAS stored, ARGV[5] what it replaced ('' = none).
# Undoes SET_ALIAS unless the alias changed since. -> 1 | 0
REVERT_ALIAS = _script("""
local name = ARGV[3]
if redis.call('HGET', k_aliases(), name) ~= ARGV[4] then return 0 end
if ARGV[5] == '' then redis.call('HDEL', k_aliases(), name) else redis.call('HSET', k_aliases(), name, ARGV[5]) end
bump_routing('alias_reverted', name)
return 1
""")

# ARGV[3] alias name. -> {'ok', version} | {'not_found'} | {'referenced', rule...}
DELETE_ALIAS = _script("""
local name = ARGV[3]
if redis.call('HEXISTS', k_aliases(), name) == 0 then return {'not_found'} end
local refs = {'referenced'}
local rules = redis.call('GET', k_rules())
if rules then
  for _, rule in ipairs(cjson.decode(rules)) do
    if rule.target == name then table.insert(refs, 'rule ' .. rule.name) end
  end
end
if #refs > 1 then return refs end
redis.call('HDEL', k_aliases(), name)
return {'ok', bump_routing('alias_deleted', name)}
""")

# ARGV[3] rules JSON [{name, match_tenant, match_headers, match_adapter_id, target}, ...],
# ARGV[4] JSON list of the targets that are live adapters (read just before; the registry
# re-reads them after, see `Registry.set_rules`).
# -> {'ok', version, previous rules JSON or ''} | {'unknown', target}
SET_RULES = _script("""
local adapters = {}
for _, id in ipairs(cjson.decode(ARGV[4])) do adapters[id] = true end
for _, rule in ipairs(cjson.decode(ARGV[3])) do
  if not adapters[rule.target] and redis.call('HEXISTS', k_aliases(), rule.target) == 0 then
    return {'unknown', rule.target}
  end
end
local previous = redis.call('GET', k_rules()) or ''
redis.call('SET', k_rules(), ARGV[3])
return {'ok', bump_routing('rules_set', ''), previous}
""")

# ARGV[3] the rules SET_RULES stored, ARGV[4] what they replaced. -> 1 | 0 (changed since)
REVERT_RULES = _script("""
if redis.call('GET', k_rules()) ~= ARGV[3] then return 0 end
if ARGV[4] == '' then redis.call('DEL', k_rules()) else redis.call('SET', k_rules(), ARGV[4]) end
bump_routing('rules_reverted', '')
return 1
""")

# ARGV[3] adapter id. A forced unregistration: drop the adapter from every alias (an alias left
# without variants goes, and so do rules that target it) and drop rules that target it. -> 1
UNROUTE = _script("""
local id = ARGV[3]
local dropped, changed = {}, false
local aliases = redis.call('HGETALL', k_aliases())
for i = 1, #aliases, 2 do
  local kept = {}
  local variants = cjson.decode(aliases[i + 1])
  for _, v in ipairs(variants) do
    if v[1] ~= id then table.insert(kept, v) end
  end
  if #kept == 0 then
    redis.call('HDEL', k_aliases(), aliases[i])
    dropped[aliases[i]] = true
    changed = true
  elseif #kept < #variants then
    redis.call('HSET', k_aliases(), aliases[i], cjson.encode(kept))
    changed = true
  end
end
local rules = redis.call('GET', k_rules())
if rules then
  local kept = {}
  local all = cjson.decode(rules)
  for _, rule in ipairs(all) do
    if rule.target ~= id and not dropped[rule.target] then table.insert(kept, rule) end
  end
  if #kept < #all then
    redis.call('SET', k_rules(), #kept == 0 and '[]' or cjson.encode(kept))
    changed = true
  end
end
if changed then bump_routing('routing_changed', 'unrouted ' .. id) end
return 1
""")

SCRIPTS = {
    name: source
    for name, source in globals().items()
    if name.isupper() and isinstance(source, str) and source.startswith(PRELUDE)
}


class Scripts:
    """Every script above, registered once on a client (EVALSHA, reloaded if Redis lost them);
    attributes named after the scripts in lower case."""

    def __init__(self, client: redis.Redis):
        for name, source in SCRIPTS.items():
            setattr(self, name.lower(), client.register_script(source))
