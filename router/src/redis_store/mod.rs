//! The store traits on Redis (standalone or Redis Cluster), plus the batched
//! presence writes of the gateway bridge (one pipeline per gateway per tick).
//!
//! Key layout — every key carries a hash tag, so everything one call touches
//! for one conversation or one user lives in one slot:
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `c:{<conv>}:seq` | string | last allocated seq (INCR) |
//! | `c:{<conv>}:h` | zset | history window: score seq, member `%020d seq` ++ Message (seq 0) |
//! | `c:{<conv>}:dd` | hash | dedup: client_msg_id → `seq appended_ms`, only for messages in the window |
//! | `c:{<conv>}:dq` | list | dedup order: `seq:client_msg_id`, oldest first (trimmed with the history) |
//! | `c:{<conv>}:d:<hex cmid>` | string, PX ttl | legacy dedup key (before the window-bound hash): read, never written |
//! | `c:{<conv>}:r:<kind>` | hash | receipt marks, user → seq |
//! | `c:{<conv>}:g` | hash | group record: title, created |
//! | `c:{<conv>}:m` | hash | group members: user → role |
//! | `u:{<user>}:convs` | set | the user's conversations |
//! | `u:{<user>}:push` | set | conversations with a pending push |
//! | `u:{<user>}:sess` | hash | device → `<conn>|<gateway>` |
//! | `u:{<user>}:seen` | string | last seen, ms |
//! | `u:{<user>}:wb` | set | watching connections `<conn>|<gateway>` |
//! | `w:{<conn>|<gateway>}` | set | users a connection watches |
//! | `gw:{gw}:lease:<id>` | string, EX | gateway lease (alive while present) |
//! | `gw:{gw}:known` | set | gateways that ever registered |
//! | `gw:{gw}:reap:<id>` | string, EX | lock: one gateway reaps a dead one |
//! | `gwc:{<id>}` | hash | a gateway's connections: conn → user \x1f device |
//!
//! The gateway keys share one tag so a lease check of every gateway is one
//! command. A session on a gateway that registered (`known`) but whose lease
//! is gone is treated as absent by every read.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use palaver_protocol::pb;
use prost::Message as _;
use redis::cluster::{ClusterClient, ClusterConnection};
use redis::{Cmd, ConnectionLike, FromRedisValue, RedisError, Script, Value};

use crate::api::{Session, SessionAddr};
use crate::store::{
    Appended, ConversationStore, DeviceSession, GroupRecord, HistorySlice, Membership, RangeRead,
    Retention, SessionClosed, SessionOpened, SessionStore, StoreError, StoreResult, UserPresence,
    UserStore, WatchAdd,
};

/// Where Redis is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://host:port/` URLs: one for a standalone server, any number of
    /// seed nodes for a cluster.
    pub urls: Vec<String>,
    /// Speak the cluster protocol (MOVED/ASK, slot routing).
    pub cluster: bool,
    /// Connect / read / write timeout for every call.
    pub timeout: Duration,
}

impl RedisConfig {
    pub fn standalone(url: impl Into<String>) -> Self {
        Self {
            urls: vec![url.into()],
            cluster: false,
            timeout: Duration::from_secs(2),
        }
    }

    pub fn cluster(urls: Vec<String>) -> Self {
        Self {
            urls,
            cluster: true,
            timeout: Duration::from_secs(2),
        }
    }

    /// Parses `redis://a:1/` (standalone) or `redis+cluster://a:1,b:2,c:3`
    /// (cluster seed list).
    pub fn parse(spec: &str) -> Result<Self, String> {
        if let Some(rest) = spec.strip_prefix("redis+cluster://") {
            let urls: Vec<String> = rest
                .trim_end_matches('/')
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|hp| format!("redis://{hp}/"))
                .collect();
            if urls.is_empty() {
                return Err(format!("{spec}: no cluster nodes listed"));
            }
            Ok(Self::cluster(urls))
        } else if spec.starts_with("redis://") {
            Ok(Self::standalone(spec))
        } else {
            Err(format!(
                "{spec}: expected redis://host:port/ or redis+cluster://host:port,host:port,..."
            ))
        }
    }
}

enum Conn {
    Single(redis::Connection),
    // Boxed: a cluster connection is several times larger than a plain one.
    Cluster(Box<ClusterConnection>),
}

impl Conn {
    fn as_dyn(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => c.as_mut(),
        }
    }
}

/// The scripts; each touches keys of one hash tag only.
struct Scripts {
    append: Script,
    advance_receipt: Script,
    create_group: Script,
    update_members: Script,
    open_session: Script,
    close_session: Script,
    add_watches: Script,
    dead_gateways: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            append: Script::new(APPEND_LUA),
            advance_receipt: Script::new(ADVANCE_RECEIPT_LUA),
            create_group: Script::new(CREATE_GROUP_LUA),
            update_members: Script::new(UPDATE_MEMBERS_LUA),
            open_session: Script::new(OPEN_SESSION_LUA),
            close_session: Script::new(CLOSE_SESSION_LUA),
            add_watches: Script::new(ADD_WATCHES_LUA),
            dead_gateways: Script::new(DEAD_GATEWAYS_LUA),
        }
    }

    fn all(&self) -> [&Script; 8] {
        [
            &self.append,
            &self.advance_receipt,
            &self.create_group,
            &self.update_members,
            &self.open_session,
            &self.close_session,
            &self.add_watches,
            &self.dead_gateways,
        ]
    }
}

