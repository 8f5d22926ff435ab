local function holds(stream, group, entry, count, consumer)
  local p = redis.call('XPENDING', stream, group, entry, entry, 1)
  return #p == 1 and p[1][2] == consumer and p[1][4] == tonumber(count)
end
