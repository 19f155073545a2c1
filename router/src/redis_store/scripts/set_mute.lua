-- set_mute.lua (RedisStore script `SET_MUTE_LUA`), loaded with include_str!.
--
-- Sets or clears a user's mute of one conversation, atomically for the
-- user (PushStore::set_mute): mutes that ran out go first; a new mute
-- past the cap is refused.
--
-- KEYS: the user's mutes (`u:{<user>}:mute`, zset: conversation, score =
-- muted until, Unix ms; `+inf` = for ever).
-- ARGV: conversation, until ('' = unmute, a number or '+inf'), now_ms,
-- max_mutes. Returns 1 when done, 0 when refused.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if ARGV[2] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
    and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
