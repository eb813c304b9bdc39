"""Scripts on the global tag: KEYS[1] = a global key. The indexes and the picker's replica marks,
which the registry updates after an owner's script, and routing (`ClusterWide`: aliases, rules).
Unlike the other tags' scripts, these add their events to the stream themselves (`xadd`).
"""

from __future__ import annotations

from adapter_svc.scripts.prelude import _script

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

# ARGV[3] replica id, ARGV[4] its score in `replicas` when the registry chose to forget it. Takes a
# replica FORGET deleted (or found without a record) out of `replicas` and `replicas:changed`,
# unless it joined again since: a join raises its score (ZADD of its JOIN's time) after its script,
# so a join that lands between the two steps either shows here or puts the entry back after.
# -> 1 | 0 (kept)
UNLIST_REPLICA = _script("""
local r = ARGV[3]
local score = redis.call('ZSCORE', k_replicas(), r)
if not score or tonumber(score) > tonumber(ARGV[4]) then return 0 end
redis.call('ZREM', k_replicas(), r)
redis.call('ZREM', k_replicas_changed(), r)
return 1
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
