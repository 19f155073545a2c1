-- charge_quota.lua (RedisStore script `CHARGE_QUOTA_LUA`), loaded with include_str!.
--
-- One quota counter of one period (SPEC §13 storage per day, §11 group
-- changes per hour): a positive charge is added only if the total stays
-- within the limit; a refund (negative) is always applied, never below 0.
-- The counter expires two periods after its first charge.
--
-- KEYS: the counter (`q:<period>` / `qm:<period>` under the owner's tag).
-- ARGV: amount (signed), limit, ttl_s.
-- Returns 1 when applied, 0 when refused.
local bytes = tonumber(ARGV[1])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if bytes > 0 and used + bytes > tonumber(ARGV[2]) then
  return 0
end
local after = math.max(0, used + bytes)
redis.call('SET', KEYS[1], after, 'KEEPTTL')
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return 1
