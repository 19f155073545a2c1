-- open_session.lua (RedisStore script `OPEN_SESSION_LUA`), loaded with include_str!.
-- Record a device's session (replacing the device's previous one).
--
-- KEYS: sessions hash, seen. ARGV: device, addr.
-- Returns {previous addr or '', every addr registered before (the previous
-- one included)}. Whether the user came online depends on those addrs'
-- gateways' leases, which live in another slot: the caller judges it (an
-- empty list, the common case, means yes).
local before = redis.call('HVALS', KEYS[1])
local prev = redis.call('HGET', KEYS[1], ARGV[1]) or ''
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {prev, before}
