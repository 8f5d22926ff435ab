-- KEYS: request, staging marker;  ARGV: marker time-to-live (seconds), token
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'EX', ARGV[1]) then return 1 end
if redis.call('GET', KEYS[2]) == ARGV[2] then return 1 end
return 0
