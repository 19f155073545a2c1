//! The router: turns one client request ([`Inbound`]) into store updates and
//! addressed frames.
//!
//! Pure over the [`Store`] traits and a [`Clock`]: no threads, no I/O of its
//! own. The embedded engine and the Kafka/Redis worker both drive it.
//!
//! Every client request is answered: with its response frame (request_id
//! echoed), or with an `Error` frame carrying a code, a message, the
//! request_id and (for Send) the client_msg_id. Receipt and Typing have no
//! positive response; they are answered only when they fail.
//!
//! This file holds the [`Router`] (construction, [`Router::handle`] /
//! [`Router::handle_batch`] dispatch) and the helpers every request family
//! shares; each family's handlers are an `impl Router` block of their own:
//! `messages` (Send, the batch send path, Sync, History), `receipts`,
//! `typing`, `presence` (queries, watches, the visibility rule, the
//! session-change path), `conversations` (create, group membership) and
//! `push` (push registrations and mutes, SPEC §20).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use palaver_protocol::pb::{self, frame::Body, ErrorCode};
use palaver_protocol::BodyKind;

use crate::api::{Inbound, SessionAddr};
use crate::bus::{Addressed, Output};
use crate::presence::SharedWatches;
use crate::store::{GroupRecord, Membership, Store, StoreError, StoreResult};

mod channels;
mod conversations;
mod messages;
mod presence;
mod push;
mod receipts;
mod typing;

pub use presence::{presence_visible, PresenceVisibility};

/// Router limits and defaults. Every limit is enforced with a clear error.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterConfig {
    /// Members of a group, creator included.
    pub max_group_members: usize,
    /// Members of a channel (SPEC §21). What bounds it: nothing per message
    /// (fan-out on read), only the member set's size in the store (about
    /// 100 bytes a member in Redis) and a member list's pages.
    pub max_channel_members: usize,
    /// Users one channel Send may mention (pushed to when offline).
    pub max_mentions: usize,
    /// Largest `Send.body`, bytes.
    pub max_body_bytes: usize,
    /// Messages kept per conversation for Sync and History (with an
    /// archive: kept in the store's window, the rest read from the archive).
    pub history_window: usize,
    /// Put every stored message in [`Output::stored`] for the archiver
    /// (the Kafka worker with an archive configured).
    pub archive_stream: bool,
    /// How long a (conversation, sender, client_msg_id) is remembered for dedup.
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
    /// Groups one user may be in (SPEC §11): creating a group or being
    /// added to one beyond it is refused with QUOTA_EXCEEDED. Bounds the
    /// work of every presence visibility check (it walks the asker's
    /// groups).
    pub max_groups_per_user: usize,
    /// Times one adder may add the same user to groups per UTC day (SPEC
    /// §11; QUOTA_EXCEEDED beyond).
    pub max_group_adds_per_adder_per_day: u32,
    /// Adds of one user to groups per UTC day by adders who are not the
    /// user's contacts (no direct conversation both have written in), all
    /// of them together (SPEC §11; QUOTA_EXCEEDED beyond).
    pub max_group_adds_by_strangers_per_day: u32,
    /// Membership changes (ChangeMembers that change something) one group
    /// may have per UTC hour (SPEC §11); beyond, QUOTA_EXCEEDED.
    pub max_membership_changes_per_group_per_hour: u64,
    /// Bytes one account may store per UTC day (SPEC §13: body + 256 per
    /// message); a Send beyond is QUOTA_EXCEEDED.
    pub account_bytes_per_day: u64,
    /// Bytes one conversation may store per UTC day, all senders together.
    pub conversation_bytes_per_day: u64,
    /// Devices with a push registration per user (SPEC §20): registering
    /// one more drops the oldest registration.
    pub max_push_devices_per_user: usize,
    /// Conversations one user may have muted at once (SPEC §20;
    /// QUOTA_EXCEEDED beyond).
    pub max_mutes_per_user: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            max_group_members: 1000,
            max_channel_members: 100_000,
            max_mentions: 20,
            max_body_bytes: palaver_protocol::Limits::default().max_body_bytes as usize,
            history_window: 10_000,
            archive_stream: false,
            dedup_ttl_ms: 24 * 60 * 60 * 1000,
            default_batch: 100,
            max_batch: 500,
            max_batch_bytes: 1024 * 1024,
            max_watches_per_connection: 1000,
            max_presence_users: 1000,
            max_title_bytes: 256,
            presence_visibility: PresenceVisibility::SharedConversation,
            max_groups_per_user: 500,
            max_group_adds_per_adder_per_day: 10,
            max_group_adds_by_strangers_per_day: 20,
            max_membership_changes_per_group_per_hour: 60,
            account_bytes_per_day: 64 * 1024 * 1024,
            conversation_bytes_per_day: 256 * 1024 * 1024,
            max_push_devices_per_user: 20,
            max_mutes_per_user: 1000,
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

