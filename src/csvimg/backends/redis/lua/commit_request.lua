-- KEYS: request, all-requests index, staging marker[, owner's index]
-- ARGV: created_at, request id, field/value pairs of the request hash...
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end  -- a replay
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
if KEYS[4] then redis.call('ZADD', KEYS[4], ARGV[1], ARGV[2]) end
redis.call('DEL', KEYS[3])
return 1
