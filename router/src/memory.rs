//! In-memory implementation of the store traits, for the embedded engine and
//! for tests. Single-threaded (`&mut self`): the embedded engine owns it on
//! its worker thread. Never fails.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use palaver_protocol::pb;

use crate::api::{Session, SessionAddr};
use crate::logic::Clock;
use crate::store::{
    Appended, Budget, ConversationStore, GatewayRegistry, GroupAdds, GroupRecord, HistorySlice,
    Membership, QuotaCharge, QuotaOwner, RangeRead, Retention, SessionChange, SessionStore,
    SessionsApplied, StoreResult, UserPresence, UserSessions, UserStore,
};

#[derive(Default)]
pub struct MemoryStore {
    conversations: HashMap<String, ConversationState>,
    users: HashMap<String, UserState>,
    /// Online devices and last seen, per user who ever had a session. Apart
    /// from `users` so an idle user (the common case: online, no messages)
    /// costs one small entry here and nothing there.
    presence: HashMap<Box<str>, DevicesOnline>,
    /// Gateway ids, shared by every device entry on that gateway (an embedded
    /// node has one), with how many devices hold each; an id goes when its
    /// last device does. Counted, not judged by `Arc::strong_count`: the
    /// addresses the store hands out share the id too.
    gateway_ids: HashMap<Arc<str>, usize>,
    /// Gateways that registered (`GatewayRegistry`): their sessions count
    /// only while their lease runs.
    known_gateways: HashSet<String>,
    /// Gateway → when its lease runs out (store clock, ms).
    leases: HashMap<String, i64>,
    /// Judges lease expiry; the system clock when `None` (a test injects a
    /// manual one to expire a lease without sleeping).
    clock: Option<Arc<dyn Clock>>,
    /// Entries [`UserStore::presence_links`] looked at, ever (see
    /// [`MemoryStore::visibility_lookups`]).
    visibility_lookups: u64,
    /// Quota counters: owner → (period, used). Entries of periods that are
    /// over are pruned whenever the map has doubled since the last prune.
    quotas: HashMap<QuotaOwner, (u32, u64)>,
    quotas_pruned_at: usize,
}

#[derive(Default)]
struct ConversationState {
    last_seq: u64,
    /// The stored window (contiguous seqs, oldest first) and its dedup index.
    history: History,
    /// (user, receipt kind) → mark
    receipts: HashMap<(String, i32), u64>,
    group: Option<GroupState>,
    /// A direct conversation `dm:<a>:<b>`: bit 0 set once `a` has written
    /// in it, bit 1 once `b` has (SPEC §10: it counts for presence when
    /// both are set).
    direct_writers: u8,
}

/// Messages per history chunk. Bounds the work of any one append: no
/// structure in a conversation's history ever moves more than one chunk.
const CHUNK: usize = 256;

/// A conversation's history window as a ring of fixed-size chunks, each with
/// its own client_msg_id → offset index. Dedup is tied to the window: an id
/// is remembered while its message is stored (and within the dedup TTL), and
/// forgotten with it, so memory is bounded by `history_window` (+ one chunk) messages
/// whatever the traffic. Chunks after the first are allocated at full
/// capacity, and the chunk evicted from the front is recycled for the next
/// one, so steady-state appends never rehash, reallocate or copy a window.
#[derive(Default)]
struct History {
    /// All chunks but the last are full (`CHUNK` messages).
    chunks: VecDeque<Chunk>,
    /// Messages already evicted from the front chunk.
    head: usize,
    /// Messages in the window.
    len: usize,
    /// The last evicted chunk, cleared, kept for reuse.
    spare: Option<Chunk>,
    /// Random keys for client_msg_id fingerprints: an id is hashed once per
    /// append, whatever the number of chunks probed.
    keys: std::hash::RandomState,
}

/// Chunk index: keyed fingerprint of (sender, client_msg_id) → (offset in
/// `messages`, dedup expiry ms). The fingerprint is already a hash.
type FingerprintMap = HashMap<u64, (usize, i64), std::hash::BuildHasherDefault<Fingerprint>>;

#[derive(Default)]
struct Chunk {
    messages: Vec<pb::Message>,
    ids: FingerprintMap,
    /// Entries whose fingerprint another id of this chunk already has
    /// (a 64-bit collision; almost always empty). Matches are always
    /// confirmed against the stored message's id.
    collided: Vec<(usize, i64)>,
}

impl Chunk {
    fn with_capacity(n: usize) -> Self {
        Chunk {
            messages: Vec::with_capacity(n),
            ids: FingerprintMap::with_capacity_and_hasher(n, Default::default()),
            collided: Vec::new(),
        }
    }
}

/// Identity hasher for keys that are already keyed hashes.
#[derive(Default)]
struct Fingerprint(u64);

impl std::hash::Hasher for Fingerprint {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl History {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, i: usize) -> Option<&pb::Message> {
        if i >= self.len {
            return None;
        }
        let at = self.head + i;
        self.chunks.get(at / CHUNK)?.messages.get(at % CHUNK)
    }

    fn front(&self) -> Option<&pb::Message> {
        self.get(0)
    }

