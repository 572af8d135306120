-- Reclaim expired leases, then (mode "reserve" or "charge") check every capped
-- dimension of every scope and hold or spend the amounts on all of them, or on none.
--
-- KEYS[1] leases zset, KEYS[2] reservation key, KEYS[3] done key, KEYS[4..] scope hashes
-- ARGV[1] key prefix, ARGV[2] now ("" = server TIME), ARGV[3] lease seconds,
-- ARGV[4] reservation JSON {"s": [scope keys], "a": {dim: "amount"}},
-- ARGV[5] caps JSON [{dim: "cap"}, ...] aligned with KEYS[4..], ARGV[6] reservation id,
-- ARGV[7] mode: "reserve" | "charge" | "reclaim"
-- Amounts travel as strings: Lua numbers are doubles and would print 1e+15 to HINCRBY.
-- Comparisons use tonumber, exact below 2^53 (the client refuses larger amounts).

local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function unhold(raw)
  local r = cjson.decode(raw)
  for _, sk in ipairs(r.s) do
    for dim, amt in pairs(r.a) do
      redis.call('HINCRBY', sk, 'r:' .. dim, '-' .. amt)
    end
  end
end

local batch = (ARGV[7] == 'reclaim') and 1000 or 100
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, batch)
for _, rid in ipairs(expired) do
  local rkey = ARGV[1] .. 'r:' .. rid
  local raw = redis.call('GET', rkey)
  if raw then
    unhold(raw)
    redis.call('DEL', rkey)
  end
  redis.call('ZREM', KEYS[1], rid)
end
if ARGV[7] == 'reclaim' then
  return {2, tostring(#expired)}
end

if ARGV[7] == 'reserve' and
   (redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 1) then
  return {-1}
end

local amounts = cjson.decode(ARGV[4]).a
local caps = cjson.decode(ARGV[5])
for i, cap in ipairs(caps) do
  local sk = KEYS[3 + i]
  for dim, c in pairs(cap) do
    local want = amounts[dim]
    if want and tonumber(want) > 0 then
      local v = redis.call('HMGET', sk, 's:' .. dim, 'r:' .. dim, 'x:' .. dim)
      local s, r, x = tonumber(v[1] or '0'), tonumber(v[2] or '0'), tonumber(v[3] or '0')
      if s + r + tonumber(want) > tonumber(c) + x then
        return {0, tostring(i), dim, tostring(tonumber(c) + x), tostring(s), tostring(r), want}
      end
    end
  end
end

local field = (ARGV[7] == 'reserve') and 'r:' or 's:'
for i = 4, #KEYS do
  for dim, amt in pairs(amounts) do
    redis.call('HINCRBY', KEYS[i], field .. dim, amt)
  end
end
if ARGV[7] == 'charge' then
  return {1, ''}
end
local expires = now + tonumber(ARGV[3])
redis.call('SET', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[1], expires, ARGV[6])
return {1, tostring(expires)}