/// 64 bits from the OS-seeded std hasher keys, the time and the process id:
/// random enough for ids and epochs, without a crate for it.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Unique opaque ids: 64 random bits fixed per process ([`random_u64`])
/// followed by a 64-bit counter, as 32 hex digits.
struct IdGen {
    node: u64,
    counter: u64,
}

impl IdGen {
    fn new() -> Self {
        Self {
            node: random_u64(),
            counter: 0,
        }
    }

    fn next(&mut self) -> String {
        self.counter += 1;
        // What `format!("{:016x}{:016x}")` makes, in one exact allocation
        // without the formatting machinery (one per message).
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut id = String::with_capacity(32);
        for word in [self.node, self.counter] {
            for shift in (0..16).rev() {
                id.push(char::from(HEX[(word >> (shift * 4)) as usize & 0xf]));
            }
        }
        id
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
    /// `chn:<id>` (SPEC §21)
    Channel,
}

/// Who may see a conversation, as far as a request needs to know: borrowed
/// from the conversation id (direct) or from the group's record, so
/// authorizing a Send copies no member id.
#[derive(Clone, Copy)]
enum Access<'a> {
    Direct([&'a str; 2]),
    Group(&'a [pb::Member]),
    /// A channel (SPEC §21): its members are not loaded; the users a Send
    /// reaches directly are the members it mentions (pushes), the rest
    /// read it from the channel's post.
    Channel(&'a [String]),
}

impl<'a> Access<'a> {
    /// The users a message reaches directly: the members (a group's
    /// ascending), or a channel Send's mentioned members.
    fn member_ids(self) -> impl Iterator<Item = &'a str> {
        // Two of the three are empty; one iterator type for all.
        let (direct, group, mentions): ([Option<&'a str>; 2], &'a [pb::Member], &'a [String]) =
            match self {
                Access::Direct([a, b]) => ([Some(a), Some(b)], &[], &[]),
                Access::Group(members) => ([None, None], members, &[]),
                Access::Channel(mentions) => ([None, None], &[], mentions),
            };
        direct
            .into_iter()
            .flatten()
            .chain(group.iter().map(|m| m.user_id.as_str()))
            .chain(mentions.iter().map(String::as_str))
    }

    fn member_count(self) -> usize {
        match self {
            Access::Direct(_) => 2,
            Access::Group(members) => members.len(),
            Access::Channel(mentions) => mentions.len(),
        }
    }
}

/// How far [`Router::handle_batch`] got: `requests[..done]` are handled
/// and their output is `out.frames[..frames]` / `out.pushes[..pushes]`
/// (whatever `out` held before included). Updated after every request or
/// run of Sends, so a driver that catches a panic knows what is complete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchProgress {
    pub done: usize,
    pub frames: usize,
    pub pushes: usize,
    pub channel_posts: usize,
}

pub struct Router<S> {
    store: S,
    config: RouterConfig,
    clock: Arc<dyn Clock>,
    ids: IdGen,
    /// The presence watches of the connections this router answers
    /// PresenceSubscribe for (shared with whoever fans events out).
    watches: SharedWatches,
}

impl<S: Store> Router<S> {
    pub fn new(store: S, config: RouterConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            config,
            clock,
            ids: IdGen::new(),
            watches: SharedWatches::default(),
        }
    }

    /// Uses `watches` for PresenceSubscribe instead of a table of its own
    /// (the bridge's reader threads share their gateway's).
    pub fn with_watches(mut self, watches: SharedWatches) -> Self {
        self.watches = watches;
        self
    }

    /// The presence watches this router adds to.
    pub fn watches(&self) -> &SharedWatches {
        &self.watches
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

    /// The router's clock, Unix epoch ms.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Process one request, appending what it produces to `out`.
    ///
    /// On a store error, `out` keeps what was produced before the failure
    /// (it describes effects that happened) and the error is returned; the
    /// driver either retries the request or answers it with
    /// [`Router::unavailable_reply`].
    pub fn handle(&mut self, request: &Inbound, out: &mut Output) -> StoreResult<()> {
        self.handle_request(request, out)
    }

    /// Process `requests` in order, as [`Router::handle`] on each would,
    /// but with each run of consecutive Sends handled as one unit: one
    /// group read, one batch of appends, one session lookup for the whole
    /// run (see `send_many`). Sends of one conversation in a run get
    /// consecutive seqs in input order. Any other request ends the run and
    /// is handled on its own, so everything a conversation sees happens in
    /// input order.
    ///
    /// `progress` is reset and then advanced past each completed unit. On
    /// a store error, the unit starting at `progress.done` failed, having
    /// left in `out` only effects that happened (as `handle` does); the
    /// caller retries from there.
    pub fn handle_batch(
        &mut self,
        requests: &[Inbound],
        out: &mut Output,
        progress: &mut BatchProgress,
    ) -> StoreResult<()> {
        *progress = BatchProgress {
            done: 0,
            frames: out.frames.len(),
            pushes: out.pushes.len(),
            channel_posts: out.channel_posts.len(),
        };
        while progress.done < requests.len() {
            let rest = &requests[progress.done..];
            let sends = rest
                .iter()
                .take_while(|req| matches!(req.body, Body::Send(_)))
                .count();
            let taken = if sends == 0 {
                self.handle(&rest[0], out)?;
                1
            } else {
                self.send_many(&rest[..sends], out)?;
                sends
            };
            *progress = BatchProgress {
                done: progress.done + taken,
                frames: out.frames.len(),
                pushes: out.pushes.len(),
                channel_posts: out.channel_posts.len(),
            };
        }
        Ok(())
    }

    /// The `Error(UNAVAILABLE)` frame that answers `request` when the store
    /// failed.
    pub fn unavailable_reply(request: &Inbound, error: &StoreError) -> Addressed {
        error_frame(
            request,
            ErrorCode::Unavailable,
            format!("temporarily unavailable, retry later ({error})"),
        )
    }

    /// The `Error(INTERNAL)` frame that answers `request` when handling it
    /// hit a bug (a caught panic).
    pub fn internal_error_reply(request: &Inbound) -> Addressed {
        error_frame(
            request,
            ErrorCode::Internal,
            "internal error; the request was not processed".to_string(),
        )
    }

    fn handle_request(&mut self, request: &Inbound, out: &mut Output) -> StoreResult<()> {
        let result = match &request.body {
            Body::Send(_) => self.send(request, out),
            Body::Receipt(receipt) => self.receipt(request, receipt, out),
            Body::Typing(typing) => self.typing(request, typing, out),
            Body::Sync(sync) => self.sync(request, sync, out),
            Body::History(history) => self.history(request, history, out),
            Body::PresenceQuery(query) => self.presence_query(request, query, out),
            Body::PresenceSubscribe(subscribe) => self.presence_subscribe(request, subscribe, out),
            Body::CreateConversation(create) => self.create_conversation(request, create, out),
            Body::ChangeMembers(change)
                if palaver_protocol::is_channel_id(&change.conversation_id) =>
            {
                self.change_channel_members(request, change, out)
            }
            Body::ChangeMembers(change) => self.change_members(request, change, out),
            Body::ListMembers(list) => self.list_members(request, list, out),
            Body::OpenChannel(open) => self.open_channel(request, open, out),
            Body::RegisterPushToken(register) => self.register_push_token(request, register, out),
            Body::UnregisterPushToken(_) => self.unregister_push_token(request, out),
            Body::MuteConversation(mute) => self.mute_conversation(request, mute, out),
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
        users: &[impl AsRef<str>],
        except: Option<&SessionAddr>,
        frame: &pb::Frame,
        out: &mut Output,
    ) -> StoreResult<()> {
        for devices in self.store.sessions_of_users(users)?.iter() {
            for addr in devices {
                if Some(addr) != except {
                    out.frames.push(Addressed {
                        to: addr.clone(),
                        frame: frame.clone(),
                        answers_request: false,
                    });
                }
            }
        }
        Ok(())
    }

    /// The record [`access`] needs for the conversation: the group's, read
    /// from the store (`None` for a direct conversation, or no such group).
    fn group_of(&mut self, conversation_id: &str) -> Result<Option<GroupRecord>, Failure> {
        match parse_conversation_id(conversation_id)? {
            ConversationRef::Direct { .. } | ConversationRef::Channel => Ok(None),
            ConversationRef::Group => Ok(self.store.group(conversation_id)?),
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
            ConversationRef::Channel => self.channel_role_of(conversation_id, user_id).map(|_| ()),
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

/// Authorize `user_id` for the conversation, given its group record if it
/// is a group ([`Router::group_of`]).
fn access<'a>(
    conversation_id: &'a str,
    user_id: &str,
    group: Option<&'a GroupRecord>,
) -> Result<Access<'a>, Failure> {
    match parse_conversation_id(conversation_id)? {
        ConversationRef::Direct { a, b } => direct_access(user_id, a, b),
        ConversationRef::Group => group_access(conversation_id, user_id, group),
        // Checked by `Router::channel_send_check` (a store lookup), before.
        ConversationRef::Channel => reject(
            ErrorCode::Internal,
            "a channel's access is checked against its member set",
        ),
    }
}

/// Access to `dm:<a>:<b>` for `user_id`: only its two users.
fn direct_access<'a>(user_id: &str, a: &'a str, b: &'a str) -> Result<Access<'a>, Failure> {
    if user_id != a && user_id != b {
        return reject(
            ErrorCode::Forbidden,
            "you are not a member of this conversation",
        );
    }
    Ok(Access::Direct([a, b]))
}

/// Access to a group for `user_id`, given its record (`None`: no such group).
fn group_access<'a>(
    conversation_id: &str,
    user_id: &str,
    group: Option<&'a GroupRecord>,
) -> Result<Access<'a>, Failure> {
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
    Ok(Access::Group(&group.members))
}

fn parse_conversation_id(id: &str) -> Result<ConversationRef<'_>, Failure> {
    if let Some((a, b)) = palaver_protocol::parse_direct(id) {
        return Ok(ConversationRef::Direct { a, b });
    }
    if palaver_protocol::is_group_id(id) {
        return Ok(ConversationRef::Group);
    }
    if palaver_protocol::is_channel_id(id) {
        return Ok(ConversationRef::Channel);
    }
    reject(
        ErrorCode::InvalidArgument,
        format!(
            "{id:?} is not a conversation id (dm:<a>:<b> with a < b bytewise, grp:<id> or chn:<id>)"
        ),
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
        ..Default::default()
    }
}

fn group_info(group: GroupRecord, last_seq: u64) -> pb::Conversation {
    pb::Conversation {
        conversation_id: group.conversation_id,
        kind: pb::ConversationKind::Group as i32,
        title: group.title,
        members: group.members,
        last_seq,
        ..Default::default()
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
        answers_request: true,
    }
}

/// The Error answering `req` ([`palaver_protocol::error_reply_to`]: a Send's
/// client_msg_id is echoed), for the requesting connection.
fn error_frame(req: &Inbound, code: ErrorCode, message: String) -> Addressed {
    Addressed {
        to: req.from.addr.clone(),
        frame: palaver_protocol::error_reply_to(req.request_id, &req.body, code, message),
        answers_request: true,
    }
}

#[cfg(test)]
mod tests {
    use super::IdGen;

    #[test]
    fn ids_are_the_node_then_the_counter_in_32_lowercase_hex_digits() {
        let mut ids = IdGen {
            node: 0x0123_4567_89ab_cdef,
            counter: 0xfe,
        };
        assert_eq!(ids.next(), "0123456789abcdef00000000000000ff");
        ids.counter = u64::MAX - 1;
        assert_eq!(ids.next(), "0123456789abcdefffffffffffffffff");
        let mut ids = IdGen::new();
        let node = ids.node;
        assert_eq!(ids.next(), format!("{node:016x}{:016x}", 1));
    }
}
