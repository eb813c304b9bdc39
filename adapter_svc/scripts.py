"""The Lua scripts behind every multi-key change, each atomic in Redis, registered once.

Contract shared by every script:
  KEYS[1]  the key the script is routed by (a key it touches; all keys share the cluster's hash tag)
  ARGV[1]  the key prefix (`keys.prefix(cluster)`); other keys are derived from it by the Lua
           mirrors of `loraserve/cluster_keys.py` (`cluster_keys.LUA_KEY_FUNCTIONS`), so one module still defines the layout
  ARGV[2]  the event stream's approximate maximum length
Script-specific ARGV start at 3 and are listed above each script. Times come from Redis `TIME`, so
every manager (and the replica TTLs) share one clock. Each script appends one stream event per
state change it makes.

Registry state of an adapter (`state` field) is derived, never set directly: the best of its live
replicas' states (ACTIVE > CACHED > LOADING), else FAILED if its last load failed, else REGISTERED.
"""

from __future__ import annotations

import redis.asyncio as redis

from loraserve.cluster_keys import LUA_KEY_FUNCTIONS

PRELUDE = (
    """
local P = ARGV[1]
local MAXLEN = tonumber(ARGV[2])
"""
    + LUA_KEY_FUNCTIONS
    + """
local _t = redis.call('TIME')
local NOW = tonumber(_t[1]) * 1000 + math.floor(tonumber(_t[2]) / 1000)

local function emit(kind, adapter, replica, detail)
  redis.call('XADD', k_events(), 'MAXLEN', '~', MAXLEN, '*', 'type', kind,
    'adapter', adapter or '', 'replica', replica or '', 'detail', detail or '', 'at', NOW)
end

local RANK = {REGISTERED = 0, FAILED = 1, LOADING = 2, CACHED = 3, ACTIVE = 4}

-- Recompute an adapter's registry state and move it between the state indexes (no-op if unknown).
local function refresh_state(id)
  local key = k_adapter(id)
  local cur = redis.call('HMGET', key, 'state', 'failed')
  if not cur[1] then return end
  local best = 'REGISTERED'
  for _, s in ipairs(redis.call('HVALS', k_on(id))) do
    if RANK[s] > RANK[best] then best = s end
  end
  if best == 'REGISTERED' and cur[2] == '1' then best = 'FAILED' end
  if best ~= cur[1] then
    redis.call('HSET', key, 'state', best, 'updated_at', NOW)
    redis.call('ZREM', k_state(cur[1]), id)
    redis.call('ZADD', k_state(best), 0, id)
  end
end

local function set_on(id, r, state)
  if redis.call('EXISTS', k_adapter(id)) == 1 then
    redis.call('HSET', k_on(id), r, state)
    refresh_state(id)
  end
end

local function clear_on(id, r)
  if redis.call('HDEL', k_on(id), r) == 1 then refresh_state(id) end
end

local function replica_ok(r, epoch)
  local st = redis.call('HMGET', k_replica(r), 'status', 'epoch', 'seq')
  return st[1] == 'UP' and st[2] == epoch, st
end

-- Forget what a replica holds (host cache, slots, pins) and, if `with_loading`, its reservations.
local function drop_mirror(r, with_loading)
  for _, id in ipairs(redis.call('ZRANGE', k_host(r), 0, -1)) do clear_on(id, r) end
  redis.call('DEL', k_host(r), k_slots(r), k_pins(r))
  if with_loading then
    for _, id in ipairs(redis.call('HKEYS', k_loading(r))) do clear_on(id, r) end
    redis.call('DEL', k_loading(r))
  end
end

-- Mirror one snapshot entry {id, slot (-1 = none), pinned (0/1), last_used_ms, sha256}; false
-- when the registry does not know the adapter with those bytes (the replica must drop it).
local function admit(r, e)
  local rec = redis.call('HMGET', k_adapter(e[1]), 'sha256', 'deleting')
  if (not rec[1]) or rec[1] ~= e[5] or rec[2] == '1' then return false end
  redis.call('ZADD', k_host(r), e[4], e[1])
  redis.call('HDEL', k_loading(r), e[1])
  if e[2] >= 0 then redis.call('HSET', k_slots(r), e[1], e[2]) end
  if e[3] == 1 then redis.call('SADD', k_pins(r), e[1]) end
  set_on(e[1], r, e[2] >= 0 and 'ACTIVE' or 'CACHED')
  return true
end

-- Alias names and rule names that route to adapter `id`.
local function references(id)
  local refs = {}
  local aliases = redis.call('HGETALL', k_aliases())
  for i = 1, #aliases, 2 do
    for _, v in ipairs(cjson.decode(aliases[i + 1])) do
      if v[1] == id then table.insert(refs, 'alias ' .. aliases[i]) end
    end
  end
  local rules = redis.call('GET', k_rules())
  if rules then
    for _, rule in ipairs(cjson.decode(rules)) do
      if rule.target == id then table.insert(refs, 'rule ' .. rule.name) end
    end
  end
  return refs
end

-- Drop replica r's load reservations older than timeout_ms: a load that neither landed nor
-- failed within it (its replica gave up, or its report was lost) holds no room.
local function lapse_loading(r, timeout_ms)
  local loading = redis.call('HGETALL', k_loading(r))
  for i = 1, #loading, 2 do
    if NOW - tonumber(loading[i + 1]) > timeout_ms then
      redis.call('HDEL', k_loading(r), loading[i])
      if redis.call('HGET', k_on(loading[i]), r) == 'LOADING' then clear_on(loading[i], r) end
    end
  end
end

-- The stored copy a record's bytes live in (blobs.blob_name).
local function blob_of(sha256, config_sha256)
  return sha256 .. '-' .. string.sub(config_sha256, 1, 16)
end

-- Adapter `id` no longer uses stored copy `b`: with no reference and no live lease left, b is
-- garbage from NOW on.
local function blob_unref(b, id)
  redis.call('SREM', k_blob_refs(b), id)
  redis.call('ZREMRANGEBYSCORE', k_blob_leases(b), '-inf', NOW)
  if redis.call('SCARD', k_blob_refs(b)) == 0 and redis.call('ZCARD', k_blob_leases(b)) == 0 then
    redis.call('ZADD', k_orphaned_blobs(), 'NX', NOW, b)
  end
end

local function bump_routing(kind, detail)
  local v = redis.call('INCR', k_routing_version())
  emit(kind, '', '', detail)
  return v
end
"""
)

