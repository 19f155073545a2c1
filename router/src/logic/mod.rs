//! The router: turns one [`Command`] into store updates and addressed frames.
//!
//! Pure over the [`Store`] traits and a [`Clock`]: no threads, no I/O of its
//! own. The embedded engine and the Kafka/Redis worker both drive it.
//!
//! Every client request is answered: with its response frame (request_id
//! echoed), or with an `Error` frame carrying a code, a message, the
//! request_id and (for Send) the client_msg_id. Receipt and Typing have no
//! positive response; they are answered only when they fail.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use palaver_protocol::pb::{self, frame::Body, ErrorCode};
use palaver_protocol::BodyKind;
use prost::Message as _;

use crate::api::{Inbound, Session, SessionAddr};
use crate::bus::{Addressed, Command, Output, PushEvent};
use crate::group_id::group_id_for;
use crate::store::{
    Appended, GroupRecord, Membership, RangeRead, Retention, Store, StoreError, StoreResult,
    UserPresence, UserStore, WatchAdd,
};

/// Whose presence and last seen a user may see (SPEC §10).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PresenceVisibility {
    /// Only users sharing a conversation (DIRECT or GROUP, current member)
    /// with the asker, and the asker themself. Everyone else looks like a
    /// user who was never seen.
    #[default]
    SharedConversation,
    /// Every user sees every user.
    Everyone,
}

impl PresenceVisibility {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SharedConversation => "shared_conversation",
            Self::Everyone => "everyone",
        }
    }
}

impl std::fmt::Display for PresenceVisibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PresenceVisibility {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "shared_conversation" => Ok(Self::SharedConversation),
            "everyone" => Ok(Self::Everyone),
            other => Err(format!(
                "unknown presence visibility {other:?}: expected shared_conversation or everyone"
            )),
        }
    }
}

/// The presence visibility rule, the one implementation every backend uses:
/// for each of `others`, in input order, whether `user_id` may see its
/// presence. Under [`PresenceVisibility::SharedConversation`] the relation
/// is symmetric (a user always sees themself), so a fan-out can ask it once
/// per changed user with all of that user's watchers as `others`.
pub fn presence_visible<S: UserStore + ?Sized>(
    store: &mut S,
    visibility: PresenceVisibility,
    user_id: &str,
    others: &[String],
) -> StoreResult<Vec<bool>> {
    if visibility == PresenceVisibility::Everyone {
        return Ok(vec![true; others.len()]);
    }
    let strangers: Vec<String> = others.iter().filter(|o| *o != user_id).cloned().collect();
    let mut shared = store.shares_conversation(user_id, &strangers)?.into_iter();
    Ok(others
        .iter()
        .map(|o| o == user_id || shared.next().unwrap_or(false))
        .collect())
}

/// Router limits and defaults. Every limit is enforced with a clear error.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterConfig {
    /// Members of a group, creator included.
    pub max_group_members: usize,
    /// Largest `Send.body`, bytes.
    pub max_body_bytes: usize,
    /// Messages kept per conversation for Sync and History.
    pub history_window: usize,
    /// How long a (conversation, client_msg_id) is remembered for dedup.
    pub dedup_ttl_ms: i64,
    /// Messages per SyncBatch / HistoryPage when the request says 0.
    pub default_batch: usize,
    /// Largest `limit` honoured by Sync / History.
    pub max_batch: usize,
    /// Soft cap on the encoded size of one SyncBatch / HistoryPage: a batch
    /// stops growing once it is reached (it always holds at least one item),
    /// and reports `has_more`.
    pub max_batch_bytes: usize,
    /// Users one connection may watch with PresenceSubscribe.
    pub max_watches_per_connection: usize,
    /// Users in one PresenceQuery / PresenceSubscribe.
    pub max_presence_users: usize,
    /// Longest group title, bytes.
    pub max_title_bytes: usize,
    /// Whose presence a user may see (SPEC §10).
    pub presence_visibility: PresenceVisibility,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            max_group_members: 1000,
            max_body_bytes: palaver_protocol::Limits::default().max_body_bytes as usize,
            history_window: 10_000,
            dedup_ttl_ms: 24 * 60 * 60 * 1000,
            default_batch: 100,
            max_batch: 500,
            max_batch_bytes: 1024 * 1024,
            max_watches_per_connection: 1000,
            max_presence_users: 1000,
            max_title_bytes: 256,
            presence_visibility: PresenceVisibility::SharedConversation,
        }
    }
}

/// Router time source, Unix epoch milliseconds (injectable for tests).
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

