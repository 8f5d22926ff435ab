-- KEYS: item, lease index;  ARGV: lease_until, item id, prefix
if redis.call('HGET', KEYS[1], 'status') ~= 'PROCESSING' then return 0 end
if not committed_request(ARGV[3], KEYS[1]) then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
