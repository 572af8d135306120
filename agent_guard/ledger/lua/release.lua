-- Release: drop the hold without spending, once per reservation id.
--
-- KEYS: open, leases, done:<id>
-- ARGV: id, token (unique per call), retention seconds, scope ttl seconds (0 = none)
-- Reply: 1 if this call dropped a hold; 0 if the id was already finished or its lease
-- was already reclaimed. The same call sent twice (a client retry) gets the same answer.

ag_ttl = tonumber(ARGV[4])
local done = redis.call('GET', KEYS[3])
if done then
  if done == ARGV[2] .. ':1' then
    return 1
  end
  return 0
end
local held = 0
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw then
  ag_unhold(raw)
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  held = 1
end
redis.call('SET', KEYS[3], ARGV[2] .. ':' .. held, 'EX', ARGV[3])
return held
