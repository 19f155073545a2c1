-- open_session.lua (RedisStore script `OPEN_SESSION_LUA`), loaded with include_str!.
-- Record a device's session (replacing the device's previous one).
--
-- KEYS: sessions hash, seen. ARGV: device, addr.
-- Returns {previous addr or '', had sessions before 0/1}.
local had = redis.call('HLEN', KEYS[1])
local prev = redis.call('HGET', KEYS[1], ARGV[1]) or ''
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {prev, had}
