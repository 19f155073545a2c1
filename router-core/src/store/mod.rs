//! The state the router keeps, as six small synchronous traits (the push
//! registrations' one, [`PushStore`], and its types in `push.rs`; channels',
//! [`ChannelStore`], in `channels.rs`).
//!
//! [`crate::memory::MemoryStore`] implements them in memory for the embedded
//! engine; the router tier implements them on Redis. The traits are shaped
//! for Redis:
//!
//! - [`ConversationStore`] methods touch the keys of ONE conversation (the
//!   Redis keys carry the conversation id as hash tag, so each call is one
//!   slot and can be one Lua script / MULTI). The exceptions are the batch
//!   reads that take a slice of conversation ids ([`ConversationStore::last_seqs`],
//!   [`ConversationStore::messages_after`], [`ConversationStore::groups`]): one
//!   pipelined round trip, any number of slots.
//! - [`UserStore`] and [`SessionStore`] methods are keyed by user (the
//!   session writes by gateway: one batch per gateway); methods taking `&[String]` of users must be one
//!   pipelined round trip, never one round trip per user: a group fan-out
//!   looks up 1000 members in one call.
//!
//! Concurrency rule the implementations may rely on: requests about one
//! conversation are processed by one router at a time, in order (Kafka
//! partition by conversation id). Read-modify-write sequences the router does
//! across several calls for one conversation (membership check, then change)
//! are therefore safe. What each method says is atomic must be atomic anyway,
//! because a rebalance may briefly let two routers overlap.
//!
//! Every method returns [`StoreResult`]; an error means "nothing reliable is
//! known about whether the call took effect" (the router answers UNAVAILABLE
//! or retries the whole request, and the per-conversation dedup keeps a retried
//! `Send` from being stored twice).

use std::sync::Arc;
use std::time::Duration;

mod channels;
mod push;
pub use channels::*;
pub use push::*;

use palaver_protocol::pb;

use crate::api::{Session, SessionAddr};

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached or did not answer in time.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with data this code cannot interpret.
    #[error("store data corrupt: {0}")]
    Corrupt(String),
}

/// Limits applied when a message is appended (from `RouterConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Router time of the append, Unix epoch ms (dedup expiry is relative to it).
    pub now_ms: i64,
    /// How long a (conversation, sender, client_msg_id) dedup entry lives.
    pub dedup_ttl_ms: i64,
    /// Messages kept per conversation: after an append only the newest
    /// `history_window` messages remain readable.
    pub history_window: usize,
}

/// Result of [`ConversationStore::append_message`].
#[derive(Clone, Debug, PartialEq)]
pub enum Appended {
    /// The message was new: it got the next seq and is in the history.
    Stored(pb::Message),
    /// The (conversation, sender, client_msg_id) was seen within the dedup TTL: here
    /// is the ack the first copy got. Nothing was stored, no seq was used.
    Duplicate(pb::SendAck),
    /// The conversation holds as many messages not yet archived as it may
    /// (the archive is down or behind, SPEC §7): nothing was stored, no seq
    /// was used; the Send is answered UNAVAILABLE. Only a store with an
    /// archive behind its window answers this.
    Backlogged { last_seq: u64 },
}

/// One read of [`ConversationStore::messages_after`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeRead {
    pub conversation_id: String,
    /// Return messages with `seq > after_seq`.
    pub after_seq: u64,
    /// At most this many (the oldest ones of the range).
    pub limit: usize,
    /// And no more than fit in this many bytes ([`message_size`]), though
    /// always the first one: a read touches what it returns plus at most
    /// one message, however large the range or its messages.
    pub max_bytes: usize,
}

/// What a message weighs against a read's `max_bytes`: its encoded length
/// with its seq, as it goes out in a SyncBatch or HistoryPage (both stores
/// compute exactly this).
pub fn message_size(message: &pb::Message) -> usize {
    use prost::Message as _;
    message.encoded_len()
}

/// A read's byte budget: takes messages while they fit, the first always.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    left: usize,
    taken: usize,
}