    fn range(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = &pb::Message> {
        let end = range.end.min(self.len);
        (range.start.min(end)..end).filter_map(move |i| self.get(i))
    }

    fn range_from(&self, start: usize) -> impl Iterator<Item = &pb::Message> {
        self.range(start..self.len)
    }

    /// The stored message `sender` sent with this client_msg_id, if it is
    /// in the window and its dedup entry has not expired at `now_ms`.
    fn find(&self, sender: &str, client_msg_id: &[u8], now_ms: i64) -> Option<&pb::Message> {
        use std::hash::BuildHasher;
        let fp = self.keys.hash_one((sender, client_msg_id));
        // Newest first: retries are usually recent, and an id stored again
        // after its first message left the window maps to the live one.
        for (ci, chunk) in self.chunks.iter().enumerate().rev() {
            let hit = chunk
                .ids
                .get(&fp)
                .into_iter()
                .chain(chunk.collided.iter().rev())
                .copied()
                .find(|&(offset, _)| {
                    // Evicted entries (front chunk, before head) are skipped.
                    !(ci == 0 && offset < self.head)
                        && chunk.messages.get(offset).is_some_and(|m| {
                            m.client_msg_id == client_msg_id && m.sender_user_id == sender
                        })
                });
            if let Some((offset, expires)) = hit {
                // The newest entry for this id decides.
                return (expires > now_ms).then(|| &chunk.messages[offset]);
            }
        }
        None
    }

    fn push_back(&mut self, message: pb::Message, dedup_expires_ms: i64) {
        let need_chunk = self.chunks.back().is_none_or(|c| c.messages.len() == CHUNK);
        if need_chunk {
            let chunk = match self.spare.take() {
                Some(chunk) => chunk,
                // The first chunk grows on demand (small conversations stay
                // small); later ones are allocated whole, once.
                None if self.chunks.is_empty() => Chunk::default(),
                None => Chunk::with_capacity(CHUNK),
            };
            self.chunks.push_back(chunk);
        }
        use std::hash::BuildHasher;
        let fp = self.keys.hash_one((
            message.sender_user_id.as_str(),
            message.client_msg_id.as_slice(),
        ));
        let chunk = self.chunks.back_mut().expect("chunk pushed");
        let entry = (chunk.messages.len(), dedup_expires_ms);
        let other_id = chunk.ids.get(&fp).is_some_and(|&(offset, _)| {
            let other = &chunk.messages[offset];
            other.client_msg_id != message.client_msg_id
                || other.sender_user_id != message.sender_user_id
        });
        if other_id {
            chunk.collided.push(entry);
        } else {
            // New, or the same id again (its older entry left the window).
            chunk.ids.insert(fp, entry);
        }
        chunk.messages.push(message);
        self.len += 1;
    }

    fn pop_front(&mut self) {
        if self.len == 0 {
            return;
        }
        self.len -= 1;
        self.head += 1;
        // Free the message's payload now; the slot goes with its chunk.
        if let Some(front) = self.chunks.front_mut() {
            if let Some(m) = front.messages.get_mut(self.head - 1) {
                *m = pb::Message::default();
            }
        }
        if self.head == CHUNK || self.len == 0 {
            let mut chunk = self.chunks.pop_front().expect("front chunk");
            self.head = 0;
            chunk.messages.clear();
            chunk.ids.clear();
            chunk.collided.clear();
            if chunk.messages.capacity() >= CHUNK {
                self.spare = Some(chunk);
            }
        }
    }
}

struct GroupState {
    title: String,
    members: BTreeMap<String, pb::Role>,
    created_ms: i64,
}

#[derive(Default)]
struct UserState {
    conversations: BTreeSet<String>,
    /// The groups among `conversations` (walked by
    /// [`UserStore::presence_links`], counted for the per-user group cap).
    groups: HashSet<String>,
    push_pending: HashSet<String>,
    /// The latest day's group-add counts (older days are forgotten).
    adds: Option<DayAdds>,
}

/// One UTC day's adds of a user to groups (SPEC §11's add limits).
struct DayAdds {
    day: i64,
    by_adder: HashMap<String, u32>,
    by_strangers: u32,
}

/// A user's online devices, ascending by device id (a Vec, not a map: users
/// have one to a few devices, and the embedded gateway pays this per
/// connection: ~190 bytes for a one-device user with the map entry), and
/// when the last one went offline.
#[derive(Default)]
struct DevicesOnline {
    devices: Vec<DeviceOnline>,
    last_seen_ms: i64,
}

struct DeviceOnline {
    device_id: Box<str>,
    gateway_id: Arc<str>,
    conn: u64,
}

impl DeviceOnline {
    fn addr(&self) -> SessionAddr {
        SessionAddr {
            gateway_id: self.gateway_id.clone(),
            conn: self.conn,
        }
    }

    fn is_at(&self, addr: &SessionAddr) -> bool {
        self.conn == addr.conn && *self.gateway_id == *addr.gateway_id
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose gateway leases run out by `clock`.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock: Some(clock),
            ..Self::default()
        }
    }

    /// How many entries [`UserStore::presence_links`] has looked at since
    /// the store was made: per pair, the pair's direct conversation and one
    /// probe per group of the viewer. Tests use it to check that the work
    /// of a presence answer does not depend on data the asker may not see.
    pub fn visibility_lookups(&self) -> u64 {
        self.visibility_lookups
    }

