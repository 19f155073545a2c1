-- add_watches.lua (RedisStore script `ADD_WATCHES_LUA`), loaded with include_str!.
-- Add users to a connection's watch set, all or none, within a maximum.
--
-- KEYS: watcher set. ARGV: max, users. Returns {1, count} or {0, count}.
local count = redis.call('SCARD', KEYS[1])
local new = {}
local seen = {}
for i = 2, #ARGV do
  local u = ARGV[i]
  if not seen[u] and redis.call('SISMEMBER', KEYS[1], u) == 0 then
    seen[u] = true
    new[#new + 1] = u
  end
end
if count + #new > tonumber(ARGV[1]) then return {0, count} end
for _, u in ipairs(new) do redis.call('SADD', KEYS[1], u) end
return {1, count + #new}
