-- KEYS: stream, leases;  ARGV: group, entry id, delivery count, consumer, lease_until
if not holds(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[2])
return 1