/// The system wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(now_ms: i64) -> Self {
        Self(AtomicI64::new(now_ms))
    }
    pub fn set(&self, now_ms: i64) {
        self.0.store(now_ms, Ordering::Relaxed);
    }
    pub fn advance(&self, by_ms: i64) {
        self.0.fetch_add(by_ms, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Unique opaque ids: 64 random bits fixed per process (from the OS-seeded
/// std hasher keys) followed by a 64-bit counter, as 32 hex digits.
struct IdGen {
    node: u64,
    counter: u64,
}

impl IdGen {
    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        hasher.write_u32(std::process::id());
        Self {
            node: hasher.finish(),
            counter: 0,
        }
    }

    fn next(&mut self) -> String {
        self.counter += 1;
        format!("{:016x}{:016x}", self.node, self.counter)
    }
}

/// Why a request failed.
enum Failure {
    /// The client's fault (or not allowed): answered with an Error frame.
    Rejected(ErrorCode, String),
    /// The store failed: the driver decides (answer UNAVAILABLE or retry).
    Store(StoreError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

/// A request refused with this code and message (answered with an Error).
type Rejection = (ErrorCode, String);

fn reject<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, Failure> {
    Err(Failure::Rejected(code, message.into()))
}

/// A parsed conversation id.
enum ConversationRef<'a> {
    /// `dm:<a>:<b>`, a < b bytewise.
    Direct { a: &'a str, b: &'a str },
    /// `grp:<id>`
    Group,
}

/// Who may see a conversation, as far as a request needs to know.
enum Access {
    Direct([String; 2]),
    Group { members: Vec<pb::Member> },
}

impl Access {
    fn member_ids(&self) -> Vec<String> {
        match self {
            Access::Direct(users) => users.to_vec(),
            Access::Group { members } => members.iter().map(|m| m.user_id.clone()).collect(),
        }
    }
}

/// How far [`Router::handle_batch`] got: `commands[..done]` are handled
/// and their output is `out.frames[..frames]` / `out.pushes[..pushes]`
/// (whatever `out` held before included). Updated after every command or
/// run of Sends, so a driver that catches a panic knows what is complete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchProgress {
    pub done: usize,
    pub frames: usize,
    pub pushes: usize,
}

pub struct Router<S> {
    store: S,
    config: RouterConfig,
    clock: Arc<dyn Clock>,
    ids: IdGen,
    /// The user of each connection that subscribed to presence here, for the
    /// visibility check when events are fanned out.
    watcher_users: HashMap<SessionAddr, String>,
}

impl<S: Store> Router<S> {
    pub fn new(store: S, config: RouterConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            config,
            clock,
            ids: IdGen::new(),
            watcher_users: HashMap::new(),
        }
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Process one command, appending what it produces to `out`.
    ///
    /// On a store error, `out` keeps what was produced before the failure
    /// (it describes effects that happened) and the error is returned; the
    /// driver either retries the command or answers it with
    /// [`Router::unavailable_reply`].
    pub fn handle(&mut self, command: &Command, out: &mut Output) -> StoreResult<()> {
        match command {
            Command::Request(request) => self.handle_request(request, out),
            Command::SessionOpened(session) => self.session_opened(session, out),
            Command::SessionClosed { session, at_ms } => self.session_closed(session, *at_ms, out),
        }
    }

    /// Process `commands` in order, as [`Router::handle`] on each would,
    /// but with each run of consecutive Sends handled as one unit: one
    /// group read, one batch of appends, one session lookup for the whole
    /// run (see `send_many`). Sends of one conversation in a run get
    /// consecutive seqs in input order. Any other command ends the run and
    /// is handled on its own, so everything a conversation sees happens in
    /// input order.
    ///
    /// `progress` is reset and then advanced past each completed unit. On
    /// a store error, the unit starting at `progress.done` failed, having
    /// left in `out` only effects that happened (as `handle` does); the
    /// caller retries from there.
    pub fn handle_batch(
        &mut self,
        commands: &[Command],
        out: &mut Output,
        progress: &mut BatchProgress,
    ) -> StoreResult<()> {
        *progress = BatchProgress {
            done: 0,
            frames: out.frames.len(),
            pushes: out.pushes.len(),
        };
        while progress.done < commands.len() {
            let sends: Vec<(&Inbound, &pb::Send)> = commands[progress.done..]
                .iter()
                .map_while(|c| match c {
                    Command::Request(req) => match &req.body {
                        Body::Send(send) => Some((req, send)),
                        _ => None,
                    },
                    _ => None,
                })
                .collect();
            let taken = if sends.is_empty() {
                self.handle(&commands[progress.done], out)?;
                1
            } else {
                self.send_many(&sends, out)?;
                sends.len()
            };
            *progress = BatchProgress {
                done: progress.done + taken,
                frames: out.frames.len(),
                pushes: out.pushes.len(),
            };
        }
        Ok(())
    }

    /// The `Error(UNAVAILABLE)` frame that answers `command` when the store
    /// failed, or `None` for commands nobody waits on.
    pub fn unavailable_reply(command: &Command, error: &StoreError) -> Option<Addressed> {
        match command {
            Command::Request(request) => Some(error_frame(
                request,
                ErrorCode::Unavailable,
                format!("temporarily unavailable, retry later ({error})"),
            )),
            _ => None,
        }
    }

    /// The `Error(INTERNAL)` frame that answers `command` when handling it
    /// hit a bug (a caught panic), or `None` for commands nobody waits on.
    pub fn internal_error_reply(command: &Command) -> Option<Addressed> {
        match command {
            Command::Request(request) => Some(error_frame(
                request,
                ErrorCode::Internal,
                "internal error; the request was not processed".to_string(),
            )),
            _ => None,
        }
    }

    fn handle_request(&mut self, request: &Inbound, out: &mut Output) -> StoreResult<()> {
        let result = match &request.body {
            Body::Send(send) => self.send(request, send, out),
            Body::Receipt(receipt) => self.receipt(request, receipt, out),
            Body::Typing(typing) => self.typing(request, typing, out),
            Body::Sync(sync) => self.sync(request, sync, out),
            Body::History(history) => self.history(request, history, out),
            Body::PresenceQuery(query) => self.presence_query(request, query, out),
            Body::PresenceSubscribe(subscribe) => self.presence_subscribe(request, subscribe, out),
            Body::CreateConversation(create) => self.create_conversation(request, create, out),
            Body::ChangeMembers(change) => self.change_members(request, change, out),
            other => reject(
                ErrorCode::InvalidArgument,
                format!(
                    "{} is not a request the server accepts",
                    BodyKind::of(other).message_name()
                ),
            ),
        };
        match result {
            Ok(()) => Ok(()),
            Err(Failure::Rejected(code, message)) => {
                out.frames.push(error_frame(request, code, message));
                Ok(())
            }
            Err(Failure::Store(e)) => Err(e),
        }
    }

    // ---- Messages ------------------------------------------------------

    fn send(&mut self, req: &Inbound, send: &pb::Send, out: &mut Output) -> Result<(), Failure> {
        Ok(self.send_many(&[(req, send)], out)?)
    }

    /// The checks of a Send that need no store, in SPEC §14's order (the
    /// gateway checks the body size first).
    fn check_send(&self, send: &pb::Send) -> Result<(), Failure> {
        if send.body.len() > self.config.max_body_bytes {
            return reject(
                ErrorCode::BodyTooLarge,
                format!(
                    "body is {} bytes, the limit is {}",
                    send.body.len(),
                    self.config.max_body_bytes
                ),
            );
        }
        if send.client_msg_id.len() != 16 {
            return reject(
                ErrorCode::InvalidArgument,
                format!(
                    "client_msg_id must be exactly 16 bytes, got {}",
                    send.client_msg_id.len()
                ),
            );
        }
        match pb::ContentKind::try_from(send.kind) {
            Ok(pb::ContentKind::Unspecified) | Err(_) => reject(
                ErrorCode::InvalidArgument,
                format!("content kind {} is not a known ContentKind", send.kind),
            ),
            Ok(_) => Ok(()),
        }
    }

    /// Sends, in order, with the store work of all of them batched: one
    /// `groups` read for the group conversations among them, one
    /// `append_messages` (one pipeline, one AOF fsync in Redis), one
    /// `sessions_of_users` for the members of every conversation, then a
    /// push mark per message that has offline members. The frames are
    /// exactly those of one Send at a time, in input order (per Send: its
    /// Error, or its SendAck then its Delivers). On a store error no frame
    /// of any of them is in `out` (push events of marks already set are,
    /// since those effects happened) and the error is returned; the caller
    /// retries them, which dedup makes safe.
    fn send_many(&mut self, sends: &[(&Inbound, &pb::Send)], out: &mut Output) -> StoreResult<()> {
        // 1. Checks without the store; group conversations to look up.
        let mut checked: Vec<Result<Option<Access>, Rejection>> = Vec::with_capacity(sends.len());
        let mut group_ids: Vec<String> = Vec::new();
        for (req, send) in sends {
            let user = &req.from.user_id;
            let result = self.check_send(send).and_then(|()| {
                match parse_conversation_id(&send.conversation_id)? {
                    ConversationRef::Direct { a, b } => direct_access(user, a, b).map(Some),
                    ConversationRef::Group => Ok(None),
                }
            });
            checked.push(match result {
                Ok(None) => {
                    if !group_ids.contains(&send.conversation_id) {
                        group_ids.push(send.conversation_id.clone());
                    }
                    Ok(None)
                }
                Ok(access) => Ok(access),
                Err(Failure::Rejected(code, message)) => Err((code, message)),
                Err(Failure::Store(e)) => return Err(e),
            });
        }
        let mut groups: HashMap<String, Option<GroupRecord>> = HashMap::new();
        if !group_ids.is_empty() {
            let records = self.store.groups(&group_ids)?;
            groups.extend(group_ids.into_iter().zip(records));
        }
        let accesses: Vec<Result<Access, Rejection>> = checked
            .into_iter()
            .zip(sends)
            .map(|(checked, (req, send))| match checked {
                Ok(Some(access)) => Ok(access),
                Ok(None) => {
                    let group = groups.get(&send.conversation_id).cloned().flatten();
                    group_access(&send.conversation_id, &req.from.user_id, group).map_err(|f| {
                        match f {
                            Failure::Rejected(code, message) => (code, message),
                            Failure::Store(e) => (ErrorCode::Internal, e.to_string()),
                        }
                    })
                }
                Err(rejected) => Err(rejected),
            })
            .collect();

        // 2. One batch of appends for the accepted Sends.
        let now_ms = self.clock.now_ms();
        let retention = Retention {
            now_ms,
            dedup_ttl_ms: self.config.dedup_ttl_ms,
            history_window: self.config.history_window,
        };
        let mut appends = Vec::with_capacity(sends.len());
        for ((req, send), access) in sends.iter().zip(&accesses) {
            if access.is_ok() {
                appends.push((
                    send.conversation_id.clone(),
                    pb::Message {
                        conversation_id: send.conversation_id.clone(),
                        seq: 0,
                        message_id: self.ids.next(),
                        sender_user_id: req.from.user_id.clone(),
                        sender_device_id: req.from.device_id.clone(),
                        client_msg_id: send.client_msg_id.clone(),
                        kind: send.kind,
                        body: send.body.clone(),
                        reply_to_seq: send.reply_to_seq,
                        media: send.media.clone(),
                        server_time_ms: now_ms,
                    },
                ));
            }
        }
        let appended = if appends.is_empty() {
            Vec::new()
        } else {
            self.store.append_messages(appends, &retention)?
        };

        // 3. A direct conversation is listed for both users by its first
        // message, and again on a retry (the first attempt may have stopped
        // right after the append).
        let mut appended_iter = appended.iter();
        let mut results: Vec<Result<(&Access, &Appended), Rejection>> =
            Vec::with_capacity(sends.len());
        for access in &accesses {
            match access {
                Ok(access) => match appended_iter.next() {
                    Some(appended) => results.push(Ok((access, appended))),
                    None => return Err(StoreError::Corrupt("fewer appends than asked".into())),
                },
                Err(rejected) => results.push(Err(rejected.clone())),
            }
        }
        for ((_, send), result) in sends.iter().zip(&results) {
            if let Ok((Access::Direct(users), appended)) = result {
                let first = match appended {
                    Appended::Duplicate(_) => true,
                    Appended::Stored(message) => message.seq == 1,
                };
                if first {
                    self.store
                        .add_conversation_to_users(&send.conversation_id, users)?;
                }
            }
        }

        // 4. One session lookup for the members of every stored message.
        let mut users: Vec<String> = Vec::new();
        let mut user_index: HashMap<String, usize> = HashMap::new();
        for (access, appended) in results.iter().flatten() {
            if let Appended::Stored(_) = appended {
                for user in access.member_ids() {
                    if !user_index.contains_key(&user) {
                        user_index.insert(user.clone(), users.len());
                        users.push(user);
                    }
                }
            }
        }
        let sessions = if users.is_empty() {
            Vec::new()
        } else {
            self.store.sessions_of_users(&users)?
        };

        // 5. The frames, in input order; push marks for offline members.
        let mut frames = Vec::new();
        for ((req, send), result) in sends.iter().zip(results) {
            let (access, appended) = match result {
                Err((code, message)) => {
                    frames.push(error_frame(req, code, message));
                    continue;
                }
                Ok(ok) => ok,
            };
            let message = match appended {
                Appended::Duplicate(ack) => {
                    frames.push(reply(req, Body::SendAck(ack.clone())));
                    continue;
                }
                Appended::Stored(message) => message,
            };
            frames.push(reply(
                req,
                Body::SendAck(pb::SendAck {
                    client_msg_id: message.client_msg_id.clone(),
                    message_id: message.message_id.clone(),
                    conversation_id: send.conversation_id.clone(),
                    seq: message.seq,
                    server_time_ms: message.server_time_ms,
                }),
            ));
            let deliver = event(Body::Deliver(pb::Deliver {
                message: Some(message.clone()),
            }));
            let mut offline = Vec::new();
            for user_id in access.member_ids() {
                let devices = user_index
                    .get(&user_id)
                    .and_then(|&i| sessions.get(i))
                    .map_or(&[][..], Vec::as_slice);
                if devices.is_empty() {
                    if user_id != req.from.user_id {
                        offline.push(user_id);
                    }
                    continue;
                }
                for device in devices {
                    if device.addr != req.from.addr {
                        frames.push(Addressed {
                            to: device.addr.clone(),
                            frame: deliver.clone(),
                        });
                    }
                }
            }
            if !offline.is_empty() {
                let fresh = self
                    .store
                    .mark_push_pending(&send.conversation_id, &offline)?;
                for (user_id, fresh) in offline.into_iter().zip(fresh) {
                    if fresh {
                        out.pushes.push(PushEvent {
                            user_id,
                            conversation_id: send.conversation_id.clone(),
                            seq: message.seq,
                            message_id: message.message_id.clone(),
                            sender_user_id: message.sender_user_id.clone(),
                            kind: message.kind,
                            server_time_ms: message.server_time_ms,
                        });
                    }
                }
            }
        }
        out.frames.extend(frames);
        Ok(())
    }

    fn receipt(
        &mut self,
        req: &Inbound,
        receipt: &pb::Receipt,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let kind = match pb::ReceiptKind::try_from(receipt.kind) {
            Ok(k @ (pb::ReceiptKind::Delivered | pb::ReceiptKind::Read)) => k,
            _ => {
                return reject(
                    ErrorCode::InvalidArgument,
                    format!("receipt kind {} is not DELIVERED or READ", receipt.kind),
                )
            }
        };
        let conversation_id = &receipt.conversation_id;
        let reader = &req.from.user_id;
        self.check_member(conversation_id, reader)?;
        self.store
            .clear_push_pending(reader, Some(conversation_id))?;
        // Receipts beyond the last message are clamped to it.
        let last_seq = self
            .store
            .last_seqs(std::slice::from_ref(conversation_id))?[0];
        let up_to_seq = receipt.up_to_seq.min(last_seq);
        if up_to_seq == 0 {
            return Ok(());
        }
        if kind == pb::ReceiptKind::Read {
            // READ implies DELIVERED; only the READ update is sent.
            self.store.advance_receipt(
                conversation_id,
                reader,
                pb::ReceiptKind::Delivered,
                up_to_seq,
            )?;
        }
        let Some(previous) =
            self.store
                .advance_receipt(conversation_id, reader, kind, up_to_seq)?
        else {
            return Ok(());
        };
        let mut users: Vec<String> = self
            .store
            .senders_between(conversation_id, previous, up_to_seq)?
            .into_iter()
            .filter(|u| u != reader)
            .collect();
        users.push(reader.clone());
        let update = event(Body::ReceiptUpdate(pb::ReceiptUpdate {
            conversation_id: conversation_id.clone(),
            user_id: reader.clone(),
            kind: kind as i32,
            up_to_seq,
        }));
        Ok(self.fan_out(&users, Some(&req.from.addr), &update, out)?)
    }

    fn typing(
        &mut self,
        req: &Inbound,
        typing: &pb::Typing,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let access = self.access_with_members(&typing.conversation_id, &req.from.user_id)?;
        let others: Vec<String> = access
            .member_ids()
            .into_iter()
            .filter(|u| *u != req.from.user_id)
            .collect();
        let frame = event(Body::Typing(pb::Typing {
            conversation_id: typing.conversation_id.clone(),
            active: typing.active,
            user_id: req.from.user_id.clone(),
        }));
        Ok(self.fan_out(&others, None, &frame, out)?)
    }

    // ---- Sync and history ----------------------------------------------

    fn batch_limit(&self, requested: u32) -> usize {
        match requested as usize {
            0 => self.config.default_batch,
            n => n.min(self.config.max_batch),
        }
    }

    fn sync(&mut self, req: &Inbound, sync: &pb::Sync, out: &mut Output) -> Result<(), Failure> {
        let user = &req.from.user_id;
        let limit = self.batch_limit(sync.limit);
        let mut conversation_ids = self.store.conversations_of_user(user)?;
        conversation_ids.sort_unstable();
        let cursors: HashMap<&str, u64> = sync
            .cursors
            .iter()
            .map(|c| (c.conversation_id.as_str(), c.after_seq))
            .collect();
        let mut last_seqs = self.store.last_seqs(&conversation_ids)?;

        // Conversations the client does not know yet, listed first; within
        // the byte budget, so a huge account pages through them too.
        let mut budget = self.config.max_batch_bytes;
        let mut has_more = false;
        let absent: Vec<(usize, &String)> = conversation_ids
            .iter()
            .enumerate()
            .filter(|(_, id)| !cursors.contains_key(id.as_str()))
            .collect();
        let absent_groups: Vec<String> = absent
            .iter()
            .filter(|(_, id)| id.starts_with("grp:"))
            .map(|(_, id)| (*id).clone())
            .collect();
        let mut groups = self.store.groups(&absent_groups)?.into_iter();
        let mut conversations = Vec::new();
        // Messages are only sent for conversations the client knows or is
        // told about in this batch, so it never holds messages of a
        // conversation it has no info for.
        let mut known: Vec<bool> = conversation_ids
            .iter()
            .map(|id| cursors.contains_key(id.as_str()))
            .collect();
        for (index, id) in absent {
            let info = if id.starts_with("grp:") {
                match groups.next().flatten() {
                    Some(group) => group_info(group, last_seqs[index]),
                    None => {
                        // Listed but its record is gone (lost data): treat it
                        // as empty, or has_more would never clear.
                        last_seqs[index] = 0;
                        continue;
                    }
                }
            } else {
                match parse_conversation_id(id) {
                    Ok(ConversationRef::Direct { a, b }) => direct_info(a, b, last_seqs[index]),
                    _ => {
                        last_seqs[index] = 0;
                        continue;
                    }
                }
            };
            let size = info.encoded_len();
            if size > budget && !conversations.is_empty() {
                has_more = true;
                break;
            }
            budget = budget.saturating_sub(size);
            conversations.push(info);
            known[index] = true;
        }

        // Plan how many messages each conversation contributes.
        let mut reads = Vec::new();
        let mut remaining = limit;
        for (index, id) in conversation_ids.iter().enumerate() {
            let after_seq = cursors.get(id.as_str()).copied().unwrap_or(0);
            if last_seqs[index] <= after_seq {
                continue;
            }
            if !known[index] || remaining == 0 {
                has_more = true;
                continue;
            }
            let wanted = (last_seqs[index] - after_seq).min(remaining as u64) as usize;
            remaining -= wanted;
            reads.push((
                index,
                RangeRead {
                    conversation_id: id.clone(),
                    after_seq,
                    limit: wanted,
                },
            ));
        }
        let range_reads: Vec<RangeRead> = reads.iter().map(|(_, r)| r.clone()).collect();
        let results = self.store.messages_after(&range_reads)?;
        let mut messages = Vec::new();
        'conversations: for ((index, _), batch) in reads.iter().zip(results) {
            let last_seq = last_seqs[*index];
            let mut newest = 0;
            for message in batch {
                let size = message.encoded_len();
                if size > budget && !(messages.is_empty() && conversations.is_empty()) {
                    has_more = true;
                    break 'conversations;
                }
                budget = budget.saturating_sub(size);
                newest = message.seq;
                messages.push(message);
            }
            if newest != 0 && newest < last_seq {
                has_more = true;
            }
        }
        out.frames.push(reply(
            req,
            Body::SyncBatch(pb::SyncBatch {
                messages,
                conversations,
                has_more,
            }),
        ));
        Ok(())
    }

    fn history(
        &mut self,
        req: &Inbound,
        history: &pb::History,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let conversation_id = &history.conversation_id;
        self.check_member(conversation_id, &req.from.user_id)?;
        let limit = self.batch_limit(history.limit);
        let mut slice = self
            .store
            .messages_before(conversation_id, history.before_seq, limit)?;
        // Keep the newest messages that fit the byte budget (at least one).
        let mut budget = self.config.max_batch_bytes;
        let mut keep_from = slice.messages.len();
        while keep_from > 0 {
            let size = slice.messages[keep_from - 1].encoded_len();
            if size > budget && keep_from < slice.messages.len() {
                break;
            }
            budget = budget.saturating_sub(size);
            keep_from -= 1;
        }
        if keep_from > 0 {
            slice.messages.drain(..keep_from);
            slice.has_more = true;
        }
        out.frames.push(reply(
            req,
            Body::HistoryPage(pb::HistoryPage {
                conversation_id: conversation_id.clone(),
                messages: slice.messages,
                has_more: slice.has_more,
            }),
        ));
        Ok(())
    }

    // ---- Presence ------------------------------------------------------

    fn presence_users(&self, user_ids: &[String]) -> Result<Vec<String>, Failure> {
        if user_ids.len() > self.config.max_presence_users {
            return reject(
                ErrorCode::InvalidArgument,
                format!(
                    "{} user ids in one request, the limit is {}",
                    user_ids.len(),
                    self.config.max_presence_users
                ),
            );
        }
        let mut seen = HashSet::new();
        let mut unique = Vec::with_capacity(user_ids.len());
        for user_id in user_ids {
            self.check_user_id(user_id)?;
            if seen.insert(user_id.as_str()) {
                unique.push(user_id.clone());
            }
        }
        Ok(unique)
    }

    /// The users' presence as `asker` may see it: a user `asker` may not see
    /// is answered exactly like a user who was never seen.
    fn presence_result(
        &mut self,
        asker: &str,
        user_ids: Vec<String>,
    ) -> Result<pb::PresenceResult, Failure> {
        let visible = presence_visible(
            &mut self.store,
            self.config.presence_visibility,
            asker,
            &user_ids,
        )?;
        let shown: Vec<String> = user_ids
            .iter()
            .zip(&visible)
            .filter(|(_, v)| **v)
            .map(|(u, _)| u.clone())
            .collect();
        let mut states = self.store.presence_of_users(&shown)?.into_iter();
        Ok(pb::PresenceResult {
            presences: user_ids
                .into_iter()
                .zip(visible)
                .map(|(user_id, visible)| {
                    let state = if visible {
                        states.next().unwrap_or_default()
                    } else {
                        UserPresence::default()
                    };
                    (user_id, state)
                })
                .map(|(user_id, state)| pb::Presence {
                    user_id,
                    online: state.online,
                    last_seen_ms: state.last_seen_ms,
                })
                .collect(),
        })
    }

    fn presence_query(
        &mut self,
        req: &Inbound,
        query: &pb::PresenceQuery,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let users = self.presence_users(&query.user_ids)?;
        let result = self.presence_result(&req.from.user_id, users)?;
        out.frames.push(reply(req, Body::PresenceResult(result)));
        Ok(())
    }

    fn presence_subscribe(
        &mut self,
        req: &Inbound,
        subscribe: &pb::PresenceSubscribe,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let users = self.presence_users(&subscribe.user_ids)?;
        if subscribe.unsubscribe {
            self.store.remove_watches(&req.from.addr, &users)?;
            out.frames.push(reply(
                req,
                Body::PresenceResult(pb::PresenceResult::default()),
            ));
            return Ok(());
        }
        let max = self.config.max_watches_per_connection;
        if let WatchAdd::LimitExceeded { watching } =
            self.store.add_watches(&req.from.addr, &users, max)?
        {
            return reject(
                ErrorCode::InvalidArgument,
                format!(
                    "a connection may watch at most {max} users; it watches {watching}, \
                     unsubscribe some first"
                ),
            );
        }
        // Every requested user is watched, visible or not: visibility is
        // checked when an event is sent, so a user who becomes visible later
        // (a shared conversation appears) starts producing events, and one
        // who stops being visible stops.
        self.watcher_users
            .insert(req.from.addr.clone(), req.from.user_id.clone());
        let result = self.presence_result(&req.from.user_id, users)?;
        out.frames.push(reply(req, Body::PresenceResult(result)));
        Ok(())
    }

    fn presence_changed(
        &mut self,
        user_id: &str,
        online: bool,
        last_seen_ms: i64,
        out: &mut Output,
    ) -> StoreResult<()> {
        let watchers = self.store.watchers_of(user_id)?;
        if watchers.is_empty() {
            return Ok(());
        }
        // Visibility at event time. A watch whose connection's user this
        // router does not know (added by another router) gets nothing: fail
        // closed.
        let watcher_users: Vec<String> = watchers
            .iter()
            .map(|w| self.watcher_users.get(w).cloned().unwrap_or_default())
            .collect();
        let visible = presence_visible(
            &mut self.store,
            self.config.presence_visibility,
            user_id,
            &watcher_users,
        )?;
        let frame = event(Body::PresenceEvent(pb::PresenceEvent {
            presence: Some(pb::Presence {
                user_id: user_id.to_owned(),
                online,
                last_seen_ms,
            }),
        }));
        for ((to, watcher), visible) in watchers.into_iter().zip(&watcher_users).zip(visible) {
            if visible && !watcher.is_empty() {
                out.frames.push(Addressed {
                    to,
                    frame: frame.clone(),
                });
            }
        }
        Ok(())
    }

    fn session_opened(&mut self, session: &Session, out: &mut Output) -> StoreResult<()> {
        let opened = self.store.open_session(session)?;
        if let Some(old) = opened.replaced {
            // The old connection is closed by its gateway; it watches nothing
            // from now on.
            self.store.drop_watches(&old)?;
            self.watcher_users.remove(&old);
            out.frames.push(Addressed {
                to: old,
                frame: event(Body::GoAway(pb::GoAway {
                    reason: pb::GoAwayReason::Replaced as i32,
                    reconnect_delay_ms: 0,
                    message: "this device connected again on another connection".into(),
                })),
            });
        }
        self.store.clear_push_pending(&session.user_id, None)?;
        if opened.came_online {
            self.presence_changed(&session.user_id, true, 0, out)?;
        }
        Ok(())
    }

    fn session_closed(
        &mut self,
        session: &Session,
        at_ms: i64,
        out: &mut Output,
    ) -> StoreResult<()> {
        self.store.drop_watches(&session.addr)?;
        self.watcher_users.remove(&session.addr);
        let closed = self.store.close_session(session, at_ms)?;
        if closed.went_offline {
            self.presence_changed(&session.user_id, false, at_ms, out)?;
        }
        Ok(())
    }

    // ---- Conversations -------------------------------------------------

    fn create_conversation(
        &mut self,
        req: &Inbound,
        create: &pb::CreateConversation,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let creator = &req.from.user_id;
        match pb::ConversationKind::try_from(create.kind) {
            Ok(pb::ConversationKind::Direct) => {
                let peers: BTreeSet<&str> =
                    create.member_user_ids.iter().map(String::as_str).collect();
                let peer =
                    match peers.into_iter().collect::<Vec<_>>()[..] {
                        [peer] => peer,
                        _ => return reject(
                            ErrorCode::InvalidArgument,
                            "a direct conversation needs exactly one other user in member_user_ids",
                        ),
                    };
                if peer == creator {
                    return reject(
                        ErrorCode::InvalidArgument,
                        "a direct conversation needs another user, not yourself",
                    );
                }
                self.check_user_id(creator)?;
                self.check_user_id(peer)?;
                let conversation_id = palaver_protocol::direct_conversation_id(creator, peer);
                let users = [creator.clone(), peer.to_owned()];
                self.store
                    .add_conversation_to_users(&conversation_id, &users)?;
                let last_seq = self
                    .store
                    .last_seqs(std::slice::from_ref(&conversation_id))?[0];
                let (a, b) = if creator.as_str() < peer {
                    (creator.as_str(), peer)
                } else {
                    (peer, creator.as_str())
                };
                let info = direct_info(a, b, last_seq);
                out.frames.push(reply(
                    req,
                    Body::ConversationCreated(pb::ConversationCreated {
                        conversation: Some(info),
                    }),
                ));
                Ok(())
            }
            Ok(pb::ConversationKind::Group) => self.create_group(req, create, out),
            _ => reject(
                ErrorCode::InvalidArgument,
                format!("conversation kind {} is not DIRECT or GROUP", create.kind),
            ),
        }
    }

    fn create_group(
        &mut self,
        req: &Inbound,
        create: &pb::CreateConversation,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let creator = &req.from.user_id;
        if create.title.len() > self.config.max_title_bytes {
            return reject(
                ErrorCode::InvalidArgument,
                format!(
                    "title is {} bytes, the limit is {}",
                    create.title.len(),
                    self.config.max_title_bytes
                ),
            );
        }
        let mut others = BTreeSet::new();
        for user_id in &create.member_user_ids {
            self.check_user_id(user_id)?;
            if user_id != creator {
                others.insert(user_id.as_str());
            }
        }
        let total = others.len() + 1;
        if total > self.config.max_group_members {
            return reject(
                ErrorCode::TooManyMembers,
                format!(
                    "{total} members including you, the limit is {}",
                    self.config.max_group_members
                ),
            );
        }
        let mut members: Vec<pb::Member> = others
            .into_iter()
            .map(|user_id| pb::Member {
                user_id: user_id.to_owned(),
                role: pb::Role::Member as i32,
            })
            .collect();
        members.push(pb::Member {
            user_id: creator.clone(),
            role: pb::Role::Admin as i32,
        });
        members.sort_unstable_by(|x, y| x.user_id.cmp(&y.user_id));
        let record = GroupRecord {
            conversation_id: group_id_for(req),
            title: create.title.clone(),
            members,
            created_ms: self.clock.now_ms(),
        };
        if !self.store.create_group(&record)? {
            // The id follows from the request's identity, so this is a
            // replay of a create that already happened (at-least-once bus):
            // answer it with the group as it was created, create nothing.
            let Some(existing) = self.store.group(&record.conversation_id)? else {
                return reject(ErrorCode::Unavailable, "group creation raced; retry");
            };
            let created = Body::ConversationCreated(pb::ConversationCreated {
                conversation: Some(group_info(existing, 0)),
            });
            out.frames.push(reply(req, created));
            return Ok(());
        }
        let user_ids: Vec<String> = record.members.iter().map(|m| m.user_id.clone()).collect();
        self.store
            .add_conversation_to_users(&record.conversation_id, &user_ids)?;
        let created = Body::ConversationCreated(pb::ConversationCreated {
            conversation: Some(group_info(record, 0)),
        });
        self.reply_and_fan_out(req, created, &user_ids, out)?;
        Ok(())
    }

    fn change_members(
        &mut self,
        req: &Inbound,
        change: &pb::ChangeMembers,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let conversation_id = &change.conversation_id;
        let actor = &req.from.user_id;
        if let ConversationRef::Direct { .. } = parse_conversation_id(conversation_id)? {
            return reject(
                ErrorCode::InvalidArgument,
                "direct conversations have fixed members",
            );
        }
        let Some(group) = self.store.group(conversation_id)? else {
            return reject(
                ErrorCode::NotFound,
                format!("no conversation {conversation_id}"),
            );
        };
        for user_id in change
            .add_user_ids
            .iter()
            .chain(&change.remove_user_ids)
            .chain(&change.promote_user_ids)
        {
            self.check_user_id(user_id)?;
        }
        let plan = plan_member_change(&group.members, actor, change, &self.config)?;
        let last_seq = self
            .store
            .last_seqs(std::slice::from_ref(conversation_id))?[0];
        let mut recipients: Vec<String> = group.members.iter().map(|m| m.user_id.clone()).collect();
        let changed = Body::MembersChanged(pb::MembersChanged {
            conversation: Some(group_info(
                GroupRecord {
                    members: plan.members_after,
                    ..group
                },
                last_seq,
            )),
            actor_user_id: actor.clone(),
            added_user_ids: plan.added.clone(),
            removed_user_ids: plan.removed.clone(),
        });
        if plan.upsert.is_empty() && plan.removed.is_empty() {
            // Nothing actually changes: tell only the requester.
            out.frames.push(reply(req, changed));
            return Ok(());
        }
        self.store
            .update_members(conversation_id, &plan.upsert, &plan.removed)?;
        self.store
            .add_conversation_to_users(conversation_id, &plan.added)?;
        self.store
            .remove_conversation_from_users(conversation_id, &plan.removed)?;
        // Everyone before and after the change.
        recipients.extend(plan.added);
        self.reply_and_fan_out(req, changed, &recipients, out)?;
        Ok(())
    }

    // ---- Helpers -------------------------------------------------------

    /// Answer the requester's connection (request_id echoed) and send the same
    /// body to every other online device of `users` (request_id 0).
    fn reply_and_fan_out(
        &mut self,
        req: &Inbound,
        body: Body,
        users: &[String],
        out: &mut Output,
    ) -> StoreResult<()> {
        let copy = event(body.clone());
        out.frames.push(reply(req, body));
        self.fan_out(users, Some(&req.from.addr), &copy, out)
    }

    /// `frame` to every online device of `users` (one batched session
    /// lookup), except the connection `except`.
    fn fan_out(
        &mut self,
        users: &[String],
        except: Option<&SessionAddr>,
        frame: &pb::Frame,
        out: &mut Output,
    ) -> StoreResult<()> {
        for devices in self.store.sessions_of_users(users)? {
            for device in devices {
                if Some(&device.addr) != except {
                    out.frames.push(Addressed {
                        to: device.addr,
                        frame: frame.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Authorize `user_id` for the conversation and load its members.
    fn access_with_members(
        &mut self,
        conversation_id: &str,
        user_id: &str,
    ) -> Result<Access, Failure> {
        match parse_conversation_id(conversation_id)? {
            ConversationRef::Direct { a, b } => direct_access(user_id, a, b),
            ConversationRef::Group => {
                let group = self.store.group(conversation_id)?;
                group_access(conversation_id, user_id, group)
            }
        }
    }

    /// Authorize `user_id` for the conversation without loading its members.
    fn check_member(&mut self, conversation_id: &str, user_id: &str) -> Result<(), Failure> {
        match parse_conversation_id(conversation_id)? {
            ConversationRef::Direct { a, b } if user_id == a || user_id == b => Ok(()),
            ConversationRef::Direct { .. } => reject(
                ErrorCode::Forbidden,
                "you are not a member of this conversation",
            ),
            ConversationRef::Group => match self.store.membership(conversation_id, user_id)? {
                Membership::NoSuchGroup => reject(
                    ErrorCode::NotFound,
                    format!("no conversation {conversation_id}"),
                ),
                Membership::NotMember => reject(
                    ErrorCode::Forbidden,
                    "you are not a member of this conversation",
                ),
                Membership::Member(_) => Ok(()),
            },
        }
    }

    fn check_user_id(&self, user_id: &str) -> Result<(), Failure> {
        if !palaver_protocol::is_valid_id(user_id) {
            return reject(
                ErrorCode::InvalidArgument,
                format!("user id {user_id:?} must be 1..=64 bytes of [A-Za-z0-9_.@-]"),
            );
        }
        Ok(())
    }
}

/// What a ChangeMembers request does to a group, decided before anything is
/// written.
struct MemberChange {
    /// Members to add or give a new role (store `upsert`).
    upsert: Vec<pb::Member>,
    /// Users who were not members and are now.
    added: Vec<String>,
    /// Users who were members and are not any more.
    removed: Vec<String>,
    /// The member list afterwards, ascending by user id.
    members_after: Vec<pb::Member>,
}

/// Check a ChangeMembers request of `actor` against the group's current
/// `members` (user ids already validated) and work out its effect.
fn plan_member_change<'a>(
    members: &'a [pb::Member],
    actor: &str,
    change: &'a pb::ChangeMembers,
    config: &RouterConfig,
) -> Result<MemberChange, Failure> {
    let mut roles: BTreeMap<&'a str, pb::Role> = members
        .iter()
        .map(|m| (m.user_id.as_str(), m.role()))
        .collect();
    let Some(actor_role) = roles.get(actor).copied() else {
        return reject(
            ErrorCode::Forbidden,
            "you are not a member of this conversation",
        );
    };
    let add: BTreeSet<&str> = change.add_user_ids.iter().map(String::as_str).collect();
    let remove: BTreeSet<&str> = change.remove_user_ids.iter().map(String::as_str).collect();
    let promote: BTreeSet<&str> = change.promote_user_ids.iter().map(String::as_str).collect();
    if add.is_empty() && remove.is_empty() && promote.is_empty() {
        return reject(ErrorCode::InvalidArgument, "nothing to change");
    }
    if let Some(both) = add.intersection(&remove).next() {
        return reject(
            ErrorCode::InvalidArgument,
            format!("{both} is both added and removed"),
        );
    }
    if let Some(both) = promote.intersection(&remove).next() {
        return reject(
            ErrorCode::InvalidArgument,
            format!("{both} is both promoted and removed"),
        );
    }
    if let Some(stranger) = promote
        .iter()
        .find(|u| !roles.contains_key(*u) && !add.contains(*u))
    {
        return reject(
            ErrorCode::InvalidArgument,
            format!("cannot promote {stranger}: not a member"),
        );
    }
    let leaving_only = add.is_empty() && promote.is_empty() && remove.iter().all(|u| *u == actor);
    if actor_role != pb::Role::Admin && !leaving_only {
        return reject(
            ErrorCode::Forbidden,
            "only admins may add, remove or promote others; members may only remove themselves",
        );
    }

    let added: Vec<&str> = add
        .iter()
        .copied()
        .filter(|u| !roles.contains_key(u))
        .collect();
    let removed: Vec<&str> = remove
        .iter()
        .copied()
        .filter(|u| roles.contains_key(u))
        .collect();
    let size_after = roles.len() + added.len() - removed.len();
    if size_after > config.max_group_members {
        return reject(
            ErrorCode::TooManyMembers,
            format!(
                "the group would have {size_after} members, the limit is {}",
                config.max_group_members
            ),
        );
    }

    let mut upsert = Vec::new();
    let mut set_role =
        |roles: &mut BTreeMap<&'a str, pb::Role>, user_id: &'a str, role: pb::Role| {
            roles.insert(user_id, role);
            upsert.push(pb::Member {
                user_id: user_id.to_owned(),
                role: role as i32,
            });
        };
    for &user_id in &added {
        let role = if promote.contains(user_id) {
            pb::Role::Admin
        } else {
            pb::Role::Member
        };
        set_role(&mut roles, user_id, role);
    }
    for &user_id in &promote {
        if roles.get(user_id) == Some(&pb::Role::Member) {
            set_role(&mut roles, user_id, pb::Role::Admin);
        }
    }
    for user_id in &removed {
        roles.remove(user_id);
    }
    // A group never loses its last admin while it has members: the remaining
    // member with the smallest user id takes over.
    if !roles.values().any(|r| *r == pb::Role::Admin) {
        if let Some(&heir) = roles.keys().next() {
            set_role(&mut roles, heir, pb::Role::Admin);
        }
    }
    Ok(MemberChange {
        upsert,
        added: added.into_iter().map(str::to_owned).collect(),
        removed: removed.into_iter().map(str::to_owned).collect(),
        members_after: roles
            .into_iter()
            .map(|(user_id, role)| pb::Member {
                user_id: user_id.to_owned(),
                role: role as i32,
            })
            .collect(),
    })
}

/// Access to `dm:<a>:<b>` for `user_id`: only its two users.
fn direct_access(user_id: &str, a: &str, b: &str) -> Result<Access, Failure> {
    if user_id != a && user_id != b {
        return reject(
            ErrorCode::Forbidden,
            "you are not a member of this conversation",
        );
    }
    Ok(Access::Direct([a.to_owned(), b.to_owned()]))
}

/// Access to a group for `user_id`, given its record (`None`: no such group).
fn group_access(
    conversation_id: &str,
    user_id: &str,
    group: Option<GroupRecord>,
) -> Result<Access, Failure> {
    let Some(group) = group else {
        return reject(
            ErrorCode::NotFound,
            format!("no conversation {conversation_id}"),
        );
    };
    let is_member = group
        .members
        .binary_search_by(|m| m.user_id.as_str().cmp(user_id))
        .is_ok();
    if !is_member {
        return reject(
            ErrorCode::Forbidden,
            "you are not a member of this conversation",
        );
    }
    Ok(Access::Group {
        members: group.members,
    })
}

fn parse_conversation_id(id: &str) -> Result<ConversationRef<'_>, Failure> {
    if let Some((a, b)) = palaver_protocol::parse_direct(id) {
        return Ok(ConversationRef::Direct { a, b });
    }
    if palaver_protocol::is_group_id(id) {
        return Ok(ConversationRef::Group);
    }
    reject(
        ErrorCode::InvalidArgument,
        format!("{id:?} is not a conversation id (dm:<a>:<b> with a < b bytewise, or grp:<id>)"),
    )
}

fn direct_info(a: &str, b: &str, last_seq: u64) -> pb::Conversation {
    pb::Conversation {
        conversation_id: palaver_protocol::direct_conversation_id(a, b),
        kind: pb::ConversationKind::Direct as i32,
        title: String::new(),
        members: [a, b]
            .into_iter()
            .map(|user_id| pb::Member {
                user_id: user_id.to_owned(),
                role: pb::Role::Member as i32,
            })
            .collect(),
        last_seq,
    }
}

fn group_info(group: GroupRecord, last_seq: u64) -> pb::Conversation {
    pb::Conversation {
        conversation_id: group.conversation_id,
        kind: pb::ConversationKind::Group as i32,
        title: group.title,
        members: group.members,
        last_seq,
    }
}

/// A server-initiated frame (request_id 0).
fn event(body: Body) -> pb::Frame {
    pb::Frame {
        request_id: 0,
        body: Some(body),
    }
}

/// The response to `req`, for the requesting connection.
fn reply(req: &Inbound, body: Body) -> Addressed {
    Addressed {
        to: req.from.addr.clone(),
        frame: pb::Frame {
            request_id: req.request_id,
            body: Some(body),
        },
    }
}

/// The Error answering `req` ([`palaver_protocol::error_reply_to`]: a Send's
/// client_msg_id is echoed), for the requesting connection.
fn error_frame(req: &Inbound, code: ErrorCode, message: String) -> Addressed {
    Addressed {
        to: req.from.addr.clone(),
        frame: palaver_protocol::error_reply_to(req.request_id, &req.body, code, message),
    }
}
