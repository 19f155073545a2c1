-- push_owner.lua (RedisStore script `PUSH_OWNER_LUA`), loaded with include_str!.
--
-- The one owner of a push token (PushStore::register_push_token): the
-- (user, device) registered with it, so a token registered by another
-- user's device leaves its previous owner.
--
-- KEYS: the token's owner key (`pt:{<platform>:<token>}`).
-- ARGV: op ('claim' or 'release'), owner (`<user>\31<device>`).
-- claim: sets the owner; returns the previous one ('' when none or the same).
-- release: deletes the key if it names this owner; returns ''.
local current = redis.call('GET', KEYS[1])
if ARGV[1] == 'claim' then
  redis.call('SET', KEYS[1], ARGV[2])
  if current and current ~= ARGV[2] then
    return current
  end
  return ''
end
if current == ARGV[2] then
  redis.call('DEL', KEYS[1])
end
return ''
