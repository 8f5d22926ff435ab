-- KEYS: request, staging marker, rows, item ids, pending index, lease index
-- ARGV: item key prefix, '1' on the last call, item ids...
-- Never touches a committed request: its commit may have run even though
-- the client saw an error.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if #ARGV >= 3 then
  for i = 3, #ARGV do redis.call('UNLINK', ARGV[1] .. ARGV[i]) end
  redis.call('ZREM', KEYS[5], unpack(ARGV, 3))
  redis.call('ZREM', KEYS[6], unpack(ARGV, 3))
end
if ARGV[2] == '1' then redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[4]) end
return 1
