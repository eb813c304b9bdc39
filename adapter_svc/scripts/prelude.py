"""The Lua every script starts with (`PRELUDE`: the key builders and the helpers the scripts
share), and `_script`, which wraps a script's body in it.

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
-- The same time in microseconds, as the exact decimal string (see `JOIN`'s mirror version).
local NOW_US = _t[1] .. string.format('%06d', tonumber(_t[2]))
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
