-- KEYS: the request's item id list, pending index, lease index, staging marker
-- ARGV: item key prefix, JSON field names, JSON list of [id, value, ...],
--       marker time-to-live, items written before
-- Times arrive as strings (exact); JSON null means the field is absent.
-- Refreshing the marker keeps the sweeper from taking these for leftovers.
if redis.call('EXPIRE', KEYS[4], ARGV[4]) == 0 then return 0 end
local items = cjson.decode(ARGV[3])
local have, start = redis.call('LLEN', KEYS[1]), tonumber(ARGV[5])
if have == start + #items then return 1 end
if have ~= start then return redis.error_reply('item ids out of step') end
local names = cjson.decode(ARGV[2])
local at = {}
for i, name in ipairs(names) do at[name] = i + 1 end
local ids, pending, leased = {}, {}, {}
-- unpack() is bounded by Lua's C stack: push ids and scores in batches.
local function flush(force)
  if #ids > 0 and (force or #ids >= 1000) then
    redis.call('RPUSH', KEYS[1], unpack(ids)); ids = {}
  end
  if #pending > 0 and (force or #pending >= 2000) then
    redis.call('ZADD', KEYS[2], unpack(pending)); pending = {}
  end
  if #leased > 0 and (force or #leased >= 2000) then
    redis.call('ZADD', KEYS[3], unpack(leased)); leased = {}
  end
end
for _, item in ipairs(items) do
  local fields = {}
  for i, name in ipairs(names) do
    local value = item[i + 1]
    if value ~= cjson.null then
      fields[#fields + 1] = name
      fields[#fields + 1] = value
    end
  end
  redis.call('HSET', ARGV[1] .. item[1], unpack(fields))
  local status = item[at['status']]
  if status == 'PENDING' then
    pending[#pending + 1] = item[at['updated_at']]
    pending[#pending + 1] = item[1]
  elseif status == 'PROCESSING' and item[at['lease_until']] ~= cjson.null then
    leased[#leased + 1] = item[at['lease_until']]
    leased[#leased + 1] = item[1]
  end
  ids[#ids + 1] = item[1]
  flush(false)
end
flush(true)
return 1
