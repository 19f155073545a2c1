-- open_session.lua (RedisStore script `OPEN_SESSION_LUA`), loaded with include_str!.
-- Record a device's session (replacing the device's previous one).
--
-- KEYS: sessions hash, seen. ARGV: device, addr, and '1' for a reopen (a
-- session its gateway had open when the store lost it): then the session
-- is recorded only if the device is free or already at addr; another addr
-- holding it is newer (the device reconnected elsewhere) and stays.
-- Returns {previous addr or '', every addr registered before (the previous
-- one included), 1 if recorded else 0}. Whether the user came online
-- depends on those addrs' gateways' leases, which live in another slot: the
-- caller judges it (an empty list, the common case, means yes).
local before = redis.call('HVALS', KEYS[1])
local prev = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if ARGV[3] == '1' and prev ~= '' and prev ~= ARGV[2] then
  return {prev, before, 0}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {prev, before, 1}
