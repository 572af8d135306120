-- In one cell: give back the holds of up to 100 expired leases, then each stripe's unused
-- allowance (g - b - s - r, when positive).
--
-- KEYS: the cell's open, leases, then stripes of this cell
-- ARGV: now ('' = server TIME)
-- Reply: per stripe {dim, "B", ...}: its absolute returned total of every lent dimension,
--        for the home's credit (cells_borrow.lua)

ag_reclaim(KEYS[1], KEYS[2], ag_now(ARGV[1]), 100)
local out = {}
for i = 3, #KEYS do
  local key = KEYS[i]
  local h = redis.call('HGETALL', key)
  local f = {}
  for j = 1, #h, 2 do
    f[h[j]] = h[j + 1]
  end
  local back = {}
  for field, g in pairs(f) do
    local dim = string.match(field, '^g:(.*)$')
    if dim then
      local b = ag_n(f['b:' .. dim])
      local unused = tonumber(g) - b - ag_n(f['s:' .. dim]) - ag_n(f['r:' .. dim])
      if unused > 0 then
        b = redis.call('HINCRBY', key, 'b:' .. dim, ag_num(unused))
      end
      back[#back + 1] = dim
      back[#back + 1] = ag_num(b)
    end
  end
  out[#out + 1] = back
end
return out