    /// Drops a device's hold on its gateway id; the id goes with the last.
    fn release_gateway_id(&mut self, id: &str) {
        if let Some(devices) = self.gateway_ids.get_mut(id) {
            *devices -= 1;
            if *devices == 0 {
                self.gateway_ids.remove(id);
            }
        }
    }
}

impl ConversationState {
    /// The ack of the stored original of `message` (same sender and
    /// client_msg_id), while it is in the window and within the dedup TTL.
    fn duplicate_of(
        &self,
        conversation_id: &str,
        message: &pb::Message,
        retention: &Retention,
    ) -> Option<pb::SendAck> {
        let original = self.history.find(
            &message.sender_user_id,
            &message.client_msg_id,
            retention.now_ms,
        )?;
        Some(pb::SendAck {
            client_msg_id: original.client_msg_id.clone(),
            message_id: original.message_id.clone(),
            conversation_id: conversation_id.to_owned(),
            seq: original.seq,
            server_time_ms: original.server_time_ms,
        })
    }

    /// Index into `history` of the first message with seq > `after_seq`.
    fn index_after(&self, after_seq: u64) -> usize {
        match self.history.front() {
            None => 0,
            Some(first) => (after_seq + 1)
                .saturating_sub(first.seq)
                .min(self.history.len() as u64) as usize,
        }
    }
}

impl ConversationStore for MemoryStore {
    fn append_message(
        &mut self,
        conversation_id: &str,
        mut message: pb::Message,
        retention: &Retention,
    ) -> StoreResult<Appended> {
        // Looked up before `entry`, which would copy the id every time.
        let state = match self.conversations.get_mut(conversation_id) {
            Some(state) => state,
            None => self
                .conversations
                .entry(conversation_id.to_owned())
                .or_default(),
        };
        // Dedup is tied to the history window (see `History`): the original
        // is remembered while it is stored and its dedup TTL has not passed.
        if let Some(ack) = state.duplicate_of(conversation_id, &message, retention) {
            return Ok(Appended::Duplicate(ack));
        }
        state.last_seq += 1;
        message.seq = state.last_seq;
        if let Some((a, b)) = palaver_protocol::parse_direct(conversation_id) {
            if message.sender_user_id == a {
                state.direct_writers |= 1;
            } else if message.sender_user_id == b {
                state.direct_writers |= 2;
            }
        }
        let expires = retention.now_ms.saturating_add(retention.dedup_ttl_ms);
        state.history.push_back(message.clone(), expires);
        while state.history.len() > retention.history_window {
            state.history.pop_front();
        }
        Ok(Appended::Stored(message))
    }

    fn last_seqs(&mut self, conversation_ids: &[String]) -> StoreResult<Vec<u64>> {
        Ok(conversation_ids
            .iter()
            .map(|id| self.conversations.get(id).map_or(0, |c| c.last_seq))
            .collect())
    }

    fn messages_after(&mut self, reads: &[RangeRead]) -> StoreResult<Vec<Vec<pb::Message>>> {
        Ok(reads
            .iter()
            .map(|read| match self.conversations.get(&read.conversation_id) {
                None => Vec::new(),
                Some(state) => {
                    let mut budget = Budget::new(read.max_bytes);
                    state
                        .history
                        .range_from(state.index_after(read.after_seq))
                        .take(read.limit)
                        .take_while(|m| budget.take(m))
                        .cloned()
                        .collect()
                }
            })
            .collect())
    }

