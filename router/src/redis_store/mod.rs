//! The store traits on Redis (standalone or Redis Cluster).
//!
//! Layout: this file holds [`RedisStore`], [`RedisConfig`], the connection
//! (standalone or cluster), the scripts and the error mapping; `keys` is the
//! key schema; `conversations`, `users`, `sessions` (the batched session
//! writes, one pipeline per gateway per flush), `gateways` (leases,
//! registry, reaping), `push` and `channels` implement the store traits. The Lua scripts are
//! `scripts/*.lua`.

use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::{Cmd, ConnectionLike, FromRedisValue, RedisError, Script, Value};

use std::sync::Arc;

use palaver_archive::{ArchiveError, CassandraArchive};

use crate::store::{StoreError, StoreResult};

mod channels;
mod conversations;
mod gateways;
mod keys;
mod push;
mod sessions;
mod users;

pub use keys::{decode_addr, encode_addr, PRESENCE_CHANNEL};

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
    dead_gateways: Script,
    read_range: Script,
    charge_quota: Script,
    raise: Script,
    register_push: Script,
    invalidate_push: Script,
    set_mute: Script,
    push_owner: Script,
    create_channel: Script,
    change_channel_members: Script,
    channel_page: Script,
    raise_read_position: Script,
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
            dead_gateways: Script::new(DEAD_GATEWAYS_LUA),
            read_range: Script::new(READ_RANGE_LUA),
            charge_quota: Script::new(CHARGE_QUOTA_LUA),
            raise: Script::new(RAISE_LUA),
            register_push: Script::new(REGISTER_PUSH_LUA),
            invalidate_push: Script::new(INVALIDATE_PUSH_LUA),
            set_mute: Script::new(SET_MUTE_LUA),
            push_owner: Script::new(PUSH_OWNER_LUA),
            create_channel: Script::new(CREATE_CHANNEL_LUA),
            change_channel_members: Script::new(CHANGE_CHANNEL_MEMBERS_LUA),
            channel_page: Script::new(CHANNEL_PAGE_LUA),
            raise_read_position: Script::new(RAISE_READ_POSITION_LUA),
        }
    }

    fn all(&self) -> [&Script; 18] {
        [
            &self.raise,
            &self.push_owner,
            &self.register_push,
            &self.invalidate_push,
            &self.set_mute,
            &self.charge_quota,
            &self.read_range,
            &self.append,
            &self.advance_receipt,
            &self.create_group,
            &self.update_members,
            &self.open_session,
            &self.close_session,
            &self.dead_gateways,
            &self.create_channel,
            &self.change_channel_members,
            &self.channel_page,
            &self.raise_read_position,
        ]
    }
}

// The Lua sources, one file each in `scripts/` (what each does, its KEYS and
// ARGV: the header of the file).
const APPEND_LUA: &str = include_str!("scripts/append.lua");
const ADVANCE_RECEIPT_LUA: &str = include_str!("scripts/advance_receipt.lua");
const CREATE_GROUP_LUA: &str = include_str!("scripts/create_group.lua");
const UPDATE_MEMBERS_LUA: &str = include_str!("scripts/update_members.lua");
const OPEN_SESSION_LUA: &str = include_str!("scripts/open_session.lua");
const CLOSE_SESSION_LUA: &str = include_str!("scripts/close_session.lua");
const DEAD_GATEWAYS_LUA: &str = include_str!("scripts/dead_gateways.lua");
const READ_RANGE_LUA: &str = include_str!("scripts/read_range.lua");
const CHARGE_QUOTA_LUA: &str = include_str!("scripts/charge_quota.lua");
const RAISE_LUA: &str = include_str!("scripts/raise.lua");
const REGISTER_PUSH_LUA: &str = include_str!("scripts/register_push.lua");
const INVALIDATE_PUSH_LUA: &str = include_str!("scripts/invalidate_push.lua");
const SET_MUTE_LUA: &str = include_str!("scripts/set_mute.lua");
const PUSH_OWNER_LUA: &str = include_str!("scripts/push_owner.lua");
const CREATE_CHANNEL_LUA: &str = include_str!("scripts/create_channel.lua");
const CHANGE_CHANNEL_MEMBERS_LUA: &str = include_str!("scripts/change_channel_members.lua");
const CHANNEL_PAGE_LUA: &str = include_str!("scripts/channel_page.lua");
const RAISE_READ_POSITION_LUA: &str = include_str!("scripts/raise_read_position.lua");

fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn from_value<T: FromRedisValue>(v: Value) -> StoreResult<T> {
    T::from_redis_value(v).map_err(|e| corrupt(format!("unexpected reply: {e}")))
}

/// The store on Redis. One connection (a cluster connection holds one per
/// node); reconnects on the next call after an I/O error.
pub struct RedisStore {
    config: RedisConfig,
    conn: Option<Conn>,
    scripts: Scripts,
    /// The history archive below the window, if one is configured.
    archive: Option<ArchiveLink>,
}

