"""Scripts on an adapter's tag: KEYS[1] = the adapter's record. The registry's `Adapters` runs
them; `RESIDE` also follows every replica script (`RegistryBase._settle`, `Reconcile`).
"""

from __future__ import annotations

from adapter_svc.scripts.prelude import _script

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
redis.call('HSET', k_on_version(id), r, ARGV[6])
if state == '' then redis.call('HDEL', k_on(id), r) else redis.call('HSET', k_on(id), r, state) end
if ARGV[7] == '1' then
  redis.call('HSET', key, 'failed', '1', 'reason', ARGV[8])
elseif ARGV[7] == '0' then
  redis.call('HDEL', key, 'failed', 'reason')
end
return refresh_state(id)
""")

# ARGV[3] adapter id, ARGV[4] JSON list of replica ids that had no membership record when read
# just before (forgotten: see the replica script FORGET). Drops their `on-version` fields, except
# where `on` names the replica (reconciliation clears that first, with RESIDE). A replica that
# joins again meanwhile starts its versions above any dropped one (JOIN), so nothing is misordered.
# -> how many fields went
DROP_VERSIONS = _script("""
local id, n = ARGV[3], 0
for _, r in ipairs(cjson.decode(ARGV[4])) do
  if redis.call('HEXISTS', k_on(id), r) == 0 then n = n + redis.call('HDEL', k_on_version(id), r) end
end
return n
""")
