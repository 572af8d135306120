-- Reserve: apply the settles that travel with it, reclaim up to 100 expired leases, then
-- hold the amounts on every scope, or on none.
--
-- KEYS: open, leases, done:<id>, then the scope hashes, then past buckets of rolling
--       windows (read only, see ag_check), then the keys of the settles (if any)
-- ARGV: now ('' = server TIME), lease seconds, id, token (unique per call),
--       record JSON {"k": [scope keys], "a": {dim: "amount" (non-zero)}, "t": token},
--       caps JSON [[[dim, "cap"], ...] per scope], scope ttl seconds (0 = none),
--       then, with settles: retention seconds of done:<id>, settle batch JSON (settle.lua)
--       (or '', ''), then '1' when the id is fresh: made by this client (unique by
--       construction) and sent once (no client retries), so the checks of a resent or
--       reused id are skipped
-- Reply: {1, expires_at} | {0, ...denial, see ag_check} | {-1} (id already used);
--        with settles: that reply and one ag_settle reply per settle (ag_with_settles)
-- The same call sent twice (a client retry after a lost reply) gets the same answer.

ag_ttl = tonumber(ARGV[7])
local settled = ag_settle_all(KEYS, ARGV[8], ARGV[9])

local function reserve()
  local now = ag_now(ARGV[1])
  ag_reclaim(KEYS[1], KEYS[2], now, 100)

  local id = ARGV[3]
  if ARGV[10] ~= '1' then  -- '1': a fresh id the client made, never sent before
    local reused = ag_reused(KEYS, id, ARGV[4])
    if reused then
      return reused
    end
  end

  local rec = cjson.decode(ARGV[5])
  local caps = cjson.decode(ARGV[6])
  local denial = ag_check(KEYS, 4, caps, rec.a)
  if denial then
    return denial
  end
  for i = 4, 3 + #caps do
    for dim, amount in pairs(rec.a) do
      redis.call('HINCRBY', KEYS[i], 'r:' .. dim, amount)
    end
    ag_touch(KEYS[i])
  end
  local expires = ag_num(now + tonumber(ARGV[2]))
  redis.call('HSET', KEYS[1], id, ARGV[5])
  redis.call('ZADD', KEYS[2], expires, id)
  return {1, expires}
end

local reply = reserve()
if settled then
  return ag_with_settles(reply, settled)
end
return reply