# ARGV[3] adapter id, ARGV[4] JSON object of the record's string fields.
# -> {'ok'} | {'same'} (identical content already registered for the same tenant) | {'exists'}
#    | {'tenant', registered tenant} (identical content, another tenant) | {'alias'}
REGISTER = (
    PRELUDE
    + """
local id = ARGV[3]
local rec = cjson.decode(ARGV[4])
if redis.call('HEXISTS', k_aliases(), id) == 1 then return {'alias'} end
local key = k_adapter(id)
local cur = redis.call('HMGET', key, 'sha256', 'config_sha256', 'tenant')
if cur[1] then
  if cur[1] ~= rec.sha256 or cur[2] ~= rec.config_sha256 then return {'exists'} end
  if (cur[3] or '') ~= rec.tenant then return {'tenant', cur[3] or ''} end
  return {'same'}
end
local b = blob_of(rec.sha256, rec.config_sha256)
redis.call('SADD', k_blob_refs(b), id)
redis.call('ZREM', k_orphaned_blobs(), b)
local flat = {'state', 'REGISTERED', 'created_at', NOW, 'updated_at', NOW}
for k, v in pairs(rec) do
  table.insert(flat, k)
  table.insert(flat, v)
end
redis.call('HSET', key, unpack(flat))
redis.call('ZADD', k_all(), 0, id)
if rec.tenant ~= '' then redis.call('ZADD', k_tenant(rec.tenant), 0, id) end
redis.call('ZADD', k_state('REGISTERED'), 0, id)
emit('registered', id, '', rec.source)
return {'ok'}
"""
)

