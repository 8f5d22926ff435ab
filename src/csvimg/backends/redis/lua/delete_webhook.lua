-- KEYS: webhook, the owner's index;  ARGV: id, has owner ('1'/'0'), owner
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local owner = redis.call('HGET', KEYS[1], 'owner')
if ARGV[2] == '1' then
  if owner ~= ARGV[3] then return 0 end
elseif owner then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
