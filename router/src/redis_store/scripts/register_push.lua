-- register_push.lua (RedisStore script `REGISTER_PUSH_LUA`), loaded with include_str!.
--
-- Stores one device's push registration, atomically for the user
-- (SPEC §20, PushStore::register_push_token): another device holding the
-- same platform and token loses its registration, then the oldest
-- registrations past the cap go (never the registering device's).
--
-- KEYS: the user's registrations (`u:{<user>}:ptok`, device -> value).
-- Value: `<registered_ms>\31<platform>\31<environment>\31<topic>\31<locale>\31<token>`.
-- ARGV: device, value, platform, token, max_devices.
-- Returns {dropped devices, values of the registrations it ended (the
-- device's previous one included)}: their tokens' owner keys are released
-- after it.
local function parse(v)
  return string.match(v, '^(%-?%d+)\31([^\31]*)\31[^\31]*\31[^\31]*\31[^\31]*\31(.*)$')
end
local dropped = {}
local ended = {}
local all = redis.call('HGETALL', KEYS[1])
local others = {}
for i = 1, #all, 2 do
  local device, value = all[i], all[i + 1]
  if device ~= ARGV[1] then
    local ms, platform, token = parse(value)
    if platform == ARGV[3] and token == ARGV[4] then
      redis.call('HDEL', KEYS[1], device)
      table.insert(dropped, device)
      table.insert(ended, value)
    else
      table.insert(others, {device, tonumber(ms) or 0, value})
    end
  else
    table.insert(ended, value)
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local max = math.max(1, tonumber(ARGV[5]))
local excess = #others + 1 - max
if excess > 0 then
  table.sort(others, function(a, b)
    if a[2] ~= b[2] then return a[2] < b[2] end
    return a[1] < b[1]
  end)
  for i = 1, excess do
    redis.call('HDEL', KEYS[1], others[i][1])
    table.insert(dropped, others[i][1])
    table.insert(ended, others[i][3])
  end
end
return {dropped, ended}