    fn messages_before(
        &mut self,
        conversation_id: &str,
        before_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> StoreResult<HistorySlice> {
        let Some(state) = self.conversations.get(conversation_id) else {
            return Ok(HistorySlice::default());
        };
        let end = if before_seq == 0 {
            state.history.len()
        } else {
            state.index_after(before_seq - 1)
        };
        // Newest first, only what fits is cloned.
        let mut budget = Budget::new(max_bytes);
        let mut start = end;
        while start > end.saturating_sub(limit) {
            match state.history.get(start - 1) {
                Some(m) if budget.take(m) => start -= 1,
                _ => break,
            }
        }
        Ok(HistorySlice {
            messages: state.history.range(start..end).cloned().collect(),
            has_more: start > 0,
        })
    }

    fn find_duplicates(
        &mut self,
        appends: Vec<(String, pb::Message)>,
        retention: &Retention,
    ) -> StoreResult<Vec<Option<pb::SendAck>>> {
        Ok(appends
            .iter()
            .map(|(conversation_id, message)| {
                self.conversations.get(conversation_id)?.duplicate_of(
                    conversation_id,
                    message,
                    retention,
                )
            })
            .collect())
    }

    fn charge_quotas(&mut self, charges: &[QuotaCharge]) -> StoreResult<Vec<bool>> {
        let granted = charges
            .iter()
            .map(|charge| {
                let amount = charge.amount.unsigned_abs();
                let (period, used) = self
                    .quotas
                    .entry(charge.owner.clone())
                    .or_insert((charge.period, 0));
                if charge.period > *period {
                    *period = charge.period;
                    *used = 0;
                }
                if charge.period < *period {
                    // A period that is over: nothing left to count against.
                    return charge.amount <= 0 || amount <= charge.limit;
                }
                if charge.amount <= 0 {
                    *used = used.saturating_sub(amount);
                    return true;
                }
                let after = used.saturating_add(amount);
                if after > charge.limit {
                    return false;
                }
                *used = after;
                true
            })
            .collect();
        if self.quotas.len() > 2 * self.quotas_pruned_at.max(1024) {
            let now_s = self.now_ms() / 1000;
            self.quotas.retain(|owner, (period, _)| {
                let current = now_s / i64::from(owner.period_s());
                i64::from(*period) >= current
            });
            self.quotas_pruned_at = self.quotas.len();
        }
        Ok(granted)
    }

    fn senders_between(
        &mut self,
        conversation_id: &str,
        after_seq: u64,
        up_to_seq: u64,
    ) -> StoreResult<Vec<String>> {
        let Some(state) = self.conversations.get(conversation_id) else {
            return Ok(Vec::new());
        };
        let mut senders = BTreeSet::new();
        for message in state.history.range_from(state.index_after(after_seq)) {
            if message.seq > up_to_seq {
                break;
            }
            senders.insert(message.sender_user_id.as_str());
        }
        Ok(senders.into_iter().map(str::to_owned).collect())
    }

    fn advance_receipt(
        &mut self,
        conversation_id: &str,
        user_id: &str,
        kind: pb::ReceiptKind,
        up_to_seq: u64,
    ) -> StoreResult<Option<u64>> {
        let state = self
            .conversations
            .entry(conversation_id.to_owned())
            .or_default();
        let mark = state
            .receipts
            .entry((user_id.to_owned(), kind as i32))
            .or_insert(0);
        if up_to_seq > *mark {
            let previous = *mark;
            *mark = up_to_seq;
            Ok(Some(previous))
        } else {
            Ok(None)
        }
    }

    fn create_group(&mut self, group: &GroupRecord) -> StoreResult<bool> {
        let state = self
            .conversations
            .entry(group.conversation_id.clone())
            .or_default();
        if state.group.is_some() {
            return Ok(false);
        }
        state.group = Some(GroupState {
            title: group.title.clone(),
            members: group
                .members
                .iter()
                .map(|m| (m.user_id.clone(), m.role()))
                .collect(),
            created_ms: group.created_ms,
        });
        Ok(true)
    }

    fn groups(&mut self, conversation_ids: &[String]) -> StoreResult<Vec<Option<GroupRecord>>> {
        Ok(conversation_ids
            .iter()
            .map(|id| {
                let group = self.conversations.get(id)?.group.as_ref()?;
                Some(GroupRecord {
                    conversation_id: id.clone(),
                    title: group.title.clone(),
                    members: group
                        .members
                        .iter()
                        .map(|(user_id, role)| pb::Member {
                            user_id: user_id.clone(),
                            role: *role as i32,
                        })
                        .collect(),
                    created_ms: group.created_ms,
                })
            })
            .collect())
    }

    fn membership(&mut self, conversation_id: &str, user_id: &str) -> StoreResult<Membership> {
        let group = self
            .conversations
            .get(conversation_id)
            .and_then(|c| c.group.as_ref());
        Ok(match group {
            None => Membership::NoSuchGroup,
            Some(g) => match g.members.get(user_id) {
                None => Membership::NotMember,
                Some(role) => Membership::Member(*role),
            },
        })
    }

    fn update_members(
        &mut self,
        conversation_id: &str,
        upsert: &[pb::Member],
        remove: &[String],
    ) -> StoreResult<()> {
        let group = self
            .conversations
            .get_mut(conversation_id)
            .and_then(|c| c.group.as_mut());
        if let Some(group) = group {
            for member in upsert {
                group.members.insert(member.user_id.clone(), member.role());
            }
            for user_id in remove {
                group.members.remove(user_id);
            }
        }
        Ok(())
    }

    fn written_by_both(&mut self, direct_ids: &[String]) -> StoreResult<Vec<bool>> {
        Ok(direct_ids
            .iter()
            .map(|id| self.direct_written_by_both(id))
            .collect())
    }

    fn members_among(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<Vec<bool>> {
        let group = self
            .conversations
            .get(conversation_id)
            .and_then(|c| c.group.as_ref());
        Ok(user_ids
            .iter()
            .map(|u| group.is_some_and(|g| g.members.contains_key(u)))
            .collect())
    }
}

impl MemoryStore {
    fn direct_written_by_both(&self, direct_id: &str) -> bool {
        self.conversations
            .get(direct_id)
            .is_some_and(|c| c.direct_writers == 3)
    }
}

/// The groups of a user with none.
fn no_groups() -> &'static HashSet<String> {
    static NONE: std::sync::OnceLock<HashSet<String>> = std::sync::OnceLock::new();
    NONE.get_or_init(HashSet::new)
}

impl UserStore for MemoryStore {
    fn conversations_of_user(&mut self, user_id: &str) -> StoreResult<Vec<String>> {
        Ok(self
            .users
            .get(user_id)
            .map(|u| u.conversations.iter().cloned().collect())
            .unwrap_or_default())
    }

