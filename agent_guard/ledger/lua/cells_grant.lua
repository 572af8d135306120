-- In one cell: apply grants to its stripes (a debt the home has taken on).
--
-- KEYS: stripes of this cell
-- ARGV: grants JSON (ag_grant_all)

ag_grant_all(KEYS, ARGV[1])
return 1