/// Dedup check + seq INCR + history append + trim + dedup record, atomically.
///
/// Dedup is tied to the history window (SPEC §6, like `MemoryStore`): one
/// hash per conversation, `dd` (field client_msg_id → `seq appended_ms`),
/// plus a list `dq` of `seq:client_msg_id` in append order. When the trim
/// drops messages from the history, the list's head entries with those seqs
/// go and their hash fields with them, so a conversation holds at most
/// `window` dedup entries whatever the traffic; an entry also stops counting
/// once `appended_ms + ttl <= now`. A duplicate's ack is read back from the
/// history entry itself (message id, time), so the entry stores only the seq.
/// KEYS[5] is the per-message key of the previous layout (`d:<hex>`, PX 24 h),
/// still read so a retry of a message stored before the upgrade is
/// recognised until that key expires; it is never written.
///
/// KEYS: seq, history, dedup hash, dedup order list, legacy dedup key.
/// ARGV: message (seq 0), client_msg_id, now_ms, dedup_ttl_ms, window.
/// Returns {1, seq} when stored; {2, seq, history member} for a duplicate;
/// {0, seq, time, message_id} for a duplicate found under the legacy key.
const APPEND_LUA: &str = r#"
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
return {1, seq}
"#;

/// KEYS: receipt hash. ARGV: user, up_to. Returns previous mark or -1.
const ADVANCE_RECEIPT_LUA: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local up = tonumber(ARGV[2])
if up > cur then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return cur
end
return -1
"#;

/// KEYS: group hash, members hash. ARGV: title, created, then user, role pairs.
const CREATE_GROUP_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'title', ARGV[1], 'created', ARGV[2])
redis.call('DEL', KEYS[2])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
return 1
"#;

/// KEYS: group hash, members hash. ARGV: n upserts, n × (user, role), removed users.
const UPDATE_MEMBERS_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[1])
for i = 0, n - 1 do
  redis.call('HSET', KEYS[2], ARGV[2 + 2 * i], ARGV[3 + 2 * i])
end
for i = 2 + 2 * n, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
end
return 1
"#;

/// KEYS: sessions hash, seen. ARGV: device, addr.
/// Returns {previous addr or '', had sessions before 0/1}.
const OPEN_SESSION_LUA: &str = r#"
local had = redis.call('HLEN', KEYS[1])
local prev = redis.call('HGET', KEYS[1], ARGV[1]) or ''
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {prev, had}
"#;

/// KEYS: sessions hash, seen. ARGV: device, addr, at_ms.
/// Returns {removed 0/1, went offline 0/1}.
const CLOSE_SESSION_LUA: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return {0, 0} end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('SET', KEYS[2], ARGV[3])
  return {1, 1}
end
return {1, 0}
"#;

