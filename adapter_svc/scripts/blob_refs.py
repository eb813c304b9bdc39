"""Scripts on a stored copy's tag: KEYS[1] = the blob's references, ARGV[3] = blob. The
registry's `BlobRefs` runs them.
"""

from __future__ import annotations

from adapter_svc.scripts.prelude import _script

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
