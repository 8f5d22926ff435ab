-- KEYS: item, pending index, lease index, due events
-- ARGV: now, item id, prefix, ok ('1'/'0'), event id to use if this call
--       finishes the request, n, then n field/value pairs of the result to
--       set, then the names of the result fields to remove (None values)
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
local rkey, rid = committed_request(ARGV[3], KEYS[1])
if not rkey then return false end
if status == 'DONE' or status == 'FAILED' then
  -- Finished already. A replay of the call that finished the request
  -- answers like the first run; anyone else gets nothing.
  if redis.call('HGET', KEYS[1], 'finished_by') == ARGV[5]
     and redis.call('HGET', rkey, 'finished_by') == ARGV[5] then
    return redis.call('HGETALL', rkey)
  end
  return false
end
local ok = ARGV[4] == '1'
local n = tonumber(ARGV[6])
local fields = {'status', ok and 'DONE' or 'FAILED', 'updated_at', ARGV[1],
                'finished_by', ARGV[5]}
for i = 7, 6 + 2 * n do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('HDEL', KEYS[1], 'lease_until')
for i = 7 + 2 * n, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('HINCRBY', rkey, ok and 'done' or 'failed', 1)
redis.call('HSET', rkey, 'updated_at', ARGV[1])
local r = redis.call('HMGET', rkey, 'total', 'done', 'failed', 'status', 'owner', 'callback_url')
local done, failed = tonumber(r[2]), tonumber(r[3])
if done + failed < tonumber(r[1]) then return false end
-- A request that is already terminal never fires a second event.
if r[4] == 'COMPLETED' or r[4] == 'FAILED' then return false end
-- The rule of csvimg.backends.memory.finish_outcome: any DONE item makes
-- the request COMPLETED; all items FAILED make it FAILED.
local final = done > 0 and 'COMPLETED' or 'FAILED'
redis.call('HSET', rkey, 'status', final, 'finished_by', ARGV[5])
local event = {'id', ARGV[5],
               'type', final == 'COMPLETED' and 'request.completed' or 'request.failed',
               'request_id', rid, 'created_at', ARGV[1], 'attempts', '0',
               'next_attempt_at', ARGV[1]}
if r[5] then event[#event + 1] = 'owner'; event[#event + 1] = r[5] end
if r[6] then event[#event + 1] = 'callback_url'; event[#event + 1] = r[6] end
redis.call('HSET', ARGV[3] .. ':event:' .. ARGV[5], unpack(event))
redis.call('ZADD', KEYS[4], ARGV[1], ARGV[5])
return redis.call('HGETALL', rkey)
