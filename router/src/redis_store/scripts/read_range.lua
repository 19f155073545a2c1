-- read_range.lua (RedisStore script `READ_RANGE_LUA`), loaded with include_str!.
--
-- Reads a conversation's history within a byte budget, so a read touches
-- what it returns plus at most one message, however many messages the
-- range holds or how large they are (a History of 500 messages of 60 KB
-- must not copy 30 MB to return 1 MiB). Sizes are measured as the router
-- measures them (`store::message_size`): a member is a 20-digit seq prefix
-- and the message encoded with seq 0, so the message with its seq is the
-- member less 20 bytes plus field 2's tag and the seq's varint.
-- Chunks are sized so a chunk of maximal messages still fits the budget
-- left: at most one message is fetched beyond it.
--
-- KEYS: history.
-- ARGV: direction ('a': seq > bound, oldest first; 'b': seq < bound, newest
--       first, bound 0 = no bound), bound, limit, max_bytes, max_message_bytes.
-- Returns {has_more, member, ...} in read order; has_more ('b' only) says
-- older messages remain.
local dir = ARGV[1]
local bound = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local budget = tonumber(ARGV[4])
local heaviest = math.max(1, tonumber(ARGV[5]))

local function varint_len(n)
  local l = 1
  while n >= 128 do
    n = math.floor(n / 128)
    l = l + 1
  end
  return l
end

local function size(m)
  return #m - 20 + 1 + varint_len(tonumber(string.sub(m, 1, 20)))
end

local out = {0}
local taken, used = 0, 0
local lo, hi
if dir == 'a' then
  lo, hi = '(' .. bound, '+inf'
else
  lo = '-inf'
  hi = (bound == 0) and '+inf' or ('(' .. bound)
end
local last = nil
local cut = false
while taken < limit do
  local chunk = math.max(1, math.min(64, limit - taken, math.floor((budget - used) / heaviest)))
  local ms
  if dir == 'a' then
    ms = redis.call('ZRANGEBYSCORE', KEYS[1], lo, hi, 'LIMIT', 0, chunk)
  else
    ms = redis.call('ZREVRANGEBYSCORE', KEYS[1], hi, lo, 'LIMIT', 0, chunk)
  end
  for _, m in ipairs(ms) do
    local s = size(m)
    if taken > 0 and used + s > budget then
      cut = true
      break
    end
    used = used + s
    taken = taken + 1
    out[#out + 1] = m
    last = tonumber(string.sub(m, 1, 20))
  end
  if cut or #ms < chunk then break end
  if dir == 'a' then lo = '(' .. last else hi = '(' .. last end
end
if dir == 'b' and last then
  if cut or redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. last) > 0 then
    out[1] = 1
  end
end
return out