/// KEYS: watcher set. ARGV: max, users. Returns {1, count} or {0, count}.
const ADD_WATCHES_LUA: &str = r#"
local count = redis.call('SCARD', KEYS[1])
local new = {}
local seen = {}
for i = 2, #ARGV do
  local u = ARGV[i]
  if not seen[u] and redis.call('SISMEMBER', KEYS[1], u) == 0 then
    seen[u] = true
    new[#new + 1] = u
  end
end
if count + #new > tonumber(ARGV[1]) then return {0, count} end
for _, u in ipairs(new) do redis.call('SADD', KEYS[1], u) end
return {1, count + #new}
"#;

/// KEYS: known-gateways set. ARGV: lease key prefix. Returns the known
/// gateways whose lease is gone. Lease keys share the set's hash tag.
const DEAD_GATEWAYS_LUA: &str = r#"
local dead = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. id) == 0 then dead[#dead + 1] = id end
end
return dead
"#;

const SEQ_PREFIX_LEN: usize = 20;
const LEASE_PREFIX: &str = "gw:{gw}:lease:";
const KNOWN_GATEWAYS: &str = "gw:{gw}:known";
/// Pub/sub channel carrying `PresenceChanges` (one message per gateway per
/// tick with changes).
pub const PRESENCE_CHANNEL: &str = "palaver.presence";

fn conv_key(conversation_id: &str, suffix: &str) -> String {
    format!("c:{{{conversation_id}}}:{suffix}")
}

fn user_key(user_id: &str, suffix: &str) -> String {
    format!("u:{{{user_id}}}:{suffix}")
}

fn dedup_key(conversation_id: &str, client_msg_id: &[u8]) -> String {
    let mut key = conv_key(conversation_id, "d:");
    for b in client_msg_id {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

fn receipt_key(conversation_id: &str, kind: pb::ReceiptKind) -> String {
    conv_key(conversation_id, &format!("r:{}", kind as i32))
}

fn watcher_key(addr: &SessionAddr) -> String {
    format!("w:{{{}}}", encode_addr(addr))
}

fn lease_key(gateway_id: &str) -> String {
    format!("{LEASE_PREFIX}{gateway_id}")
}

fn gateway_conns_key(gateway_id: &str) -> String {
    format!("gwc:{{{gateway_id}}}")
}

/// `<conn>|<gateway>`: the conn first so any gateway id is allowed.
pub fn encode_addr(addr: &SessionAddr) -> String {
    format!("{}|{}", addr.conn, addr.gateway_id)
}

pub fn decode_addr(s: &str) -> Option<SessionAddr> {
    let (conn, gateway_id) = s.split_once('|')?;
    Some(SessionAddr {
        gateway_id: gateway_id.to_owned(),
        conn: conn.parse().ok()?,
    })
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn from_value<T: FromRedisValue>(v: Value) -> StoreResult<T> {
    T::from_redis_value(v).map_err(|e| corrupt(format!("unexpected reply: {e}")))
}

/// Decodes a history member: seq prefix, then the Message with seq 0.
fn decode_history_member(member: &[u8]) -> StoreResult<pb::Message> {
    if member.len() < SEQ_PREFIX_LEN {
        return Err(corrupt("history entry shorter than its seq prefix"));
    }
    let seq: u64 = std::str::from_utf8(&member[..SEQ_PREFIX_LEN])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt("history entry seq prefix"))?;
    let mut message = pb::Message::decode(&member[SEQ_PREFIX_LEN..])
        .map_err(|e| corrupt(format!("history entry: {e}")))?;
    message.seq = seq;
    Ok(message)
}

fn decode_history(members: Vec<Vec<u8>>) -> StoreResult<Vec<pb::Message>> {
    members.iter().map(|m| decode_history_member(m)).collect()
}

fn role_of(value: &str) -> StoreResult<pb::Role> {
    value
        .parse::<i32>()
        .ok()
        .and_then(|r| pb::Role::try_from(r).ok())
        .ok_or_else(|| corrupt(format!("member role {value:?}")))
}

/// One opened or closed session for a presence tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionChange {
    Opened(Session),
    Closed { session: Session, at_ms: i64 },
}

/// What a presence tick found out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TickResult {
    /// Connections replaced by a newer one of the same device (they must get
    /// `GoAway(REPLACED)`), with the user and device.
    pub replaced: Vec<(Session, SessionAddr)>,
    /// Users whose presence changed: (user, online, last_seen_ms).
    pub changes: Vec<(String, bool, i64)>,
}

/// The store on Redis. One connection (a cluster connection holds one per
/// node); reconnects on the next call after an I/O error.
pub struct RedisStore {
    config: RedisConfig,
    conn: Option<Conn>,
    scripts: Scripts,
}

impl RedisStore {
    /// Connects and loads the scripts (on every master of a cluster).
    pub fn connect(config: RedisConfig) -> StoreResult<Self> {
        let mut store = Self {
            config,
            conn: None,
            scripts: Scripts::new(),
        };
        store.conn()?;
        Ok(store)
    }

    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    fn open(&self) -> Result<Conn, RedisError> {
        let timeout = Some(self.config.timeout);
        let mut conn = if self.config.cluster {
            let client = ClusterClient::builder(self.config.urls.iter().map(String::as_str))
                .connection_timeout(self.config.timeout)
                .response_timeout(self.config.timeout)
                .build()?;
            Conn::Cluster(Box::new(client.get_connection()?))
        } else {
            let url = self.config.urls.first().ok_or_else(|| {
                RedisError::from((redis::ErrorKind::Client, "no Redis URL configured"))
            })?;
            let client = redis::Client::open(url.as_str())?;
            let conn = client.get_connection_with_timeout(self.config.timeout)?;
            conn.set_read_timeout(timeout)?;
            conn.set_write_timeout(timeout)?;
            Conn::Single(conn)
        };
        for script in self.scripts.all() {
            script.prepare_invoke().load(conn.as_dyn())?;
        }
        Ok(conn)
    }

    /// Drops the connection; the next call reconnects. For callers that
    /// caught a panic in the middle of store work and cannot know what state
    /// the connection was left in.
    pub fn reset_connection(&mut self) {
        self.conn = None;
    }

    fn conn(&mut self) -> StoreResult<&mut Conn> {
        if self.conn.is_none() {
            self.conn = Some(self.open().map_err(unavailable)?);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Runs `f` on the connection; an error that broke the connection drops
    /// it, so the next call reconnects.
    fn with_conn<T>(
        &mut self,
        f: impl FnOnce(&mut Conn, &Scripts) -> Result<T, RedisError>,
    ) -> StoreResult<T> {
        self.conn()?;
        let conn = self.conn.as_mut().expect("connected");
        match f(conn, &self.scripts) {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    self.conn = None;
                }
                Err(unavailable(e))
            }
        }
    }

    /// One command.
    fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> StoreResult<T> {
        self.with_conn(|conn, _| cmd.query(conn.as_dyn()))
    }

    /// Commands in one pipeline (one round trip per node touched); the
    /// replies in order. A script that is missing on a node (Redis was
    /// restarted) is loaded again and the pipeline retried once.
    fn pipeline(&mut self, cmds: Vec<Cmd>) -> StoreResult<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let run = |conn: &mut Conn| -> Result<Vec<Value>, RedisError> {
            match conn {
                Conn::Single(c) => {
                    let mut p = redis::pipe();
                    for cmd in &cmds {
                        p.add_command(cmd.clone());
                    }
                    p.query(c)
                }
                Conn::Cluster(c) => {
                    let mut p = redis::cluster::cluster_pipe();
                    for cmd in &cmds {
                        p.add_command(cmd.clone());
                    }
                    p.query(c.as_mut())
                }
            }
        };
        self.with_conn(|conn, scripts| match run(conn) {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                for script in scripts.all() {
                    script.prepare_invoke().load(conn.as_dyn())?;
                }
                run(conn)
            }
            other => other,
        })
    }

    /// `EVALSHA` of a script as a plain command, for pipelines.
    fn evalsha(script: &Script, keys: &[&str], args: &[&[u8]]) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
        for a in args {
            cmd.arg(*a);
        }
        cmd
    }

    /// For each gateway id: is it known to be dead (registered, lease gone)?
    fn dead_gateways_among(
        &mut self,
        gateway_ids: &HashSet<String>,
    ) -> StoreResult<HashSet<String>> {
        if gateway_ids.is_empty() {
            return Ok(HashSet::new());
        }
        let ids: Vec<&String> = gateway_ids.iter().collect();
        let mut cmds = Vec::with_capacity(ids.len() + 1);
        let mut known = redis::cmd("SMISMEMBER");
        known.arg(KNOWN_GATEWAYS).arg(&ids);
        cmds.push(known);
        for id in &ids {
            cmds.push(redis::cmd("EXISTS").arg(lease_key(id)).clone());
        }
        let mut replies = self.pipeline(cmds)?.into_iter();
        let known: Vec<bool> = from_value(replies.next().unwrap_or(Value::Nil))?;
        let mut dead = HashSet::new();
        for ((id, known), lease) in ids.iter().zip(known).zip(replies) {
            let alive: bool = from_value(lease)?;
            if known && !alive {
                dead.insert((*id).clone());
            }
        }
        Ok(dead)
    }

    /// Every session of each user, dead gateways included.
    fn raw_sessions(&mut self, user_ids: &[String]) -> StoreResult<Vec<Vec<DeviceSession>>> {
        let cmds = user_ids
            .iter()
            .map(|u| redis::cmd("HGETALL").arg(user_key(u, "sess")).clone())
            .collect();
        let replies = self.pipeline(cmds)?;
        replies
            .into_iter()
            .map(|v| {
                let map: HashMap<String, String> = from_value(v)?;
                let mut sessions: Vec<DeviceSession> = map
                    .into_iter()
                    .map(|(device_id, addr)| {
                        decode_addr(&addr)
                            .map(|addr| DeviceSession { device_id, addr })
                            .ok_or_else(|| corrupt(format!("session address {addr:?}")))
                    })
                    .collect::<StoreResult<_>>()?;
                sessions.sort_by(|a, b| a.device_id.cmp(&b.device_id));
                Ok(sessions)
            })
            .collect()
    }

    // ---- Gateway presence (the bridge's batcher) -------------------------

    /// Registers a gateway: its lease, and its id in the known set. If the
    /// same id left sessions behind (a crash and restart faster than the
    /// lease), they are reaped first; the result holds the presence changes.
    pub fn register_gateway(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> StoreResult<Vec<(String, bool, i64)>> {
        let changes = self.reap_sessions_of(gateway_id, now_ms)?;
        self.pipeline(vec![
            redis::cmd("SET")
                .arg(lease_key(gateway_id))
                .arg(now_ms)
                .arg("PX")
                .arg(lease_ttl.as_millis() as u64)
                .clone(),
            redis::cmd("SADD")
                .arg(KNOWN_GATEWAYS)
                .arg(gateway_id)
                .clone(),
        ])?;
        Ok(changes)
    }

    /// One presence tick of one gateway, in ONE pipeline: renew the lease,
    /// register opened sessions, unregister closed ones (setting last-seen
    /// when a user's last session closes), clear the push-pending marks of
    /// users who connected. Commands: 1 + a few per change.
    pub fn presence_tick(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        now_ms: i64,
        changes: &[SessionChange],
    ) -> StoreResult<TickResult> {
        let mut cmds = Vec::with_capacity(1 + 3 * changes.len());
        cmds.push(
            redis::cmd("SET")
                .arg(lease_key(gateway_id))
                .arg(now_ms)
                .arg("PX")
                .arg(lease_ttl.as_millis() as u64)
                .clone(),
        );
        let conns = gateway_conns_key(gateway_id);
        for change in changes {
            match change {
                SessionChange::Opened(s) => {
                    let addr = encode_addr(&s.addr);
                    cmds.push(Self::evalsha(
                        &self.scripts.open_session,
                        &[&user_key(&s.user_id, "sess"), &user_key(&s.user_id, "seen")],
                        &[s.device_id.as_bytes(), addr.as_bytes()],
                    ));
                    cmds.push(
                        redis::cmd("HSET")
                            .arg(&conns)
                            .arg(s.addr.conn)
                            .arg(format!("{}\x1f{}", s.user_id, s.device_id))
                            .clone(),
                    );
                    cmds.push(redis::cmd("DEL").arg(user_key(&s.user_id, "push")).clone());
                }
                SessionChange::Closed { session: s, at_ms } => {
                    let addr = encode_addr(&s.addr);
                    cmds.push(Self::evalsha(
                        &self.scripts.close_session,
                        &[&user_key(&s.user_id, "sess"), &user_key(&s.user_id, "seen")],
                        &[
                            s.device_id.as_bytes(),
                            addr.as_bytes(),
                            at_ms.to_string().as_bytes(),
                        ],
                    ));
                    cmds.push(redis::cmd("HDEL").arg(&conns).arg(s.addr.conn).clone());
                }
            }
        }
        let replies = self.pipeline(cmds)?;
        let mut replies = replies.into_iter().skip(1);
        let mut result = TickResult::default();
        for change in changes {
            match change {
                SessionChange::Opened(s) => {
                    let (prev, had): (String, i64) =
                        from_value(replies.next().unwrap_or(Value::Nil))?;
                    replies.next();
                    replies.next();
                    let prev = if prev.is_empty() {
                        None
                    } else {
                        decode_addr(&prev)
                    };
                    if let Some(prev) = prev.filter(|p| *p != s.addr) {
                        result.replaced.push((s.clone(), prev));
                    }
                    if had == 0 {
                        result.changes.push((s.user_id.clone(), true, 0));
                    }
                }
                SessionChange::Closed { session: s, at_ms } => {
                    let (_removed, offline): (i64, i64) =
                        from_value(replies.next().unwrap_or(Value::Nil))?;
                    replies.next();
                    if offline == 1 {
                        result.changes.push((s.user_id.clone(), false, *at_ms));
                    }
                }
            }
        }
        Ok(result)
    }

    /// Known gateways whose lease has expired (one command).
    pub fn dead_gateways(&mut self) -> StoreResult<Vec<String>> {
        let cmd = Self::evalsha(
            &self.scripts.dead_gateways,
            &[KNOWN_GATEWAYS],
            &[LEASE_PREFIX.as_bytes()],
        );
        let mut replies = self.pipeline(vec![cmd])?;
        from_value(replies.pop().unwrap_or(Value::Nil))
    }

    /// Takes over a dead gateway if no other gateway is doing so: removes
    /// its sessions (users without another session go offline with
    /// last-seen `now_ms`) and forgets it. Returns the presence changes, or
    /// `None` if another gateway holds the reap lock.
    pub fn reap_gateway(
        &mut self,
        dead_gateway_id: &str,
        reaper_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Vec<(String, bool, i64)>>> {
        let locked: Option<String> = self.query(
            redis::cmd("SET")
                .arg(format!("gw:{{gw}}:reap:{dead_gateway_id}"))
                .arg(reaper_id)
                .arg("NX")
                .arg("EX")
                .arg(60),
        )?;
        if locked.is_none() {
            return Ok(None);
        }
        let changes = self.reap_sessions_of(dead_gateway_id, now_ms)?;
        self.query::<()>(redis::cmd("SREM").arg(KNOWN_GATEWAYS).arg(dead_gateway_id))?;
        Ok(Some(changes))
    }

    /// Removes every session registered on `gateway_id` (pipelined).
    fn reap_sessions_of(
        &mut self,
        gateway_id: &str,
        now_ms: i64,
    ) -> StoreResult<Vec<(String, bool, i64)>> {
        let conns_key = gateway_conns_key(gateway_id);
        let conns: HashMap<u64, String> = self.query(redis::cmd("HGETALL").arg(&conns_key))?;
        if conns.is_empty() {
            return Ok(Vec::new());
        }
        let mut sessions = Vec::with_capacity(conns.len());
        for (conn, who) in conns {
            let Some((user_id, device_id)) = who.split_once('\x1f') else {
                return Err(corrupt(format!("gateway connection entry {who:?}")));
            };
            sessions.push(SessionChange::Closed {
                session: Session {
                    user_id: user_id.to_owned(),
                    device_id: device_id.to_owned(),
                    addr: SessionAddr {
                        gateway_id: gateway_id.to_owned(),
                        conn,
                    },
                },
                at_ms: now_ms,
            });
        }
        let mut changes = Vec::new();
        for chunk in sessions.chunks(1000) {
            let mut cmds = Vec::with_capacity(chunk.len());
            for change in chunk {
                if let SessionChange::Closed { session: s, at_ms } = change {
                    cmds.push(Self::evalsha(
                        &self.scripts.close_session,
                        &[&user_key(&s.user_id, "sess"), &user_key(&s.user_id, "seen")],
                        &[
                            s.device_id.as_bytes(),
                            encode_addr(&s.addr).as_bytes(),
                            at_ms.to_string().as_bytes(),
                        ],
                    ));
                }
            }
            for (change, reply) in chunk.iter().zip(self.pipeline(cmds)?) {
                let (_removed, offline): (i64, i64) = from_value(reply)?;
                if let (SessionChange::Closed { session, at_ms }, 1) = (change, offline) {
                    changes.push((session.user_id.clone(), false, *at_ms));
                }
            }
        }
        self.query::<()>(redis::cmd("DEL").arg(&conns_key))?;
        Ok(changes)
    }

    /// Clean shutdown of a gateway: its lease and registration go, its
    /// remaining sessions are removed; returns who went offline.
    pub fn deregister_gateway(
        &mut self,
        gateway_id: &str,
        now_ms: i64,
    ) -> StoreResult<Vec<(String, bool, i64)>> {
        let changes = self.reap_sessions_of(gateway_id, now_ms)?;
        self.pipeline(vec![
            redis::cmd("DEL").arg(lease_key(gateway_id)).clone(),
            redis::cmd("SREM")
                .arg(KNOWN_GATEWAYS)
                .arg(gateway_id)
                .clone(),
        ])?;
        Ok(changes)
    }

    /// PUBLISH one encoded presence batch.
    pub fn publish_presence(&mut self, payload: &[u8]) -> StoreResult<()> {
        self.query::<i64>(redis::cmd("PUBLISH").arg(PRESENCE_CHANNEL).arg(payload))
            .map(|_| ())
    }
}

impl ConversationStore for RedisStore {
    fn append_message(
        &mut self,
        conversation_id: &str,
        message: pb::Message,
        retention: &Retention,
    ) -> StoreResult<Appended> {
        self.append_messages(vec![(conversation_id.to_owned(), message)], retention)?
            .pop()
            .ok_or_else(|| corrupt("no reply to an append"))
    }

    /// One pipeline of append scripts: one round trip per node, and with
    /// `appendfsync always` one AOF fsync for the whole batch (Redis writes
    /// and fsyncs once per event-loop turn before replying).
    fn append_messages(
        &mut self,
        appends: Vec<(String, pb::Message)>,
        retention: &Retention,
    ) -> StoreResult<Vec<Appended>> {
        let mut cmds = Vec::with_capacity(appends.len());
        let mut messages = Vec::with_capacity(appends.len());
        let (now, ttl, window) = (
            retention.now_ms.to_string(),
            retention.dedup_ttl_ms.to_string(),
            retention.history_window.to_string(),
        );
        for (conversation_id, mut message) in appends {
            message.seq = 0;
            let encoded = message.encode_to_vec();
            cmds.push(Self::evalsha(
                &self.scripts.append,
                &[
                    &conv_key(&conversation_id, "seq"),
                    &conv_key(&conversation_id, "h"),
                    &conv_key(&conversation_id, "dd"),
                    &conv_key(&conversation_id, "dq"),
                    &dedup_key(&conversation_id, &message.client_msg_id),
                ],
                &[
                    &encoded,
                    &message.client_msg_id,
                    now.as_bytes(),
                    ttl.as_bytes(),
                    window.as_bytes(),
                ],
            ));
            messages.push((conversation_id, message));
        }
        let replies = self.pipeline(cmds)?;
        if replies.len() != messages.len() {
            return Err(corrupt(format!(
                "{} replies to {} appends",
                replies.len(),
                messages.len()
            )));
        }
        replies
            .into_iter()
            .zip(messages)
            .map(|(reply, (conversation_id, mut message))| {
                let reply: Vec<Value> = from_value(reply)?;
                let mut reply = reply.into_iter();
                let code: i64 = from_value(reply.next().unwrap_or(Value::Nil))?;
                let seq: u64 = from_value(reply.next().unwrap_or(Value::Nil))?;
                let (message_id, server_time_ms) = match code {
                    1 => {
                        message.seq = seq;
                        return Ok(Appended::Stored(message));
                    }
                    2 => {
                        let member: Vec<u8> = from_value(reply.next().unwrap_or(Value::Nil))?;
                        let original = decode_history_member(&member)?;
                        (original.message_id, original.server_time_ms)
                    }
                    _ => {
                        let time: i64 = from_value(reply.next().unwrap_or(Value::Nil))?;
                        let id: String = from_value(reply.next().unwrap_or(Value::Nil))?;
                        (id, time)
                    }
                };
                Ok(Appended::Duplicate(pb::SendAck {
                    client_msg_id: message.client_msg_id,
                    message_id,
                    conversation_id,
                    seq,
                    server_time_ms,
                }))
            })
            .collect()
    }

    fn last_seqs(&mut self, conversation_ids: &[String]) -> StoreResult<Vec<u64>> {
        let cmds = conversation_ids
            .iter()
            .map(|c| redis::cmd("GET").arg(conv_key(c, "seq")).clone())
            .collect();
        self.pipeline(cmds)?
            .into_iter()
            .map(|v| Ok(from_value::<Option<u64>>(v)?.unwrap_or(0)))
            .collect()
    }

    fn messages_after(&mut self, reads: &[RangeRead]) -> StoreResult<Vec<Vec<pb::Message>>> {
        let cmds = reads
            .iter()
            .map(|r| {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(conv_key(&r.conversation_id, "h"))
                    .arg(format!("({}", r.after_seq))
                    .arg("+inf")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(r.limit)
                    .clone()
            })
            .collect();
        self.pipeline(cmds)?
            .into_iter()
            .map(|v| decode_history(from_value(v)?))
            .collect()
    }

    fn messages_before(
        &mut self,
        conversation_id: &str,
        before_seq: u64,
        limit: usize,
    ) -> StoreResult<HistorySlice> {
        if limit == 0 {
            return Ok(HistorySlice::default());
        }
        let max = if before_seq == 0 {
            "+inf".to_string()
        } else {
            format!("({before_seq}")
        };
        let members: Vec<Vec<u8>> = self.query(
            redis::cmd("ZREVRANGEBYSCORE")
                .arg(conv_key(conversation_id, "h"))
                .arg(max)
                .arg("-inf")
                .arg("LIMIT")
                .arg(0)
                .arg(limit + 1),
        )?;
        let has_more = members.len() > limit;
        let mut messages = decode_history(members.into_iter().take(limit).collect())?;
        messages.reverse();
        Ok(HistorySlice { messages, has_more })
    }

    fn senders_between(
        &mut self,
        conversation_id: &str,
        after_seq: u64,
        up_to_seq: u64,
    ) -> StoreResult<Vec<String>> {
        if up_to_seq <= after_seq {
            return Ok(Vec::new());
        }
        let members: Vec<Vec<u8>> = self.query(
            redis::cmd("ZRANGEBYSCORE")
                .arg(conv_key(conversation_id, "h"))
                .arg(format!("({after_seq}"))
                .arg(up_to_seq),
        )?;
        let mut senders = HashSet::new();
        for m in decode_history(members)? {
            senders.insert(m.sender_user_id);
        }
        Ok(senders.into_iter().collect())
    }

    fn advance_receipt(
        &mut self,
        conversation_id: &str,
        user_id: &str,
        kind: pb::ReceiptKind,
        up_to_seq: u64,
    ) -> StoreResult<Option<u64>> {
        let key = receipt_key(conversation_id, kind);
        let previous: i64 = self.with_conn(|conn, scripts| {
            scripts
                .advance_receipt
                .key(&key)
                .arg(user_id)
                .arg(up_to_seq)
                .invoke(conn.as_dyn())
        })?;
        Ok(u64::try_from(previous).ok())
    }

    fn create_group(&mut self, group: &GroupRecord) -> StoreResult<bool> {
        let id = &group.conversation_id;
        let (g, m) = (conv_key(id, "g"), conv_key(id, "m"));
        let created: i64 = self.with_conn(|conn, scripts| {
            let mut inv = scripts.create_group.prepare_invoke();
            inv.key(&g).key(&m).arg(&group.title).arg(group.created_ms);
            for member in &group.members {
                inv.arg(&member.user_id).arg(member.role);
            }
            inv.invoke(conn.as_dyn())
        })?;
        Ok(created == 1)
    }

    fn groups(&mut self, conversation_ids: &[String]) -> StoreResult<Vec<Option<GroupRecord>>> {
        let mut cmds = Vec::with_capacity(2 * conversation_ids.len());
        for id in conversation_ids {
            cmds.push(redis::cmd("HGETALL").arg(conv_key(id, "g")).clone());
            cmds.push(redis::cmd("HGETALL").arg(conv_key(id, "m")).clone());
        }
        let mut replies = self.pipeline(cmds)?.into_iter();
        let mut out = Vec::with_capacity(conversation_ids.len());
        for id in conversation_ids {
            let g: HashMap<String, String> = from_value(replies.next().unwrap_or(Value::Nil))?;
            let m: HashMap<String, String> = from_value(replies.next().unwrap_or(Value::Nil))?;
            if g.is_empty() {
                out.push(None);
                continue;
            }
            let mut members = m
                .into_iter()
                .map(|(user_id, role)| {
                    Ok(pb::Member {
                        user_id,
                        role: role_of(&role)? as i32,
                    })
                })
                .collect::<StoreResult<Vec<_>>>()?;
            members.sort_by(|a, b| a.user_id.cmp(&b.user_id));
            out.push(Some(GroupRecord {
                conversation_id: id.clone(),
                title: g.get("title").cloned().unwrap_or_default(),
                members,
                created_ms: g
                    .get("created")
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| corrupt(format!("group {id} without created time")))?,
            }));
        }
        Ok(out)
    }

    fn membership(&mut self, conversation_id: &str, user_id: &str) -> StoreResult<Membership> {
        let replies = self.pipeline(vec![
            redis::cmd("EXISTS")
                .arg(conv_key(conversation_id, "g"))
                .clone(),
            redis::cmd("HGET")
                .arg(conv_key(conversation_id, "m"))
                .arg(user_id)
                .clone(),
        ])?;
        let mut replies = replies.into_iter();
        let exists: bool = from_value(replies.next().unwrap_or(Value::Nil))?;
        let role: Option<String> = from_value(replies.next().unwrap_or(Value::Nil))?;
        Ok(match (exists, role) {
            (false, _) => Membership::NoSuchGroup,
            (true, None) => Membership::NotMember,
            (true, Some(role)) => Membership::Member(role_of(&role)?),
        })
    }

    fn update_members(
        &mut self,
        conversation_id: &str,
        upsert: &[pb::Member],
        remove: &[String],
    ) -> StoreResult<()> {
        let (g, m) = (
            conv_key(conversation_id, "g"),
            conv_key(conversation_id, "m"),
        );
        self.with_conn(|conn, scripts| {
            let mut inv = scripts.update_members.prepare_invoke();
            inv.key(&g).key(&m).arg(upsert.len());
            for member in upsert {
                inv.arg(&member.user_id).arg(member.role);
            }
            for user_id in remove {
                inv.arg(user_id);
            }
            inv.invoke::<i64>(conn.as_dyn())
        })?;
        Ok(())
    }
}

