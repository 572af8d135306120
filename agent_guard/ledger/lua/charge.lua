-- Charge: apply the settles that travel with it, reclaim up to 100 expired leases, then
-- check and spend on every scope, or on none.
--
-- KEYS: open, leases, then the scope hashes, then past buckets of rolling windows, then
--       the keys of the settles (if any)
-- ARGV: now ('' = server TIME), caps JSON [[[dim, "cap"], ...] per scope],
--       amounts JSON {dim: "amount" (non-zero)}, scope ttl seconds (0 = none),
--       retention seconds of done:<id> and settle batch JSON (settle.lua; '' = none),
--       then, to read them back, the charged dimensions' names (none: no reads)
-- Reply: {1, spent after the charge of each scope (in KEYS order) and each named
--         dimension} | {0, ...denial, see ag_check}; with settles: that reply and one
--         ag_settle reply per settle (ag_with_settles)

ag_ttl = tonumber(ARGV[4])
local settled = ag_settle_all(KEYS, ARGV[5], ARGV[6])

local function charge()
  ag_reclaim(KEYS[1], KEYS[2], ag_now(ARGV[1]), 100)

  local amounts = cjson.decode(ARGV[3])
  local caps = cjson.decode(ARGV[2])
  local denial = ag_check(KEYS, 3, caps, amounts)
  if denial then
    return denial
  end
  local reply = {1}
  for i = 3, 2 + #caps do
    for dim, amount in pairs(amounts) do
      redis.call('HINCRBY', KEYS[i], 's:' .. dim, amount)
    end
    ag_touch(KEYS[i])
    for j = 7, #ARGV do
      reply[#reply + 1] = redis.call('HGET', KEYS[i], 's:' .. ARGV[j]) or '0'
    end
  end
  return reply
end

local reply = charge()
if settled then
  return ag_with_settles(reply, settled)
end
return reply
