-- KEYS: rows list, staging marker;  ARGV: pages written before, pages...
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local have, start = redis.call('LLEN', KEYS[1]), tonumber(ARGV[1])
if have == start + #ARGV - 1 then return 1 end
if have ~= start then return redis.error_reply('row pages out of step') end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
return 1
