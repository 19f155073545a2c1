//! The SDK's sans-io core: fed app commands, transport events, decoded
//! frames and the time, it decides what to write, what to tell the app and
//! when to dial. No sockets, no threads, no clock: `io.rs` moves the bytes,
//! and the unit tests below drive it on a virtual clock.
//!
//! Per connection it uses the protocol crate's [`ClientConn`] (phases,
//! heartbeats, timeouts); across connections it keeps the outbox, the
//! receive cursors, the presence watch list and the pending receipts.

mod inbound;
mod outbound;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use palaver_protocol::pb::{self, frame::Body};
use palaver_protocol::state::ClientPhase;
use palaver_protocol::{frame, ClientConn, Verdict};

use crate::config::ClientConfig;
use crate::cursors::Cursors;
use crate::log::LogLevel;
use crate::outbox::Outbox;
use crate::types::*;

/// How long a refused-for-now request (RATE_LIMITED, 3xxx) waits (SPEC §13).
const RETRY_AFTER_MS: u64 = 1_000;
/// DELIVERED receipts are batched for this long.
const RECEIPT_BATCH_MS: u64 = 500;
/// SPEC §9: `active: true` at most every 3 s.
const TYPING_REFRESH_MS: u64 = 3_000;
/// SPEC §10: at most 1,000 user ids per presence request.
const PRESENCE_CHUNK: usize = 1_000;
/// Extra attempts counted after PROTOCOL_VIOLATION / MALFORMED_FRAME, so a
/// client bug does not loop tight (SPEC §14).
const STRONG_BACKOFF_STEPS: u32 = 4;

/// A request the app made that is answered under a ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    History {
        conversation_id: String,
        before_seq: u64,
        limit: u32,
    },
    PresenceQuery {
        user_ids: Vec<String>,
    },
    CreateConversation {
        kind: ConversationKind,
        title: String,
        member_user_ids: Vec<String>,
        /// A channel's settings (SPEC §21).
        channel: Option<pb::ChannelSettings>,
    },
    /// SPEC §21.
    ListMembers {
        conversation_id: String,
        after_user_id: String,
        limit: u32,
    },
    ChangeMembers {
        conversation_id: String,
        add: Vec<String>,
        remove: Vec<String>,
        promote: Vec<String>,
    },
    /// SPEC §20; built and checked by the caller.
    RegisterPushToken(pb::RegisterPushToken),
    UnregisterPushToken,
    MuteConversation {
        conversation_id: String,
        /// 0 with `forever` false: unmute.
        muted_until_ms: i64,
        forever: bool,
    },
}

impl Request {
    /// A push request (SPEC §20): sent only to a server that announced
    /// them (`Welcome.limits.max_push_token_bytes` non-zero).
    fn is_push(&self) -> bool {
        matches!(
            self,
            Request::RegisterPushToken(_)
                | Request::UnregisterPushToken
                | Request::MuteConversation { .. }
        )
    }

    /// Whether sending it twice does no harm (the connection may drop after
    /// the server carried it out but before the answer arrived).
    fn safe_to_repeat(&self) -> bool {
        // A group's or channel's id comes from the request's identity on
        // its connection: sent again on another, it makes a second one.
        !matches!(
            self,
            Request::CreateConversation {
                kind: ConversationKind::Group | ConversationKind::Channel,
                ..
            }
        )
    }

    fn body(&self) -> Body {
        match self.clone() {
            Request::History {
                conversation_id,
                before_seq,
                limit,
            } => Body::History(pb::History {
                conversation_id,
                before_seq,
                limit,
            }),
            Request::PresenceQuery { user_ids } => {
                Body::PresenceQuery(pb::PresenceQuery { user_ids })
            }
            Request::CreateConversation {
                kind,
                title,
                member_user_ids,
                channel,
            } => Body::CreateConversation(pb::CreateConversation {
                kind: match kind {
                    ConversationKind::Direct => pb::ConversationKind::Direct,
                    ConversationKind::Group => pb::ConversationKind::Group,
                    ConversationKind::Channel => pb::ConversationKind::Channel,
                    ConversationKind::Unspecified => pb::ConversationKind::Unspecified,
                } as i32,
                title,
                member_user_ids,
                channel,
            }),
            Request::ListMembers {
                conversation_id,
                after_user_id,
                limit,
            } => Body::ListMembers(pb::ListMembers {
                conversation_id,
                after_user_id,
                limit,
            }),
            Request::ChangeMembers {
                conversation_id,
                add,
                remove,
                promote,
            } => Body::ChangeMembers(pb::ChangeMembers {
                conversation_id,
                add_user_ids: add,
                remove_user_ids: remove,
                promote_user_ids: promote,
            }),
            Request::RegisterPushToken(register) => Body::RegisterPushToken(register),
            Request::UnregisterPushToken => Body::UnregisterPushToken(pb::UnregisterPushToken {}),
            Request::MuteConversation {
                conversation_id,
                muted_until_ms,
                forever,
            } => Body::MuteConversation(pb::MuteConversation {
                conversation_id,
                muted_until_ms,
                forever,
            }),
        }
    }
}

/// App commands, in the order the app made them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Connect,
    Disconnect,
    Close,
    /// Already written to the store by the calling thread.
    Send(OutgoingMessage),
    Receipt {
        conversation_id: String,
        kind: ReceiptKind,
        up_to_seq: u64,
    },
    Typing {
        conversation_id: String,
        active: bool,
    },
    Presence {
        user_ids: Vec<String>,
        unsubscribe: bool,
    },
    /// SPEC §21: remembered, and set again after every reconnect.
    OpenChannel {
        conversation_id: String,
        mode: ChannelMode,
    },
    Ticket {
        ticket: u64,
        request: Request,
    },
    SyncNow,
    /// Skip the wait before the next attempt (the app came to the
    /// foreground, the network changed).
    ReconnectNow,
}

/// What the I/O side must do for the engine besides writing frames.
// Nearly every value is an Event: boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Output {
    Event(ClientEvent),
    /// Persist after the events before it were handled.
    SaveCursor(SyncCursor),
    RemoveOutgoing(Vec<u8>),
    /// A line for the app's log sink (`crate::log`), in order with the
    /// events, from the dispatch thread.
    Log(LogLevel, String),
}

/// Why a dial failed before the transport came up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DialFailure {
    /// The token provider refused for good.
    TokenDenied(String),
    /// Token provider unavailable for now, DNS, TCP: retry with backoff.
    Transient(ConnectFailure),
}

/// Where the connection is; each state holds what only it needs.
enum Link {
    /// Not connecting (not running, or stopped).
    Idle,
    /// Waiting to dial at `at`.
    Waiting { at: u64 },
    /// The I/O side is dialling (TCP + TLS) until `deadline`; Hello not
    /// sent yet.
    Dialling { deadline: u64 },
    /// Hello sent on a transport; the Welcome is due by `welcome_by` (the
    /// dial's deadline: connect_timeout_ms covers both).
    Open { conn: ClientConn, welcome_by: u64 },
}

/// A message's identity across a history reset: (conversation, sender,
/// client_msg_id).
type MessageKey = (String, String, Vec<u8>);

