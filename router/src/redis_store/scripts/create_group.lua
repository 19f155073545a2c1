-- create_group.lua (RedisStore script `CREATE_GROUP_LUA`), loaded with include_str!.
-- Create a group record and its members, unless the group exists.
--
-- KEYS: group hash, members hash. ARGV: title, created, then user, role pairs.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'title', ARGV[1], 'created', ARGV[2])
redis.call('DEL', KEYS[2])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
return 1
