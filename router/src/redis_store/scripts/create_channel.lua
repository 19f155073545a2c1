-- create_channel.lua (RedisStore script `CREATE_CHANNEL_LUA`), loaded with include_str!.
--
-- Creates a channel's record and members unless the channel exists
-- (ChannelStore::create_channel). Leftover members or read positions under
-- the id (none, unless written by hand) are dropped first.
--
-- KEYS: record (`c:{<conv>}:chan`, hash), members (`c:{<conv>}:cm`, zset,
-- score 0), roles (`c:{<conv>}:cr`, hash user → role), read positions
-- (`c:{<conv>}:rp`).
-- ARGV: title, settings (protobuf), created_ms, member_count, admin_count,
-- then user, role pairs (each user once; the caller counted them).
-- Returns 1 if created, 0 if the channel existed (nothing changed).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('HSET', KEYS[1], 'title', ARGV[1], 'settings', ARGV[2],
  'created_ms', ARGV[3], 'member_count', ARGV[4], 'admin_count', ARGV[5])
for i = 6, #ARGV, 2 do
  redis.call('ZADD', KEYS[2], 0, ARGV[i])
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
return 1