/// Messages remembered to recognise one stored again after the server lost
/// its history (see `Engine::recent`): more than a sender's messages in
/// flight (`max_requests_in_flight`, 64 by default) around a crash.
const RECENT_MESSAGES: usize = 512;

#[derive(Debug, Clone)]
enum InFlight {
    Send(Vec<u8>),
    Sync,
    PresenceSubscribe,
    /// An OpenChannel of this channel.
    Channel(String),
    Ticket(u64, Request),
}

#[derive(Debug)]
struct SyncRound {
    request_id: u32,
    /// Conversations that had a gap when the round started: a gap still
    /// there at the end is final (SPEC §7, the server's window).
    gapped_at_start: BTreeSet<String>,
    /// Highest seq received per conversation in this round's batches: where
    /// the next `has_more` Sync continues.
    received: HashMap<String, u64>,
}

pub(crate) struct Engine {
    cfg: ClientConfig,
    /// The app wants to be connected.
    running: bool,
    closed: bool,
    link: Link,
    attempt: u32,
    /// Ask the provider for a fresh token at the next dial (TOKEN_EXPIRED).
    refresh_token: bool,
    /// The token of the current dial was a forced refresh.
    token_was_refreshed: bool,
    state: ConnectionState,
    /// Why the last attempt or connection ended (for `Connecting`).
    last_failure: Option<ConnectFailure>,
    rng: u64,

    next_request_id: u32,
    ping_nonce: u64,
    limits: pb::Limits,
    user_id: String,
    in_flight: HashMap<u32, InFlight>,
    sync: Option<SyncRound>,
    sync_wanted: bool,
    send_tokens: f64,
    tokens_at: u64,

    outbox: Outbox,
    cursors: Cursors,
    dirty_cursors: BTreeSet<String>,
    /// The last [`RECENT_MESSAGES`] messages handed to the app, as
    /// (conversation, sender, client_msg_id).
    recent: VecDeque<MessageKey>,
    /// Those of conversations whose history the server lost since: the
    /// sender's outbox may send them again and the new history store them
    /// under new seqs (the old server stored them but died before its ack):
    /// the app already has them and does not get them twice.
    delivered_before_reset: std::collections::HashSet<MessageKey>,
    watched: BTreeSet<String>,
    /// Channels the app opened (LIVE or COUNTS): a connection's modes end
    /// with it (SPEC §21), so they are set again after each Welcome.
    open_channels: BTreeMap<String, ChannelMode>,
    /// (conversation, kind) → up_to_seq not yet sent.
    receipts: BTreeMap<(String, ReceiptKind), u64>,
    receipts_due: Option<u64>,
    /// conversation → (active, sent at).
    typing: HashMap<String, (bool, u64)>,
    queued: VecDeque<(u64, Request)>,

    writes: Vec<pb::Frame>,
    outputs: Vec<Output>,
    close_transport: bool,
}

impl Engine {
    pub fn new(
        cfg: ClientConfig,
        outbox: Vec<OutgoingMessage>,
        cursors: Vec<SyncCursor>,
        seed: u64,
    ) -> Engine {
        Engine {
            cfg,
            running: false,
            closed: false,
            link: Link::Idle,
            attempt: 0,
            refresh_token: false,
            token_was_refreshed: false,
            state: ConnectionState::Disconnected { cause: None },
            last_failure: None,
            rng: seed | 1,
            next_request_id: 1,
            ping_nonce: 0,
            limits: pb::Limits::default(),
            user_id: String::new(),
            in_flight: HashMap::new(),
            sync: None,
            sync_wanted: false,
            send_tokens: 0.0,
            tokens_at: 0,
            outbox: Outbox::from_saved(outbox),
            cursors: Cursors::from_saved(
                cursors
                    .into_iter()
                    .map(|c| (c.conversation_id, c.after_seq, c.history_epoch)),
            ),
            dirty_cursors: BTreeSet::new(),
            recent: VecDeque::with_capacity(RECENT_MESSAGES),
            delivered_before_reset: std::collections::HashSet::new(),
            watched: BTreeSet::new(),
            open_channels: BTreeMap::new(),
            receipts: BTreeMap::new(),
            receipts_due: None,
            typing: HashMap::new(),
            queued: VecDeque::new(),
            writes: Vec::new(),
            outputs: Vec::new(),
            close_transport: false,
        }
    }

    // ---- what the I/O side reads ------------------------------------------------

