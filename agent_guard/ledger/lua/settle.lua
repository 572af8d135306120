-- Settle: drop the hold (if the lease was not reclaimed yet) and add what was actually
-- spent, once per reservation id. A settle after the lease expired still counts, once:
-- the client sends the reservation's scopes, so nothing depends on the stored record.
--
-- KEYS: open, leases, done:<id>, then the reservation's scope hashes
-- ARGV: id, token (unique per call), retention seconds, scope ttl seconds (0 = none),
--       then dim, "amount" pairs
-- Reply: 0 if another call already settled or released the id; otherwise
--        {1, spent after, for each scope and each dim in ARGV order}
-- The same call sent twice (a client retry) gets the same answer and counts once.

ag_ttl = tonumber(ARGV[4])
local done = redis.call('GET', KEYS[3])
if done and done ~= ARGV[2] then
  return 0
end
if not done then
  local raw = redis.call('HGET', KEYS[1], ARGV[1])
  if raw then
    ag_unhold(raw)
    redis.call('HDEL', KEYS[1], ARGV[1])
    redis.call('ZREM', KEYS[2], ARGV[1])
  end
  redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
end

local reply = {1}
for i = 4, #KEYS do
  for j = 5, #ARGV, 2 do
    local field = 's:' .. ARGV[j]
    if not done and ARGV[j + 1] ~= '0' then
      redis.call('HINCRBY', KEYS[i], field, ARGV[j + 1])
    end
    reply[#reply + 1] = redis.call('HGET', KEYS[i], field) or '0'
  end
  if not done then
    ag_touch(KEYS[i])
  end
end
return reply