# ARGV[3] adapter id, ARGV[4] '1' = force.
# Marks the adapter `deleting` (no new loads) and answers who holds it, unless refused.
# -> {'ok', holder...} | {'not_found'} | {'pinned'} | {'active', replica...} | {'referenced', ref...}
UNREGISTER_BEGIN = (
    PRELUDE
    + """
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
  local refs = references(id)
  if #refs > 0 then
    table.insert(refs, 1, 'referenced')
    return refs
  end
else
  redis.call('SREM', k_pinned(), id)
  redis.call('HSET', key, 'pinned', '0')
end
redis.call('HSET', key, 'deleting', '1')
local holders = redis.call('HKEYS', k_on(id))
table.insert(holders, 1, 'ok')
return holders
"""
)

# ARGV[3] adapter id. Undo UNREGISTER_BEGIN after a failed eviction. -> 1
UNREGISTER_ABORT = (
    PRELUDE
    + """
redis.call('HDEL', k_adapter(ARGV[3]), 'deleting')
return 1
"""
)

# ARGV[3] adapter id, ARGV[4] '1' = force (also drop it from aliases and rules).
# -> {'ok'} | {'not_found'} | {'held', replica...} | {'referenced', ref...}
UNREGISTER_FINISH = (
    PRELUDE
    + """
local id, force = ARGV[3], ARGV[4] == '1'
local key = k_adapter(id)
local rec = redis.call('HMGET', key, 'tenant', 'state', 'sha256', 'config_sha256')
if not rec[2] then return {'not_found'} end
local holders = redis.call('HKEYS', k_on(id))
if #holders > 0 then
  redis.call('HDEL', key, 'deleting')
  table.insert(holders, 1, 'held')
  return holders
end
if force then
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
else
  local refs = references(id)
  if #refs > 0 then
    redis.call('HDEL', key, 'deleting')
    table.insert(refs, 1, 'referenced')
    return refs
  end
end
redis.call('DEL', key, k_on(id))
blob_unref(blob_of(rec[3], rec[4]), id)
redis.call('ZREM', k_all(), id)
if rec[1] ~= '' then redis.call('ZREM', k_tenant(rec[1]), id) end
redis.call('ZREM', k_state(rec[2]), id)
redis.call('SREM', k_pinned(), id)
emit('unregistered', id, '', '')
return {'ok'}
"""
)

# KEYS[1] the index to page (all / tenant / state). ARGV[3] cursor ('' = start), ARGV[4] page
# size, ARGV[5] most index entries to examine, ARGV[6] tenant filter, ARGV[7] state filter.
# -> {next_cursor ('' = no more), {field, value, ...} per adapter...}
LIST_PAGE = (
    PRELUDE
    + """
local start = ARGV[3] == '' and '-' or '(' .. ARGV[3]
local page, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local tenant, state = ARGV[6], ARGV[7]
local ids = redis.call('ZRANGEBYLEX', KEYS[1], start, '+', 'LIMIT', 0, budget)
local out = {''}
local last = nil
for _, id in ipairs(ids) do
  last = id
  local f = redis.call('HMGET', k_adapter(id), 'tenant', 'state')
  if f[2] and (tenant == '' or f[1] == tenant) and (state == '' or f[2] == state) then
    table.insert(out, redis.call('HGETALL', k_adapter(id)))
    if #out - 1 >= page then break end
  end
end
if last and #redis.call('ZRANGEBYLEX', KEYS[1], '(' .. last, '+', 'LIMIT', 0, 1) > 0 then
  out[1] = last
end
return out
"""
)

