-- KEYS: webhook;  ARGV: '1' or '0'
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'active', ARGV[1])
return 1
