-- Settle a batch of reservations (one, or the settles a client deferred), each once per
-- reservation id: see ag_settle in common.lua.
--
-- KEYS: open, leases, then every done:<id> and scope hash the batch names
-- ARGV: scope ttl seconds (0 = none), retention seconds of done:<id>, batch JSON
-- Reply: one ag_settle reply per settle, in order

ag_ttl = tonumber(ARGV[1])
return ag_settle_all(KEYS, ARGV[2], ARGV[3])