    fn add_conversation_to_users(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<()> {
        let group = palaver_protocol::is_group_id(conversation_id);
        for user_id in user_ids {
            let user = self.users.entry(user_id.clone()).or_default();
            if !user.conversations.contains(conversation_id) {
                user.conversations.insert(conversation_id.to_owned());
            }
            if group && !user.groups.contains(conversation_id) {
                user.groups.insert(conversation_id.to_owned());
            }
        }
        Ok(())
    }

    fn remove_conversation_from_users(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<()> {
        for user_id in user_ids {
            if let Some(user) = self.users.get_mut(user_id) {
                user.conversations.remove(conversation_id);
                user.groups.remove(conversation_id);
            }
        }
        Ok(())
    }

    fn group_counts(&mut self, user_ids: &[String]) -> StoreResult<Vec<usize>> {
        Ok(user_ids
            .iter()
            .map(|u| self.users.get(u).map_or(0, |u| u.groups.len()))
            .collect())
    }

    fn presence_links(&mut self, pairs: &[(&str, &str)]) -> StoreResult<Vec<bool>> {
        let mut lookups = 0u64;
        let links = pairs
            .iter()
            .map(|&(viewer, other)| {
                // The pair's direct conversation: one lookup by its id.
                lookups += 1;
                let direct = viewer != other
                    && self.direct_written_by_both(&palaver_protocol::direct_conversation_id(
                        viewer, other,
                    ));
                // One probe of `other`'s groups per group of the viewer,
                // all of them, whether `other` exists or not (no early
                // exit: the work is the viewer's, not `other`'s).
                let theirs = self.users.get(other).map_or(no_groups(), |u| &u.groups);
                let mine = self.users.get(viewer).map_or(no_groups(), |u| &u.groups);
                let mut shared = false;
                for group in mine {
                    lookups += 1;
                    shared |= theirs.contains(group);
                }
                direct || (viewer != other && shared)
            })
            .collect();
        self.visibility_lookups += lookups;
        Ok(links)
    }

    fn group_adds_on(
        &mut self,
        day: i64,
        adder: &str,
        user_ids: &[String],
    ) -> StoreResult<Vec<GroupAdds>> {
        Ok(user_ids
            .iter()
            .map(|u| {
                let adds = self.users.get(u).and_then(|u| u.adds.as_ref());
                match adds {
                    Some(adds) if adds.day == day => GroupAdds {
                        by_adder: adds.by_adder.get(adder).copied().unwrap_or(0),
                        by_strangers: adds.by_strangers,
                    },
                    _ => GroupAdds::default(),
                }
            })
            .collect())
    }

    fn count_group_adds(
        &mut self,
        day: i64,
        adder: &str,
        adds: &[(String, bool)],
    ) -> StoreResult<()> {
        for (user_id, stranger) in adds {
            let user = self.users.entry(user_id.clone()).or_default();
            let counts = match &mut user.adds {
                Some(counts) if counts.day == day => counts,
                other => other.insert(DayAdds {
                    day,
                    by_adder: HashMap::new(),
                    by_strangers: 0,
                }),
            };
            *counts.by_adder.entry(adder.to_owned()).or_default() += 1;
            if *stranger {
                counts.by_strangers += 1;
            }
        }
        Ok(())
    }

    fn mark_push_pending<U: AsRef<str>>(
        &mut self,
        conversation_id: &str,
        user_ids: &[U],
    ) -> StoreResult<Vec<bool>> {
        Ok(user_ids
            .iter()
            .map(|user_id| {
                let user_id = user_id.as_ref();
                // Looked up before `entry`, which would copy the id every time.
                let user = match self.users.get_mut(user_id) {
                    Some(user) => user,
                    None => self.users.entry(user_id.to_owned()).or_default(),
                };
                if user.push_pending.contains(conversation_id) {
                    false
                } else {
                    user.push_pending.insert(conversation_id.to_owned())
                }
            })
            .collect())
    }

    fn clear_push_pending(
        &mut self,
        user_id: &str,
        conversation_id: Option<&str>,
    ) -> StoreResult<()> {
        if let Some(user) = self.users.get_mut(user_id) {
            match conversation_id {
                Some(id) => {
                    user.push_pending.remove(id);
                }
                None => user.push_pending.clear(),
            }
        }
        Ok(())
    }
}

/// Result of registering one session.
struct Opened {
    /// The device's previous address, if it was another one.
    replaced: Option<SessionAddr>,
    /// The user had no session on a live gateway before.
    came_online: bool,
}

impl MemoryStore {
    /// The address holding `session`'s (user, device), if it is another.
    fn device_held_elsewhere(&self, session: &Session) -> Option<SessionAddr> {
        let user = self.presence.get(session.user_id.as_str())?;
        let i = user
            .devices
            .binary_search_by(|d| (*d.device_id).cmp(&session.device_id))
            .ok()?;
        let holder = &user.devices[i];
        (!holder.is_at(&session.addr)).then(|| holder.addr())
    }

    /// Registers one session, replacing its device's previous one.
    fn open_session(&mut self, session: &Session) -> Opened {
        // Sessions on dead gateways do not count, as in every read.
        let came_online = !self.has_live_session(&session.user_id);
        let gateway_id = match self.gateway_ids.get_key_value(&*session.addr.gateway_id) {
            Some((id, _)) => id.clone(),
            None => session.addr.gateway_id.clone(),
        };
        *self.gateway_ids.entry(gateway_id.clone()).or_insert(0) += 1;
        let user = match self.presence.get_mut(session.user_id.as_str()) {
            Some(user) => user,
            None => self
                .presence
                .entry(session.user_id.as_str().into())
                .or_default(),
        };
        let device = DeviceOnline {
            device_id: session.device_id.as_str().into(),
            gateway_id,
            conn: session.addr.conn,
        };
        let previous = match user
            .devices
            .binary_search_by(|d| (*d.device_id).cmp(&session.device_id))
        {
            Ok(i) => Some(std::mem::replace(&mut user.devices[i], device)),
            Err(i) => {
                // Exact growth: one device is the common case, and a Vec's
                // first push would make room for four (+128 B per idle
                // connection).
                user.devices.reserve_exact(1);
                user.devices.insert(i, device);
                None
            }
        };
        if came_online {
            user.last_seen_ms = 0;
        }
        let replaced = previous.and_then(|old| {
            let addr = (!old.is_at(&session.addr)).then(|| old.addr());
            self.release_gateway_id(&old.gateway_id);
            addr
        });
        Opened {
            replaced,
            came_online,
        }
    }

    /// Removes the session if its device is still at its address; true if
    /// the user went offline through that (last seen is then `at_ms`): it
    /// was their last session, or it `counted` (its gateway is alive) and
    /// every session left is on a dead gateway.
    fn close_session(&mut self, session: &Session, at_ms: i64, counted: bool) -> bool {
        let Some(user) = self.presence.get_mut(session.user_id.as_str()) else {
            return false;
        };
        let Some(i) = user
            .devices
            .iter()
            .position(|d| *d.device_id == *session.device_id && d.is_at(&session.addr))
        else {
            return false;
        };
        let gone = user.devices.remove(i);
        let last = user.devices.is_empty();
        if last {
            // Give back the allocation: offline users should cost nothing here.
            user.devices = Vec::new();
        }
        self.release_gateway_id(&gone.gateway_id);
        // A session of a dead gateway did not count, so removing it (a reap)
        // changes nothing while the user has another session.
        let went_offline = last || counted && !self.has_live_session(&session.user_id);
        if went_offline {
            if let Some(user) = self.presence.get_mut(session.user_id.as_str()) {
                user.last_seen_ms = at_ms;
            }
        }
        went_offline
    }

    /// Whether the user has a session on a live gateway.
    fn has_live_session(&self, user_id: &str) -> bool {
        let now_ms = self.lease_now_ms();
        self.presence.get(user_id).is_some_and(|user| {
            user.devices
                .iter()
                .any(|d| self.gateway_alive(&d.gateway_id, now_ms))
        })
    }

    /// Whether sessions on `gateway_id` count: a gateway that registered
    /// and whose lease ran out is dead (one that never registered, like the
    /// embedded engine's own, is alive).
    fn gateway_alive(&self, gateway_id: &str, now_ms: i64) -> bool {
        // No registered gateway (the embedded engine): no hashing per device.
        self.known_gateways.is_empty()
            || !self.known_gateways.contains(gateway_id)
            || self
                .leases
                .get(gateway_id)
                .is_some_and(|expires_ms| *expires_ms > now_ms)
    }

    /// The store's clock, for lease expiry.
    fn now_ms(&self) -> i64 {
        match &self.clock {
            Some(clock) => clock.now_ms(),
            None => crate::logic::SystemClock.now_ms(),
        }
    }

    /// The time leases are judged at; not read when no gateway registered
    /// (the embedded engine's hot path: every fan-out reads sessions).
    fn lease_now_ms(&self) -> i64 {
        if self.known_gateways.is_empty() {
            0
        } else {
            self.now_ms()
        }
    }

    /// Removes every session on `gateway_id` (a scan of all users: reaping
    /// is rare, and an index per connection would cost every connection
    /// memory); returns who went offline. `counted`: the gateway is alive,
    /// so its sessions counted until now.
    fn remove_sessions_of(
        &mut self,
        gateway_id: &str,
        now_ms: i64,
        counted: bool,
    ) -> Vec<pb::Presence> {
        let on_gateway: Vec<Session> = self
            .presence
            .iter()
            .flat_map(|(user_id, user)| {
                user.devices
                    .iter()
                    .filter(|d| *d.gateway_id == *gateway_id)
                    .map(|d| Session {
                        user_id: user_id.to_string(),
                        device_id: d.device_id.to_string(),
                        addr: d.addr(),
                    })
            })
            .collect();
        let mut offline = Vec::new();
        for session in on_gateway {
            if self.close_session(&session, now_ms, counted) {
                offline.push(pb::Presence {
                    user_id: session.user_id,
                    online: false,
                    last_seen_ms: now_ms,
                });
            }
        }
        offline
    }
}

impl SessionStore for MemoryStore {
    fn apply_sessions(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        _now_ms: i64,
        changes: &[SessionChange],
    ) -> StoreResult<SessionsApplied> {
        let expires_ms = self.now_ms().saturating_add(lease_ttl.as_millis() as i64);
        match self.leases.get_mut(gateway_id) {
            Some(lease) => *lease = expires_ms,
            None => {
                self.leases.insert(gateway_id.to_owned(), expires_ms);
            }
        }
        let mut applied = SessionsApplied::default();
        for change in changes {
            match change {
                SessionChange::Opened(session) | SessionChange::Reopened(session) => {
                    let held_elsewhere = match change {
                        SessionChange::Reopened(_) => self.device_held_elsewhere(session),
                        _ => None,
                    };
                    if let Some(holder) = held_elsewhere {
                        // The device reconnected elsewhere: this one is older.
                        let by = Session {
                            addr: holder,
                            ..session.clone()
                        };
                        applied.replaced.push((by, session.addr.clone()));
                        continue;
                    }
                    let opened = self.open_session(session);
                    if let Some(old) = opened.replaced {
                        applied.replaced.push((session.clone(), old));
                    }
                    if opened.came_online {
                        applied.presence.push(pb::Presence {
                            user_id: session.user_id.clone(),
                            online: true,
                            last_seen_ms: 0,
                        });
                    }
                    self.clear_push_pending(&session.user_id, None)?;
                }
                SessionChange::Closed { session, at_ms } => {
                    let counted = self.gateway_alive(&session.addr.gateway_id, self.lease_now_ms());
                    if self.close_session(session, *at_ms, counted) {
                        applied.presence.push(pb::Presence {
                            user_id: session.user_id.clone(),
                            online: false,
                            last_seen_ms: *at_ms,
                        });
                    }
                }
            }
        }
        Ok(applied)
    }

    fn sessions_of_users<U: AsRef<str>>(&mut self, user_ids: &[U]) -> StoreResult<UserSessions> {
        let now_ms = self.lease_now_ms();
        let mut sessions = UserSessions::with_capacity(user_ids.len());
        for user_id in user_ids {
            let devices = self
                .presence
                .get(user_id.as_ref())
                .map_or(&[][..], |user| &user.devices);
            sessions.push_user(
                devices
                    .iter()
                    .filter(|d| self.gateway_alive(&d.gateway_id, now_ms))
                    .map(DeviceOnline::addr),
            );
        }
        Ok(sessions)
    }

    fn presence_of_users(&mut self, user_ids: &[String]) -> StoreResult<Vec<UserPresence>> {
        let now_ms = self.lease_now_ms();
        Ok(user_ids
            .iter()
            .map(|user_id| match self.presence.get(user_id.as_str()) {
                None => UserPresence::default(),
                Some(user)
                    if user
                        .devices
                        .iter()
                        .any(|d| self.gateway_alive(&d.gateway_id, now_ms)) =>
                {
                    UserPresence {
                        online: true,
                        last_seen_ms: 0,
                    }
                }
                Some(user) => UserPresence {
                    online: false,
                    last_seen_ms: user.last_seen_ms,
                },
            })
            .collect())
    }
}

impl GatewayRegistry for MemoryStore {
    fn register_gateway(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> StoreResult<Vec<pb::Presence>> {
        let alive = self.gateway_alive(gateway_id, self.lease_now_ms());
        let offline = self.remove_sessions_of(gateway_id, now_ms, alive);
        let expires_ms = self.now_ms().saturating_add(lease_ttl.as_millis() as i64);
        self.leases.insert(gateway_id.to_owned(), expires_ms);
        self.known_gateways.insert(gateway_id.to_owned());
        Ok(offline)
    }

    fn dead_gateways(&mut self) -> StoreResult<Vec<String>> {
        let now_ms = self.now_ms();
        Ok(self
            .known_gateways
            .iter()
            .filter(|g| !self.gateway_alive(g, now_ms))
            .cloned()
            .collect())
    }

    fn reap_gateway(
        &mut self,
        dead_gateway_id: &str,
        _reaper_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Vec<pb::Presence>>> {
        // One thread owns the store: no lock needed, a reaped gateway is
        // simply no longer known.
        if !self.known_gateways.remove(dead_gateway_id) {
            return Ok(None);
        }
        self.leases.remove(dead_gateway_id);
        Ok(Some(self.remove_sessions_of(
            dead_gateway_id,
            now_ms,
            false,
        )))
    }

    fn rejoin_if_forgotten(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        _now_ms: i64,
    ) -> StoreResult<bool> {
        let expires_ms = self.now_ms().saturating_add(lease_ttl.as_millis() as i64);
        self.leases.insert(gateway_id.to_owned(), expires_ms);
        Ok(self.known_gateways.insert(gateway_id.to_owned()))
    }

    fn deregister_gateway(
        &mut self,
        gateway_id: &str,
        now_ms: i64,
    ) -> StoreResult<Vec<pb::Presence>> {
        let alive = self.gateway_alive(gateway_id, self.lease_now_ms());
        let offline = self.remove_sessions_of(gateway_id, now_ms, alive);
        self.known_gateways.remove(gateway_id);
        self.leases.remove(gateway_id);
        Ok(offline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retention(now_ms: i64, window: usize) -> Retention {
        Retention {
            now_ms,
            dedup_ttl_ms: 1000,
            history_window: window,
        }
    }

    fn message(cmid: u8, sender: &str) -> pb::Message {
        pb::Message {
            conversation_id: "c".into(),
            client_msg_id: vec![cmid; 16],
            message_id: format!("m{cmid}"),
            sender_user_id: sender.into(),
            ..Default::default()
        }
    }

    fn stored(a: Appended) -> pb::Message {
        match a {
            Appended::Stored(m) => m,
            Appended::Duplicate(ack) => panic!("unexpected duplicate {ack:?}"),
        }
    }

    #[test]
    fn append_assigns_seq_dedups_and_trims_window() {
        let mut s = MemoryStore::new();
        for i in 1..=5u8 {
            let m = stored(
                s.append_message("c", message(i, "u"), &retention(0, 3))
                    .unwrap(),
            );
            assert_eq!(m.seq, i as u64);
        }
        // Duplicate of a message still in the window: original ack, no seq used.
        match s
            .append_message("c", message(4, "u"), &retention(999, 3))
            .unwrap()
        {
            Appended::Duplicate(ack) => {
                assert_eq!(ack.seq, 4);
                assert_eq!(ack.message_id, "m4");
                assert_eq!(ack.conversation_id, "c");
            }
            other => panic!("expected duplicate, got {other:?}"),
        }
        assert_eq!(s.last_seqs(&["c".into()]).unwrap(), vec![5]);
        // Dedup is tied to the window: seq 2 has left it, so the same
        // client_msg_id is a new message.
        let m = stored(
            s.append_message("c", message(2, "u"), &retention(1000, 3))
                .unwrap(),
        );
        assert_eq!(m.seq, 6);
        // ... and that new message is deduplicated in turn (its id's older,
        // evicted entry in the same chunk does not hide it).
        match s
            .append_message("c", message(2, "u"), &retention(1000, 3))
            .unwrap()
        {
            Appended::Duplicate(ack) => assert_eq!(ack.seq, 6),
            other => panic!("expected duplicate, got {other:?}"),
        }
        // Window of 3: seqs 4..=6 remain.
        let all = s
            .messages_after(&[RangeRead {
                conversation_id: "c".into(),
                after_seq: 0,
                limit: 100,
                max_bytes: usize::MAX,
            }])
            .unwrap();
        let seqs: Vec<u64> = all[0].iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![4, 5, 6]);
    }

    #[test]
    fn window_and_dedup_index_stay_bounded() {
        let mut s = MemoryStore::new();
        let window = 1000;
        let cmid = |n: u32| n.to_le_bytes().to_vec();
        for n in 1..=20 * CHUNK as u32 + 7 {
            let m = pb::Message {
                client_msg_id: cmid(n),
                message_id: format!("m{n}"),
                ..Default::default()
            };
            stored(s.append_message("c", m, &retention(0, window)).unwrap());
        }
        let last = 20 * CHUNK as u64 + 7;
        let history = &s.conversations["c"].history;
        assert_eq!(history.len(), window);
        assert_eq!(history.front().unwrap().seq, last - window as u64 + 1);
        let indexed: usize = history
            .chunks
            .iter()
            .map(|c| c.ids.len() + c.collided.len())
            .sum();
        assert!(indexed < window + CHUNK, "{indexed} ids indexed");
        assert!(history.chunks.len() <= window / CHUNK + 2);
        // Oldest message in the window still dedups; one just before it does not.
        let oldest = (last - window as u64 + 1) as u32;
        let retry = |n: u32| pb::Message {
            client_msg_id: cmid(n),
            ..Default::default()
        };
        match s.append_message("c", retry(oldest), &retention(0, window)) {
            Ok(Appended::Duplicate(ack)) => assert_eq!(ack.seq, oldest as u64),
            other => panic!("expected duplicate, got {other:?}"),
        }
        let m = stored(
            s.append_message("c", retry(oldest - 1), &retention(0, window))
                .unwrap(),
        );
        assert_eq!(m.seq, last + 1);
        // History reads see the contiguous window across chunk boundaries.
        let slice = s.messages_before("c", 0, 2 * CHUNK, usize::MAX).unwrap();
        let seqs: Vec<u64> = slice.messages.iter().map(|m| m.seq).collect();
        let want: Vec<u64> = (last + 2 - 2 * CHUNK as u64..=last + 1).collect();
        assert_eq!(seqs, want);
        assert!(slice.has_more);
    }

    #[test]
    fn gateway_ids_are_shared_and_go_with_the_last_device() {
        let mut s = MemoryStore::new();
        let session = |user: &str, device: &str, gateway: &str, conn| Session {
            user_id: user.into(),
            device_id: device.into(),
            addr: SessionAddr {
                gateway_id: gateway.into(),
                conn,
            },
        };
        let a = session("a", "phone", "g1", 1);
        let b = session("b", "phone", "g1", 2);
        let a_moved = session("a", "phone", "g2", 3);
        s.open_session(&a);
        s.open_session(&b);
        assert_eq!(s.gateway_ids.len(), 1, "one shared id for g1");
        assert_eq!(
            s.presence["a"].devices.capacity(),
            1,
            "an online user's device list holds exactly its one device"
        );
        // a reconnects through g2: replaces its g1 device, g1 stays for b.
        let opened = s.open_session(&a_moved);
        assert_eq!(opened.replaced, Some(a.addr.clone()));
        assert_eq!(s.gateway_ids.len(), 2);
        s.close_session(&b, 9, true);
        assert_eq!(s.gateway_ids.len(), 1, "g1 went with its last device");
        assert_eq!(
            s.sessions_of_users(&["a"]).unwrap().of(0),
            std::slice::from_ref(&a_moved.addr)
        );
        s.close_session(&a_moved, 10, true);
        assert!(s.gateway_ids.is_empty());
    }
}
