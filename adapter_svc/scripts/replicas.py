"""Scripts on a replica's tag: KEYS[1] = the replica's membership hash, ARGV[3] = replica id.
The registry's `Replicas` runs them (`MIRROR_STATES`: `Reconcile`).
"""

from __future__ import annotations

from adapter_svc.scripts.prelude import _script

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
-- The mirror version goes no lower than the Redis time in microseconds: above every version an
-- earlier record of this id left in adapters' `on-version` (FORGET deletes the record, not those),
-- since a replica's scripts, one at a time and each over a microsecond, never raise it faster.
local mv = redis.call('HGET', k_replica(r), 'mv')
if not mv or tonumber(mv) < tonumber(NOW_US) then redis.call('HSET', k_replica(r), 'mv', NOW_US) end
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

# ARGV[4] how long (ms) the replica must have been down. Deletes every key of a replica that is not
# up and went down (or, with no `down_at`, was last seen) longer ago than that; checked here, so a
# replica that joined again since is kept. Its mirror is empty already (MARK_DOWN dropped it, and
# only JOIN fills it again), so no adapter's `on` changes. The registry then takes it out of the
# membership index (`UNLIST_REPLICA`). -> 'forgotten' | 'absent' (no record: nothing to delete) | 'kept'
FORGET = _script(
    """
local r = ARGV[3]
if redis.call('EXISTS', k_replica(r)) == 0 then return 'absent' end
local st = redis.call('HMGET', k_replica(r), 'status', 'down_at', 'last_heartbeat', 'down_reason')
if st[1] == 'UP' then return 'kept' end
local since = tonumber(st[2] or st[3] or '0')
if NOW - since <= tonumber(ARGV[4]) then return 'kept' end
redis.call('DEL', k_replica(r), k_alive(r), k_host(r), k_slots(r), k_pins(r), k_loading(r))
emit('replica_forgotten', '', r, 'down ' .. math.floor((NOW - since) / 1000) .. ' s: ' .. (st[4] or ''))
return 'forgotten'
"""
)

# ARGV[4] adapter id. Records an eviction the replica just confirmed to the manager (its own
# report follows and re-applies it harmlessly). -> 1 | 0 (the replica has no record: nothing held)
MIRROR_EVICTED = _script(
    """
local r, id = ARGV[3], ARGV[4]
if redis.call('EXISTS', k_replica(r)) == 0 then return 0 end  -- its mirror version would recreate it
local held = redis.call('ZREM', k_host(r), id) + redis.call('HDEL', k_loading(r), id)
redis.call('HDEL', k_slots(r), id)
redis.call('SREM', k_pins(r), id)
touch(id)
if held > 0 then emit('evicted', id, r, 'confirmed to the manager') end
return 1
""",
    replica=True,
)

# ARGV[4] adapter ids JSON. The mirror's state of each (for reconciliation). A replica with no
# record (forgotten, or never joined) holds nothing, at the Redis time in microseconds as its
# version: above every version of an earlier record, below every one of a later join (see JOIN).
# -> {mirror version, {id, state}...}
MIRROR_STATES = _script(
    """
local mv = redis.call('HGET', k_replica(ARGV[3]), 'mv')
if redis.call('EXISTS', k_replica(ARGV[3])) == 0 then mv = NOW_US end
local out = {tonumber(mv or '0')}
for _, id in ipairs(cjson.decode(ARGV[4])) do table.insert(out, {id, mirror_state(ARGV[3], id)}) end
return out
"""
)