impl UserStore for RedisStore {
    fn conversations_of_user(&mut self, user_id: &str) -> StoreResult<Vec<String>> {
        self.query(redis::cmd("SMEMBERS").arg(user_key(user_id, "convs")))
    }

    /// Two round trips whatever the number of users: `SMEMBERS` of the
    /// asker's list, then one pipelined `SMISMEMBER` per other user against
    /// that user's own list (every command touches one key, so one hash
    /// slot: fine on Redis Cluster). Cost: `others.len()` × the asker's
    /// conversation count membership checks.
    fn shares_conversation(&mut self, user_id: &str, others: &[String]) -> StoreResult<Vec<bool>> {
        let mine = self.conversations_of_user(user_id)?;
        if mine.is_empty() || others.is_empty() {
            return Ok(vec![false; others.len()]);
        }
        let cmds = others
            .iter()
            .map(|other| {
                redis::cmd("SMISMEMBER")
                    .arg(user_key(other, "convs"))
                    .arg(&mine)
                    .clone()
            })
            .collect();
        self.pipeline(cmds)?
            .into_iter()
            .map(|v| from_value::<Vec<i64>>(v).map(|hits| hits.contains(&1)))
            .collect()
    }

    fn add_conversation_to_users(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<()> {
        let cmds = user_ids
            .iter()
            .map(|u| {
                redis::cmd("SADD")
                    .arg(user_key(u, "convs"))
                    .arg(conversation_id)
                    .clone()
            })
            .collect();
        self.pipeline(cmds).map(|_| ())
    }

    fn remove_conversation_from_users(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<()> {
        let cmds = user_ids
            .iter()
            .map(|u| {
                redis::cmd("SREM")
                    .arg(user_key(u, "convs"))
                    .arg(conversation_id)
                    .clone()
            })
            .collect();
        self.pipeline(cmds).map(|_| ())
    }

    fn mark_push_pending(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<Vec<bool>> {
        let cmds = user_ids
            .iter()
            .map(|u| {
                redis::cmd("SADD")
                    .arg(user_key(u, "push"))
                    .arg(conversation_id)
                    .clone()
            })
            .collect();
        self.pipeline(cmds)?.into_iter().map(from_value).collect()
    }

    fn clear_push_pending(
        &mut self,
        user_id: &str,
        conversation_id: Option<&str>,
    ) -> StoreResult<()> {
        let key = user_key(user_id, "push");
        match conversation_id {
            Some(id) => self.query::<()>(redis::cmd("SREM").arg(key).arg(id)),
            None => self.query::<()>(redis::cmd("DEL").arg(key)),
        }
    }
}

impl SessionStore for RedisStore {
    fn open_session(&mut self, session: &Session) -> StoreResult<SessionOpened> {
        let keys = [
            user_key(&session.user_id, "sess"),
            user_key(&session.user_id, "seen"),
        ];
        let addr = encode_addr(&session.addr);
        let (prev, had): (String, i64) = self.with_conn(|conn, scripts| {
            scripts
                .open_session
                .key(&keys[0])
                .key(&keys[1])
                .arg(&session.device_id)
                .arg(&addr)
                .invoke(conn.as_dyn())
        })?;
        self.query::<()>(
            redis::cmd("HSET")
                .arg(gateway_conns_key(&session.addr.gateway_id))
                .arg(session.addr.conn)
                .arg(format!("{}\x1f{}", session.user_id, session.device_id)),
        )?;
        let replaced = if prev.is_empty() {
            None
        } else {
            decode_addr(&prev)
        };
        Ok(SessionOpened {
            replaced: replaced.filter(|p| *p != session.addr),
            came_online: had == 0,
        })
    }

    fn close_session(&mut self, session: &Session, at_ms: i64) -> StoreResult<SessionClosed> {
        let keys = [
            user_key(&session.user_id, "sess"),
            user_key(&session.user_id, "seen"),
        ];
        let addr = encode_addr(&session.addr);
        let (removed, offline): (i64, i64) = self.with_conn(|conn, scripts| {
            scripts
                .close_session
                .key(&keys[0])
                .key(&keys[1])
                .arg(&session.device_id)
                .arg(&addr)
                .arg(at_ms)
                .invoke(conn.as_dyn())
        })?;
        if removed == 1 {
            self.query::<()>(
                redis::cmd("HDEL")
                    .arg(gateway_conns_key(&session.addr.gateway_id))
                    .arg(session.addr.conn),
            )?;
        }
        Ok(SessionClosed {
            removed: removed == 1,
            went_offline: offline == 1,
        })
    }

    fn sessions_of_users(&mut self, user_ids: &[String]) -> StoreResult<Vec<Vec<DeviceSession>>> {
        let mut sessions = self.raw_sessions(user_ids)?;
        let gateways: HashSet<String> = sessions
            .iter()
            .flatten()
            .map(|s| s.addr.gateway_id.clone())
            .collect();
        let dead = self.dead_gateways_among(&gateways)?;
        if !dead.is_empty() {
            for list in &mut sessions {
                list.retain(|s| !dead.contains(&s.addr.gateway_id));
            }
        }
        Ok(sessions)
    }

    fn presence_of_users(&mut self, user_ids: &[String]) -> StoreResult<Vec<UserPresence>> {
        let mut cmds = Vec::with_capacity(2 * user_ids.len());
        for u in user_ids {
            cmds.push(redis::cmd("HVALS").arg(user_key(u, "sess")).clone());
            cmds.push(redis::cmd("GET").arg(user_key(u, "seen")).clone());
        }
        let mut replies = self.pipeline(cmds)?.into_iter();
        let mut per_user = Vec::with_capacity(user_ids.len());
        let mut gateways = HashSet::new();
        for _ in user_ids {
            let addrs: Vec<String> = from_value(replies.next().unwrap_or(Value::Nil))?;
            let seen: Option<i64> = from_value(replies.next().unwrap_or(Value::Nil))?;
            let addrs: Vec<SessionAddr> = addrs.iter().filter_map(|a| decode_addr(a)).collect();
            gateways.extend(addrs.iter().map(|a| a.gateway_id.clone()));
            per_user.push((addrs, seen.unwrap_or(0)));
        }
        let dead = self.dead_gateways_among(&gateways)?;
        Ok(per_user
            .into_iter()
            .map(|(addrs, seen)| {
                if addrs.iter().any(|a| !dead.contains(&a.gateway_id)) {
                    UserPresence {
                        online: true,
                        last_seen_ms: 0,
                    }
                } else {
                    UserPresence {
                        online: false,
                        last_seen_ms: seen,
                    }
                }
            })
            .collect())
    }

    fn add_watches(
        &mut self,
        watcher: &SessionAddr,
        user_ids: &[String],
        max: usize,
    ) -> StoreResult<WatchAdd> {
        let key = watcher_key(watcher);
        let (added, watching): (i64, usize) = self.with_conn(|conn, scripts| {
            let mut inv = scripts.add_watches.prepare_invoke();
            inv.key(&key).arg(max);
            for u in user_ids {
                inv.arg(u);
            }
            inv.invoke(conn.as_dyn())
        })?;
        if added == 0 {
            return Ok(WatchAdd::LimitExceeded { watching });
        }
        let addr = encode_addr(watcher);
        let cmds = user_ids
            .iter()
            .map(|u| redis::cmd("SADD").arg(user_key(u, "wb")).arg(&addr).clone())
            .collect();
        self.pipeline(cmds)?;
        Ok(WatchAdd::Added { watching })
    }

    fn remove_watches(&mut self, watcher: &SessionAddr, user_ids: &[String]) -> StoreResult<()> {
        if user_ids.is_empty() {
            return Ok(());
        }
        let addr = encode_addr(watcher);
        let mut cmds = vec![redis::cmd("SREM")
            .arg(watcher_key(watcher))
            .arg(user_ids)
            .clone()];
        cmds.extend(
            user_ids
                .iter()
                .map(|u| redis::cmd("SREM").arg(user_key(u, "wb")).arg(&addr).clone()),
        );
        self.pipeline(cmds).map(|_| ())
    }

    fn drop_watches(&mut self, watcher: &SessionAddr) -> StoreResult<()> {
        let key = watcher_key(watcher);
        let users: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(&key))?;
        let addr = encode_addr(watcher);
        let mut cmds = vec![redis::cmd("DEL").arg(&key).clone()];
        cmds.extend(
            users
                .iter()
                .map(|u| redis::cmd("SREM").arg(user_key(u, "wb")).arg(&addr).clone()),
        );
        self.pipeline(cmds).map(|_| ())
    }

    fn watchers_of(&mut self, user_id: &str) -> StoreResult<Vec<SessionAddr>> {
        let addrs: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(user_key(user_id, "wb")))?;
        addrs
            .iter()
            .map(|a| decode_addr(a).ok_or_else(|| corrupt(format!("watcher address {a:?}"))))
            .collect()
    }
}
