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
-- KEYS[6], given for a direct conversation only, is its set of users who
-- have written in it: a stored message adds its sender (SPEC §10 consent).
--
-- KEYS: seq, history, dedup hash, dedup order list, legacy dedup key[, writers].
-- ARGV: message (seq 0), client_msg_id, now_ms, dedup_ttl_ms, window[, sender].
-- Returns {1, seq} when stored; {2, seq, history member} for a duplicate;
-- {0, seq, time, message_id} for a duplicate found under the legacy key.
local now = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local d = redis.call('HGET', KEYS[3], ARGV[2])
if d then
  local seq, t = string.match(d, '^(%d+) (%-?%d+)$')
  if seq and tonumber(t) + ttl > now then
    local m = redis.call('ZRANGEBYSCORE', KEYS[2], seq, seq)
    if m[1] then return {2, seq, m[1]} end
  end
else
  local old = redis.call('GET', KEYS[5])
  if old then
    local exp, seq, t, id = string.match(old, '^(%-?%d+) (%d+) (%-?%d+) (.*)$')
    if exp and tonumber(exp) > now then
      return {0, seq, t, id}
    end
  end
end
local seq = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], seq, string.format('%020d', seq) .. ARGV[1])
if ttl > 0 then
  redis.call('HSET', KEYS[3], ARGV[2], seq .. ' ' .. ARGV[3])
  redis.call('RPUSH', KEYS[4], seq .. ':' .. ARGV[2])
end
local window = tonumber(ARGV[5])
if window > 0 and redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(window + 1)) > 0 then
  local oldest = seq - window
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
if KEYS[6] then redis.call('SADD', KEYS[6], ARGV[6]) end
return {1, seq}
