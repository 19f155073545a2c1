-- close_session.lua (RedisStore script `CLOSE_SESSION_LUA`), loaded with include_str!.
-- Remove a device's session if it is still this connection; record last seen when the user goes offline.
--
-- KEYS: sessions hash, seen. ARGV: device, addr, at_ms, live gateway (the
-- closing session's gateway when it is alive, '' when it is dead: a reap).
-- Returns {removed 0/1, went offline 0/1, addrs to judge}:
--   no session left: offline, last seen set;
--   a dead gateway's session: it did not count, nothing changes while
--   another session is left;
--   another session on the live gateway: still online;
--   otherwise the addrs left, all on other gateways: the user went offline
--   iff all of those are dead, which the caller judges from their leases
--   (another slot). Last seen is set now anyway, so that no second round
--   trip is needed: it is read only while the user is offline, and if the
--   user is offline through this close, this close is when they left.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return {0, 0, {}} end
redis.call('HDEL', KEYS[1], ARGV[1])
local rest = redis.call('HVALS', KEYS[1])
if #rest == 0 then
  redis.call('SET', KEYS[2], ARGV[3])
  return {1, 1, {}}
end
if ARGV[4] == '' then return {1, 0, {}} end
for _, addr in ipairs(rest) do
  -- `<conn>|<gateway>`: the gateway is everything after the first '|'.
  local bar = string.find(addr, '|', 1, true)
  if bar and string.sub(addr, bar + 1) == ARGV[4] then return {1, 0, {}} end
end
redis.call('SET', KEYS[2], ARGV[3])
return {1, 0, rest}
