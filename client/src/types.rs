//! The records and enums apps see (UniFFI turns them into Kotlin data
//! classes and Swift structs), and their conversions from the wire types.

use palaver_protocol::pb;

use crate::error::ServerError;

/// `Message.kind` (SPEC §17). Unknown values from newer servers read as
/// `Unspecified`: show a placeholder, keep the message (SPEC §16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum ContentKind {
    Unspecified,
    Text,
    Image,
    Video,
    Audio,
    File,
    Custom,
}

impl ContentKind {
    pub(crate) fn from_pb(v: i32) -> ContentKind {
        match pb::ContentKind::try_from(v) {
            Ok(pb::ContentKind::Text) => ContentKind::Text,
            Ok(pb::ContentKind::Image) => ContentKind::Image,
            Ok(pb::ContentKind::Video) => ContentKind::Video,
            Ok(pb::ContentKind::Audio) => ContentKind::Audio,
            Ok(pb::ContentKind::File) => ContentKind::File,
            Ok(pb::ContentKind::Custom) => ContentKind::Custom,
            _ => ContentKind::Unspecified,
        }
    }

    pub(crate) fn to_pb(self) -> i32 {
        (match self {
            ContentKind::Unspecified => pb::ContentKind::Unspecified,
            ContentKind::Text => pb::ContentKind::Text,
            ContentKind::Image => pb::ContentKind::Image,
            ContentKind::Video => pb::ContentKind::Video,
            ContentKind::Audio => pb::ContentKind::Audio,
            ContentKind::File => pb::ContentKind::File,
            ContentKind::Custom => pb::ContentKind::Custom,
        }) as i32
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, uniffi::Enum)]
pub enum ReceiptKind {
    Delivered,
    Read,
}

impl ReceiptKind {
    pub(crate) fn from_pb(v: i32) -> Option<ReceiptKind> {
        match pb::ReceiptKind::try_from(v) {
            Ok(pb::ReceiptKind::Delivered) => Some(ReceiptKind::Delivered),
            Ok(pb::ReceiptKind::Read) => Some(ReceiptKind::Read),
            _ => None,
        }
    }

    pub(crate) fn to_pb(self) -> i32 {
        (match self {
            ReceiptKind::Delivered => pb::ReceiptKind::Delivered,
            ReceiptKind::Read => pb::ReceiptKind::Read,
        }) as i32
    }
}

/// An attachment reference (the upload happens elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Media {
    pub url: String,
    pub mime_type: String,
    pub size_bytes: u64,
    pub sha256: Vec<u8>,
}

impl Media {
    fn from_pb(m: pb::MediaRef) -> Media {
        Media {
            url: m.url,
            mime_type: m.mime_type,
            size_bytes: m.size_bytes,
            sha256: m.sha256,
        }
    }

    pub(crate) fn to_pb(&self) -> pb::MediaRef {
        pb::MediaRef {
            url: self.url.clone(),
            mime_type: self.mime_type.clone(),
            size_bytes: self.size_bytes,
            sha256: self.sha256.clone(),
        }
    }
}

/// A stored message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ChatMessage {
    pub conversation_id: String,
    /// Its place in the conversation: 1, 2, 3... without gaps.
    pub seq: u64,
    pub message_id: String,
    pub sender_user_id: String,
    pub sender_device_id: String,
    /// The sender's 16-byte id (matches `MessageSent.client_msg_id` on the
    /// sending device).
    pub client_msg_id: Vec<u8>,
    pub kind: ContentKind,
    pub body: Vec<u8>,
    pub reply_to_seq: u64,
    pub media: Option<Media>,
    pub server_time_ms: i64,
}

impl ChatMessage {
    pub(crate) fn from_pb(m: pb::Message) -> ChatMessage {
        ChatMessage {
            conversation_id: m.conversation_id,
            seq: m.seq,
            message_id: m.message_id,
            sender_user_id: m.sender_user_id,
            sender_device_id: m.sender_device_id,
            client_msg_id: m.client_msg_id,
            kind: ContentKind::from_pb(m.kind),
            body: m.body,
            reply_to_seq: m.reply_to_seq,
            media: m.media.map(Media::from_pb),
            server_time_ms: m.server_time_ms,
        }
    }

