-- raise_read_position.lua (RedisStore script `RAISE_READ_POSITION_LUA`), loaded with include_str!.
--
-- Raises a user's read position in a channel, never lowers it
-- (ChannelStore::raise_read_position). Without the channel nothing is
-- written and the answer is 0.
--
-- KEYS: record (`c:{<conv>}:chan`), read positions (`c:{<conv>}:rp`, hash
-- user → seq).
-- ARGV: user, seq. Returns the position after, as a string (a seq may not
-- fit a Lua number exactly).
if redis.call('EXISTS', KEYS[1]) == 0 then return '0' end
local current = redis.call('HGET', KEYS[2], ARGV[1])
if current and tonumber(current) >= tonumber(ARGV[2]) then return current end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return ARGV[2]