impl Budget {
    pub fn new(max_bytes: usize) -> Self {
        Budget {
            left: max_bytes,
            taken: 0,
        }
    }

    /// Takes `message` if it fits (or is the first); false once one does not.
    pub fn take(&mut self, message: &pb::Message) -> bool {
        let size = message_size(message);
        if size > self.left && self.taken > 0 {
            return false;
        }
        self.left = self.left.saturating_sub(size);
        self.taken += 1;
        true
    }
}

/// Result of [`ConversationStore::messages_before`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistorySlice {
    /// Ascending by seq.
    pub messages: Vec<pb::Message>,
    /// Older messages than the first one returned exist in the stored window.
    pub has_more: bool,
}

/// A group conversation as stored. Direct conversations (`dm:<a>:<b>`) are
/// never stored as records: their members follow from the id.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupRecord {
    pub conversation_id: String,
    pub title: String,
    /// Ascending by user id, each user at most once.
    pub members: Vec<pb::Member>,
    pub created_ms: i64,
}

/// Whose quota a [`QuotaCharge`] counts against, and in what periods.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum QuotaOwner {
    /// Bytes the sender's account stored, per UTC day (SPEC §13).
    Account(String),
    /// Bytes stored in a conversation, per UTC day (SPEC §13).
    Conversation(String),
    /// Membership changes of a group, per UTC hour (SPEC §11).
    MembershipChanges(String),
}

impl QuotaOwner {
    /// How long a period of this owner's counter lasts, in seconds.
    pub fn period_s(&self) -> u32 {
        match self {
            QuotaOwner::Account(_) | QuotaOwner::Conversation(_) => 24 * 60 * 60,
            QuotaOwner::MembershipChanges(_) => 60 * 60,
        }
    }
}

/// `amount` counted for `owner` in period `period` (periods of
/// [`QuotaOwner::period_s`] since the Unix epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaCharge {
    pub owner: QuotaOwner,
    pub period: u32,
    /// Positive: about to be used (bytes to store, a change to make);
    /// negative: a refund (the append turned out to be a duplicate, or the
    /// other quota refused).
    pub amount: i64,
    /// The period's quota: a positive charge that would exceed it is refused.
    pub limit: u64,
}

/// Result of [`ConversationStore::membership`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    /// No group with that id exists.
    NoSuchGroup,
    /// The group exists; the user is not a member.
    NotMember,
    /// The user is a member with this role.
    Member(pb::Role),
}

/// Per-conversation state: seq counter, dedup, history window, receipts,
/// group records. All keys of one conversation share one Redis hash tag.
pub trait ConversationStore {
    /// Append one message, atomically (one Lua script in Redis):
    ///
    /// 1. If a dedup entry for (`conversation_id`, `message.client_msg_id`)
    ///    exists and has not expired at `retention.now_ms`, return
    ///    [`Appended::Duplicate`] with the stored ack and change nothing.
    /// 2. Otherwise allocate `seq` = previous seq of the conversation + 1
    ///    (first message gets 1; seqs are never reused, never skipped, even
    ///    when the history window drops old messages), set `message.seq`,
    ///    append the message to the history, drop messages beyond
    ///    `retention.history_window` (oldest first), and store the ack
    ///    (`client_msg_id`, `message_id`, `conversation_id`, `seq`,
    ///    `server_time_ms`, all taken from the message) as dedup entry with
    ///    TTL `retention.dedup_ttl_ms`. Return [`Appended::Stored`].
    ///
    /// A store must deduplicate at least while the original is inside the
    /// history window and younger than the TTL (SPEC §6); it forgets the
    /// entry once either bound passes (both stores drop it with the message
    /// leaving the window, so dedup state is bounded by the window, not by
    /// traffic × TTL).
    ///
    /// A stored message of a direct conversation also records its sender as
    /// having written in it ([`ConversationStore::written_by_both`], the
    /// consent SPEC §10 asks before the conversation counts for presence),
    /// atomically with the append.
    ///
    /// The caller fills every other field of `message` (`message_id`,
    /// sender, `server_time_ms`, ...); the store keeps it as given.
    fn append_message(
        &mut self,
        conversation_id: &str,
        message: pb::Message,
        retention: &Retention,
    ) -> StoreResult<Appended>;

