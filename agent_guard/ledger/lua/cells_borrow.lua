-- At a scope's home: take back what cells returned, then lend allowance to one cell, or
-- list the cells holding loans.
--
-- KEYS: the scope's home hash, then its past buckets' home hashes (a rolling window)
-- ARGV: the borrowing cell, caps JSON [[dim, "cap"], ...] (with 'debt': [dim, "debt", ...]),
--       need JSON [dim, "need", ...] ('' = lend nothing; 'loans' = list the loans;
--       'debt' = lend the debts in ARGV[2] whatever the room: spent already),
--       credits JSON [[KEYS index, cell, dim, "B"], ...] ('' = none): a cell's absolute
--       returned total (its stripe's b:<dim>), applied with max(),
--       chunk divisor: a loan is at least (cap + extra) / divisor, when there is room
-- Reply: {1, {dim, "G", ...}} the cell's new granted totals; or {0, {{KEYS index, cell},
--        ...}} when the unlent room does not cover the need (nothing lent), listing
--        the loans a recall can bring back

local function credit(raw)
  if raw == '' then
    return
  end
  for _, c in ipairs(cjson.decode(raw)) do
    local key, field = KEYS[c[1]], 'b:' .. c[2] .. ':' .. c[3]
    local old, new = ag_n(redis.call('HGET', key, field)), tonumber(c[4])
    if new > old then
      redis.call('HSET', key, field, c[4])
      redis.call('HINCRBY', key, 'l:' .. c[3], '-' .. ag_num(new - old))
    end
  end
end

local function loans()
  local out = {}
  for k, key in ipairs(KEYS) do
    local h = redis.call('HGETALL', key)
    local f, cells = {}, {}
    for j = 1, #h, 2 do
      f[h[j]] = h[j + 1]
    end
    for field, g in pairs(f) do
      local cell, dim = string.match(field, '^g:(%d+):(.*)$')
      if cell and not cells[cell] and tonumber(g) > ag_n(f['b:' .. cell .. ':' .. dim]) then
        cells[cell] = true
        out[#out + 1] = {k, tonumber(cell)}
      end
    end
  end
  return out
end

credit(ARGV[4])
if ARGV[3] == 'debt' then  -- a stripe spent past its allowance: lend it what it spent
  local debts, granted = cjson.decode(ARGV[2]), {}
  for j = 1, #debts, 2 do
    local g = redis.call('HINCRBY', KEYS[1], 'g:' .. ARGV[1] .. ':' .. debts[j], debts[j + 1])
    redis.call('HINCRBY', KEYS[1], 'l:' .. debts[j], debts[j + 1])
    granted[#granted + 1] = debts[j]
    granted[#granted + 1] = ag_num(g)
  end
  return {1, granted}
end
if ARGV[3] == 'loans' then
  return {0, loans()}
end
if ARGV[3] == '' then
  return {1, {}}
end

local caps = {}
for _, pair in ipairs(cjson.decode(ARGV[2])) do
  caps[pair[1]] = tonumber(pair[2])
end
local need, plan = cjson.decode(ARGV[3]), {}
for j = 1, #need, 2 do
  local dim, want = need[j], tonumber(need[j + 1])
  local limit = caps[dim] + ag_n(redis.call('HGET', KEYS[1], 'x:' .. dim))
  local used = 0
  for _, key in ipairs(KEYS) do
    local v = redis.call('HMGET', key, 's:' .. dim, 'r:' .. dim, 'l:' .. dim)
    used = used + ag_n(v[1]) + ag_n(v[2]) + ag_n(v[3])
  end
  local unlent = limit - used
  if unlent < want then
    return {0, loans()}
  end
  plan[#plan + 1] = {dim, math.min(unlent, math.max(want, math.ceil(limit / tonumber(ARGV[5]))))}
end
local granted = {}
for _, p in ipairs(plan) do
  local g = redis.call('HINCRBY', KEYS[1], 'g:' .. ARGV[1] .. ':' .. p[1], ag_num(p[2]))
  redis.call('HINCRBY', KEYS[1], 'l:' .. p[1], ag_num(p[2]))
  granted[#granted + 1] = p[1]
  granted[#granted + 1] = ag_num(g)
end
redis.call('HSET', KEYS[1], 'n', '1')
return {1, granted}
