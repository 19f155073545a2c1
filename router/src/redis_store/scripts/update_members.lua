-- update_members.lua (RedisStore script `UPDATE_MEMBERS_LUA`), loaded with include_str!.
-- Upsert and remove members of an existing group.
--
-- KEYS: group hash, members hash. ARGV: n upserts, n × (user, role), removed users.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[1])
for i = 0, n - 1 do
  redis.call('HSET', KEYS[2], ARGV[2 + 2 * i], ARGV[3 + 2 * i])
end
for i = 2 + 2 * n, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
end
return 1
