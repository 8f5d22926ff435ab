-- KEYS: item, pending index, lease index
-- ARGV: now, lease_until, item id, prefix, token of this call
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'DONE' or status == 'FAILED' then return false end
local rkey = committed_request(ARGV[4], KEYS[1])
if not rkey then return false end
if status == 'PROCESSING' and redis.call('HGET', KEYS[1], 'leased_by') == ARGV[5] then
  return redis.call('HGETALL', KEYS[1])  -- a replay of this very call
end
if status == 'PROCESSING' then
  local lease = redis.call('HGET', KEYS[1], 'lease_until')
  if lease and tonumber(lease) > tonumber(ARGV[1]) then return false end
end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'PROCESSING', 'lease_until', ARGV[2],
           'updated_at', ARGV[1], 'leased_by', ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
if redis.call('HGET', rkey, 'status') == 'PENDING' then
  redis.call('HSET', rkey, 'status', 'PROCESSING', 'updated_at', ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