    /// Append several messages, in slice order, each exactly as
    /// [`ConversationStore::append_message`] would (each append is atomic on
    /// its own; several for one conversation get consecutive seqs in slice
    /// order). Results in input order. One pipelined round trip in Redis
    /// (so one AOF fsync for the whole batch). On an error any prefix of
    /// the appends may have taken effect; a retry is deduplicated.
    /// Provided as a loop; `RedisStore` overrides it.
    fn append_messages(
        &mut self,
        appends: Vec<(String, pb::Message)>,
        retention: &Retention,
    ) -> StoreResult<Vec<Appended>> {
        appends
            .into_iter()
            .map(|(conversation_id, message)| {
                self.append_message(&conversation_id, message, retention)
            })
            .collect()
    }

    /// For each message, the original SendAck [`append_messages`] would
    /// answer it with as a duplicate, or None if it would be stored; stores
    /// nothing. (A Send refused by a quota may be the retry of a stored one,
    /// which gets its ack, not the refusal.) One pipelined round trip.
    ///
    /// [`append_messages`]: ConversationStore::append_messages
    fn find_duplicates(
        &mut self,
        appends: Vec<(String, pb::Message)>,
        retention: &Retention,
    ) -> StoreResult<Vec<Option<pb::SendAck>>>;

    /// The store's history epoch (SPEC §7 "History epochs"): a non-zero
    /// value fixed when the stored history began, so it changes exactly when
    /// that history was lost or replaced (a memory store's process ended, a
    /// store file or Redis dataset was wiped or restored). Clients compare it
    /// to tell "my cursors are ahead of the server" from "I am up to date".
    /// Redis: one command (the key is created by the first read after a
    /// wipe).
    fn history_epoch(&mut self) -> StoreResult<u64>;

    /// The last allocated seq of each conversation (0 if none), in input
    /// order. One pipelined round trip.
    fn last_seqs(&mut self, conversation_ids: &[String]) -> StoreResult<Vec<u64>>;

    /// For each read, the stored messages with `seq > after_seq`, ascending,
    /// at most `limit` (the oldest of the range) and within `max_bytes`
    /// (the first always), in input order. Messages that left the history
    /// window are simply absent. One pipelined round trip.
    fn messages_after(&mut self, reads: &[RangeRead]) -> StoreResult<Vec<Vec<pb::Message>>>;

