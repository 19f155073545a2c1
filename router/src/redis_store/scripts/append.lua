-- append.lua (RedisStore script `APPEND_LUA`), loaded with include_str!.
--
-- Dedup check + seq INCR + history append + trim + dedup record, atomically.
--
-- Dedup is tied to the history window (SPEC §6, like `MemoryStore`): one
-- hash per conversation, `dd` (field client_msg_id → `seq appended_ms`),
-- plus a list `dq` of `seq:client_msg_id` in append order. When the trim
-- drops messages from the history, the list's head entries with those seqs
-- go and their hash fields with them, so a conversation holds at most
-- `window` dedup entries whatever the traffic; an entry also stops counting
-- once `appended_ms + ttl <= now`. A duplicate's ack is read back from the
-- history entry itself (message id, time), so the entry stores only the seq.
-- KEYS[5] is the per-message key of the previous layout (`d:<hex>`, PX 24 h),
-- still read so a retry of a message stored before the upgrade is
-- recognised until that key expires; it is never written.
--
-- The dedup key is the sender with the client_msg_id (SPEC §6): field
-- `<sender>\0<client_msg_id>` (user ids never hold a NUL). Entries of the
-- previous layout (field = the bare client_msg_id, ARGV[6]) are still read,
-- and count only when the original's sender (field 4 of the stored
-- message) is this sender.
--
-- KEYS[7], given for a direct conversation only, is its set of users who
-- have written in it: a stored message adds its sender (SPEC §10 consent).
--
-- With an archive (ARGV[9] > 0), the history is a cache of the archive:
-- KEYS[6] holds the highest seq the archiver confirmed (every seq up to it
-- is in Cassandra), and the trim never drops a message above it. Messages
-- not yet archived stay, at most ARGV[9] of them: beyond, the append is
-- refused ({4, last seq}) and the Send answered UNAVAILABLE — backpressure,
-- never a silent drop. One append trims at most TRIM_STEP messages beyond
-- the window, so the backlog left by an archive outage drains over the
-- following appends instead of in one long call.
--
-- KEYS: seq, history, dedup hash, dedup order list, legacy dedup key,
--       archived seq[, writers].
-- ARGV: message (seq 0), dedup field, now_ms, dedup_ttl_ms, window,
--       bare client_msg_id, sender, check_only ('1': only look for a
--       duplicate, store nothing), max unarchived messages (0: no archive).
-- Returns {1, seq} when stored; {2, seq, history member} for a duplicate;
-- {0, seq, time, message_id} for a duplicate found under the legacy key;
-- {3, 0} when check_only found no duplicate; {4, last seq} when the
-- archive is too far behind to store more.
local now = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])

-- The sender_user_id of a history member: a 20-digit seq prefix, then the
-- message as prost writes it, fields in number order (1 and 3 are strings;
-- seq, field 2, is 0 and absent).
local function sender_of(m)
  local i = 21
  while i <= #m do
    local tag = string.byte(m, i)
    i = i + 1
    if tag % 8 ~= 2 then return nil end
    local len, shift, b = 0, 1, 128
    while b >= 128 do
      b = string.byte(m, i)
      i = i + 1
      len = len + (b % 128) * shift
      shift = shift * 128
    end
    local field = math.floor(tag / 8)
    if field == 4 then return string.sub(m, i, i + len - 1) end
    if field > 4 then return '' end
    i = i + len
  end
  return ''
end

local function original(field, check_sender)
  local d = redis.call('HGET', KEYS[3], field)
  if not d then return nil, false end
  local seq, t = string.match(d, '^(%d+) (%-?%d+)$')
  if seq and tonumber(t) + ttl > now then
    local m = redis.call('ZRANGEBYSCORE', KEYS[2], seq, seq)
    if m[1] and (not check_sender or sender_of(m[1]) == ARGV[7]) then
      return {2, seq, m[1]}, true
    end
  end
  return nil, true
end

local hit, found = original(ARGV[2], false)
if hit then return hit end
local legacy_hit, legacy_found = original(ARGV[6], true)
if legacy_hit then return legacy_hit end
if not found and not legacy_found then
  local old = redis.call('GET', KEYS[5])
  if old then
    local exp, seq, t, id = string.match(old, '^(%-?%d+) (%d+) (%-?%d+) (.*)$')
    if exp and tonumber(exp) > now then
      return {0, seq, t, id}
    end
  end
end
if ARGV[8] == '1' then return {3, 0} end
local cap = tonumber(ARGV[9])
local archived = 0
if cap > 0 then
  archived = tonumber(redis.call('GET', KEYS[6]) or '0')
  local last = tonumber(redis.call('GET', KEYS[1]) or '0')
  if last - archived >= cap then return {4, last} end
end
local seq = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], seq, string.format('%020d', seq) .. ARGV[1])
if ttl > 0 then
  redis.call('HSET', KEYS[3], ARGV[2], seq .. ' ' .. ARGV[3])
  redis.call('RPUSH', KEYS[4], seq .. ':' .. ARGV[2])
end
local window = tonumber(ARGV[5])
-- Seqs are contiguous in the history: trimming to the window drops every
-- seq up to `oldest`.
local oldest = seq - window
if cap > 0 and oldest > archived then oldest = archived end
if cap > 0 and oldest > 0 then
  local TRIM_STEP = 256
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if first[2] and oldest > tonumber(first[2]) + TRIM_STEP then
    oldest = tonumber(first[2]) + TRIM_STEP
  end
end
if window > 0 and oldest > 0
    and redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', oldest) > 0 then
  while true do
    local e = redis.call('LINDEX', KEYS[4], 0)
    if not e then break end
    local s = string.match(e, '^(%d+):')
    if not s or tonumber(s) > oldest then break end
    redis.call('LPOP', KEYS[4])
    local id = string.sub(e, #s + 2)
    local v = redis.call('HGET', KEYS[3], id)
    if v and string.match(v, '^(%d+) ') == s then
      redis.call('HDEL', KEYS[3], id)
    end
  end
end
if KEYS[7] then redis.call('SADD', KEYS[7], ARGV[7]) end
return {1, seq}
