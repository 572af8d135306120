-- Settle a batch of reservations of one cell: see ag_cells_settle_all in cells.lua.
--
-- KEYS: the cell's open, leases, then every done:<id> and scope hash the batch names
-- ARGV: retention seconds of done:<id>, batch JSON
-- Reply: one ag_cells_settle_all reply per settle, in order

return ag_cells_settle_all(KEYS, ARGV[1], ARGV[2])
