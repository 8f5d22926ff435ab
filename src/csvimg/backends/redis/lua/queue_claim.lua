-- KEYS: stream, delayed, leases
-- ARGV: group, consumer, now, lease_until, max items
local group, consumer, now, lease_until = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local max = tonumber(ARGV[5])
local claimed = {}
local function fields_of(flat)
  local f = {}
  for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  return f
end
-- 1. Released ids whose delay is over go back into the stream.
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
for _, member in ipairs(due) do
  local d, item = string.match(member, '^(%d+):[^:]*:(.*)$')
  if item then redis.call('XADD', KEYS[1], '*', 'i', item, 'd', d) end
  redis.call('ZREM', KEYS[2], member)
end
-- 2. Take over entries whose lease ended without an ack (consumer died).
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. now, 'LIMIT', 0, max)
for _, id in ipairs(expired) do
  local got = redis.call('XCLAIM', KEYS[1], group, consumer, 0, id)
  local entry = got[1]
  if entry and entry[2] then
    local f = fields_of(entry[2])
    local count = redis.call('XPENDING', KEYS[1], group, id, id, 1)[1][4]
    claimed[#claimed + 1] = {id, f['i'] or '', tonumber(f['d'] or '0') + count, count}
    redis.call('ZADD', KEYS[3], lease_until, id)
  else
    -- acked or deleted meanwhile: forget it
    redis.call('XACK', KEYS[1], group, id)
    redis.call('ZREM', KEYS[3], id)
  end
end
-- 3. New entries; their lease is recorded in this same step, so a consumer
-- dying right after this script still has its entries taken over.
if #claimed < max then
  local res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', max - #claimed,
                         'STREAMS', KEYS[1], '>')
  if res then
    for _, entry in ipairs(res[1][2]) do
      local f = fields_of(entry[2])
      claimed[#claimed + 1] = {entry[1], f['i'] or '', tonumber(f['d'] or '0') + 1, 1}
      redis.call('ZADD', KEYS[3], lease_until, entry[1])
    end
  end
end
-- 4. For a caller that got nothing: the stream's last id to block on, and
-- when the next delayed id or lease is due.
local last = '0-0'
if #claimed == 0 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
local next_delayed = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2] or ''
local next_lease = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')[2] or ''
return {claimed, last, next_delayed, next_lease}
