local function owner_index(prefix, owner)
  if owner then return prefix .. ':webhooks:o:' .. owner end
  return prefix .. ':webhooks:-'
end