# ARGV[3] replica id, ARGV[4] address, ARGV[5] engine JSON, ARGV[6] model config JSON,
# ARGV[7] snapshot JSON [[id, slot, pinned, last_used_ms, sha256], ...], ARGV[8] snapshot seq,
# ARGV[9] membership TTL (ms), ARGV[10] the credential the manager presents to this replica.
# Refused while another live replica has the same address, or this replica is live at another
# address (a joiner could otherwise take over the commands meant for a live replica). Replaces the
# replica's mirror with the snapshot.
# -> {epoch, routing_version, {drop id...}} | {-1, the live replica, its address}
JOIN = (
    PRELUDE
    + """
local r = ARGV[3]
for _, other in ipairs(redis.call('ZRANGE', k_replicas(), 0, -1)) do
  if redis.call('EXISTS', k_alive(other)) == 1 then
    local held = redis.call('HGET', k_replica(other), 'address')
    if (other ~= r and held == ARGV[4]) or (other == r and held and held ~= ARGV[4]) then
      return {-1, other, held}
    end
  end
end
drop_mirror(r, true)
local epoch = redis.call('HINCRBY', k_replica(r), 'epoch', 1)
redis.call('HSET', k_replica(r), 'address', ARGV[4], 'engine', ARGV[5], 'model', ARGV[6],
  'status', 'UP', 'joined_at', NOW, 'last_heartbeat', NOW, 'seq', ARGV[8], 'down_reason', '',
  'credential', ARGV[10])
local drop = {}
for _, e in ipairs(cjson.decode(ARGV[7])) do
  if not admit(r, e) then table.insert(drop, e[1]) end
end
redis.call('SET', k_alive(r), epoch, 'PX', ARGV[9])
redis.call('ZADD', k_replicas(), NOW, r)
emit('replica_joined', '', r, 'epoch ' .. epoch)
return {epoch, tonumber(redis.call('GET', k_routing_version()) or '0'), drop}
"""
)

# ARGV[3] replica id, ARGV[4] epoch, ARGV[5] snapshot JSON (as JOIN), ARGV[6] snapshot seq,
# ARGV[7] membership TTL (ms), ARGV[8..11] load: waiting, running, KV free fraction, draining ('1'/'0'),
# ARGV[12] load timeout (ms). Renews the TTL, stores the load (`LOAD_FIELDS`), lapses old reservations. When the snapshot is at the mirror's seq, refreshes last-use times and pins (which
# no change reports) and, if the mirror drifted, replaces it. Answers which local pins the cluster no longer holds, and which
# held adapters the registry does not know with those bytes.
# -> {'rejoin'} | {'ok', routing_version, {unpin id...}, {pin id...}, {drop id...}}
HEARTBEAT = (
    PRELUDE
    + """
local r = ARGV[3]
local ok, st = replica_ok(r, ARGV[4])
if not ok then return {'rejoin'} end
redis.call('SET', k_alive(r), ARGV[4], 'PX', ARGV[7])
redis.call('ZADD', k_replicas(), NOW, r)
redis.call('HSET', k_replica(r), 'last_heartbeat', NOW, 'waiting', ARGV[8], 'running', ARGV[9],
  'kv_free', ARGV[10], 'draining', ARGV[11], 'load_at', NOW)
lapse_loading(r, tonumber(ARGV[12]))  -- reservations lapse even when no new load asks for room
local snap = cjson.decode(ARGV[5])
local unpin, pin, drop = {}, {}, {}
for _, e in ipairs(snap) do
  local rec = redis.call('HMGET', k_adapter(e[1]), 'sha256', 'deleting')
  local pinned = redis.call('SISMEMBER', k_pinned(), e[1])
  if (not rec[1]) or rec[1] ~= e[5] or rec[2] == '1' then
    table.insert(drop, e[1])
  elseif e[3] == 1 and pinned == 0 then
    table.insert(unpin, e[1])
  elseif e[3] == 0 and pinned == 1 then
    table.insert(pin, e[1])
  end
end
if st[3] == ARGV[6] then
  local drift, seen = false, 0
  for _, e in ipairs(snap) do
    if redis.call('HGET', k_adapter(e[1]), 'sha256') == e[5] then
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
    for _, e in ipairs(snap) do admit(r, e) end
    emit('resynced', '', r, 'mirror replaced by the replica snapshot')
  end
end
return {'ok', tonumber(redis.call('GET', k_routing_version()) or '0'), unpin, pin, drop}
"""
)

