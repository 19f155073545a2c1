//! The durable store of the embedded engine: the store traits on
//! redb (an embedded, crash-safe B-tree file), so a
//! single-node `palaver-gateway` keeps its conversations across a restart
//! or a SIGKILL.
//!
//! **What is on disk** (`<data dir>/store/palaver.redb`): messages (every
//! one, no window: History and Sync read them from the file), the seq
//! counter of each conversation, dedup entries, direct conversations'
//! writers (presence consent), receipt marks, group records and members,
//! each user's conversation and group lists (with a group count), push
//! marks (dropped at open: the pushes they stood for were in the previous
//! run's memory), group-add counts, storage-quota counters, push registrations
//! and mutes (`push.rs`), and channels: records with their counts, members,
//! read positions (`channels.rs`).
//!
//! **What is not**: sessions, presence, last seen and the gateway
//! registry. They describe this process's connections and die with it, so
//! they stay in a [`MemoryStore`] inside (the same code as the ephemeral
//! engine).
//!
//! **Group commit.** Every call runs in one write transaction that stays
//! open for the engine's turn (reads see the turn's own writes); the engine
//! calls [`DiskStore::commit`] (fsync) once at the end of the turn, before
//! any answer of that turn leaves (`crate::embedded::EngineStore`). If a
//! call of the turn failed, or the commit does, the whole turn is rolled
//! back and answered UNAVAILABLE: no ack for an unwritten message, and no
//! seq anyone was told about is ever handed out again (a seq is only told
//! after its commit).
//!
//! **Bounds.** Memory: redb's page cache ([`DiskConfig::cache_bytes`]),
//! the session registry, nothing per stored message. Dedup entries: the
//! newest `history_window` messages of a conversation (as in the other
//! stores: the entry of the message `history_window` seqs back is dropped
//! by each append). History: unbounded, until the retention sweep
//! ([`DiskConfig::retention_days`]) deletes a conversation's messages older
//! than that, oldest first, a bounded number per commit (at most
//! [`SWEEP_MESSAGES`] inspected per second).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use palaver_protocol::pb;
use prost::Message as _;
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use crate::api::SessionAddr;
use crate::logic::{Clock, SystemClock};
use crate::memory::MemoryStore;
use crate::store::{
    GatewayRegistry, SessionChange, SessionStore, SessionsApplied, StoreError, StoreResult,
    UserPresence, UserSessions,
};

mod channels;
mod conversations;
mod push;
mod users;

/// The file inside the store directory.
pub const FILE_NAME: &str = "palaver.redb";
/// The layout this code writes; a file with another is refused at open.
const SCHEMA_VERSION: u64 = 1;
/// Messages the retention sweep inspects per run (one run a second at most).
pub const SWEEP_MESSAGES: usize = 1000;

// Keys are tuples ordered element by element, so one conversation's (or
// user's) entries are one contiguous range.
/// "schema" → layout version; "history_epoch" → the epoch (SPEC §7), set at creation.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// conversation → last allocated seq.
const SEQS: TableDefinition<&str, u64> = TableDefinition::new("seqs");
/// (conversation, seq) → the message, protobuf, without its conversation
/// id and seq (they are the key).
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
/// (conversation, sender, client_msg_id) → (seq, dedup expiry ms).
const DEDUP: TableDefinition<(&str, &str, &[u8]), (u64, i64)> = TableDefinition::new("dedup");
/// direct conversation → bit 0: its first user wrote, bit 1: its second.
const WRITERS: TableDefinition<&str, u8> = TableDefinition::new("direct_writers");
/// (conversation, user, receipt kind) → mark.
const RECEIPTS: TableDefinition<(&str, &str, i32), u64> = TableDefinition::new("receipts");
/// group → (title, created ms).
const GROUPS: TableDefinition<&str, (&str, i64)> = TableDefinition::new("groups");
/// (group, user) → role.
const MEMBERS: TableDefinition<(&str, &str), i32> = TableDefinition::new("members");
/// (user, conversation): the user's conversations.
const USER_CONVERSATIONS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("user_conversations");
/// (user, group): the user's groups.
const USER_GROUPS: TableDefinition<(&str, &str), ()> = TableDefinition::new("user_groups");
/// user → how many groups (kept beside the list: counting is one lookup).
const GROUP_COUNTS: TableDefinition<&str, u64> = TableDefinition::new("group_counts");
/// (user, conversation): a push is pending.
const PUSH_PENDING: TableDefinition<(&str, &str), ()> = TableDefinition::new("push_pending");
/// (user, UTC day, adder) → adds of the user to groups by that adder.
const ADDS: TableDefinition<(&str, i64, &str), u32> = TableDefinition::new("group_adds");
/// (user, UTC day) → adds by adders who were strangers.
const STRANGER_ADDS: TableDefinition<(&str, i64), u32> = TableDefinition::new("stranger_adds");
/// (owner kind, owner id) → (period, used).
const QUOTAS: TableDefinition<(u8, &str), (u32, u64)> = TableDefinition::new("quotas");

