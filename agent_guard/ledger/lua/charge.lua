-- Charge: reclaim up to 100 expired leases, then check and spend on every scope, or on
-- none.
--
-- KEYS: open, leases, then the scope hashes, then past buckets of rolling windows
-- ARGV: now ('' = server TIME), caps JSON [[[dim, "cap"], ...] per scope],
--       amounts JSON {dim: "amount" (non-zero)}, scope ttl seconds (0 = none)
-- Reply: {1} | {0, ...denial, see ag_check}

ag_ttl = tonumber(ARGV[4])
ag_reclaim(KEYS[1], KEYS[2], ag_now(ARGV[1]), 100)

local amounts = cjson.decode(ARGV[3])
local caps = cjson.decode(ARGV[2])
local denial = ag_check(KEYS, 3, caps, amounts)
if denial then
  return denial
end
for i = 3, 2 + #caps do
  for dim, amount in pairs(amounts) do
    redis.call('HINCRBY', KEYS[i], 's:' .. dim, amount)
  end
  ag_touch(KEYS[i])
end
return {1}