# ARGV[3] replica id, ARGV[4] epoch, ARGV[5] changes JSON [[seq, kind, id, slot, at_ms, reason]...]
# with kind one of loaded / activated / deactivated / evicted / load_failed.
# Applies changes with seq = mirror seq + 1, in order; skips ones already applied.
# -> 'ok' | 'rejoin' (stale epoch, replica down, or a gap in seq)
REPORT = (
    PRELUDE
    + """
local r = ARGV[3]
local ok, st = replica_ok(r, ARGV[4])
if not ok then return 'rejoin' end
local seq = tonumber(st[3])

local function apply(kind, id, slot, at, reason)
  local known = redis.call('EXISTS', k_adapter(id)) == 1
  local in_host = redis.call('ZSCORE', k_host(r), id)
  if kind == 'loaded' then
    redis.call('HDEL', k_loading(r), id)
    if known then
      redis.call('ZADD', k_host(r), at, id)
      redis.call('HDEL', k_adapter(id), 'failed', 'reason')
      set_on(id, r, redis.call('HEXISTS', k_slots(r), id) == 1 and 'ACTIVE' or 'CACHED')
    end
  elseif kind == 'activated' then
    if in_host then
      redis.call('HSET', k_slots(r), id, slot)
      redis.call('ZADD', k_host(r), at, id)
      set_on(id, r, 'ACTIVE')
    end
  elseif kind == 'deactivated' then
    redis.call('HDEL', k_slots(r), id)
    if in_host then set_on(id, r, 'CACHED') end
  elseif kind == 'evicted' then
    redis.call('ZREM', k_host(r), id)
    redis.call('HDEL', k_slots(r), id)
    redis.call('HDEL', k_loading(r), id)
    redis.call('SREM', k_pins(r), id)
    clear_on(id, r)
  elseif kind == 'load_failed' then
    redis.call('HDEL', k_loading(r), id)
    if known and not in_host then
      redis.call('HSET', k_adapter(id), 'failed', '1', 'reason', reason)
      clear_on(id, r)
      refresh_state(id)
    end
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
"""
)

# ARGV[3] replica id, ARGV[4] epoch, ARGV[5] adapter id, ARGV[6] the replica's host cache now,
# JSON [[id, last_used_ms, pinned (0/1)]...] (refreshes last use and pins of mirrored entries),
# ARGV[7] max_cpu_loras, ARGV[8] load timeout (ms).
# The host-cache policy: reserve room for the adapter, choosing LRU victims among unpinned entries.
# -> {'rejoin'} | {'not_found'} | {'deleting'} | {'resident', sha256, size, pin}
#    | {'exhausted', entries, pinned} | {'ok', sha256, size, pin, {victim...}}
ACQUIRE = (
    PRELUDE
    + """
local r, id = ARGV[3], ARGV[5]
local ok = replica_ok(r, ARGV[4])
if not ok then return {'rejoin'} end
local rec = redis.call('HMGET', k_adapter(id), 'sha256', 'size_bytes', 'deleting')
if not rec[1] then return {'not_found'} end
if rec[3] == '1' then return {'deleting'} end
local pin = redis.call('SISMEMBER', k_pinned(), id)
for _, u in ipairs(cjson.decode(ARGV[6])) do
  redis.call('ZADD', k_host(r), 'XX', u[2], u[1])
  if redis.call('ZSCORE', k_host(r), u[1]) then
    if u[3] == 1 then redis.call('SADD', k_pins(r), u[1]) else redis.call('SREM', k_pins(r), u[1]) end
  end
end
if redis.call('ZSCORE', k_host(r), id) then return {'resident', rec[1], rec[2], pin} end
lapse_loading(r, tonumber(ARGV[8]))
local held = redis.call('ZCARD', k_host(r)) + redis.call('HLEN', k_loading(r))
  - redis.call('HEXISTS', k_loading(r), id)
local need = held + 1 - tonumber(ARGV[7])
local victims = {}
if need > 0 then
  local pinned = 0
  for _, cand in ipairs(redis.call('ZRANGE', k_host(r), 0, -1)) do
    if #victims >= need then break end
    if redis.call('SISMEMBER', k_pins(r), cand) == 1 or redis.call('SISMEMBER', k_pinned(), cand) == 1 then
      pinned = pinned + 1
    else
      table.insert(victims, cand)
    end
  end
  if #victims < need then return {'exhausted', held, pinned} end
end
redis.call('HSET', k_loading(r), id, NOW)
if not redis.call('HGET', k_on(id), r) then set_on(id, r, 'LOADING') end
emit('loading', id, r, #victims > 0 and ('evicting ' .. table.concat(victims, ',')) or '')
return {'ok', rec[1], rec[2], pin, victims}
"""
)

