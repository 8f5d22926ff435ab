local function committed_request(prefix, ikey)
  local rid = redis.call('HGET', ikey, 'request_id')
  if not rid then return false end
  local rkey = prefix .. ':req:' .. rid
  if redis.call('EXISTS', rkey) == 0 then return false end
  return rkey, rid
end
