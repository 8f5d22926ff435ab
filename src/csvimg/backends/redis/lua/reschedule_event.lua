-- KEYS: event, due events;  ARGV: next_attempt_at ('' = delivered), event id
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if ARGV[1] == '' then
  redis.call('HDEL', KEYS[1], 'next_attempt_at')
  redis.call('ZREM', KEYS[2], ARGV[2])
else
  redis.call('HSET', KEYS[1], 'next_attempt_at', ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
end
return 1
