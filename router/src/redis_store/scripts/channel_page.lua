-- channel_page.lua (RedisStore script `CHANNEL_PAGE_LUA`), loaded with include_str!.
--
-- One page of a channel's members (ChannelStore::channel_members): up to
-- limit user ids bytewise after a given one, with their roles, and whether
-- more follow. Reads limit + 1 members, whatever the channel's size.
--
-- KEYS: members (`c:{<conv>}:cm`, zset, score 0), roles (`c:{<conv>}:cr`).
-- ARGV: after user id ('' from the start), limit.
-- Returns {more (0/1), user, role, user, role, ...}.
local limit = tonumber(ARGV[2])
local from = '-'
if ARGV[1] ~= '' then from = '(' .. ARGV[1] end
local users = redis.call('ZRANGE', KEYS[1], from, '+', 'BYLEX', 'LIMIT', 0, limit + 1)
local more = 0
if #users > limit then
  more = 1
  users[#users] = nil
end
local reply = {more}
-- HMGET in slices: unpack's stack is small (a few thousand values).
for first = 1, #users, 1000 do
  local last = math.min(first + 999, #users)
  local roles = redis.call('HMGET', KEYS[2], unpack(users, first, last))
  for i = first, last do
    reply[#reply + 1] = users[i]
    reply[#reply + 1] = roles[i - first + 1] or ''
  end
end
return reply
