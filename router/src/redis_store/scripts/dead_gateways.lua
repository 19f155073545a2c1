-- dead_gateways.lua (RedisStore script `DEAD_GATEWAYS_LUA`), loaded with include_str!.
-- List the gateways that registered but whose lease is gone.
--
-- KEYS: known-gateways set. ARGV: lease key prefix. Returns the known
-- gateways whose lease is gone. Lease keys share the set's hash tag.
local dead = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. id) == 0 then dead[#dead + 1] = id end
end
return dead
