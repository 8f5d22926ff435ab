-- KEYS: webhook, its owner's index;  ARGV: prefix, id, created_at, field/value pairs...
-- Re-registering an id replaces it, possibly under another owner.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZREM', owner_index(ARGV[1], redis.call('HGET', KEYS[1], 'owner')), ARGV[2])
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return 1
