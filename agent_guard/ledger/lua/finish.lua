-- Settle or release a reservation, once. A reservation whose lease already expired
-- (its hold was reclaimed) is still settled: its spend is added, once.
--
-- KEYS[1] leases zset, KEYS[2] reservation key, KEYS[3] done key,
-- KEYS[4..] the reservation's scope hashes (sent by the client, so a settle after
-- expiry still knows where to add)
-- ARGV[1] actual JSON {dim: "amount"}, ARGV[2] reservation id,
-- ARGV[3] seconds to remember the id as done, ARGV[4] mode: "settle" | "release"
-- Returns 0 if the reservation was already finished (release after expiry: 0, nothing
-- was held any more); a release that counted returns 1; a settle that counted returns
-- {1, JSON list of {dim: spent after} per scope}.

if redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
local held = 0
local raw = redis.call('GET', KEYS[2])
if raw then
  local r = cjson.decode(raw)
  for _, sk in ipairs(r.s) do
    for dim, amt in pairs(r.a) do
      redis.call('HINCRBY', sk, 'r:' .. dim, '-' .. amt)
    end
  end
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[1], ARGV[2])
  held = 1
end
redis.call('SET', KEYS[3], '1', 'EX', ARGV[3])
if ARGV[4] == 'release' then
  return held
end
local actual = cjson.decode(ARGV[1])
local after = {}
for i = 4, #KEYS do
  local spent = {}
  for dim, amt in pairs(actual) do
    spent[dim] = tostring(redis.call('HINCRBY', KEYS[i], 's:' .. dim, amt))
  end
  after[#after + 1] = spent
end
return {1, cjson.encode(after)}