    /// The newest stored messages with `seq < before_seq` (any seq if
    /// `before_seq` is 0): at most `limit`, and of those the newest that fit
    /// in `max_bytes` ([`message_size`]; the newest always), returned
    /// ascending, and whether older ones exist in the stored window. The
    /// work is bounded by what is returned, not by `limit` × message size.
    fn messages_before(
        &mut self,
        conversation_id: &str,
        before_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> StoreResult<HistorySlice>;

    /// Quota counters: each charge on its own, in order, atomically. A
    /// positive charge is added if the owner's total for that period then
    /// stays within its `limit` (true), else nothing changes (false); a
    /// refund is always applied (true), never below 0. A period's counters
    /// may be forgotten once it is over (Redis: expiry; memory: replaced by
    /// the next period's, stale ones pruned). One pipelined round trip.
    fn charge_quotas(&mut self, charges: &[QuotaCharge]) -> StoreResult<Vec<bool>>;

    /// Distinct `sender_user_id`s of stored messages with
    /// `after_seq < seq <= up_to_seq`, any order.
    fn senders_between(
        &mut self,
        conversation_id: &str,
        after_seq: u64,
        up_to_seq: u64,
    ) -> StoreResult<Vec<String>>;

    /// Atomically raise the receipt mark of (`user_id`, `kind`) in the
    /// conversation to `up_to_seq`, if that is higher than the stored mark
    /// (0 when none). Returns `Some(previous mark)` if it was raised, `None`
    /// (and no change) if `up_to_seq` is not higher.
    fn advance_receipt(
        &mut self,
        conversation_id: &str,
        user_id: &str,
        kind: pb::ReceiptKind,
        up_to_seq: u64,
    ) -> StoreResult<Option<u64>>;

    /// Create a group record, atomically, only if no group with that id
    /// exists. Returns false (and changes nothing) if it exists.
    fn create_group(&mut self, group: &GroupRecord) -> StoreResult<bool>;

    /// The group records for these ids (`None` where no group exists), in
    /// input order, members ascending by user id. One pipelined round trip.
    fn groups(&mut self, conversation_ids: &[String]) -> StoreResult<Vec<Option<GroupRecord>>>;

    /// One user's standing in one group, without loading the member list.
    fn membership(&mut self, conversation_id: &str, user_id: &str) -> StoreResult<Membership>;

    /// Change a group's member list, atomically: every `upsert` member is
    /// added or gets the given role, then every user in `remove` is removed.
    /// Does nothing if the group does not exist.
    fn update_members(
        &mut self,
        conversation_id: &str,
        upsert: &[pb::Member],
        remove: &[String],
    ) -> StoreResult<()>;

    /// For each direct conversation id (`dm:<a>:<b>`), in input order,
    /// whether both of its users have written in it (each has a stored
    /// message there, [`ConversationStore::append_message`]; the marks stay
    /// when the messages leave the history window). One lookup per id,
    /// whatever the users' other conversations; one pipelined round trip.
    fn written_by_both(&mut self, direct_ids: &[String]) -> StoreResult<Vec<bool>>;

    /// For each of `user_ids`, in input order, whether it is a current
    /// member of the group (false for every user when there is no such
    /// group). One lookup per user, without loading the member list.
    fn members_among(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<Vec<bool>>;

    /// The group record for one id. Provided; implementations need not
    /// override it.
    fn group(&mut self, conversation_id: &str) -> StoreResult<Option<GroupRecord>> {
        Ok(self.groups(&[conversation_id.to_owned()])?.pop().flatten())
    }
}

/// How often one user was added to groups on one UTC day
/// ([`UserStore::group_adds_on`]): the counts SPEC §11's add limits check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupAdds {
    /// Adds by the one adder asked about.
    pub by_adder: u32,
    /// Adds by adders who were not the user's contacts (no direct
    /// conversation both had written in), all of them together.
    pub by_strangers: u32,
}

/// Per-user state: the user's conversation list, group list, pending push
/// marks and the day's group-add counts.
pub trait UserStore {
    /// Every conversation the user belongs to (direct conversations once
    /// created or written to, groups while a member), any order.
    fn conversations_of_user(&mut self, user_id: &str) -> StoreResult<Vec<String>>;