# ARGV[3] replica id, ARGV[4] reason, ARGV[5] '1' = only if its heartbeat lapsed, ARGV[6] epoch
# ('' = any). Marks the replica down and drops its mirror. -> 1 if it was up, else 0
MARK_DOWN = (
    PRELUDE
    + """
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
"""
)

# ARGV[3] replica id, ARGV[4] adapter id.
# Records an eviction the replica just confirmed to the manager (its own report follows and
# re-applies it harmlessly). -> 1
MIRROR_EVICTED = (
    PRELUDE
    + """
local r, id = ARGV[3], ARGV[4]
local held = redis.call('ZREM', k_host(r), id) + redis.call('HDEL', k_loading(r), id)
redis.call('HDEL', k_slots(r), id)
redis.call('SREM', k_pins(r), id)
clear_on(id, r)
if held > 0 then emit('evicted', id, r, 'confirmed to the manager') end
return 1
"""
)

# ARGV[3] adapter id, ARGV[4] '1' = pin, '0' = unpin.
# -> {'ok', replica, state, ...} (its live holders) | {'not_found'} | {'deleting'}
PIN = (
    PRELUDE
    + """
local id = ARGV[3]
local key = k_adapter(id)
local rec = redis.call('HMGET', key, 'sha256', 'deleting', 'pinned')
if not rec[1] then return {'not_found'} end
if rec[2] == '1' then return {'deleting'} end
if ARGV[4] == '1' then
  redis.call('SADD', k_pinned(), id)
  if rec[3] ~= '1' then emit('pinned', id, '', '') end
else
  redis.call('SREM', k_pinned(), id)
  if rec[3] == '1' then emit('unpinned', id, '', '') end
end
redis.call('HSET', key, 'pinned', ARGV[4], 'updated_at', NOW)
local on = redis.call('HGETALL', k_on(id))
table.insert(on, 1, 'ok')
return on
"""
)

# ARGV[3] alias name, ARGV[4] variants JSON [[adapter id, weight], ...].
# -> {'ok', version} | {'conflict'} (a registered adapter has that id) | {'unknown', adapter id}
SET_ALIAS = (
    PRELUDE
    + """
local name = ARGV[3]
if redis.call('EXISTS', k_adapter(name)) == 1 then return {'conflict'} end
for _, v in ipairs(cjson.decode(ARGV[4])) do
  local rec = redis.call('HMGET', k_adapter(v[1]), 'sha256', 'deleting')
  if (not rec[1]) or rec[2] == '1' then return {'unknown', v[1]} end
end
redis.call('HSET', k_aliases(), name, ARGV[4])
return {'ok', bump_routing('alias_set', name)}
"""
)

# ARGV[3] alias name. -> {'ok', version} | {'not_found'} | {'referenced', rule...}
DELETE_ALIAS = (
    PRELUDE
    + """
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
"""
)

# ARGV[3] rules JSON [{name, match_tenant, match_headers, match_adapter_id, target}, ...].
# -> {'ok', version} | {'unknown', target}
SET_RULES = (
    PRELUDE
    + """
for _, rule in ipairs(cjson.decode(ARGV[3])) do
  local rec = redis.call('HMGET', k_adapter(rule.target), 'sha256', 'deleting')
  local is_adapter = rec[1] and rec[2] ~= '1'
  if not is_adapter and redis.call('HEXISTS', k_aliases(), rule.target) == 0 then
    return {'unknown', rule.target}
  end
end
redis.call('SET', k_rules(), ARGV[3])
return {'ok', bump_routing('rules_set', '')}
"""
)


