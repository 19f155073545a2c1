-- charge_quota.lua (RedisStore script `CHARGE_QUOTA_LUA`), loaded with include_str!.
--
-- One storage quota counter of one day (SPEC §13): a positive charge is
-- added only if the total stays within the limit; a refund (negative) is
-- always applied, never below 0. The counter expires two days after its
-- first charge, once its day is over.
--
-- KEYS: the counter (`q:<day>` under the account's or conversation's tag).
-- ARGV: bytes (signed), limit, ttl_s.
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