    /// Add `conversation_id` to each user's list (idempotent); a group
    /// (`grp:` id) also goes into each user's group list (what
    /// [`UserStore::group_counts`] counts and [`UserStore::presence_links`]
    /// walks). One pipelined round trip.
    fn add_conversation_to_users(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<()>;

    /// Remove `conversation_id` from each user's list, and from their group
    /// list for a group (idempotent).
    fn remove_conversation_from_users(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<()>;

    /// How many groups each user is in, in input order. One lookup per
    /// user (a count, not the list); one pipelined round trip.
    fn group_counts(&mut self, user_ids: &[String]) -> StoreResult<Vec<usize>>;

    /// For each `(viewer, other)` pair, in input order, whether the two
    /// share a conversation that counts for presence (SPEC §10): the direct
    /// conversation of the pair, once both have written in it
    /// ([`ConversationStore::written_by_both`]), or a group both are members
    /// of. A pair of one user with themself is false (the caller decides
    /// that case).
    ///
    /// The work is bounded and independent of `other`'s data: per pair one
    /// lookup of the pair's direct conversation (its id follows from the
    /// two user ids), then one membership probe of `other` per group of
    /// `viewer` (every probe made whether or not `other` exists); neither
    /// user's direct conversations are read, nor `other`'s group list. So
    /// the answer costs the same for a hidden user with 10,000 conversations
    /// as for an id never seen, and a viewer pays for its own groups only.
    /// Two pipelined round trips in Redis (the viewers' group lists with the
    /// direct-conversation lookups, then the probes).
    fn presence_links(&mut self, pairs: &[(&str, &str)]) -> StoreResult<Vec<bool>>;

    /// For each of `user_ids`, in input order, how often it was added to
    /// groups on UTC day `day` (days since the Unix epoch): by `adder`, and
    /// by strangers altogether ([`GroupAdds`]). One pipelined round trip.
    fn group_adds_on(
        &mut self,
        day: i64,
        adder: &str,
        user_ids: &[String],
    ) -> StoreResult<Vec<GroupAdds>>;

    /// Counts `adder`'s adds of these users to groups on UTC day `day`: one
    /// more by `adder` for each, and one more by strangers for those marked
    /// `true`. Counts of earlier days may be forgotten (they are kept at
    /// least until the day after). One pipelined round trip.
    fn count_group_adds(
        &mut self,
        day: i64,
        adder: &str,
        adds: &[(String, bool)],
    ) -> StoreResult<()>;

    /// Mark a push as pending for each (user, `conversation_id`); per user,
    /// `true` if it was not pending before (the caller emits a push event
    /// exactly for those), in input order. Marks have no TTL; they are
    /// cleared by [`UserStore::clear_push_pending`].
    fn mark_push_pending<U: AsRef<str>>(
        &mut self,
        conversation_id: &str,
        user_ids: &[U],
    ) -> StoreResult<Vec<bool>>;

    /// Clear the user's pending push mark for one conversation, or for all of
    /// them when `conversation_id` is `None`.
    fn clear_push_pending(
        &mut self,
        user_id: &str,
        conversation_id: Option<&str>,
    ) -> StoreResult<()>;
}

/// The registered connections of several users
/// ([`SessionStore::sessions_of_users`]): for each user asked about, in
/// order, the addresses of their devices, ascending by device id. Flat (two
/// allocations, however many users): a group's fan-out looks up every
/// member for every message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserSessions {
    addrs: Vec<SessionAddr>,
    /// User `i`'s addresses are `addrs[ends[i - 1]..ends[i]]` (from 0 for
    /// the first).
    ends: Vec<usize>,
}

impl UserSessions {
    pub fn with_capacity(users: usize) -> Self {
        Self {
            addrs: Vec::with_capacity(users),
            ends: Vec::with_capacity(users),
        }
    }

    /// Adds the next user's addresses.
    pub fn push_user(&mut self, addrs: impl IntoIterator<Item = SessionAddr>) {
        self.addrs.extend(addrs);
        self.ends.push(self.addrs.len());
    }

    /// How many users.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The addresses of the `user`-th user asked about (none past the end).
    pub fn of(&self, user: usize) -> &[SessionAddr] {
        let Some(&end) = self.ends.get(user) else {
            return &[];
        };
        let start = user.checked_sub(1).map_or(0, |i| self.ends[i]);
        &self.addrs[start..end]
    }

    /// Every user's addresses, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[SessionAddr]> {
        (0..self.len()).map(|user| self.of(user))
    }
}

impl FromIterator<Vec<SessionAddr>> for UserSessions {
    fn from_iter<I: IntoIterator<Item = Vec<SessionAddr>>>(users: I) -> Self {
        let mut sessions = UserSessions::default();
        for addrs in users {
            sessions.push_user(addrs);
        }
        sessions
    }
}

/// A connection that completed Hello, one opened again, or a registered
/// one that closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionChange {
    Opened(Session),
    /// A session its gateway had open when the store lost it (the gateway
    /// was reaped while it stalled, [`GatewayRegistry::rejoin_if_forgotten`]).
    /// Opened like any session unless its (user, device) is held by another
    /// connection: the device reconnected elsewhere meanwhile, so this
    /// connection is the older one and is the one replaced.
    Reopened(Session),
    Closed {
        session: Session,
        at_ms: i64,
    },
}

