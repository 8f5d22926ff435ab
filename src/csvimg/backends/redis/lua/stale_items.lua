-- KEYS: pending index, lease index;  ARGV: now, pending_before, limit, prefix
local now, prefix, limit = ARGV[1], ARGV[4], tonumber(ARGV[3])
local found = {}
-- 'ok': an item of a committed request; 'wait': its request is being
-- written; 'gone': a leftover of a create_request whose writer died
-- (no request, no live staging marker), removed here.
local function state(id)
  local ikey = prefix .. ':item:' .. id
  local rid = redis.call('HGET', ikey, 'request_id')
  if not rid then return 'gone', ikey, nil end
  if redis.call('EXISTS', prefix .. ':req:' .. rid) == 1 then return 'ok', ikey, rid end
  if redis.call('EXISTS', prefix .. ':staging:' .. rid) == 1 then return 'wait', ikey, rid end
  return 'gone', ikey, rid
end
local function sweep(index, max_score, touch)
  if #found >= limit then return end
  -- One snapshot, a few times wider than needed so that items of requests
  -- still being written cannot hide the ones behind them.
  local ids = redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. max_score,
                         'LIMIT', 0, 4 * (limit - #found))
  for _, id in ipairs(ids) do
    if #found >= limit then return end
    local st, ikey, rid = state(id)
    if st == 'ok' then
      touch(id, ikey)
      found[#found + 1] = id
    elseif st == 'gone' then
      redis.call('UNLINK', ikey)
      redis.call('ZREM', KEYS[1], id)
      redis.call('ZREM', KEYS[2], id)
      if rid then
        redis.call('UNLINK', prefix .. ':rows:' .. rid, prefix .. ':itemids:' .. rid)
      end
    end
  end
end
-- Waiting items first: an item moved back from PROCESSING below gets
-- updated_at = now and must not be picked up again by this same call.
sweep(KEYS[1], ARGV[2], function(id, ikey)
  redis.call('HSET', ikey, 'updated_at', now)
  redis.call('ZADD', KEYS[1], now, id)
end)
sweep(KEYS[2], now, function(id, ikey)
  redis.call('HSET', ikey, 'status', 'PENDING', 'updated_at', now)
  redis.call('HDEL', ikey, 'lease_until')
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], now, id)
end)
return found
