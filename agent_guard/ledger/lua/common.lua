-- Helpers shared by every ledger script: the loader (redis.py) prepends this file to
-- each script, so every script is still one self-contained EVALSHA.
--
-- Keys (one hash tag per ledger, so every key lives in one Redis Cluster slot):
--   ag:{ns}:s:<scope>  HASH    s:<dim> spent, r:<dim> reserved, x:<dim> extra
--   ag:{ns}:open       HASH    reservation id -> JSON {"k": [scope keys],
--                              "a": {dim: "amount"}, "t": token of the reserving call}
--   ag:{ns}:leases     ZSET    reservation id -> expires_at (seconds)
--   ag:{ns}:done:<id>  STRING  token of the call that finished the id, EX retention
--
-- Settles travel in batches (settle.lua, and after a reserve or a charge: the settles a
-- client deferred ride with its next script, see ag_settle_all), each applied before the
-- script's own work, so a reserve sees the holds they drop.
--
-- Scope expiry (RedisLedger(scope_ttl_seconds=N)): every script sets ag_ttl from its
-- ARGV, and every write to a scope hash refreshes its EXPIRE, so a scope nothing wrote
-- to for N seconds disappears (its budget resets). 0 = scope hashes never expire.
--
-- Amounts travel and are stored as decimal strings and change only by HINCRBY (exact
-- 64-bit integers). Comparisons use tonumber (doubles): exact while cap + extra stays
-- below 2^53; the client refuses amounts and caps from 2^53 up. Numbers are never
-- formatted with tostring or cjson.encode, which keep only 14 significant digits.

