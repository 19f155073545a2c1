-- invalidate_push.lua (RedisStore script `INVALIDATE_PUSH_LUA`), loaded with include_str!.
--
-- A provider said a token is dead (PushStore::invalidate_push_token):
-- remove the device's registration only if it still holds that token and
-- was registered before the provider's time (a re-registration wins).
--
-- KEYS: the user's registrations (`u:{<user>}:ptok`). ARGV: device, token,
-- invalidated_ms, platform ('' = any). Returns the removed registration's
-- value (its token's owner key is released after it), or '' when nothing
-- was removed.
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then
  return ''
end
local ms, platform, token = string.match(value, '^(%-?%d+)\31([^\31]*)\31[^\31]*\31[^\31]*\31[^\31]*\31(.*)$')
if token == ARGV[2] and tonumber(ms) < tonumber(ARGV[3])
    and (ARGV[4] == '' or platform == ARGV[4]) then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return value
end
return ''
