-- raise.lua (RedisStore script `RAISE_LUA`), loaded with include_str!.
--
-- Raises a counter to ARGV[1] if that is higher, never lowers it: the
-- archived seq of a conversation (`c:{<conv>}:arch`), which archivers that
-- overlap during a consumer-group rebalance may confirm out of order.
-- KEYS: the counter. ARGV: the new value. Returns 1 if raised, else 0.
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
