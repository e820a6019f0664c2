"""The Lua scripts of `RedisSnapshotStore` (redis_store.py): each write under
a lease is one script, so it is checked and applied in one step in Redis."""

# Whether the lease at `lease` holds `value`; if it expired with nobody claiming the session since
# (`owner`, which only a claim sets and a release clears, still holds `value`: the store was down past
# the lease's time-to-live), it is taken again. Every script that writes under a lease starts with it.
HOLDS = """
local function holds(lease, owner, value, ttl)
  local held = redis.call('GET', lease)
  if held then return held == value end
  if redis.call('GET', owner) ~= value then return false end
  redis.call('SET', lease, value, 'PX', ttl)
  return true
end
"""
# KEYS[1] lease, KEYS[2] fence, KEYS[3] owner; ARGV[1] worker, ARGV[2] ttl ms. Returns {1, value} or {0, holder}.
CLAIM = """
local held = redis.call('GET', KEYS[1])
if held then
  if string.sub(held, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ':' then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, held}
  end
  return {0, held}
end
local value = ARGV[1] .. ':' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
redis.call('SET', KEYS[3], value)
return {1, value}
"""
# KEYS[1] lease, KEYS[2] owner; ARGV[1] value, ARGV[2] ttl ms.
RENEW = HOLDS + """
if holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS[1] lease, KEYS[2] owner; ARGV[1] value, ARGV[2] channel, ARGV[3] id. The owner goes even where
# the lease has expired already. A claim waiting for the session hears of it at once (`on_release`)
# instead of at its next poll.
RELEASE = """
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""
# A snapshot is SET to an upload key beside it (no lease needed: nobody reads it) and, in the
# same round trip, promoted by this script under the lease. A snapshot (a 2B session's: 18 MB)
# passed to a script instead would be copied into Lua and out again.
# KEYS[1] lease, KEYS[2] snap, KEYS[3] index, KEYS[4] upload, KEYS[5] owner; ARGV[1] value, ARGV[2] now,
# ARGV[3] id, ARGV[4] ttl ms.
PROMOTE = HOLDS + """
if not holds(KEYS[1], KEYS[5], ARGV[1], ARGV[4]) then
  redis.call('DEL', KEYS[4])
  return 0
end
redis.call('RENAME', KEYS[4], KEYS[2])
redis.call('PERSIST', KEYS[2])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
return 1
"""
# One tick's group commit: ARGV[1] the key prefix, ARGV[2] msgpack [[id, lease value, [record,
# ...]], ...], ARGV[3] now: a journaled session counts as written then (expiry must not take it
# for abandoned because its snapshot is old). One argument instead of four per session: packing a
# command's arguments was most of the client's time per commit (256 sessions: 1,283 arguments).
# The keys are built here (a batch spans many sessions anyway, so it is for one Redis, not a
# cluster). ARGV[4]: the lease's ttl ms. Returns 1 (appended) or 0 (refused) per session.
APPEND = HOLDS + """
local out = {}
for i, entry in ipairs(cmsgpack.unpack(ARGV[2])) do
  local key = ARGV[1] .. ':s:' .. entry[1]
  if holds(key .. ':lease', key .. ':owner', entry[2], ARGV[4]) then
    redis.call('RPUSH', key .. ':journal', unpack(entry[3]))
    redis.call('ZADD', ARGV[1] .. ':index', 'XX', ARGV[3], entry[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
# KEYS[1] lease, KEYS[2] journal, KEYS[3] owner; ARGV[1] value, ARGV[2] records to drop from the head,
# ARGV[3] ttl ms.
TRIM = HOLDS + """
if not holds(KEYS[1], KEYS[3], ARGV[1], ARGV[3]) then return 0 end
redis.call('LTRIM', KEYS[2], ARGV[2], -1)
return 1
"""
# KEYS[1] lease, KEYS[2] snap, KEYS[3] journal, KEYS[4] index, KEYS[5] the per-session fence counter
# older versions kept, KEYS[6] owner; ARGV[1] value, ARGV[2] id, ARGV[3] ttl ms. Releases too.
DELETE = HOLDS + """
if not holds(KEYS[1], KEYS[6], ARGV[1], ARGV[3]) then return -1 end
local n = redis.call('DEL', KEYS[2])
redis.call('DEL', KEYS[3], KEYS[1], KEYS[5], KEYS[6])
redis.call('ZREM', KEYS[4], ARGV[2])
return n
"""
