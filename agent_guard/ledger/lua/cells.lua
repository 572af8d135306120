-- Helpers of the cells layout (redis_cells.py), prepended after common.lua.
--
-- A namespace's keys are spread over N cells, each one hash tag (one slot). A call runs
-- in the cell of its first scope, as one script: every key it touches is in that cell.
-- Each scope has a home cell (from its name up to its first '@', so the buckets of a
-- window share it). A scope's hash in its home cell is the home hash; in another cell it
-- is a stripe, which admits only within the allowance the home lent it.
--
--   home hash    s:/r:/x:<dim> as in common.lua, and
--                l:<dim>         allowance lent out to other cells, now
--                g:<cell>:<dim>  allowance ever granted to a cell (only grows)
--                b:<cell>:<dim>  allowance ever given back by a cell, as last reported
--                n               1 once any other cell has a stripe of this scope
--   stripe       s:/r:<dim> as in common.lua, and
--                g:<dim>         its home's g:<cell>:<dim> as last received (only grows)
--                b:<dim>         allowance ever given back (only grows)
--                allowance = g - b
--
-- Grants and returns carry absolute, growing totals and are applied with max(), so a
-- lost, late or repeated message changes nothing and the next one catches up. The home
-- counts a grant as lent before any stripe can use it, and a return as lent until the
-- home hears of it, so the allowances out plus the home's own use never exceed the cap.

local function ag_n(v)
  return tonumber(v or '0')
end

-- Apply grants [[KEYS index of a stripe, dim, "G"], ...] ('' = none).
local function ag_grant_all(keys, raw)
  if raw == nil or raw == '' then
    return
  end
  for _, g in ipairs(cjson.decode(raw)) do
    local key, field = keys[g[1]], 'g:' .. g[2]
    if ag_n(redis.call('HGET', key, field)) < tonumber(g[3]) then
      redis.call('HSET', key, field, g[3])
    end
  end
end

-- The admission rule in a cell. `caps` is, per scope aligned with keys[first..],
-- {"c": [[dim, "cap"], ...]} plus "s": 1 for a stripe, "h": [KEYS index of each past
-- bucket's home hash] for a window, "f": 1 when its loans were just recalled.
-- A stripe admits within its allowance: s + r + amount <= g - b. A home hash admits
-- within what it has not lent: s + r + l (+ the past buckets') + amount <= cap + x.
-- Returns nil (fits), a denial as ag_check's, or {2, {{scope index, {dim, "need", ...}},
-- ...}}: scopes short of allowance (a stripe) or with allowance lent out that a recall
-- may bring back (a home hash); a denial on a scope after a short one is left for the
-- retry to find.
local function ag_cell_check(keys, first, caps, amounts)
  local shorts = {}
  for i, sc in ipairs(caps) do
    local key = keys[first + i - 1]
    local asked, fields = {}, {}
    for _, pair in ipairs(sc.c) do
      local want = amounts[pair[1]]
      if want and tonumber(want) > 0 then
        local d = pair[1]
        asked[#asked + 1] = pair
        if sc.s then
          fields[#fields + 1] = 's:' .. d
          fields[#fields + 1] = 'r:' .. d
          fields[#fields + 1] = 'g:' .. d
          fields[#fields + 1] = 'b:' .. d
        else
          fields[#fields + 1] = 's:' .. d
          fields[#fields + 1] = 'r:' .. d
          fields[#fields + 1] = 'x:' .. d
          fields[#fields + 1] = 'l:' .. d
        end
      end
    end
    if #asked > 0 then
      local v = redis.call('HMGET', key, unpack(fields))
      local past = {}
      if sc.h then
        for _, k in ipairs(sc.h) do
          past[#past + 1] = redis.call('HMGET', keys[k], unpack(fields))
        end
      end
      local short = {}
      for j, pair in ipairs(asked) do
        local dim, cap, want = pair[1], pair[2], amounts[pair[1]]
        local s, r = ag_n(v[4 * j - 3]), ag_n(v[4 * j - 2])
        local w = tonumber(want)
        if sc.s then
          local room = ag_n(v[4 * j - 1]) - ag_n(v[4 * j])
          if s + r + w > room then
            short[#short + 1] = dim
            short[#short + 1] = ag_num(s + r + w - room)
          end
        else
          local x, l = v[4 * j - 1] or '0', ag_n(v[4 * j])
          for _, p in ipairs(past) do
            s = s + ag_n(p[4 * j - 3])
            r = r + ag_n(p[4 * j - 2])
            l = l + ag_n(p[4 * j])
          end
          local limit = tonumber(cap) + tonumber(x)
          if s + r + l + w > limit then
            if l > 0 and not sc.f then
              short[#short + 1] = dim
              short[#short + 1] = ag_num(s + r + l + w - limit)
            elseif #shorts == 0 and #short == 0 then
              return {0, i, dim, cap, x, ag_num(s), ag_num(r + l), want}
            end
          end
        end
      end
      if #short > 0 then
        shorts[#shorts + 1] = {i, short}
      end
    end
  end
  if #shorts > 0 then
    return {2, shorts}
  end
  return nil
end

-- ag_settle_all, each counted settle's reply followed by, per scope key, 1 if other cells
-- hold stripes of it (its home hash's n), else 0; then the debts it left:
-- {{scope position, dim, "debt"}, ...}: a stripe whose spent + reserved passed its
-- allowance (a settle above its hold), which the client reports to the home.
local function ag_cells_settle_all(keys, retention, batch)
  local replies = ag_settle_all(keys, retention, batch)
  if replies == nil then
    return nil
  end
  for i, s in ipairs(cjson.decode(batch)) do
    local reply = replies[i]
    if reply ~= 0 then
      local debts = {}
      -- one HMGET per scope key: n, then g, b, s, r of each settled dim (dim a/2+1's
      -- g at index 2a)
      local fields = {'n'}
      for a = 1, #s[5], 2 do
        local dim = s[5][a]
        fields[#fields + 1] = 'g:' .. dim
        fields[#fields + 1] = 'b:' .. dim
        fields[#fields + 1] = 's:' .. dim
        fields[#fields + 1] = 'r:' .. dim
      end
      for j, k in ipairs(s[4]) do
        local v = redis.call('HMGET', keys[k], unpack(fields))
        reply[#reply + 1] = ag_n(v[1])
        for a = 1, #s[5], 2 do
          local o = 2 * a
          if v[o] then
            local debt = ag_n(v[o + 2]) + ag_n(v[o + 3]) - (ag_n(v[o]) - ag_n(v[o + 1]))
            if debt > 0 then
              debts[#debts + 1] = {j, s[5][a], ag_num(debt)}
            end
          end
        end
      end
      reply[#reply + 1] = debts
    end
  end
  return replies
end
