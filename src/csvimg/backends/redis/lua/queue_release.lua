-- KEYS: stream, delayed, leases
-- ARGV: group, entry id, delivery count, consumer, item id, deliveries,
--       due ('' = now), delayed member
if not holds(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
if ARGV[7] == '' then
  redis.call('XADD', KEYS[1], '*', 'i', ARGV[5], 'd', ARGV[6])
else
  redis.call('ZADD', KEYS[2], ARGV[7], ARGV[8])
end
return 1
