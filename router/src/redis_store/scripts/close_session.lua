-- close_session.lua (RedisStore script `CLOSE_SESSION_LUA`), loaded with include_str!.
-- Remove a device's session if it is still this connection; record last seen when the user goes offline.
--
-- KEYS: sessions hash, seen. ARGV: device, addr, at_ms.
-- Returns {removed 0/1, went offline 0/1}.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return {0, 0} end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('SET', KEYS[2], ARGV[3])
  return {1, 1}
end
return {1, 0}
