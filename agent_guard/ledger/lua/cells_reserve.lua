-- Reserve in one cell: apply the settles that travel with it and the grants it carries,
-- reclaim up to 100 expired leases of the cell, then hold the amounts on every scope, or
-- on none (see ag_cell_check).
--
-- KEYS: the cell's open, leases, done:<id>, then the scope hashes in this cell, then
--       past buckets of rolling windows at home (read only), then the settles' keys
-- ARGV: now ('' = server TIME), lease seconds, id, token, record JSON (as reserve.lua),
--       caps JSON (ag_cell_check), grants JSON (ag_grant_all; '' = none),
--       retention seconds of done:<id>, settle batch JSON ('' = none)
-- Reply: as reserve.lua's, or {2, shorts} (nothing held; see ag_cell_check); with
--        settles: {that reply, {one ag_cells_settle_all reply per settle}}

local settled = ag_cells_settle_all(KEYS, ARGV[8], ARGV[9])
ag_grant_all(KEYS, ARGV[7])

local function reserve()
  local now = ag_now(ARGV[1])
  ag_reclaim(KEYS[1], KEYS[2], now, 100)

  local id = ARGV[3]
  local reused = ag_reused(KEYS, id, ARGV[4])
  if reused then
    return reused
  end

  local rec = cjson.decode(ARGV[5])
  local caps = cjson.decode(ARGV[6])
  local refused = ag_cell_check(KEYS, 4, caps, rec.a)
  if refused then
    return refused
  end
  for i = 4, 3 + #caps do
    for dim, amount in pairs(rec.a) do
      redis.call('HINCRBY', KEYS[i], 'r:' .. dim, amount)
    end
  end
  local expires = ag_num(now + tonumber(ARGV[2]))
  redis.call('HSET', KEYS[1], id, ARGV[5])
  redis.call('ZADD', KEYS[2], expires, id)
  return {1, expires}
end

local reply = reserve()
if settled then
  return {reply, settled}
end
return reply