/// The store's history with an archive behind it (SPEC §7): the window is
/// a cache that never trims what the archiver has not confirmed, and reads
/// below it go to the archive.
#[derive(Clone)]
pub struct ArchiveLink {
    pub archive: Arc<CassandraArchive>,
    /// Messages of one conversation not yet archived that Redis holds at
    /// most; a Send beyond is answered UNAVAILABLE until the archiver
    /// catches up.
    pub max_unarchived: u64,
}

/// Default [`ArchiveLink::max_unarchived`]: ten windows' worth, so an
/// archive outage of minutes costs busy conversations nothing, and one
/// conversation holds at most ~6 GB of unarchived 60 KiB messages... in
/// practice a few MB.
pub const DEFAULT_MAX_UNARCHIVED: u64 = 100_000;

pub(super) fn archive_error(e: ArchiveError) -> StoreError {
    match e {
        ArchiveError::Corrupt(m) => StoreError::Corrupt(m),
        e => StoreError::Unavailable(e.to_string()),
    }
}

impl RedisStore {
    /// Connects and loads the scripts (on every master of a cluster).
    pub fn connect(config: RedisConfig) -> StoreResult<Self> {
        let mut store = Self {
            config,
            conn: None,
            scripts: Scripts::new(),
            archive: None,
        };
        store.conn()?;
        Ok(store)
    }

    /// Puts the archive behind the history window (see [`ArchiveLink`]).
    pub fn with_archive(mut self, link: ArchiveLink) -> Self {
        self.archive = Some(link);
        self
    }

    /// The highest seq of each conversation the archiver confirmed (every
    /// seq up to it is archived); 0 for none.
    pub fn archived_seqs(&mut self, conversation_ids: &[String]) -> StoreResult<Vec<u64>> {
        let cmds = conversation_ids
            .iter()
            .map(|c| {
                redis::cmd("GET")
                    .arg(keys::conv_key(c, keys::ARCHIVED_SUFFIX))
                    .clone()
            })
            .collect();
        self.pipeline(cmds)?
            .into_iter()
            .map(|v| Ok(from_value::<Option<u64>>(v)?.unwrap_or(0)))
            .collect()
    }

    /// Raises each conversation's archived seq to the given one (never
    /// lowers it: archivers may overlap during a rebalance).
    pub fn confirm_archived(&mut self, confirmed: &[(String, u64)]) -> StoreResult<()> {
        let cmds = confirmed
            .iter()
            .map(|(c, seq)| {
                Self::evalsha(
                    &self.scripts.raise,
                    &[&keys::conv_key(c, keys::ARCHIVED_SUFFIX)],
                    &[seq.to_string().as_bytes()],
                )
            })
            .collect();
        self.pipeline(cmds).map(drop)
    }

    /// The window's messages of a conversation after `after_seq`, up to
    /// `limit`, never from the archive (the archiver fills a gap with them).
    pub fn window_after(
        &mut self,
        conversation_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<palaver_protocol::pb::Message>> {
        let cmd = self.read_range(conversation_id, b"a", after_seq, limit, 0);
        let reply = self
            .pipeline(vec![cmd])?
            .pop()
            .ok_or_else(|| corrupt("no reply to a window read"))?;
        Ok(conversations::decode_range(reply)?.1)
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

    /// Writes the limits this router enforces for gateways to announce;
    /// returns the ones another router had written if they differ (a tier
    /// whose routers disagree: the last to start wins, and says so).
    pub fn publish_tier_limits(
        &mut self,
        limits: &crate::api::TierLimits,
    ) -> StoreResult<Option<crate::api::TierLimits>> {
        let before = self.tier_limits()?;
        let cmd = redis::cmd("HSET")
            .arg(keys::TIER_LIMITS)
            .arg("max_group_members")
            .arg(limits.max_group_members)
            .arg("max_body_bytes")
            .arg(limits.max_body_bytes)
            .arg("max_batch")
            .arg(limits.max_batch)
            .arg("max_channel_members")
            .arg(limits.max_channel_members)
            .clone();
        let _: i64 = self.query(&cmd)?;
        Ok(before.filter(|b| b != limits))
    }

    /// The limits the router tier published ([`Self::publish_tier_limits`]),
    /// if any router has.
    pub fn tier_limits(&mut self) -> StoreResult<Option<crate::api::TierLimits>> {
        let fields: std::collections::HashMap<String, u32> =
            self.query(redis::cmd("HGETALL").arg(keys::TIER_LIMITS))?;
        let field = |name: &str| fields.get(name).copied();
        Ok(
            match (
                field("max_group_members"),
                field("max_body_bytes"),
                field("max_batch"),
            ) {
                (Some(max_group_members), Some(max_body_bytes), Some(max_batch)) => {
                    Some(crate::api::TierLimits {
                        max_group_members,
                        max_body_bytes,
                        max_batch,
                        // Not written by routers that predate channels.
                        max_channel_members: field("max_channel_members").unwrap_or(0),
                    })
                }
                _ => None,
            },
        )
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
}
