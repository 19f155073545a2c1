-- advance_receipt.lua (RedisStore script `ADVANCE_RECEIPT_LUA`), loaded with include_str!.
-- Advance a user's receipt mark in a conversation, never backwards.
--
-- KEYS: receipt hash. ARGV: user, up_to. Returns previous mark or -1.
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local up = tonumber(ARGV[2])
if up > cur then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return cur
end
return -1
