-- KEYS: due events;  ARGV: now, limit, lease_until, prefix
-- The lease is the due score pushed forward: a claimed event becomes due
-- again when the lease ends unless reschedule_event moves it first.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[3], id)
  out[#out + 1] = redis.call('HGETALL', ARGV[4] .. ':event:' .. id)
end
return out
