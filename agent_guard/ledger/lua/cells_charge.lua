-- Charge in one cell: apply the settles that travel with it and the grants it carries,
-- reclaim up to 100 expired leases of the cell, then check and spend on every scope, or
-- on none (see ag_cell_check).
--
-- KEYS: the cell's open, leases, then the scope hashes in this cell, then past buckets
--       of rolling windows at home, then the settles' keys
-- ARGV: now ('' = server TIME), caps JSON (ag_cell_check), amounts JSON,
--       grants JSON ('' = none), retention seconds of done:<id> and settle batch JSON
--       ('' = none), then the charged dimensions' names to read back (none: no reads)
-- Reply: as charge.lua's, or {2, shorts} (nothing spent); with settles: {that reply,
--        {one ag_cells_settle_all reply per settle}}

local settled = ag_cells_settle_all(KEYS, ARGV[5], ARGV[6])
ag_grant_all(KEYS, ARGV[4])

local function charge()
  ag_reclaim(KEYS[1], KEYS[2], ag_now(ARGV[1]), 100)

  local amounts = cjson.decode(ARGV[3])
  local caps = cjson.decode(ARGV[2])
  local refused = ag_cell_check(KEYS, 3, caps, amounts)
  if refused then
    return refused
  end
  local reply = {1}
  for i = 3, 2 + #caps do
    for dim, amount in pairs(amounts) do
      redis.call('HINCRBY', KEYS[i], 's:' .. dim, amount)
    end
    for j = 7, #ARGV do
      reply[#reply + 1] = redis.call('HGET', KEYS[i], 's:' .. ARGV[j]) or '0'
    end
  end
  return reply
end

local reply = charge()
if settled then
  return {reply, settled}
end
return reply