    /// The body as text (lossy for non-UTF-8 bodies).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum ConversationKind {
    Unspecified,
    Direct,
    Group,
    /// Up to 100,000 members, delivered live only where opened (SPEC §21,
    /// `open_channel`).
    Channel,
}

/// How a channel is run (SPEC §21).
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Record)]
pub struct ChannelSettings {
    /// Anyone may join (`change_members` adding themselves).
    pub public: bool,
    /// An announcement channel: only admins post.
    pub admins_only_post: bool,
}

/// What this connection receives of a channel (SPEC §21).
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum ChannelMode {
    /// Nothing live (its messages still come with Sync and history).
    Closed,
    /// `ChannelActivity` with its newest seq, batched (about once a second):
    /// for a channel list with unread counts.
    Counts,
    /// Each message and Typing as it happens: the channel is on screen.
    Live,
}

impl ChannelMode {
    pub(crate) fn to_pb(self) -> pb::ChannelMode {
        match self {
            ChannelMode::Closed => pb::ChannelMode::Closed,
            ChannelMode::Counts => pb::ChannelMode::Counts,
            ChannelMode::Live => pb::ChannelMode::Live,
        }
    }

    pub(crate) fn from_pb(v: i32) -> ChannelMode {
        match pb::ChannelMode::try_from(v) {
            Ok(pb::ChannelMode::Counts) => ChannelMode::Counts,
            Ok(pb::ChannelMode::Live) => ChannelMode::Live,
            _ => ChannelMode::Closed,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Role {
    Unspecified,
    Member,
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Member {
    pub user_id: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Conversation {
    pub conversation_id: String,
    pub kind: ConversationKind,
    pub title: String,
    /// All members; empty for a channel (`list_members` pages them).
    pub members: Vec<Member>,
    pub last_seq: u64,
    /// A channel's members now (0 for other kinds).
    pub member_count: u32,
    /// A channel's settings (None for other kinds).
    pub channel: Option<ChannelSettings>,
}

impl Conversation {
    pub(crate) fn from_pb(c: pb::Conversation) -> Conversation {
        let kind = match pb::ConversationKind::try_from(c.kind) {
            Ok(pb::ConversationKind::Direct) => ConversationKind::Direct,
            Ok(pb::ConversationKind::Group) => ConversationKind::Group,
            Ok(pb::ConversationKind::Channel) => ConversationKind::Channel,
            _ => ConversationKind::Unspecified,
        };
        Conversation {
            conversation_id: c.conversation_id,
            kind,
            title: c.title,
            members: c.members.into_iter().map(Member::from_pb).collect(),
            last_seq: c.last_seq,
            member_count: c.member_count,
            channel: c.channel.map(|s| ChannelSettings {
                public: s.public,
                admins_only_post: s.admins_only_post,
            }),
        }
    }
}

impl Member {
    pub(crate) fn from_pb(m: pb::Member) -> Member {
        Member {
            role: match pb::Role::try_from(m.role) {
                Ok(pb::Role::Member) => Role::Member,
                Ok(pb::Role::Admin) => Role::Admin,
                _ => Role::Unspecified,
            },
            user_id: m.user_id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Presence {
    pub user_id: String,
    pub online: bool,
    /// Last time online (Unix ms); 0 while online, never seen or not visible.
    pub last_seen_ms: i64,
}

impl Presence {
    pub(crate) fn from_pb(p: pb::Presence) -> Presence {
        Presence {
            user_id: p.user_id,
            online: p.online,
            last_seen_ms: p.last_seen_ms,
        }
    }
}

/// A per-conversation sync position: everything up to `after_seq` is held.
/// The SDK hands these to [`crate::ClientStore::save_cursor`] so an app can
/// persist them and resume where it left off after a restart.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SyncCursor {
    pub conversation_id: String,
    pub after_seq: u64,
    /// The server history epoch `after_seq` counts in (SPEC §7); 0 when
    /// not known. Save it with the cursor: it is how the SDK notices a
    /// server that lost its history instead of dropping its new messages
    /// as repeats.
    #[uniffi(default = 0)]
    pub history_epoch: u64,
}

/// A message in the outbox: accepted by `send_message`, not yet
/// acknowledged by the server. Resent with the same `client_msg_id` on every
/// connection until its SendAck (or a final error) arrives.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct OutgoingMessage {
    pub client_msg_id: Vec<u8>,
    pub conversation_id: String,
    pub kind: ContentKind,
    pub body: Vec<u8>,
    pub reply_to_seq: u64,
    pub media: Option<Media>,
    /// Order of acceptance (the outbox sends in this order per conversation).
    pub created_order: u64,
    /// A channel message's mentions (SPEC §21): those members are pushed
    /// when offline. Empty elsewhere (a store written before this field
    /// loads it empty).
    pub mention_user_ids: Vec<String>,
}

/// The SDK's connection state (see client/SDK-SPEC.md).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum ConnectionState {
    /// Not trying to connect: before `connect()`, after `disconnect()`, or
    /// stopped by the server (`error` says why: REPLACED is reported as a
    /// [`DisconnectCause::Replaced`], UNAUTHENTICATED and
    /// UNSUPPORTED_VERSION as `Server`).
    Disconnected { cause: Option<DisconnectCause> },
    /// Dialling, or waiting `retry_in_ms` before the next attempt;
    /// `last_failure` says why the previous attempt or connection ended
    /// (`None` on the first attempt).
    Connecting {
        attempt: u32,
        retry_in_ms: u64,
        last_failure: Option<ConnectFailure>,
    },
    /// Welcome received: requests flow.
    Connected { user_id: String, session_id: String },
    /// `shutdown()` was called; terminal.
    Closed,
}

/// Why the SDK stopped connecting on its own.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum DisconnectCause {
    /// The app called `disconnect()`.
    Requested,
    /// Another instance of this user and device connected (GoAway REPLACED,
    /// SPEC §12): reconnect only on a user action.
    Replaced,
    /// A closing error the SDK cannot fix alone (UNAUTHENTICATED,
    /// UNSUPPORTED_VERSION).
    Server { error: ServerError },
    /// The token provider failed; call `connect()` once it can give a token.
    TokenUnavailable { message: String },
    /// A failure that retrying cannot heal: the server's certificate is not
    /// trusted (wrong CA or server name, expired), or the server refused
    /// as expired a token the provider had just fetched fresh (its clock,
    /// or its tokens, are wrong). Call `connect()` once it is fixed.
    Failed { failure: ConnectFailure },
}

/// Why a connection attempt or a connection failed
/// ([`ConnectionState::Connecting`]'s `last_failure`,
/// [`DisconnectCause::Failed`]).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum ConnectFailure {
    /// DNS found no address, or the TCP connection was refused or timed
    /// out: no network, or no server there.
    Unreachable { detail: String },
    /// The server's certificate is not trusted: permanent (the SDK stops).
    UntrustedCertificate { detail: String },
    /// TLS failed otherwise (handshake, protocol, alert).
    Tls { detail: String },
    /// The server refused the token (UNAUTHENTICATED, TOKEN_EXPIRED).
    AuthRefused { error: ServerError },
    /// The server is busy or going away (GoAway, OVERLOADED, SHUTTING_DOWN,
    /// TOO_MANY_CONNECTIONS): it said when to come back.
    ServerBusy { detail: String },
    /// No Welcome in time, or the server fell silent (missed heartbeats).
    TimedOut { detail: String },
    /// The connection closed or broke (EOF, reset, close_notify).
    ConnectionLost { detail: String },
    /// The server broke the protocol, or refused ours (PROTOCOL_VIOLATION,
    /// MALFORMED_FRAME): reconnecting with a longer backoff.
    Protocol { detail: String },
    /// The token provider could not give a token for now.
    TokenUnavailable { detail: String },
}

/// Everything the SDK tells the app, in order, on one dispatch thread.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum ClientEvent {
    StateChanged {
        state: ConnectionState,
    },
    /// A message of a conversation: exactly once per (conversation, seq)
    /// per client run, in seq order within the conversation.
    Message {
        message: ChatMessage,
    },
    /// A message from the outbox was stored by the server.
    MessageSent {
        client_msg_id: Vec<u8>,
        conversation_id: String,
        seq: u64,
        message_id: String,
        server_time_ms: i64,
    },
    /// The server refused an outbox message for good (a 2xxx other than
    /// RATE_LIMITED); it left the outbox.
    SendFailed {
        client_msg_id: Vec<u8>,
        conversation_id: String,
        error: ServerError,
    },
    Receipt {
        conversation_id: String,
        user_id: String,
        kind: ReceiptKind,
        up_to_seq: u64,
    },
    Typing {
        conversation_id: String,
        user_id: String,
        active: bool,
    },
    /// A watched user's presence (after subscribing, and on every change).
    PresenceChanged {
        presence: Presence,
    },
    /// A conversation was created, listed by a Sync, or changed.
    ConversationUpdated {
        conversation: Conversation,
    },
    MembersChanged {
        conversation: Conversation,
        actor_user_id: String,
        added_user_ids: Vec<String>,
        removed_user_ids: Vec<String>,
    },
    /// Answer to `load_history(ticket)`.
    HistoryPage {
        ticket: u64,
        conversation_id: String,
        messages: Vec<ChatMessage>,
        has_more: bool,
    },
    /// Answer to `create_group` / `create_channel` / `open_direct` /
    /// `change_members`.
    ConversationResult {
        ticket: u64,
        conversation: Conversation,
    },
    /// Answer to `list_members(ticket)`: members ascending by user id;
    /// ask again after the last one while `has_more`.
    MemberPage {
        ticket: u64,
        conversation_id: String,
        members: Vec<Member>,
        has_more: bool,
        member_count: u32,
    },
    /// The server set this connection's mode for a channel
    /// (`open_channel`, also after every reconnect): its newest seq and
    /// this user's read position.
    ChannelOpened {
        conversation_id: String,
        mode: ChannelMode,
        last_seq: u64,
        read_seq: u64,
    },
    /// The server refused `open_channel` (not a member, too many open):
    /// the SDK forgets the mode.
    ChannelOpenFailed {
        conversation_id: String,
        error: ServerError,
    },
    /// A channel open in COUNTS mode reached `last_seq` (batched by the
    /// server, about once a second): unread = `last_seq` - what was read.
    ChannelActivity {
        conversation_id: String,
        last_seq: u64,
    },
    /// Answer to `query_presence(ticket)`.
    PresenceResult {
        ticket: u64,
        presences: Vec<Presence>,
    },
    /// Answer to `register_apns_token` / `register_fcm_token`: this device
    /// gets pushes while it is not connected (SPEC §20).
    PushTokenRegistered {
        ticket: u64,
        /// Server time of the registration.
        registered_ms: i64,
    },
    /// Answer to `unregister_push_token`.
    PushTokenUnregistered {
        ticket: u64,
        /// The device had a registration.
        was_registered: bool,
    },
    /// Answer to `mute_conversation` / `unmute_conversation`: the user's
    /// mute of the conversation now (all devices).
    MuteChanged {
        ticket: u64,
        conversation_id: String,
        /// Muted until then (Unix ms); 0 when not muted or muted for ever.
        muted_until_ms: i64,
        forever: bool,
    },
    /// A ticketed request failed.
    RequestFailed {
        ticket: u64,
        /// The server's refusal; `None` when the connection dropped before
        /// the answer to a request that is not safe to repeat (creating a
        /// group): it may or may not have been carried out.
        error: Option<ServerError>,
    },
    /// A Sync round finished: every message stored up to now has been
    /// delivered (as `Message` events) or was already held.
    SyncComplete,
    /// Seqs the server no longer keeps (its history window): skipped for
    /// good; later messages were delivered.
    MessagesUnavailable {
        conversation_id: String,
        from_seq: u64,
        to_seq: u64,
    },
    /// The server lost or replaced this conversation's history (its
    /// history epoch changed, SPEC §7): a non-durable server restarted, or
    /// its store was wiped or restored. Seqs start again from 1; the SDK
    /// dropped its cursor and syncs the conversation from the start, so
    /// `Message` events follow with seqs the app may have seen before for
    /// other messages. An app keying messages by seq drops what it keyed
    /// for this conversation; `message_id`s stay unique.
    HistoryReset {
        conversation_id: String,
    },
}