impl SessionChange {
    pub fn session(&self) -> &Session {
        match self {
            SessionChange::Opened(session)
            | SessionChange::Reopened(session)
            | SessionChange::Closed { session, .. } => session,
        }
    }
}

/// What [`SessionStore::apply_sessions`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionsApplied {
    /// Connections replaced by a newer one of the same (user, device), with
    /// the opened session that replaced them: each must get
    /// `GoAway(REPLACED)`.
    pub replaced: Vec<(Session, SessionAddr)>,
    /// Users who came online (first session on a live gateway) or went
    /// offline (their last session on a live gateway closed, `last_seen_ms`
    /// set to the close time), in change order.
    pub presence: Vec<pb::Presence>,
    /// Each session `Opened` (and recorded) in this batch whose user had
    /// sessions of other devices registered right before it, with those
    /// sessions' gateways (dead ones included; a store may leave this
    /// empty). A gateway with an account cap (SPEC §4,
    /// `max_connections_per_account`) closes an opened session that made
    /// one too many: opens are applied in order per user, so it is always
    /// the newest.
    pub opened_beside: Vec<(SessionAddr, Vec<Arc<str>>)>,
}

/// A user's presence as the store knows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserPresence {
    /// The user has at least one registered session on a live gateway.
    pub online: bool,
    /// When the user's last session closed; 0 when online or never seen.
    pub last_seen_ms: i64,
}

/// Session registry (user → device → address) and last seen, written in
/// batches of one gateway's changes. Watches are not here: they belong to
/// a connection, so they live with its gateway (`crate::presence::Watches`).
///
/// A session counts only while its gateway is alive: a gateway that
/// registered ([`GatewayRegistry::register_gateway`]) and whose lease ran
/// out is dead, and every read here leaves its sessions out. A gateway that
/// never registered (the embedded engine's) is always alive.
pub trait SessionStore {
    /// Apply one gateway's session changes in order and renew its lease
    /// (`lease_ttl` from now): ONE pipelined round trip in Redis however
    /// many changes (one more, reading leases, when a changed user has
    /// sessions on other gateways), so presence costs churn plus gateways, never
    /// connected users (DESIGN "presence without a heartbeat storm").
    ///
    /// - `Opened`: the (user, device) now maps to the session's address,
    ///   atomically per user; a different previous address is reported in
    ///   [`SessionsApplied::replaced`]; the user came online if they had no
    ///   session on a live gateway before; the user's pending push marks
    ///   are cleared.
    /// - `Reopened`: as `Opened` when the (user, device) is free or already
    ///   at this address; when another address holds it, nothing changes
    ///   and this session is reported replaced (by the holder) instead.
    /// - `Closed`: removed ONLY if the (user, device) is still registered at
    ///   that address (a replaced connection closing late must not remove
    ///   its replacement); if no session on a live gateway is left (and
    ///   this one counted), the user went offline and last-seen is `at_ms`.
    fn apply_sessions(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        now_ms: i64,
        changes: &[SessionChange],
    ) -> StoreResult<SessionsApplied>;

    /// Every session of each user on a live gateway, in input order (none
    /// for users without one), each user's ascending by device id. One
    /// pipelined round trip for all users. Generic over the id type so the
    /// router can pass ids it borrows (a Send's members) without copying
    /// them.
    fn sessions_of_users<U: AsRef<str>>(&mut self, user_ids: &[U]) -> StoreResult<UserSessions>;

    /// Presence of each user, in input order: online iff a session on a
    /// live gateway. One pipelined round trip.
    fn presence_of_users(&mut self, user_ids: &[String]) -> StoreResult<Vec<UserPresence>>;
}