# ARGV[3] blob, ARGV[4] lease token, ARGV[5] lease length (ms).
# A lease keeps the blob from being collected while a registration commits it or a fetch reads it.
# -> 1 | 0 (a manager is deleting it right now: ask again shortly)
BLOB_HOLD = (
    PRELUDE
    + """
local b = ARGV[3]
if redis.call('EXISTS', k_blob_deleting(b)) == 1 then return 0 end
redis.call('ZADD', k_blob_leases(b), NOW + tonumber(ARGV[5]), ARGV[4])
redis.call('PEXPIRE', k_blob_leases(b), 2 * tonumber(ARGV[5]))
return 1
"""
)

# ARGV[3] blob, ARGV[4] lease token. -> 1
BLOB_RELEASE = (
    PRELUDE
    + """
local b = ARGV[3]
redis.call('ZREM', k_blob_leases(b), ARGV[4])
redis.call('ZREMRANGEBYSCORE', k_blob_leases(b), '-inf', NOW)
if redis.call('SCARD', k_blob_refs(b)) == 0 and redis.call('ZCARD', k_blob_leases(b)) == 0 then
  redis.call('ZADD', k_orphaned_blobs(), 'NX', NOW, b)
end
return 1
"""
)

# ARGV[3] blob, ARGV[4] owner (the collecting manager), ARGV[5] claim length (ms).
# -> 'claimed' (delete the files, then BLOB_DELETED) | 'referenced' (no longer garbage) |
#    'leased' (in use: later) | 'busy' (another manager is deleting it)
BLOB_CLAIM = (
    PRELUDE
    + """
local b = ARGV[3]
if redis.call('SCARD', k_blob_refs(b)) > 0 then
  redis.call('ZREM', k_orphaned_blobs(), b)
  return 'referenced'
end
redis.call('ZREMRANGEBYSCORE', k_blob_leases(b), '-inf', NOW)
if redis.call('ZCARD', k_blob_leases(b)) > 0 then return 'leased' end
if not redis.call('SET', k_blob_deleting(b), ARGV[4], 'NX', 'PX', tonumber(ARGV[5])) then return 'busy' end
return 'claimed'
"""
)

# ARGV[3] blob, ARGV[4] owner. The files are gone: forget the blob. -> 1 | 0 (the claim lapsed)
BLOB_DELETED = (
    PRELUDE
    + """
local b = ARGV[3]
if redis.call('GET', k_blob_deleting(b)) ~= ARGV[4] then return 0 end
redis.call('DEL', k_blob_deleting(b), k_blob_leases(b))
redis.call('ZREM', k_orphaned_blobs(), b)
emit('blob_deleted', '', '', b)
return 1
"""
)


class Scripts:
    """Every script above, registered once on a client (EVALSHA, reloaded if Redis lost them)."""

    def __init__(self, client: redis.Redis):
        self.register = client.register_script(REGISTER)
        self.unregister_begin = client.register_script(UNREGISTER_BEGIN)
        self.unregister_abort = client.register_script(UNREGISTER_ABORT)
        self.unregister_finish = client.register_script(UNREGISTER_FINISH)
        self.list_page = client.register_script(LIST_PAGE)
        self.join = client.register_script(JOIN)
        self.heartbeat = client.register_script(HEARTBEAT)
        self.report = client.register_script(REPORT)
        self.acquire = client.register_script(ACQUIRE)
        self.mark_down = client.register_script(MARK_DOWN)
        self.mirror_evicted = client.register_script(MIRROR_EVICTED)
        self.pin = client.register_script(PIN)
        self.set_alias = client.register_script(SET_ALIAS)
        self.delete_alias = client.register_script(DELETE_ALIAS)
        self.set_rules = client.register_script(SET_RULES)
        self.blob_hold = client.register_script(BLOB_HOLD)
        self.blob_release = client.register_script(BLOB_RELEASE)
        self.blob_claim = client.register_script(BLOB_CLAIM)
        self.blob_deleted = client.register_script(BLOB_DELETED)
