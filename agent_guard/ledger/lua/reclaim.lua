-- Reclaim: give back the holds of up to ARGV[2] expired leases.
--
-- KEYS: open, leases
-- ARGV: now ('' = server TIME), limit, scope ttl seconds (0 = none)
-- Reply: {leases examined, holds given back}; the client calls again while
-- examined == limit.

ag_ttl = tonumber(ARGV[3])
local examined, reclaimed = ag_reclaim(KEYS[1], KEYS[2], ag_now(ARGV[1]), tonumber(ARGV[2]))
return {examined, reclaimed}