/// The gateways that hold sessions, each alive while it renews its lease
/// (DESIGN: "a crashed gateway's lease expires and all its users go offline
/// together"). The lease is renewed by every
/// [`SessionStore::apply_sessions`] of the gateway.
pub trait GatewayRegistry {
    /// Register a gateway (lease `lease_ttl` from now; known from now on).
    /// Sessions a previous run with the same id left behind (a crash and
    /// restart inside the lease) are removed first; returns who went
    /// offline through that.
    fn register_gateway(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> StoreResult<Vec<pb::Presence>>;

    /// Renew a gateway's lease without session changes.
    fn renew_lease(&mut self, gateway_id: &str, lease_ttl: Duration, now_ms: i64) -> StoreResult<()>
    where
        Self: SessionStore,
    {
        self.apply_sessions(gateway_id, lease_ttl, now_ms, &[])
            .map(|_| ())
    }

    /// Registered gateways whose lease ran out and that nobody reaped yet.
    fn dead_gateways(&mut self) -> StoreResult<Vec<String>>;

    /// Take over a dead gateway: remove its sessions (users left without a
    /// session go offline with last-seen `now_ms`) and forget it. Returns
    /// who went offline, or `None` if another gateway (`reaper_id` names
    /// this one) is reaping it or already did.
    fn reap_gateway(
        &mut self,
        dead_gateway_id: &str,
        reaper_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Vec<pb::Presence>>>;

    /// Keeps a running gateway registered, renewing its lease. A gateway
    /// that stalled past its lease (a paused VM, a long GC) may have been
    /// taken for dead and reaped meanwhile: its sessions were removed and
    /// the registry forgot it, so nobody would reap it after a real crash.
    /// Then this registers it again, leaves its sessions alone, and returns
    /// true: the gateway must open its live sessions again.
    fn rejoin_if_forgotten(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> StoreResult<bool>;

    /// Clean shutdown of a gateway: its lease and registration go, its
    /// sessions are removed; returns who went offline.
    fn deregister_gateway(
        &mut self,
        gateway_id: &str,
        now_ms: i64,
    ) -> StoreResult<Vec<pb::Presence>>;
}

/// Everything the router needs; implemented for any type implementing the
/// parts.
pub trait Store:
    ConversationStore + UserStore + SessionStore + GatewayRegistry + PushStore + ChannelStore
{
}

impl<
        T: ConversationStore + UserStore + SessionStore + GatewayRegistry + PushStore + ChannelStore,
    > Store for T
{
}

/// A fresh history epoch: random ([`crate::logic::random_u64`]), never 0
/// (0 means "not announced" on the wire).
pub fn new_history_epoch() -> u64 {
    crate::logic::random_u64().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_targets_are_the_registered_devices_not_online() {
        let token = |device: &str| DeviceToken {
            device_id: device.into(),
            token: PushToken {
                platform: PushPlatform::Fcm,
                token: format!("t-{device}"),
                apns_environment: None,
                apns_topic: String::new(),
                locale: String::new(),
                registered_ms: 0,
            },
        };
        let context = PushContext {
            tokens: vec![token("desktop"), token("phone"), token("tablet")],
            ..PushContext::default()
        };
        let devices = |targets: Vec<&DeviceToken>| -> Vec<String> {
            targets.iter().map(|t| t.device_id.clone()).collect()
        };
        assert_eq!(
            devices(context.targets(&["desktop".into()])),
            ["phone", "tablet"]
        );
        assert_eq!(devices(context.targets(&[])).len(), 3);
        let muted = PushContext {
            muted: true,
            ..context.clone()
        };
        assert!(muted.targets(&[]).is_empty());
        let read = PushContext {
            already_read: true,
            ..context
        };
        assert!(read.targets(&[]).is_empty());
    }

    #[test]
    fn user_sessions_keep_each_users_addresses_apart() {
        let addr = |conn| SessionAddr {
            gateway_id: "g".into(),
            conn,
        };
        let sessions: UserSessions = [vec![], vec![addr(1), addr(2)], vec![], vec![addr(3)]]
            .into_iter()
            .collect();
        assert_eq!(sessions.len(), 4);
        let per_user: Vec<&[SessionAddr]> = sessions.iter().collect();
        assert_eq!(per_user, [&[][..], &[addr(1), addr(2)], &[], &[addr(3)]]);
        assert!(sessions.of(4).is_empty(), "past the end: none");
        assert!(UserSessions::default().is_empty());
    }
}