local function ag_now(arg)
  if arg ~= '' then
    return tonumber(arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- A double as a string that reads back to the same double.
local function ag_num(x)
  return string.format('%.17g', x)
end

local ag_ttl = 0

local function ag_touch(key)
  if ag_ttl > 0 then
    redis.call('EXPIRE', key, ag_ttl)
  end
end

-- Give a reservation's holds back. A scope hash that expired meanwhile took its holds
-- with it: nothing is given back there (no negative counter, no key without expiry).
local function ag_unhold(raw)
  local rec = cjson.decode(raw)
  for _, key in ipairs(rec.k) do
    if redis.call('EXISTS', key) == 1 then
      for dim, amount in pairs(rec.a) do
        redis.call('HINCRBY', key, 'r:' .. dim, '-' .. amount)
      end
      ag_touch(key)
    end
  end
end

-- Give back the holds of up to `limit` leases expired at `now`.
-- Returns how many leases were examined and how many holds were given back.
local function ag_reclaim(open, leases, now, limit)
  local ids = redis.call('ZRANGEBYSCORE', leases, '-inf', ag_num(now), 'LIMIT', 0, limit)
  local reclaimed = 0
  for _, id in ipairs(ids) do
    local raw = redis.call('HGET', open, id)
    if raw then
      ag_unhold(raw)
      redis.call('HDEL', open, id)
      reclaimed = reclaimed + 1
    end
  end
  if #ids > 0 then
    redis.call('ZREM', leases, unpack(ids))
  end
  return #ids, reclaimed
end

-- The admission rule (agent_guard.ledger.base.first_denial): for every scope, in order,
-- and every capped dimension, in order, with a positive amount,
-- spent + reserved + amount <= cap + extra. `caps` is [[[dim, "cap"], ...] per scope],
-- aligned with keys[first..]. Returns nil, or the denial reply
-- {0, scope index (1-based), dim, cap, extra, spent, reserved, requested}.
local function ag_check(keys, first, caps, amounts)
  for i, scope_caps in ipairs(caps) do
    local key = keys[first + i - 1]
    -- a scope with a rolling window: {"c": caps, "h": [KEYS index of each past bucket]}
    local pairs_, history = scope_caps, nil
    if scope_caps.c then
      pairs_, history = scope_caps.c, scope_caps.h
    end
    -- the capped dimensions this call asks for, read with one HMGET per hash
    local asked, fields = {}, {}
    for _, pair in ipairs(pairs_) do
      local want = amounts[pair[1]]
      if want and tonumber(want) > 0 then
        asked[#asked + 1] = pair
        fields[#fields + 1] = 's:' .. pair[1]
        fields[#fields + 1] = 'r:' .. pair[1]
        fields[#fields + 1] = 'x:' .. pair[1]
      end
    end
    if #asked > 0 then
      local v = redis.call('HMGET', key, unpack(fields))
      local past = {}
      if history then
        for _, k in ipairs(history) do
          past[#past + 1] = redis.call('HMGET', keys[k], unpack(fields))
          ag_touch(keys[k])  -- a bucket the window still reads is not idle
        end
      end
      for j, pair in ipairs(asked) do
        local dim, cap, want = pair[1], pair[2], amounts[pair[1]]
        local s, r, x = v[3 * j - 2] or '0', v[3 * j - 1] or '0', v[3 * j] or '0'
        if history then
          local sn, rn = tonumber(s), tonumber(r)
          for _, p in ipairs(past) do
            sn = sn + tonumber(p[3 * j - 2] or '0')
            rn = rn + tonumber(p[3 * j - 1] or '0')
          end
          s, r = ag_num(sn), ag_num(rn)
        end
        if tonumber(s) + tonumber(r) + tonumber(want) > tonumber(cap) + tonumber(x) then
          return {0, i, dim, cap, x, s, r, want}
        end
      end
    end
  end
  return nil
end

-- A reserve's answer when its id is already taken, else nil: the same call sent again (a
-- client retry after a lost reply: same token) gets the first answer, {1, expires_at};
-- any other use of an id held or finished, {-1}. keys[1], keys[2], keys[3]: the open
-- hash, the leases zset, done:<id>.
local function ag_reused(keys, id, token)
  local open = redis.call('HGET', keys[1], id)
  if open then
    if cjson.decode(open).t == token then
      return {1, redis.call('ZSCORE', keys[2], id)}
    end
    return {-1}
  end
  if redis.call('EXISTS', keys[3]) == 1 then
    return {-1}
  end
  return nil
end

-- Settle one reservation: drop its hold (if its lease was not reclaimed yet) and add what
-- was actually spent, once per reservation id (a settle after the lease expired still
-- counts, once: the client names the scopes, so nothing depends on the stored record).
-- `s` = [id, token, KEYS index of done:<id>, [KEYS index of each scope],
--        [dim, "amount", ...], [[dims to read back] per scope]].
-- Returns 0 if another call already settled or released the id, else {1, spent after of
-- each scope's read dims, in order}. The same settle sent twice (same token) counts once
-- and gets the same answer.
local function ag_settle(keys, s, retention)
  local id, token, done_key = s[1], s[2], keys[s[3]]
  local done = redis.call('GET', done_key)
  if done and done ~= token then
    return 0
  end
  if not done then
    local raw = redis.call('HGET', keys[1], id)
    if raw then
      ag_unhold(raw)
      redis.call('HDEL', keys[1], id)
      redis.call('ZREM', keys[2], id)
    end
    redis.call('SET', done_key, token, 'EX', retention)
  end
  local amounts, reads, reply = s[5], s[6], {1}
  for i, k in ipairs(s[4]) do
    local key = keys[k]
    if not done then
      for j = 1, #amounts, 2 do
        if amounts[j + 1] ~= '0' then
          redis.call('HINCRBY', key, 's:' .. amounts[j], amounts[j + 1])
        end
      end
      ag_touch(key)
    end
    local dims = reads[i]
    if dims and #dims > 0 then
      local fields = {}
      for j, dim in ipairs(dims) do
        fields[j] = 's:' .. dim
      end
      local values = redis.call('HMGET', key, unpack(fields))
      for j = 1, #dims do
        reply[#reply + 1] = values[j] or '0'
      end
    end
  end
  return reply
end

-- Every settle of a batch (JSON list of ag_settle's `s`; '' = none): nil, or their replies.
-- keys[1], keys[2] are the open hash and the leases zset.
local function ag_settle_all(keys, retention, batch)
  if batch == nil or batch == '' then
    return nil
  end
  local replies = {}
  for i, s in ipairs(cjson.decode(batch)) do
    replies[i] = ag_settle(keys, s, retention)
  end
  return replies
end

-- A reserve's or charge's reply with the replies of the settles that rode along: a
-- success ({1, ...}) as one string "1 v ...|s|s..." (each s: 0, or "1 spent ..." as
-- ag_settle answers), which the client reads as one bulk string instead of a nested
-- array of about ten elements (their parse was most of the client's cost of a reply);
-- any other reply as the table {reply, settled}. Only numbers travel in the string.
local function ag_with_settles(reply, settled)
  if reply[1] ~= 1 then
    return {reply, settled}
  end
  local parts = {table.concat(reply, ' ')}
  for i, s in ipairs(settled) do
    parts[i + 1] = s == 0 and '0' or table.concat(s, ' ')
  end
  return table.concat(parts, '|')
end