    pub fn state(&self) -> &ConnectionState {
        &self.state
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    #[cfg(test)]
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    pub fn next_created_order(&self) -> u64 {
        self.outbox.highest_order().map_or(0, |o| o + 1)
    }

    pub fn max_body_bytes(&self) -> usize {
        match self.limits.max_body_bytes {
            0 => 61_440,
            n => n as usize,
        }
    }

    pub fn take_writes(&mut self) -> Vec<pb::Frame> {
        std::mem::take(&mut self.writes)
    }

    pub fn take_outputs(&mut self) -> Vec<Output> {
        self.flush_cursors();
        std::mem::take(&mut self.outputs)
    }

    /// True once: the engine is done with the current transport.
    pub fn take_close(&mut self) -> bool {
        std::mem::take(&mut self.close_transport)
    }

    /// Dial now? Returns whether the token must be a fresh one.
    pub fn poll_dial(&mut self, now: u64) -> Option<bool> {
        match self.link {
            Link::Waiting { at } if self.running && now >= at => {}
            _ => return None,
        }
        self.link = Link::Dialling {
            deadline: now.saturating_add(u64::from(self.cfg.connect_timeout_ms)),
        };
        self.set_state(ConnectionState::Connecting {
            attempt: self.attempt,
            retry_in_ms: 0,
            last_failure: self.last_failure.clone(),
        });
        let fresh = std::mem::take(&mut self.refresh_token);
        self.token_was_refreshed = fresh;
        Some(fresh)
    }

    /// The earliest time `on_tick` must run.
    pub fn next_wakeup(&self, now: u64) -> Option<u64> {
        let mut t: Option<u64> = None;
        let mut at = |x: u64| t = Some(t.map_or(x, |y: u64| y.min(x)));
        match &self.link {
            Link::Waiting { at: dial_at } if self.running => at(*dial_at),
            Link::Dialling { deadline } => at(*deadline),
            Link::Open { conn, welcome_by } => {
                if let Some(w) = conn.next_wakeup() {
                    at(w);
                }
                if conn.phase() == ClientPhase::AwaitingWelcome {
                    at(*welcome_by);
                }
                if let Some(r) = self.receipts_due {
                    at(r);
                }
                if let Some(r) = self.outbox.next_retry_at(now) {
                    at(r);
                }
                if self.established() && !self.outbox.ready(now, 1).is_empty() {
                    // Waiting for send tokens (or in-flight room).
                    at(now + 20);
                }
            }
            Link::Idle | Link::Waiting { .. } => {}
        }
        t
    }

    // ---- app commands -----------------------------------------------------------

    pub fn command(&mut self, cmd: Command, now: u64) {
        if self.closed {
            return;
        }
        match cmd {
            Command::Connect => {
                self.running = true;
                if matches!(self.link, Link::Idle) {
                    self.attempt = 0;
                    self.refresh_token = false;
                    self.link = Link::Waiting { at: now };
                    self.last_failure = None;
                    self.set_state(ConnectionState::Connecting {
                        attempt: 0,
                        retry_in_ms: 0,
                        last_failure: None,
                    });
                }
            }
            Command::Disconnect => {
                self.stop(now, Some(DisconnectCause::Requested));
            }
            Command::Close => {
                self.stop(now, Some(DisconnectCause::Requested));
                self.closed = true;
                self.set_state(ConnectionState::Closed);
            }
            Command::Send(m) => {
                self.outbox.push(m);
                self.pump(now);
            }
            Command::Receipt {
                conversation_id,
                kind,
                up_to_seq,
            } => {
                // A user action: send it now (DELIVERED from the SDK itself
                // is batched).
                self.add_receipt(conversation_id, kind, up_to_seq, now);
                self.pump(now);
            }
            Command::Typing {
                conversation_id,
                active,
            } => self.typing(conversation_id, active, now),
            Command::Presence {
                user_ids,
                unsubscribe,
            } => {
                for u in &user_ids {
                    if unsubscribe {
                        self.watched.remove(u);
                    } else {
                        self.watched.insert(u.clone());
                    }
                }
                if self.established() {
                    self.presence_subscribe(user_ids, unsubscribe, now);
                }
            }
            Command::OpenChannel {
                conversation_id,
                mode,
            } => {
                if mode == ChannelMode::Closed {
                    self.open_channels.remove(&conversation_id);
                } else {
                    self.open_channels.insert(conversation_id.clone(), mode);
                }
                if self.established() {
                    self.open_channel(conversation_id, mode, now);
                }
            }
            Command::Ticket { ticket, request } => {
                self.queued.push_back((ticket, request));
                self.pump(now);
            }
            Command::SyncNow => self.want_sync(now),
            Command::ReconnectNow => {
                if let (true, Link::Waiting { at }) = (self.running, &mut self.link) {
                    *at = now;
                }
            }
        }
    }

    // ---- transport events ---------------------------------------------------------

    /// TLS is up: send Hello with `token`.
    pub fn on_transport_up(&mut self, now: u64, token: String) {
        let Link::Dialling { deadline } = self.link else {
            return;
        };
        let welcome_ms = deadline.saturating_sub(now);
        self.link = Link::Open {
            conn: ClientConn::new(now, u32::try_from(welcome_ms).unwrap_or(u32::MAX)),
            welcome_by: deadline,
        };
        self.in_flight.clear();
        self.sync = None;
        let id = self.request_id();
        let resume: Vec<pb::Cursor> = self
            .cursors
            .positions()
            .into_iter()
            .map(|(conversation_id, after_seq)| pb::Cursor {
                conversation_id,
                after_seq,
            })
            .collect();
        if !resume.is_empty() {
            // SPEC §7: resume cursors start the sync right after Welcome,
            // answered under the Hello's request id.
            self.begin_round(id);
        }
        self.writes.push(frame(
            id,
            Body::Hello(pb::Hello {
                protocol_version: palaver_protocol::PROTOCOL_VERSION,
                token,
                device_id: self.cfg.device_id.clone(),
                client_name: self.cfg.client_name.clone(),
                client_version: self.cfg.client_version.clone(),
                resume,
            }),
        ));
    }

    pub fn on_dial_failed(&mut self, now: u64, why: DialFailure) {
        if !matches!(self.link, Link::Dialling { .. }) {
            return;
        }
        match why {
            DialFailure::TokenDenied(message) => {
                self.stop(now, Some(DisconnectCause::TokenUnavailable { message }))
            }
            DialFailure::Transient(why) => self.fail(now, 0, 0, why),
        }
    }

    /// The transport closed or failed (EOF, reset, TLS or framing error):
    /// `why` says which. An untrusted certificate stops reconnecting (it
    /// fails the same way every time); the rest retry with backoff.
    pub fn on_transport_down(&mut self, now: u64, why: ConnectFailure) {
        if !matches!(self.link, Link::Dialling { .. } | Link::Open { .. }) {
            return;
        }
        if matches!(why, ConnectFailure::UntrustedCertificate { .. }) {
            self.stop(now, Some(DisconnectCause::Failed { failure: why }));
        } else {
            self.fail(now, 0, 0, why);
        }
    }

    pub fn on_tick(&mut self, now: u64) {
        let (timed_out, ping_due) = match &self.link {
            Link::Dialling { deadline } if now >= *deadline => (true, false),
            Link::Open { conn, .. } => (conn.check_timeout(now).is_some(), conn.ping_due(now)),
            _ => return,
        };
        match self.link {
            Link::Dialling { .. } if timed_out => self.fail(
                now,
                0,
                0,
                ConnectFailure::TimedOut {
                    detail: "no connection within connect_timeout_ms".into(),
                },
            ),
            Link::Open { .. } => {
                if timed_out {
                    // No Welcome in time, or server silent for 2.5 intervals.
                    self.fail(
                        now,
                        0,
                        0,
                        ConnectFailure::TimedOut {
                            detail: "no Welcome in time, or the server fell silent".into(),
                        },
                    );
                    return;
                }
                if ping_due {
                    self.ping_nonce += 1;
                    let nonce = self.ping_nonce;
                    self.write(Body::Ping(pb::Ping { nonce }), now);
                }
                self.pump(now);
            }
            _ => {}
        }
    }

    pub fn on_frame(&mut self, f: pb::Frame, now: u64) {
        let Link::Open { conn, .. } = &mut self.link else {
            return;
        };
        match conn.on_frame(&f, now) {
            Ok(Verdict::Process) => {}
            Ok(Verdict::Ignore | Verdict::Hold) => return,
            Err(e) => {
                // The server broke the protocol: close, back off strongly.
                self.fail(
                    now,
                    0,
                    STRONG_BACKOFF_STEPS,
                    ConnectFailure::Protocol {
                        detail: format!("the server broke the protocol: {e:?}"),
                    },
                );
                return;
            }
        }
        let rid = f.request_id;
        let Some(body) = f.body else { return };
        match body {
            Body::Welcome(w) => self.on_welcome(w, now),
            Body::Ping(p) => self.write_with_id(rid, Body::Pong(pb::Pong { nonce: p.nonce }), now),
            Body::Pong(_) => {}
            Body::GoAway(g) => self.on_go_away(g, now),
            Body::Error(e) => self.on_error(rid, e, now),
            Body::SendAck(a) => self.on_send_ack(rid, a, now),
            Body::Deliver(d) => {
                if let Some(m) = d.message {
                    self.on_message(m, now);
                }
            }
            Body::SyncBatch(b) => self.on_sync_batch(rid, b, now),
            Body::HistoryPage(p) => {
                if !self.on_epoch(p.history_epoch).is_empty() {
                    self.want_sync(now);
                }
                if let Some(InFlight::Ticket(ticket, _)) = self.in_flight.remove(&rid) {
                    self.event(ClientEvent::HistoryPage {
                        ticket,
                        conversation_id: p.conversation_id,
                        messages: p.messages.into_iter().map(ChatMessage::from_pb).collect(),
                        has_more: p.has_more,
                    });
                }
            }
            Body::ReceiptUpdate(r) => {
                if let Some(kind) = ReceiptKind::from_pb(r.kind) {
                    self.event(ClientEvent::Receipt {
                        conversation_id: r.conversation_id,
                        user_id: r.user_id,
                        kind,
                        up_to_seq: r.up_to_seq,
                    });
                }
            }
            Body::Typing(t) => self.event(ClientEvent::Typing {
                conversation_id: t.conversation_id,
                user_id: t.user_id,
                active: t.active,
            }),
            Body::PresenceResult(r) => {
                let presences: Vec<Presence> =
                    r.presences.into_iter().map(Presence::from_pb).collect();
                match self.in_flight.remove(&rid) {
                    Some(InFlight::Ticket(ticket, _)) => {
                        self.event(ClientEvent::PresenceResult { ticket, presences })
                    }
                    _ => {
                        for presence in presences {
                            self.event(ClientEvent::PresenceChanged { presence });
                        }
                    }
                }
            }
            Body::PresenceEvent(e) => {
                if let Some(p) = e.presence {
                    self.event(ClientEvent::PresenceChanged {
                        presence: Presence::from_pb(p),
                    });
                }
            }
            Body::ConversationCreated(c) => {
                if let Some(c) = c.conversation {
                    self.on_conversation(rid, Conversation::from_pb(c));
                }
            }
            Body::MembersChanged(m) => {
                if let Some(c) = m.conversation {
                    let conversation = Conversation::from_pb(c);
                    if let Some(InFlight::Ticket(ticket, _)) = self.in_flight.remove(&rid) {
                        self.event(ClientEvent::ConversationResult {
                            ticket,
                            conversation: conversation.clone(),
                        });
                    }
                    self.cursors.know(&conversation.conversation_id);
                    self.event(ClientEvent::MembersChanged {
                        conversation,
                        actor_user_id: m.actor_user_id,
                        added_user_ids: m.added_user_ids,
                        removed_user_ids: m.removed_user_ids,
                    });
                }
            }
            // Client-only bodies: ClientConn refused them above. Listed, not
            // a wildcard: a body added to the protocol fails to compile here
            // until the SDK says what it does with it.
            Body::Hello(_)
            | Body::Send(_)
            | Body::Receipt(_)
            | Body::PresenceQuery(_)
            | Body::PresenceSubscribe(_)
            | Body::Sync(_)
            | Body::History(_)
            | Body::CreateConversation(_)
            | Body::ChangeMembers(_)
            | Body::RegisterPushToken(_)
            | Body::UnregisterPushToken(_)
            | Body::MuteConversation(_)
            | Body::ListMembers(_)
            | Body::OpenChannel(_) => {}
            Body::MemberPage(p) => {
                if let Some(InFlight::Ticket(ticket, _)) = self.in_flight.remove(&rid) {
                    self.event(ClientEvent::MemberPage {
                        ticket,
                        conversation_id: p.conversation_id,
                        members: p.members.into_iter().map(Member::from_pb).collect(),
                        has_more: p.has_more,
                        member_count: p.member_count,
                    });
                }
            }
            Body::ChannelOpened(o) => {
                self.in_flight.remove(&rid);
                self.event(ClientEvent::ChannelOpened {
                    conversation_id: o.conversation_id,
                    mode: ChannelMode::from_pb(o.mode),
                    last_seq: o.last_seq,
                    read_seq: o.read_seq,
                });
            }
            Body::ChannelActivity(a) => {
                for c in a.channels {
                    self.event(ClientEvent::ChannelActivity {
                        conversation_id: c.conversation_id,
                        last_seq: c.last_seq,
                    });
                }
            }
            Body::PushTokenRegistered(r) => {
                if let Some(InFlight::Ticket(ticket, _)) = self.in_flight.remove(&rid) {
                    self.event(ClientEvent::PushTokenRegistered {
                        ticket,
                        registered_ms: r.registered_ms,
                    });
                }
            }
            Body::PushTokenUnregistered(u) => {
                if let Some(InFlight::Ticket(ticket, _)) = self.in_flight.remove(&rid) {
                    self.event(ClientEvent::PushTokenUnregistered {
                        ticket,
                        was_registered: u.was_registered,
                    });
                }
            }
            Body::ConversationMuted(m) => {
                if let Some(InFlight::Ticket(ticket, _)) = self.in_flight.remove(&rid) {
                    self.event(ClientEvent::MuteChanged {
                        ticket,
                        conversation_id: m.conversation_id,
                        muted_until_ms: m.muted_until_ms,
                        forever: m.forever,
                    });
                }
            }
        }
        self.pump(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn cfg() -> ClientConfig {
        ClientConfig::new("127.0.0.1:7443", "", "phone")
    }

    fn welcome(interval: u32) -> pb::Frame {
        frame(
            1,
            Body::Welcome(pb::Welcome {
                protocol_version: 1,
                session_id: "s".into(),
                user_id: "alice".into(),
                heartbeat_interval_ms: interval,
                limits: None,
                server_time_ms: 0,
            }),
        )
    }

    fn out_msg(order: u64, conv: &str) -> OutgoingMessage {
        OutgoingMessage {
            client_msg_id: vec![order as u8 + 1; 16],
            conversation_id: conv.into(),
            kind: ContentKind::Text,
            body: b"hi".to_vec(),
            reply_to_seq: 0,
            media: None,
            created_order: order,
            mention_user_ids: Default::default(),
        }
    }

    fn msg(conv: &str, seq: u64) -> pb::Message {
        pb::Message {
            conversation_id: conv.into(),
            seq,
            sender_user_id: "bob".into(),
            ..Default::default()
        }
    }

    fn lost() -> ConnectFailure {
        ConnectFailure::ConnectionLost {
            detail: "reset".into(),
        }
    }

    /// Connects at `now` and returns the frames written (Hello, ...).
    fn connect(e: &mut Engine, now: u64) -> Vec<pb::Frame> {
        e.command(Command::Connect, now);
        assert_eq!(e.poll_dial(now), Some(false));
        e.on_transport_up(now, "tok".into());
        let hello = e.take_writes();
        let mut w = welcome(30_000);
        w.request_id = hello[0].request_id;
        e.on_frame(w, now);
        let mut all = hello;
        all.extend(e.take_writes());
        all
    }

    /// Every body the protocol's table lets a server send is taken by an
    /// established engine (the match in `on_frame` names each one); a body
    /// a server may not send closes the connection.
    #[test]
    fn every_server_body_of_the_table_is_handled_and_client_bodies_refused() {
        use palaver_protocol::bodies::{BodyKind, Direction};
        for kind in BodyKind::ALL {
            let mut e = Engine::new(cfg(), vec![], vec![], 7);
            connect(&mut e, 0);
            let body = kind.default_body();
            // GoAway ends the connection, and so does a second Welcome (SPEC §4).
            let closing = matches!(body, Body::GoAway(_) | Body::Welcome(_));
            e.on_frame(frame(0, body), 1);
            let connected = matches!(e.state(), ConnectionState::Connected { .. });
            match kind.info().direction {
                Direction::ClientToServer => assert!(!connected, "{kind:?} from a server"),
                Direction::ServerToClient | Direction::Both if closing => {
                    assert!(!connected, "{kind:?} ends the connection")
                }
                Direction::ServerToClient | Direction::Both => {
                    assert!(connected, "{kind:?} from a server: {:?}", e.state())
                }
            }
        }
    }

    fn bodies(frames: &[pb::Frame]) -> Vec<&'static str> {
        frames
            .iter()
            .map(|f| palaver_protocol::body_name(f.body.as_ref().expect("body")))
            .collect()
    }

    fn events(e: &mut Engine) -> Vec<ClientEvent> {
        e.take_outputs()
            .into_iter()
            .filter_map(|o| match o {
                Output::Event(ev) => Some(ev),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn connect_sends_hello_then_sync_and_pings_when_idle() {
        let mut e = Engine::new(cfg(), vec![], vec![], 7);
        let w = connect(&mut e, 0);
        assert_eq!(bodies(&w), vec!["hello", "sync"]);
        assert!(matches!(e.state(), ConnectionState::Connected { .. }));
        assert_eq!(e.next_wakeup(0), Some(30_000));
        e.on_tick(30_000);
        assert_eq!(bodies(&e.take_writes()), vec!["ping"]);
        // Server silent for 2.5 intervals after Welcome: reconnect.
        e.on_tick(75_000);
        assert!(e.take_close());
        assert!(matches!(
            e.state(),
            ConnectionState::Connecting { attempt: 1, .. }
        ));
    }

    #[test]
    fn saved_cursors_resume_in_hello() {
        let saved = vec![SyncCursor {
            conversation_id: "dm:alice:bob".into(),
            after_seq: 9,
            history_epoch: 0,
        }];
        let mut e = Engine::new(cfg(), vec![], saved, 7);
        let w = connect(&mut e, 0);
        assert_eq!(bodies(&w), vec!["hello"], "no separate Sync");
        match &w[0].body {
            Some(Body::Hello(h)) => assert_eq!(h.resume[0].after_seq, 9),
            other => panic!("{other:?}"),
        }
    }

    /// A channel message's mentions go out with it (SPEC §21).
    #[test]
    fn a_message_names_its_mentions_on_the_wire() {
        let mut e = Engine::new(cfg(), vec![], vec![], 7);
        e.command(
            Command::Send(OutgoingMessage {
                mention_user_ids: vec!["carol".into(), "dave".into()],
                ..out_msg(0, "chn:news")
            }),
            0,
        );
        let w = connect(&mut e, 10);
        let Some(Body::Send(send)) = w
            .iter()
            .find(|f| matches!(f.body, Some(Body::Send(_))))
            .and_then(|f| f.body.clone())
        else {
            panic!("no Send in {w:?}")
        };
        assert_eq!(send.mention_user_ids, vec!["carol", "dave"]);
    }

    #[test]
    fn outbox_resends_same_id_after_reconnect_until_acked() {
        let mut e = Engine::new(cfg(), vec![], vec![], 7);
        e.command(Command::Send(out_msg(0, "dm:alice:bob")), 0);
        assert!(e.take_writes().is_empty(), "not connected: nothing written");
        let w = connect(&mut e, 10);
        let send = w
            .iter()
            .find(|f| matches!(f.body, Some(Body::Send(_))))
            .expect("send");
        // Connection drops before the SendAck.
        e.on_transport_down(20, lost());
        assert!(e.take_close());
        let at = match e.state() {
            ConnectionState::Connecting { retry_in_ms, .. } => 20 + retry_in_ms,
            other => panic!("{other:?}"),
        };
        assert!(at <= 20 + 500, "first retry within the base backoff");
        assert_eq!(e.poll_dial(at.saturating_sub(1)).is_some(), at == 20);
        let w2 = connect_again(&mut e, at);
        let send2 = w2
            .iter()
            .find(|f| matches!(f.body, Some(Body::Send(_))))
            .expect("resend");
        let (Some(Body::Send(a)), Some(Body::Send(b))) = (&send.body, &send2.body) else {
            panic!()
        };
        assert_eq!(a.client_msg_id, b.client_msg_id);
        e.on_frame(
            frame(
                send2.request_id,
                Body::SendAck(pb::SendAck {
                    client_msg_id: b.client_msg_id.clone(),
                    message_id: "m1".into(),
                    conversation_id: "dm:alice:bob".into(),
                    seq: 1,
                    server_time_ms: 0,
                }),
            ),
            at + 1,
        );
        let outs = e.take_outputs();
        assert!(outs.contains(&Output::RemoveOutgoing(b.client_msg_id.clone())));
        assert_eq!(e.outbox_len(), 0);
        // Its own seq advances the cursor silently.
        assert!(outs.contains(&Output::SaveCursor(SyncCursor {
            conversation_id: "dm:alice:bob".into(),
            after_seq: 1,
            history_epoch: 0,
        })));
    }

    fn connect_again(e: &mut Engine, now: u64) -> Vec<pb::Frame> {
        assert!(e.poll_dial(now).is_some());
        e.on_transport_up(now, "tok".into());
        let hello = e.take_writes();
        let mut w = welcome(30_000);
        w.request_id = hello[0].request_id;
        e.on_frame(w, now);
        let mut all = hello;
        all.extend(e.take_writes());
        all
    }

    #[test]
    fn one_send_in_flight_per_conversation_and_paced() {
        let mut e = Engine::new(cfg(), vec![], vec![], 7);
        for i in 0..3 {
            e.command(Command::Send(out_msg(i, "dm:alice:bob")), 0);
        }
        let w = connect(&mut e, 0);
        assert_eq!(
            bodies(&w).iter().filter(|b| **b == "send").count(),
            1,
            "the second waits for the first's ack"
        );
    }

    #[test]
    fn go_away_floor_and_replaced_stops() {
        let mut e = Engine::new(cfg(), vec![], vec![], 7);
        connect(&mut e, 0);
        e.on_frame(
            frame(
                0,
                Body::GoAway(pb::GoAway {
                    reason: pb::GoAwayReason::Shutdown as i32,
                    reconnect_delay_ms: 2_000,
                    message: String::new(),
                }),
            ),
            100,
        );
        assert!(e.take_close());
        match e.state() {
            ConnectionState::Connecting { retry_in_ms, .. } => {
                assert!((2_000..=2_500).contains(retry_in_ms), "{retry_in_ms}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.poll_dial(100 + 1_999), None, "never before the floor");
        connect_again(&mut e, 100 + 2_500);
        e.on_frame(
            frame(
                0,
                Body::GoAway(pb::GoAway {
                    reason: pb::GoAwayReason::Replaced as i32,
                    reconnect_delay_ms: 0,
                    message: String::new(),
                }),
            ),
            3_000,
        );
        assert!(e.take_close());
        assert_eq!(
            e.state(),
            &ConnectionState::Disconnected {
                cause: Some(DisconnectCause::Replaced)
            }
        );
        assert_eq!(e.poll_dial(u64::MAX), None, "REPLACED never redials alone");
        assert_eq!(e.next_wakeup(3_000), None);
    }

    #[test]
    fn token_expired_refreshes_and_unauthenticated_stops_after_a_fresh_token() {
        let mut e = Engine::new(cfg(), vec![], vec![], 7);
        e.command(Command::Connect, 0);
        assert_eq!(e.poll_dial(0), Some(false));
        e.on_transport_up(0, "old".into());
        e.take_writes();
        e.on_frame(
            palaver_protocol::error_reply(1, pb::ErrorCode::TokenExpired, "exp"),
            1,
        );
        assert!(e.take_close());
        assert_eq!(e.poll_dial(10_000), Some(true), "asks for a fresh token");
        e.on_transport_up(10_000, "fresh".into());
        e.on_frame(
            palaver_protocol::error_reply(2, pb::ErrorCode::Unauthenticated, "bad"),
            10_001,
        );
        match e.state() {
            ConnectionState::Disconnected {
                cause: Some(DisconnectCause::Server { error }),
            } => assert_eq!(error.code, ErrorCode::Unauthenticated),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_gap_triggers_sync_and_messages_come_out_in_order_once() {
        let mut e = Engine::new(cfg(), vec![], vec![], 7);
        let w = connect(&mut e, 0);
        let sync_id = w[1].request_id;
        e.on_frame(
            frame(
                sync_id,
                Body::SyncBatch(pb::SyncBatch {
                    messages: vec![msg("g", 1)],
                    conversations: vec![],
                    has_more: false,
                    ..Default::default()
                }),
            ),
            1,
        );
        events(&mut e);
        e.on_frame(
            frame(
                0,
                Body::Deliver(pb::Deliver {
                    message: Some(msg("g", 3)),
                }),
            ),
            2,
        );
        let w = e.take_writes();
        assert_eq!(bodies(&w), vec!["sync"], "gap → Sync");
        assert!(events(&mut e).is_empty(), "3 is held until 2 arrives");
        match &w[0].body {
            Some(Body::Sync(s)) => assert_eq!(s.cursors[0].after_seq, 1),
            other => panic!("{other:?}"),
        }
        e.on_frame(
            frame(
                w[0].request_id,
                Body::SyncBatch(pb::SyncBatch {
                    messages: vec![msg("g", 2), msg("g", 3)],
                    conversations: vec![],
                    has_more: false,
                    ..Default::default()
                }),
            ),
            3,
        );
        let seqs: Vec<u64> = events(&mut e)
            .into_iter()
            .filter_map(|ev| match ev {
                ClientEvent::Message { message } => Some(message.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![2, 3]);
    }

    #[test]
    fn rate_limited_send_waits_and_resends_the_same_id() {
        let mut e = Engine::new(cfg(), vec![], vec![], 7);
        e.command(Command::Send(out_msg(0, "dm:alice:bob")), 0);
        let w = connect(&mut e, 0);
        let send = w
            .iter()
            .find(|f| matches!(f.body, Some(Body::Send(_))))
            .expect("send");
        e.on_frame(
            palaver_protocol::send_error_reply(
                send.request_id,
                vec![1; 16],
                pb::ErrorCode::RateLimited,
                "slow",
            ),
            5,
        );
        assert!(e.take_writes().is_empty());
        assert_eq!(e.next_wakeup(5), Some(1_005));
        e.on_tick(1_005);
        assert_eq!(bodies(&e.take_writes()), vec!["send"]);
        // A final refusal leaves the outbox with SendFailed.
        e.on_frame(
            palaver_protocol::send_error_reply(0, vec![1; 16], pb::ErrorCode::Forbidden, "no"),
            6,
        );
        assert_eq!(e.outbox_len(), 0);
        assert!(events(&mut e)
            .iter()
            .any(|ev| matches!(ev, ClientEvent::SendFailed { error, .. } if error.code == ErrorCode::Forbidden)));
    }

    #[test]
    fn presence_is_restored_and_typing_throttled() {
        let mut e = Engine::new(cfg(), vec![], vec![], 7);
        e.command(
            Command::Presence {
                user_ids: vec!["bob".into()],
                unsubscribe: false,
            },
            0,
        );
        let w = connect(&mut e, 0);
        assert!(bodies(&w).contains(&"presence_subscribe"));
        for t in [0, 1_000, 2_999] {
            e.command(
                Command::Typing {
                    conversation_id: "dm:alice:bob".into(),
                    active: true,
                },
                t,
            );
        }
        assert_eq!(bodies(&e.take_writes()), vec!["typing"]);
        e.command(
            Command::Typing {
                conversation_id: "dm:alice:bob".into(),
                active: true,
            },
            3_000,
        );
        e.command(
            Command::Typing {
                conversation_id: "dm:alice:bob".into(),
                active: false,
            },
            3_001,
        );
        assert_eq!(bodies(&e.take_writes()), vec!["typing", "typing"]);
        e.on_transport_down(4_000, lost());
        let at = match e.state() {
            ConnectionState::Connecting { retry_in_ms, .. } => 4_000 + retry_in_ms,
            other => panic!("{other:?}"),
        };
        let w = connect_again(&mut e, at);
        assert!(bodies(&w).contains(&"presence_subscribe"), "re-subscribed");
    }

    #[test]
    fn group_creation_lost_in_flight_fails_history_is_repeated() {
        let mut e = Engine::new(cfg(), vec![], vec![], 7);
        connect(&mut e, 0);
        e.command(
            Command::Ticket {
                ticket: 1,
                request: Request::CreateConversation {
                    kind: ConversationKind::Group,
                    title: "t".into(),
                    member_user_ids: vec![],
                    channel: Default::default(),
                },
            },
            1,
        );
        e.command(
            Command::Ticket {
                ticket: 2,
                request: Request::History {
                    conversation_id: "dm:alice:bob".into(),
                    before_seq: 0,
                    limit: 10,
                },
            },
            1,
        );
        assert_eq!(
            bodies(&e.take_writes()),
            vec!["create_conversation", "history"]
        );
        e.on_transport_down(2, lost());
        assert!(events(&mut e).contains(&ClientEvent::RequestFailed {
            ticket: 1,
            error: None
        }));
        let at = match e.state() {
            ConnectionState::Connecting { retry_in_ms, .. } => 2 + retry_in_ms,
            other => panic!("{other:?}"),
        };
        let w = connect_again(&mut e, at);
        assert!(bodies(&w).contains(&"history"));
        assert!(!bodies(&w).contains(&"create_conversation"));
    }

    #[test]
    fn push_requests_go_only_to_a_server_that_announced_them() {
        let mute = |ticket| Command::Ticket {
            ticket,
            request: Request::MuteConversation {
                conversation_id: "dm:alice:bob".into(),
                muted_until_ms: 0,
                forever: true,
            },
        };
        // Welcome without `max_push_token_bytes`: refused locally, nothing
        // written (the server would close the connection, SPEC §16).
        let mut e = Engine::new(cfg(), vec![], vec![], 7);
        connect(&mut e, 0);
        events(&mut e);
        e.command(mute(1), 1);
        assert!(e.take_writes().is_empty());
        match events(&mut e).as_slice() {
            [ClientEvent::RequestFailed {
                ticket: 1,
                error: Some(error),
            }] => assert_eq!(error.raw_code, 2000),
            other => panic!("{other:?}"),
        }

        // Announced: sent, and each answer reaches its ticket.
        let mut e = Engine::new(cfg(), vec![], vec![], 7);
        e.command(Command::Connect, 0);
        assert_eq!(e.poll_dial(0), Some(false));
        e.on_transport_up(0, "tok".into());
        let hello = e.take_writes();
        let mut w = welcome(30_000);
        w.request_id = hello[0].request_id;
        if let Some(Body::Welcome(welcome)) = &mut w.body {
            welcome.limits = Some(palaver_protocol::Limits::default().to_pb());
        }
        e.on_frame(w, 0);
        e.take_writes();
        events(&mut e);
        e.command(mute(2), 1);
        e.command(
            Command::Ticket {
                ticket: 3,
                request: Request::UnregisterPushToken,
            },
            1,
        );
        let w = e.take_writes();
        assert_eq!(
            bodies(&w),
            vec!["mute_conversation", "unregister_push_token"]
        );
        e.on_frame(
            frame(
                w[0].request_id,
                Body::ConversationMuted(pb::ConversationMuted {
                    conversation_id: "dm:alice:bob".into(),
                    muted_until_ms: 0,
                    forever: true,
                }),
            ),
            2,
        );
        e.on_frame(
            frame(
                w[1].request_id,
                Body::PushTokenUnregistered(pb::PushTokenUnregistered {
                    was_registered: true,
                }),
            ),
            2,
        );
        assert_eq!(
            events(&mut e),
            vec![
                ClientEvent::MuteChanged {
                    ticket: 2,
                    conversation_id: "dm:alice:bob".into(),
                    muted_until_ms: 0,
                    forever: true,
                },
                ClientEvent::PushTokenUnregistered {
                    ticket: 3,
                    was_registered: true,
                },
            ]
        );
    }

    #[test]
    fn has_more_continues_from_the_highest_received_and_a_final_gap_is_skipped() {
        let saved = vec![SyncCursor {
            conversation_id: "g".into(),
            after_seq: 2,
            history_epoch: 0,
        }];
        let mut e = Engine::new(cfg(), vec![], saved, 7);
        let hello_id = connect(&mut e, 0)[0].request_id;
        // The resume round: 3..4, more to come.
        e.on_frame(
            frame(
                hello_id,
                Body::SyncBatch(pb::SyncBatch {
                    messages: vec![msg("g", 3), msg("g", 4)],
                    conversations: vec![],
                    has_more: true,
                    ..Default::default()
                }),
            ),
            1,
        );
        let w = e.take_writes();
        let Some(Body::Sync(s)) = &w[0].body else {
            panic!("{w:?}")
        };
        assert_eq!(s.cursors[0].after_seq, 4);
        e.on_frame(
            frame(
                w[0].request_id,
                Body::SyncBatch(pb::SyncBatch {
                    messages: vec![],
                    conversations: vec![],
                    has_more: false,
                    ..Default::default()
                }),
            ),
            2,
        );
        assert!(events(&mut e).contains(&ClientEvent::SyncComplete));
        // A Deliver at 8: 5..7 missing → Sync; the server no longer has
        // 5..6 (its window) and returns only 7.
        e.on_frame(
            frame(
                0,
                Body::Deliver(pb::Deliver {
                    message: Some(msg("g", 8)),
                }),
            ),
            3,
        );
        let w = e.take_writes();
        assert_eq!(bodies(&w), vec!["sync"]);
        e.on_frame(
            frame(
                w[0].request_id,
                Body::SyncBatch(pb::SyncBatch {
                    messages: vec![msg("g", 7), msg("g", 8)],
                    conversations: vec![],
                    has_more: false,
                    ..Default::default()
                }),
            ),
            4,
        );
        let ev = events(&mut e);
        assert!(ev.contains(&ClientEvent::MessagesUnavailable {
            conversation_id: "g".into(),
            from_seq: 5,
            to_seq: 6
        }));
        let seqs: Vec<u64> = ev
            .iter()
            .filter_map(|x| match x {
                ClientEvent::Message { message } => Some(message.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![7, 8]);
    }

    #[test]
    fn a_server_that_lost_its_history_is_noticed_by_its_epoch_and_synced_from_the_start() {
        let saved = vec![SyncCursor {
            conversation_id: "dm:alice:bob".into(),
            after_seq: 540,
            history_epoch: 7,
        }];
        let mut e = Engine::new(cfg(), vec![], saved, 7);
        let hello_id = connect(&mut e, 0)[0].request_id;
        // The restarted server has 2 messages in a new history: above the
        // old cursor there is nothing, and it says so with its epoch.
        e.on_frame(
            frame(
                hello_id,
                Body::SyncBatch(pb::SyncBatch {
                    history_epoch: 8,
                    ..Default::default()
                }),
            ),
            1,
        );
        let ev = events(&mut e);
        assert!(ev.contains(&ClientEvent::HistoryReset {
            conversation_id: "dm:alice:bob".into()
        }));
        assert!(
            !ev.contains(&ClientEvent::SyncComplete),
            "the round goes on"
        );
        let w = e.take_writes();
        let Some(Body::Sync(s)) = &w[0].body else {
            panic!("{w:?}")
        };
        assert_eq!(
            s.cursors[0].after_seq, 0,
            "from the start of the new history"
        );
        e.on_frame(
            frame(
                w[0].request_id,
                Body::SyncBatch(pb::SyncBatch {
                    messages: vec![msg("dm:alice:bob", 1), msg("dm:alice:bob", 2)],
                    history_epoch: 8,
                    ..Default::default()
                }),
            ),
            2,
        );
        e.flush_cursors();
        let outs = e.take_outputs();
        let seqs: Vec<u64> = outs
            .iter()
            .filter_map(|o| match o {
                Output::Event(ClientEvent::Message { message }) => Some(message.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![1, 2]);
        assert!(outs.contains(&Output::Event(ClientEvent::SyncComplete)));
        assert!(outs.contains(&Output::SaveCursor(SyncCursor {
            conversation_id: "dm:alice:bob".into(),
            after_seq: 2,
            history_epoch: 8,
        })));
    }

    /// A message the old server stored and delivered but never acked is
    /// sent again by its sender's outbox and stored again by the server
    /// that lost its history, under a new seq: the app gets it once.
    #[test]
    fn a_message_stored_again_after_a_history_reset_reaches_the_app_once() {
        let with_id = |seq: u64, id: u8| pb::Message {
            client_msg_id: vec![id; 16],
            ..msg("dm:alice:bob", seq)
        };
        let saved = vec![SyncCursor {
            conversation_id: "dm:alice:bob".into(),
            after_seq: 539,
            history_epoch: 7,
        }];
        let mut e = Engine::new(cfg(), vec![], saved, 7);
        let hello_id = connect(&mut e, 0)[0].request_id;
        e.on_frame(
            frame(
                hello_id,
                Body::SyncBatch(pb::SyncBatch {
                    messages: vec![with_id(540, 0xa)],
                    history_epoch: 7,
                    ..Default::default()
                }),
            ),
            1,
        );
        assert_eq!(
            events(&mut e)
                .iter()
                .filter(|e| matches!(e, ClientEvent::Message { .. }))
                .count(),
            1
        );
        let _ = e.take_writes();
        // The server lost its history: the same message again as seq 1,
        // then a new one. The first batch in the new epoch resets the
        // conversation; the Sync from 0 that follows brings them.
        e.command(Command::SyncNow, 2);
        for now in [3, 4] {
            let w = e.take_writes();
            let Some(sync) = w.iter().find(|f| matches!(f.body, Some(Body::Sync(_)))) else {
                break;
            };
            e.on_frame(
                frame(
                    sync.request_id,
                    Body::SyncBatch(pb::SyncBatch {
                        messages: vec![with_id(1, 0xa), with_id(2, 0xb)],
                        history_epoch: 8,
                        ..Default::default()
                    }),
                ),
                now,
            );
        }
        let got: Vec<(u64, Vec<u8>)> = events(&mut e)
            .into_iter()
            .filter_map(|ev| match ev {
                ClientEvent::Message { message } => Some((message.seq, message.client_msg_id)),
                _ => None,
            })
            .collect();
        assert_eq!(
            got,
            vec![(2, vec![0xb; 16])],
            "the repeat is not handed over twice"
        );
    }

    #[test]
    fn a_repeat_outside_a_sync_round_asks_the_server_which_history_it_is_in() {
        let saved = vec![SyncCursor {
            conversation_id: "dm:alice:bob".into(),
            after_seq: 540,
            history_epoch: 7,
        }];
        let mut e = Engine::new(cfg(), vec![], saved, 7);
        let hello_id = connect(&mut e, 0)[0].request_id;
        e.on_frame(
            frame(
                hello_id,
                Body::SyncBatch(pb::SyncBatch {
                    history_epoch: 7,
                    ..Default::default()
                }),
            ),
            1,
        );
        assert!(events(&mut e).contains(&ClientEvent::SyncComplete));
        let _ = e.take_writes();
        // Still connected, the server's store is wiped: seq 1 again.
        e.on_frame(
            frame(
                0,
                Body::Deliver(pb::Deliver {
                    message: Some(msg("dm:alice:bob", 1)),
                }),
            ),
            2,
        );
        assert!(
            events(&mut e)
                .iter()
                .all(|x| !matches!(x, ClientEvent::Message { .. })),
            "not news before the epoch says so"
        );
        let w = e.take_writes();
        assert_eq!(bodies(&w), vec!["sync"]);
        e.on_frame(
            frame(
                w[0].request_id,
                Body::SyncBatch(pb::SyncBatch {
                    history_epoch: 9,
                    ..Default::default()
                }),
            ),
            3,
        );
        assert!(events(&mut e).contains(&ClientEvent::HistoryReset {
            conversation_id: "dm:alice:bob".into()
        }));
        let w = e.take_writes();
        let Some(Body::Sync(s)) = &w[0].body else {
            panic!("{w:?}")
        };
        assert_eq!(s.cursors[0].after_seq, 0);
    }

    fn last_failure(e: &Engine) -> Option<ConnectFailure> {
        match e.state() {
            ConnectionState::Connecting { last_failure, .. } => last_failure.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connecting_says_why_the_last_attempt_failed_and_reconnect_now_skips_the_wait() {
        let mut e = Engine::new(cfg(), vec![], vec![], 7);
        e.command(Command::Connect, 0);
        assert_eq!(last_failure(&e), None, "first attempt");
        assert_eq!(e.poll_dial(0), Some(false));
        let refused = ConnectFailure::Unreachable {
            detail: "127.0.0.1:9: connection refused".into(),
        };
        e.on_transport_down(5, refused.clone());
        assert_eq!(last_failure(&e), Some(refused.clone()));
        let ConnectionState::Connecting { retry_in_ms, .. } = e.state().clone() else {
            panic!()
        };
        assert!(retry_in_ms > 1);
        assert_eq!(e.poll_dial(6), None, "waiting out the backoff");
        e.command(Command::ReconnectNow, 6);
        assert_eq!(e.poll_dial(6), Some(false), "at once");
        // The state while dialling still says what went wrong last time.
        assert_eq!(last_failure(&e), Some(refused));
        // A timeout has its own reason.
        e.on_tick(6 + u64::from(cfg().connect_timeout_ms));
        assert!(matches!(
            last_failure(&e),
            Some(ConnectFailure::TimedOut { .. })
        ));
        // The log sink hears about each failure.
        assert!(e
            .take_outputs()
            .iter()
            .any(|o| matches!(o, Output::Log(LogLevel::Info, line) if line.contains("connection refused"))));
    }

    #[test]
    fn an_untrusted_certificate_stops_reconnecting_and_says_why() {
        let mut e = Engine::new(cfg(), vec![], vec![], 7);
        e.command(Command::Connect, 0);
        assert_eq!(e.poll_dial(0), Some(false));
        let bad = ConnectFailure::UntrustedCertificate {
            detail: "invalid peer certificate: UnknownIssuer".into(),
        };
        e.on_transport_down(3, bad.clone());
        assert_eq!(
            e.state(),
            &ConnectionState::Disconnected {
                cause: Some(DisconnectCause::Failed { failure: bad })
            }
        );
        assert_eq!(e.poll_dial(1_000_000), None, "no retry loop");
        assert!(e
            .take_outputs()
            .iter()
            .any(|o| matches!(o, Output::Log(LogLevel::Warn, _))));
        // connect() tries again (the app fixed its CA).
        e.command(Command::Connect, 1_000_001);
        assert_eq!(e.poll_dial(1_000_001), Some(false));
    }

    #[test]
    fn a_token_expired_again_right_after_a_fresh_fetch_stops_reconnecting() {
        let mut e = Engine::new(cfg(), vec![], vec![], 7);
        e.command(Command::Connect, 0);
        assert_eq!(e.poll_dial(0), Some(false));
        e.on_transport_up(0, "tok".into());
        let expired = || {
            frame(
                1,
                Body::Error(pb::Error {
                    code: pb::ErrorCode::TokenExpired as u32,
                    message: "token expired".into(),
                    ..Default::default()
                }),
            )
        };
        e.on_frame(expired(), 1);
        assert!(matches!(
            last_failure(&e),
            Some(ConnectFailure::AuthRefused { .. })
        ));
        let ConnectionState::Connecting { retry_in_ms, .. } = e.state().clone() else {
            panic!()
        };
        let at = 1 + retry_in_ms;
        assert_eq!(e.poll_dial(at), Some(true), "a fresh token is asked for");
        e.on_transport_up(at, "fresh".into());
        e.on_frame(expired(), at + 1);
        assert!(
            matches!(
                e.state(),
                ConnectionState::Disconnected {
                    cause: Some(DisconnectCause::Failed {
                        failure: ConnectFailure::AuthRefused { .. }
                    })
                }
            ),
            "{:?}",
            e.state()
        );
    }
}
