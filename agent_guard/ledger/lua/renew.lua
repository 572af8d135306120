-- Renew: push the lease of a reservation that is still open (a long call keeps its
-- hold while it runs). A lease that is already over is not revived: its hold was, or
-- will be, given back by a reclaim.
--
-- KEYS: open, leases
-- ARGV: now ('' = server TIME), lease seconds, id
-- Reply: the new expires_at, or nil if the reservation is not open or its lease is over

local now = ag_now(ARGV[1])
local id = ARGV[3]
if redis.call('HEXISTS', KEYS[1], id) == 0 then
  return false
end
local score = redis.call('ZSCORE', KEYS[2], id)
if not score or tonumber(score) <= now then
  return false
end
local expires = math.max(tonumber(score), now + tonumber(ARGV[2]))
redis.call('ZADD', KEYS[2], ag_num(expires), id)
return ag_num(expires)
