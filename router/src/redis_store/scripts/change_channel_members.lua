-- change_channel_members.lua (RedisStore script `CHANGE_CHANNEL_MEMBERS_LUA`), loaded with include_str!.
--
-- Adds, promotes and removes channel members atomically with the
-- max_members check (ChannelStore::change_channel_members): if the members
-- after would be more than max_members, nothing changes. Adds join as
-- members (members already are untouched), promotes make members (or
-- those just added) admins, removes drop members with their read
-- positions (non-members ignored). The counts in the record follow.
--
-- KEYS: record (`c:{<conv>}:chan`), members (`c:{<conv>}:cm`), roles
-- (`c:{<conv>}:cr`), read positions (`c:{<conv>}:rp`).
-- ARGV: max_members, admin role, member role, n add, n promote, then the
-- add users, the promote users, the remove users (each list distinct and
-- ascending, so the answer's lists are too).
-- Returns {0} without the channel, {1} when refused, else {2,
-- member_count, admin_count, n added, n promoted, added..., promoted...,
-- removed...}.
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local max_members = tonumber(ARGV[1])
local admin, member = ARGV[2], ARGV[3]
local n_add, n_promote = tonumber(ARGV[4]), tonumber(ARGV[5])
local add_from, promote_from, remove_from = 6, 6 + n_add, 6 + n_add + n_promote
local members = tonumber(redis.call('HGET', KEYS[1], 'member_count'))
local admins = tonumber(redis.call('HGET', KEYS[1], 'admin_count'))

local joining, leaving = 0, 0
for i = add_from, promote_from - 1 do
  if not redis.call('ZSCORE', KEYS[2], ARGV[i]) then joining = joining + 1 end
end
for i = remove_from, #ARGV do
  if redis.call('ZSCORE', KEYS[2], ARGV[i]) then leaving = leaving + 1 end
end
if members + joining - leaving > max_members then return {1} end

local added, promoted, removed = {}, {}, {}
for i = add_from, promote_from - 1 do
  if redis.call('ZADD', KEYS[2], 'NX', 0, ARGV[i]) == 1 then
    redis.call('HSET', KEYS[3], ARGV[i], member)
    added[#added + 1] = ARGV[i]
  end
end
for i = promote_from, remove_from - 1 do
  local role = redis.call('HGET', KEYS[3], ARGV[i])
  if role and role ~= admin then
    redis.call('HSET', KEYS[3], ARGV[i], admin)
    promoted[#promoted + 1] = ARGV[i]
  end
end
local admins_left = 0
for i = remove_from, #ARGV do
  local role = redis.call('HGET', KEYS[3], ARGV[i])
  if role then
    if role == admin then admins_left = admins_left + 1 end
    redis.call('ZREM', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[3], ARGV[i])
    redis.call('HDEL', KEYS[4], ARGV[i])
    removed[#removed + 1] = ARGV[i]
  end
end
members = members + #added - #removed
admins = admins + #promoted - admins_left
redis.call('HSET', KEYS[1], 'member_count', members, 'admin_count', admins)

local reply = {2, members, admins, #added, #promoted}
for _, list in ipairs({added, promoted, removed}) do
  for _, user in ipairs(list) do reply[#reply + 1] = user end
end
return reply