/// Settings of the durable store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Messages older than this many days are deleted (0: kept forever).
    pub retention_days: u32,
    /// redb's page cache: the store's memory besides the session registry.
    pub cache_bytes: usize,
}

impl Default for DiskConfig {
    fn default() -> Self {
        Self {
            // Five years, as the archive of the Kafka/Redis tier.
            retention_days: 1826,
            cache_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Why the store could not open: names the file and what to do.
#[derive(Debug, thiserror::Error)]
#[error("durable store {}: {problem}", path.display())]
pub struct OpenError {
    pub path: PathBuf,
    pub problem: String,
}

/// A failure inside one call (mapped to [`StoreError`] at the trait).
#[derive(Debug, thiserror::Error)]
pub(crate) enum DiskError {
    #[error(transparent)]
    Redb(#[from] redb::Error),
    #[error("corrupt record in {0}")]
    Corrupt(&'static str),
}

macro_rules! from_redb {
    ($($t:ty),*) => {
        $(impl From<$t> for DiskError {
            fn from(e: $t) -> Self {
                DiskError::Redb(e.into())
            }
        })*
    };
}
from_redb!(
    redb::TableError,
    redb::StorageError,
    redb::TransactionError,
    redb::CommitError
);

type DiskResult<T> = Result<T, DiskError>;

pub struct DiskStore {
    db: redb::Database,
    path: PathBuf,
    /// The turn's transaction, begun by its first call.
    txn: Option<WriteTransaction>,
    /// A call of this turn wrote something.
    dirty: bool,
    /// A call of this turn failed: its writes may be half done, so the
    /// turn is rolled back instead of committed.
    failed: Option<String>,
    /// Sessions, presence, gateway leases: per process, in memory.
    sessions: MemoryStore,
    clock: Arc<dyn Clock>,
    retention_ms: Option<i64>,
    /// The retention sweep: when it last ran, and the conversation it
    /// goes on from.
    swept_at_ms: i64,
    sweep_from: String,
    /// Fault injection ([`DiskStore::commit_failures`]).
    fail_commits: Arc<AtomicBool>,
    /// Written once, when the file is created (META "history_epoch"): a
    /// new file is a new history.
    history_epoch: u64,
}

impl DiskStore {
    /// Opens (or creates) the store in `dir` (created if missing), with the
    /// system clock.
    pub fn open(dir: &Path, config: &DiskConfig) -> Result<Self, OpenError> {
        Self::open_with_clock(dir, config, Arc::new(SystemClock))
    }

    /// As [`DiskStore::open`], with `clock` for gateway leases and the
    /// retention sweep (tests inject a manual one).
    pub fn open_with_clock(
        dir: &Path,
        config: &DiskConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, OpenError> {
        let path = dir.join(FILE_NAME);
        let fail = |problem: String| OpenError {
            path: path.clone(),
            problem,
        };
        std::fs::create_dir_all(dir).map_err(|e| {
            fail(format!(
                "cannot create {}: {e}; choose a writable --data-dir",
                dir.display()
            ))
        })?;
        let db = redb::Database::builder()
            .set_cache_size(config.cache_bytes)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => fail(
                    "in use by another process (another palaver-gateway on the same \
                     --data-dir?); stop it or give this one its own --data-dir"
                        .into(),
                ),
                e => fail(format!(
                    "cannot open: {e}; check the file's permissions and free space, \
                     or move it away to start empty"
                )),
            })?;
        let mut store = Self {
            db,
            path: path.clone(),
            txn: None,
            dirty: false,
            failed: None,
            sessions: MemoryStore::with_clock(clock.clone()),
            clock,
            retention_ms: (config.retention_days > 0)
                .then(|| i64::from(config.retention_days) * 24 * 60 * 60 * 1000),
            swept_at_ms: 0,
            sweep_from: String::new(),
            fail_commits: Arc::default(),
            history_epoch: 0,
        };
        store.check_schema().map_err(|e| fail(e.to_string()))?;
        Ok(store)
    }

    /// Writes the schema version and the history epoch into a new file;
    /// refuses another layout; drops the push marks of the previous run.
    fn check_schema(&mut self) -> Result<(), String> {
        let (found, epoch) = self
            .write(|txn| {
                let mut meta = txn.open_table(META)?;
                let found = meta.get("schema")?.map(|v| v.value());
                if found.is_none() {
                    meta.insert("schema", SCHEMA_VERSION)?;
                }
                let epoch = meta.get("history_epoch")?.map(|v| v.value());
                let epoch = match epoch {
                    Some(epoch) => epoch,
                    None => {
                        let epoch = crate::store::new_history_epoch();
                        meta.insert("history_epoch", epoch)?;
                        epoch
                    }
                };
                // Push marks say "a push for this burst is sent or queued".
                // The embedded push worker's queue is in memory and died
                // with the previous process: keeping the marks would silence
                // those conversations until their users connect. Dropped,
                // the next message pushes again (at worst one extra push).
                txn.delete_table(PUSH_PENDING)?;
                Ok((found, epoch))
            })
            .map_err(|e| e.to_string())?;
        self.history_epoch = epoch;
        self.commit().map_err(|e| e.to_string())?;
        match found {
            None | Some(SCHEMA_VERSION) => Ok(()),
            Some(other) => Err(format!(
                "written with layout {other}, this build reads layout {SCHEMA_VERSION}"
            )),
        }
    }

    /// Fault injection for tests of what sits on top: while the flag is
    /// set, every commit that has something to write fails as one the disk
    /// refused would (the turn is rolled back, [`DiskStore::commit`] errs).
    pub fn commit_failures(&self) -> Arc<AtomicBool> {
        self.fail_commits.clone()
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the turn's writes durable (one fsync), or rolls the whole turn
    /// back if one of its calls failed. Nothing to do after a turn that
    /// only read. On an error nothing of the turn is on disk.
    pub fn commit(&mut self) -> StoreResult<()> {
        if self.failed.is_none() {
            let now_ms = self.clock.now_ms();
            if let Some(retention_ms) = self.retention_ms {
                if now_ms - self.swept_at_ms >= 1000 {
                    self.swept_at_ms = now_ms;
                    let cutoff = now_ms - retention_ms;
                    let mut from = std::mem::take(&mut self.sweep_from);
                    // A failed sweep fails the turn like any write.
                    if let Ok(deleted) = self.read(|txn| sweep(txn, cutoff, &mut from)) {
                        self.dirty |= deleted > 0;
                    }
                    self.sweep_from = from;
                }
            }
        }
        let Some(txn) = self.txn.take() else {
            return Ok(());
        };
        let dirty = std::mem::take(&mut self.dirty);
        if dirty && self.fail_commits.load(Ordering::Relaxed) {
            self.failed
                .get_or_insert_with(|| "commit refused (injected fault)".into());
        }
        if let Some(reason) = self.failed.take() {
            if let Err(e) = txn.abort() {
                tracing::error!(path = %self.path.display(), "rolling back a failed turn: {e}");
            }
            return Err(StoreError::Unavailable(format!(
                "durable store {}: {reason}; the turn was rolled back",
                self.path.display()
            )));
        }
        let done = if dirty {
            txn.commit().map_err(redb::Error::from)
        } else {
            txn.abort().map_err(redb::Error::from)
        };
        done.map_err(|e| {
            StoreError::Unavailable(format!(
                "durable store {}: commit failed: {e}",
                self.path.display()
            ))
        })
    }

    /// Bytes the file takes on disk.
    pub fn file_bytes(&self) -> std::io::Result<u64> {
        std::fs::metadata(&self.path).map(|m| m.len())
    }

    /// The turn's transaction, begun if none is open.
    fn txn(&mut self) -> DiskResult<&WriteTransaction> {
        if self.txn.is_none() {
            let mut txn = self.db.begin_write()?;
            // Commits save the allocator state, so opening after a crash
            // does not walk the whole file to rebuild it.
            txn.set_quick_repair(true);
            self.txn = Some(txn);
        }
        self.txn.as_ref().ok_or(DiskError::Corrupt("transaction"))
    }

    /// Runs a call that reads only.
    fn read<T>(&mut self, f: impl FnOnce(&WriteTransaction) -> DiskResult<T>) -> StoreResult<T> {
        let result = self.txn().and_then(f);
        self.settle(result)
    }

    /// Runs a call that may write.
    fn write<T>(&mut self, f: impl FnOnce(&WriteTransaction) -> DiskResult<T>) -> StoreResult<T> {
        let result = self.txn().and_then(f);
        self.dirty = true;
        self.settle(result)
    }

    /// Maps a call's failure to the store's error and marks the turn failed.
    fn settle<T>(&mut self, result: DiskResult<T>) -> StoreResult<T> {
        result.map_err(|e| {
            let reason = e.to_string();
            tracing::error!(path = %self.path.display(), "durable store: {reason}");
            self.failed.get_or_insert_with(|| reason.clone());
            StoreError::Unavailable(format!("durable store {}: {reason}", self.path.display()))
        })
    }
}

/// The message as stored: its conversation id and seq are the key.
fn encode(message: &pb::Message) -> Vec<u8> {
    let mut stored = message.clone();
    stored.conversation_id.clear();
    stored.seq = 0;
    stored.encode_to_vec()
}

fn decode(conversation_id: &str, seq: u64, bytes: &[u8]) -> DiskResult<pb::Message> {
    let mut message = pb::Message::decode(bytes).map_err(|_| DiskError::Corrupt("messages"))?;
    message.conversation_id = conversation_id.to_owned();
    message.seq = seq;
    Ok(message)
}

/// The smallest string above every string starting with `prefix`'s whole
/// value as a tuple's first element: `(prefix, ..)` keys lie in
/// `(prefix, "")..(after(prefix), "")`.
fn after(prefix: &str) -> String {
    format!("{prefix}\0")
}

/// One run of the retention sweep: from conversation `from` on (wrapping
/// around), deletes messages older than `cutoff_ms`, oldest first, looking
/// at no more than [`SWEEP_MESSAGES`] messages; returns how many it
/// deleted. Seq counters stay, so a conversation emptied by retention goes
/// on from its last seq.
fn sweep(txn: &WriteTransaction, cutoff_ms: i64, from: &mut String) -> DiskResult<usize> {
    let mut deleted = 0;
    const CONVERSATIONS: usize = 64;
    let seqs = txn.open_table(SEQS)?;
    let mut messages = txn.open_table(MESSAGES)?;
    let mut conversations: Vec<String> = Vec::new();
    for entry in seqs.range(from.as_str()..)?.take(CONVERSATIONS) {
        conversations.push(entry?.0.value().to_owned());
    }
    let mut budget = SWEEP_MESSAGES;
    for conversation in &conversations {
        let id = conversation.as_str();
        let mut old = Vec::new();
        for entry in messages.range((id, 0)..=(id, u64::MAX))? {
            if budget == 0 {
                break;
            }
            budget -= 1;
            let (key, value) = entry?;
            let time = pb::Message::decode(value.value())
                .map_err(|_| DiskError::Corrupt("messages"))?
                .server_time_ms;
            if time >= cutoff_ms {
                break;
            }
            old.push(key.value().1);
        }
        deleted += old.len();
        for seq in old {
            messages.remove((id, seq))?;
        }
        if budget == 0 {
            // Maybe not done with this one: the next run starts here.
            *from = conversation.clone();
            return Ok(deleted);
        }
    }
    *from = match conversations.last() {
        Some(last) if conversations.len() == CONVERSATIONS => after(last),
        // The end: the next run starts from the first conversation.
        _ => String::new(),
    };
    Ok(deleted)
}

impl SessionStore for DiskStore {
    fn apply_sessions(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        now_ms: i64,
        changes: &[SessionChange],
    ) -> StoreResult<SessionsApplied> {
        let applied = self
            .sessions
            .apply_sessions(gateway_id, lease_ttl, now_ms, changes)?;
        // An open clears the user's pending push marks, which live on disk
        // here (the memory store's own marks are always empty). A Reopen
        // refused because the device is held elsewhere changed nothing.
        let refused: Vec<&SessionAddr> = applied.replaced.iter().map(|(_, old)| old).collect();
        for change in changes {
            let session = match change {
                SessionChange::Opened(session) => session,
                SessionChange::Reopened(session) if !refused.contains(&&session.addr) => session,
                _ => continue,
            };
            crate::store::UserStore::clear_push_pending(self, &session.user_id, None)?;
        }
        Ok(applied)
    }

    fn sessions_of_users<U: AsRef<str>>(&mut self, user_ids: &[U]) -> StoreResult<UserSessions> {
        self.sessions.sessions_of_users(user_ids)
    }

    fn presence_of_users(&mut self, user_ids: &[String]) -> StoreResult<Vec<UserPresence>> {
        self.sessions.presence_of_users(user_ids)
    }
}

impl GatewayRegistry for DiskStore {
    fn register_gateway(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> StoreResult<Vec<pb::Presence>> {
        self.sessions
            .register_gateway(gateway_id, lease_ttl, now_ms)
    }

    fn dead_gateways(&mut self) -> StoreResult<Vec<String>> {
        self.sessions.dead_gateways()
    }

    fn reap_gateway(
        &mut self,
        dead_gateway_id: &str,
        reaper_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Vec<pb::Presence>>> {
        self.sessions
            .reap_gateway(dead_gateway_id, reaper_id, now_ms)
    }

    fn rejoin_if_forgotten(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> StoreResult<bool> {
        self.sessions
            .rejoin_if_forgotten(gateway_id, lease_ttl, now_ms)
    }

    fn deregister_gateway(
        &mut self,
        gateway_id: &str,
        now_ms: i64,
    ) -> StoreResult<Vec<pb::Presence>> {
        self.sessions.deregister_gateway(gateway_id, now_ms)
    }
}
