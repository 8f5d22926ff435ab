-- KEYS: item;  ARGV: prefix
if not committed_request(ARGV[1], KEYS[1]) then return false end
return redis.call('HGETALL', KEYS[1])
