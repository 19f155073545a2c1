//! The one description of every `Frame.body` kind: wire name, field number,
//! direction, metric index, and how a server handles it when a client sends
//! it (on the connection, a read served from the store, or a write through
//! the bus), whether a response follows, and which body answers it.
//!
//! Everything that used to keep its own list of bodies (state machine
//! direction checks, log/metric names, bus routing, the Kafka bridge's
//! read/write split, the gateway's in-flight accounting) asks this module.
//!
//! Adding a body to `palaver.proto`: the compiler then points at
//! [`BodyKind::of`], [`BodyKind::info`], [`BodyKind::default_body`] and
//! [`conversation_of`] here (one arm each); the tests in this module fail
//! until [`BodyKind::ALL`] lists it in schema order with the schema's name and
//! number. See the crate README for the rest of the list.

use crate::pb::frame::Body;

/// One variant per field of the `Frame.body` oneof, in schema order. The
/// discriminant is the dense metric index (0 is reserved for "no body").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum BodyKind {
    Hello = 1,
    Welcome,
    Ping,
    Pong,
    GoAway,
    Error,
    Send,
    SendAck,
    Deliver,
    Receipt,
    ReceiptUpdate,
    Typing,
    PresenceQuery,
    PresenceResult,
    PresenceSubscribe,
    PresenceEvent,
    Sync,
    SyncBatch,
    History,
    HistoryPage,
    CreateConversation,
    ConversationCreated,
    ChangeMembers,
    MembersChanged,
    RegisterPushToken,
    PushTokenRegistered,
    UnregisterPushToken,
    PushTokenUnregistered,
    MuteConversation,
    ConversationMuted,
    ListMembers,
    MemberPage,
    OpenChannel,
    ChannelOpened,
    ChannelActivity,
}

/// Who sends a body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
    /// Ping, Pong, Typing.
    Both,
}

impl Direction {
    pub const fn from_client(self) -> bool {
        matches!(self, Direction::ClientToServer | Direction::Both)
    }

    pub const fn from_server(self) -> bool {
        matches!(self, Direction::ServerToClient | Direction::Both)
    }
}

/// How a server handles a body a client sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The connection answers it itself (Hello, Ping, Pong); it never
    /// reaches the backend.
    Connection,
    /// A read: served from the store (in the Kafka/Redis tier by the
    /// gateway's readers, straight from Redis, never through the bus).
    Read,
    /// A read that also leaves a presence watch for the connection
    /// (PresenceSubscribe): the Kafka/Redis tier serves it from Redis and
    /// keeps the watch in the receiving gateway; the embedded engine runs it
    /// through its bus to the router.
    Watch,
    /// A write: through the bus (Kafka `palaver.inbound`) to the router,
    /// ordered by [`conversation_of`] (else the sender's user id).
    Write,
}

/// Whether a server body answers a backend request (one the gateway counts
/// as in flight, see [`BodyInfo::response`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answers {
    /// Never (events, connection frames, client-only bodies).
    No,
    /// Always the response to a request.
    Always,
    /// Only with a non-zero request_id: with 0 it is an event for the user's
    /// other devices (ConversationCreated, MembersChanged) or an error about
    /// the stream (Error).
    WithRequestId,
}

/// One row of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyInfo {
    /// The oneof field name (`send_ack`): logs, errors and the metrics'
    /// `type` label.
    pub name: &'static str,
    /// The message type name (`SendAck`).
    pub message: &'static str,
    /// The oneof field number.
    pub field: u32,
    pub direction: Direction,
    /// How a server handles it from a client; `None` for server-only bodies.
    pub route: Option<Route>,
    /// The body that answers it when a client sends it (besides an Error),
    /// if any.
    pub response: Option<BodyKind>,
    /// For server bodies: whether it answers a backend request.
    pub answers: Answers,
}

const fn row(
    name: &'static str,
    message: &'static str,
    field: u32,
    direction: Direction,
    route: Option<Route>,
    response: Option<BodyKind>,
    answers: Answers,
) -> BodyInfo {
    BodyInfo {
        name,
        message,
        field,
        direction,
        route,
        response,
        answers,
    }
}

/// Number of slots a per-kind metric array needs (index 0: no body).
pub const METRIC_SLOTS: usize = BodyKind::ALL.len() + 1;

/// The metric label of slot 0 (a frame without a body, or undecodable).
pub const NO_BODY_NAME: &str = "none";

impl BodyKind {
    /// Every kind, in schema (and metric index) order.
    pub const ALL: [BodyKind; 35] = [
        BodyKind::Hello,
        BodyKind::Welcome,
        BodyKind::Ping,
        BodyKind::Pong,
        BodyKind::GoAway,
        BodyKind::Error,
        BodyKind::Send,
        BodyKind::SendAck,
        BodyKind::Deliver,
        BodyKind::Receipt,
        BodyKind::ReceiptUpdate,
        BodyKind::Typing,
        BodyKind::PresenceQuery,
        BodyKind::PresenceResult,
        BodyKind::PresenceSubscribe,
        BodyKind::PresenceEvent,
        BodyKind::Sync,
        BodyKind::SyncBatch,
        BodyKind::History,
        BodyKind::HistoryPage,
        BodyKind::CreateConversation,
        BodyKind::ConversationCreated,
        BodyKind::ChangeMembers,
        BodyKind::MembersChanged,
        BodyKind::RegisterPushToken,
        BodyKind::PushTokenRegistered,
        BodyKind::UnregisterPushToken,
        BodyKind::PushTokenUnregistered,
        BodyKind::MuteConversation,
        BodyKind::ConversationMuted,
        BodyKind::ListMembers,
        BodyKind::MemberPage,
        BodyKind::OpenChannel,
        BodyKind::ChannelOpened,
        BodyKind::ChannelActivity,
    ];

    /// The kind of a body.
    pub const fn of(body: &Body) -> BodyKind {
        match body {
            Body::Hello(_) => BodyKind::Hello,
            Body::Welcome(_) => BodyKind::Welcome,
            Body::Ping(_) => BodyKind::Ping,
            Body::Pong(_) => BodyKind::Pong,
            Body::GoAway(_) => BodyKind::GoAway,
            Body::Error(_) => BodyKind::Error,
            Body::Send(_) => BodyKind::Send,
            Body::SendAck(_) => BodyKind::SendAck,
            Body::Deliver(_) => BodyKind::Deliver,
            Body::Receipt(_) => BodyKind::Receipt,
            Body::ReceiptUpdate(_) => BodyKind::ReceiptUpdate,
            Body::Typing(_) => BodyKind::Typing,
            Body::PresenceQuery(_) => BodyKind::PresenceQuery,
            Body::PresenceResult(_) => BodyKind::PresenceResult,
            Body::PresenceSubscribe(_) => BodyKind::PresenceSubscribe,
            Body::PresenceEvent(_) => BodyKind::PresenceEvent,
            Body::Sync(_) => BodyKind::Sync,
            Body::SyncBatch(_) => BodyKind::SyncBatch,
            Body::History(_) => BodyKind::History,
            Body::HistoryPage(_) => BodyKind::HistoryPage,
            Body::CreateConversation(_) => BodyKind::CreateConversation,
            Body::ConversationCreated(_) => BodyKind::ConversationCreated,
            Body::ChangeMembers(_) => BodyKind::ChangeMembers,
            Body::MembersChanged(_) => BodyKind::MembersChanged,
            Body::RegisterPushToken(_) => BodyKind::RegisterPushToken,
            Body::PushTokenRegistered(_) => BodyKind::PushTokenRegistered,
            Body::UnregisterPushToken(_) => BodyKind::UnregisterPushToken,
            Body::PushTokenUnregistered(_) => BodyKind::PushTokenUnregistered,
            Body::MuteConversation(_) => BodyKind::MuteConversation,
            Body::ConversationMuted(_) => BodyKind::ConversationMuted,
            Body::ListMembers(_) => BodyKind::ListMembers,
            Body::MemberPage(_) => BodyKind::MemberPage,
            Body::OpenChannel(_) => BodyKind::OpenChannel,
            Body::ChannelOpened(_) => BodyKind::ChannelOpened,
            Body::ChannelActivity(_) => BodyKind::ChannelActivity,
        }
    }

    /// The table row of this kind.
    #[rustfmt::skip]
    pub const fn info(self) -> &'static BodyInfo {
        use Answers::{Always, WithRequestId};
        use Direction::{Both, ClientToServer as C2S, ServerToClient as S2C};
        use Route::{Connection, Read, Watch, Write};
        const NO: Answers = Answers::No;
        match self {
            BodyKind::Hello => const { &row("hello", "Hello", 10, C2S, Some(Connection), Some(BodyKind::Welcome), NO) },
            BodyKind::Welcome => const { &row("welcome", "Welcome", 11, S2C, None, None, NO) },
            BodyKind::Ping => const { &row("ping", "Ping", 12, Both, Some(Connection), Some(BodyKind::Pong), NO) },
            BodyKind::Pong => const { &row("pong", "Pong", 13, Both, Some(Connection), None, NO) },
            BodyKind::GoAway => const { &row("go_away", "GoAway", 14, S2C, None, None, NO) },
            BodyKind::Error => const { &row("error", "Error", 15, S2C, None, None, WithRequestId) },
            BodyKind::Send => const { &row("send", "Send", 20, C2S, Some(Write), Some(BodyKind::SendAck), NO) },
            BodyKind::SendAck => const { &row("send_ack", "SendAck", 21, S2C, None, None, Always) },
            BodyKind::Deliver => const { &row("deliver", "Deliver", 22, S2C, None, None, NO) },
            BodyKind::Receipt => const { &row("receipt", "Receipt", 23, C2S, Some(Write), None, NO) },
            BodyKind::ReceiptUpdate => const { &row("receipt_update", "ReceiptUpdate", 24, S2C, None, None, NO) },
            BodyKind::Typing => const { &row("typing", "Typing", 25, Both, Some(Write), None, NO) },
            BodyKind::PresenceQuery => const { &row("presence_query", "PresenceQuery", 30, C2S, Some(Read), Some(BodyKind::PresenceResult), NO) },
            BodyKind::PresenceResult => const { &row("presence_result", "PresenceResult", 31, S2C, None, None, Always) },
            BodyKind::PresenceSubscribe => const { &row("presence_subscribe", "PresenceSubscribe", 32, C2S, Some(Watch), Some(BodyKind::PresenceResult), NO) },
            BodyKind::PresenceEvent => const { &row("presence_event", "PresenceEvent", 33, S2C, None, None, NO) },
            BodyKind::Sync => const { &row("sync", "Sync", 40, C2S, Some(Read), Some(BodyKind::SyncBatch), NO) },
            BodyKind::SyncBatch => const { &row("sync_batch", "SyncBatch", 41, S2C, None, None, Always) },
            BodyKind::History => const { &row("history", "History", 42, C2S, Some(Read), Some(BodyKind::HistoryPage), NO) },
            BodyKind::HistoryPage => const { &row("history_page", "HistoryPage", 43, S2C, None, None, Always) },
            BodyKind::CreateConversation => const { &row("create_conversation", "CreateConversation", 50, C2S, Some(Write), Some(BodyKind::ConversationCreated), NO) },
            BodyKind::ConversationCreated => const { &row("conversation_created", "ConversationCreated", 51, S2C, None, None, WithRequestId) },
            BodyKind::ChangeMembers => const { &row("change_members", "ChangeMembers", 52, C2S, Some(Write), Some(BodyKind::MembersChanged), NO) },
            BodyKind::MembersChanged => const { &row("members_changed", "MembersChanged", 53, S2C, None, None, WithRequestId) },
            BodyKind::RegisterPushToken => const { &row("register_push_token", "RegisterPushToken", 60, C2S, Some(Write), Some(BodyKind::PushTokenRegistered), NO) },
            BodyKind::PushTokenRegistered => const { &row("push_token_registered", "PushTokenRegistered", 61, S2C, None, None, Always) },
            BodyKind::UnregisterPushToken => const { &row("unregister_push_token", "UnregisterPushToken", 62, C2S, Some(Write), Some(BodyKind::PushTokenUnregistered), NO) },
            BodyKind::PushTokenUnregistered => const { &row("push_token_unregistered", "PushTokenUnregistered", 63, S2C, None, None, Always) },
            BodyKind::MuteConversation => const { &row("mute_conversation", "MuteConversation", 64, C2S, Some(Write), Some(BodyKind::ConversationMuted), NO) },
            BodyKind::ConversationMuted => const { &row("conversation_muted", "ConversationMuted", 65, S2C, None, None, Always) },
            BodyKind::ListMembers => const { &row("list_members", "ListMembers", 70, C2S, Some(Read), Some(BodyKind::MemberPage), NO) },
            BodyKind::MemberPage => const { &row("member_page", "MemberPage", 71, S2C, None, None, Always) },
            BodyKind::OpenChannel => const { &row("open_channel", "OpenChannel", 72, C2S, Some(Read), Some(BodyKind::ChannelOpened), NO) },
            BodyKind::ChannelOpened => const { &row("channel_opened", "ChannelOpened", 73, S2C, None, None, Always) },
            BodyKind::ChannelActivity => const { &row("channel_activity", "ChannelActivity", 74, S2C, None, None, NO) },
        }
    }

    /// A body of this kind with default contents.
    pub fn default_body(self) -> Body {
        match self {
            BodyKind::Hello => Body::Hello(Default::default()),
            BodyKind::Welcome => Body::Welcome(Default::default()),
            BodyKind::Ping => Body::Ping(Default::default()),
            BodyKind::Pong => Body::Pong(Default::default()),
            BodyKind::GoAway => Body::GoAway(Default::default()),
            BodyKind::Error => Body::Error(Default::default()),
            BodyKind::Send => Body::Send(Default::default()),
            BodyKind::SendAck => Body::SendAck(Default::default()),
            BodyKind::Deliver => Body::Deliver(Default::default()),
            BodyKind::Receipt => Body::Receipt(Default::default()),
            BodyKind::ReceiptUpdate => Body::ReceiptUpdate(Default::default()),
            BodyKind::Typing => Body::Typing(Default::default()),
            BodyKind::PresenceQuery => Body::PresenceQuery(Default::default()),
            BodyKind::PresenceResult => Body::PresenceResult(Default::default()),
            BodyKind::PresenceSubscribe => Body::PresenceSubscribe(Default::default()),
            BodyKind::PresenceEvent => Body::PresenceEvent(Default::default()),
            BodyKind::Sync => Body::Sync(Default::default()),
            BodyKind::SyncBatch => Body::SyncBatch(Default::default()),
            BodyKind::History => Body::History(Default::default()),
            BodyKind::HistoryPage => Body::HistoryPage(Default::default()),
            BodyKind::CreateConversation => Body::CreateConversation(Default::default()),
            BodyKind::ConversationCreated => Body::ConversationCreated(Default::default()),
            BodyKind::ChangeMembers => Body::ChangeMembers(Default::default()),
            BodyKind::MembersChanged => Body::MembersChanged(Default::default()),
            BodyKind::RegisterPushToken => Body::RegisterPushToken(Default::default()),
            BodyKind::PushTokenRegistered => Body::PushTokenRegistered(Default::default()),
            BodyKind::UnregisterPushToken => Body::UnregisterPushToken(Default::default()),
            BodyKind::PushTokenUnregistered => Body::PushTokenUnregistered(Default::default()),
            BodyKind::MuteConversation => Body::MuteConversation(Default::default()),
            BodyKind::ConversationMuted => Body::ConversationMuted(Default::default()),
            BodyKind::ListMembers => Body::ListMembers(Default::default()),
            BodyKind::MemberPage => Body::MemberPage(Default::default()),
            BodyKind::OpenChannel => Body::OpenChannel(Default::default()),
            BodyKind::ChannelOpened => Body::ChannelOpened(Default::default()),
            BodyKind::ChannelActivity => Body::ChannelActivity(Default::default()),
        }
    }

    /// The oneof field name (`send_ack`).
    pub const fn name(self) -> &'static str {
        self.info().name
    }

    /// The message type name (`SendAck`).
    pub const fn message_name(self) -> &'static str {
        self.info().message
    }

    /// Dense index for per-kind counters, 1..=35 (0: no body).
    pub const fn metric_index(self) -> usize {
        self as usize
    }

    /// True for bodies a client may send.
    pub const fn sent_by_client(self) -> bool {
        self.info().direction.from_client()
    }

    /// True for bodies a server may send.
    pub const fn sent_by_server(self) -> bool {
        self.info().direction.from_server()
    }

    /// How a server handles it from a client (`None`: server-only body).
    pub const fn route(self) -> Option<Route> {
        self.info().route
    }

    /// A client request for the backend (read, watch or write), as opposed
    /// to a connection frame or a server-only body.
    pub const fn is_backend_request(self) -> bool {
        matches!(
            self.route(),
            Some(Route::Read | Route::Watch | Route::Write)
        )
    }

    /// A backend request the Kafka/Redis tier serves from the store on the
    /// gateway (reads and watches), not through the bus.
    pub const fn served_from_store(self) -> bool {
        matches!(self.route(), Some(Route::Read | Route::Watch))
    }

    /// A backend request answered by a response of its own (SPEC §3), which
    /// the gateway counts against `max_requests_in_flight`.
    pub const fn expects_response(self) -> bool {
        self.is_backend_request() && self.info().response.is_some()
    }

    /// The metric index of an optional body (0 for none).
    pub fn metric_index_of(body: Option<&Body>) -> usize {
        body.map_or(0, |b| BodyKind::of(b).metric_index())
    }

    /// The metric label of a slot from [`BodyKind::metric_index`].
    pub fn metric_name(index: usize) -> &'static str {
        match index.checked_sub(1).and_then(|i| BodyKind::ALL.get(i)) {
            Some(kind) => kind.name(),
            None => NO_BODY_NAME,
        }
    }
}

/// True for a frame from the backend that answers one of the connection's
/// requests (see [`Answers`]).
pub fn answers_request(frame: &crate::pb::Frame) -> bool {
    match frame.body.as_ref().map(|b| BodyKind::of(b).info().answers) {
        Some(Answers::Always) => true,
        Some(Answers::WithRequestId) => frame.request_id != 0,
        Some(Answers::No) | None => false,
    }
}

/// The conversation a client request is about, which orders it on the bus
/// (requests about no single conversation are ordered by the sender's user
/// id). Exhaustive on purpose: a new body must say.
pub fn conversation_of(body: &Body) -> Option<&str> {
    match body {
        Body::Send(b) => Some(&b.conversation_id),
        Body::Receipt(b) => Some(&b.conversation_id),
        Body::Typing(b) => Some(&b.conversation_id),
        Body::History(b) => Some(&b.conversation_id),
        Body::ChangeMembers(b) => Some(&b.conversation_id),
        Body::MuteConversation(b) => Some(&b.conversation_id),
        Body::ListMembers(b) => Some(&b.conversation_id),
        Body::OpenChannel(b) => Some(&b.conversation_id),
        Body::Hello(_)
        | Body::Welcome(_)
        | Body::Ping(_)
        | Body::Pong(_)
        | Body::GoAway(_)
        | Body::Error(_)
        | Body::SendAck(_)
        | Body::Deliver(_)
        | Body::ReceiptUpdate(_)
        | Body::PresenceQuery(_)
        | Body::PresenceResult(_)
        | Body::PresenceSubscribe(_)
        | Body::PresenceEvent(_)
        | Body::Sync(_)
        | Body::SyncBatch(_)
        | Body::HistoryPage(_)
        | Body::CreateConversation(_)
        | Body::ConversationCreated(_)
        | Body::MembersChanged(_)
        | Body::RegisterPushToken(_)
        | Body::PushTokenRegistered(_)
        | Body::UnregisterPushToken(_)
        | Body::PushTokenUnregistered(_)
        | Body::ConversationMuted(_)
        | Body::MemberPage(_)
        | Body::ChannelOpened(_)
        | Body::ChannelActivity(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::DescriptorPool;
    use std::collections::HashSet;

    #[test]
    fn table_matches_the_compiled_schema() {
        let pool = DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
        let frame = pool.get_message_by_name("palaver.v1.Frame").unwrap();
        let oneof = frame.oneofs().find(|o| o.name() == "body").unwrap();
        let fields: Vec<_> = oneof.fields().collect();
        assert_eq!(fields.len(), BodyKind::ALL.len(), "ALL misses a body");
        let mut seen = HashSet::new();
        for field in &fields {
            let kinds: Vec<_> = BodyKind::ALL
                .iter()
                .filter(|k| k.name() == field.name())
                .collect();
            assert_eq!(
                kinds.len(),
                1,
                "{} listed {} times",
                field.name(),
                kinds.len()
            );
            let info = kinds[0].info();
            assert_eq!(info.field, field.number(), "{}", field.name());
            let message = field.kind();
            let message = message.as_message().unwrap();
            assert_eq!(info.message, message.name(), "{}", field.name());
            assert!(seen.insert(info.field));
        }
        // Schema order is metric order.
        let mut numbers: Vec<u32> = fields.iter().map(|f| f.number()).collect();
        numbers.sort_unstable();
        let ours: Vec<u32> = BodyKind::ALL.iter().map(|k| k.info().field).collect();
        assert_eq!(ours, numbers);
    }

    #[test]
    fn metric_indices_are_dense_and_unique() {
        for (i, kind) in BodyKind::ALL.iter().enumerate() {
            assert_eq!(kind.metric_index(), i + 1, "{kind:?}");
            assert_eq!(BodyKind::metric_name(i + 1), kind.name());
        }
        let unique: HashSet<_> = BodyKind::ALL.iter().map(|k| k.metric_index()).collect();
        assert_eq!(unique.len(), BodyKind::ALL.len());
        assert_eq!(METRIC_SLOTS, BodyKind::ALL.len() + 1);
        assert_eq!(BodyKind::metric_index_of(None), 0);
        assert_eq!(BodyKind::metric_name(0), "none");
        assert_eq!(BodyKind::metric_name(METRIC_SLOTS), "none");
    }

    #[test]
    fn kinds_round_trip_through_bodies() {
        for kind in BodyKind::ALL {
            assert_eq!(BodyKind::of(&kind.default_body()), kind);
        }
    }

    #[test]
    fn rows_are_consistent() {
        for kind in BodyKind::ALL {
            let info = kind.info();
            // A client body has a route; a server-only one has none.
            assert_eq!(
                info.route.is_some(),
                info.direction.from_client(),
                "{kind:?}"
            );
            if let Some(response) = info.response {
                assert!(response.sent_by_server(), "{kind:?}");
                // Responses to backend requests are counted as answers.
                assert_eq!(
                    response.info().answers != Answers::No,
                    kind.is_backend_request(),
                    "{kind:?} -> {response:?}"
                );
            }
            if info.answers != Answers::No {
                assert!(kind.sent_by_server(), "{kind:?}");
                // Every answer except Error answers some backend request.
                assert!(
                    kind == BodyKind::Error
                        || BodyKind::ALL
                            .iter()
                            .any(|r| r.is_backend_request() && r.info().response == Some(kind)),
                    "{kind:?} answers nothing"
                );
            }
            // Only requests about one conversation are keyed by it, and only
            // client requests carry an ordering key.
            if conversation_of(&kind.default_body()).is_some() {
                assert!(kind.is_backend_request(), "{kind:?}");
            }
        }
    }

    /// SPEC §3's request/response table and "which side may send what"
    /// lists say what the table says.
    #[test]
    fn table_matches_spec() {
        let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../SPEC.md"))
            .expect("SPEC.md at the repository root");
        let by_message = |name: &str| {
            BodyKind::ALL
                .into_iter()
                .find(|k| k.message_name() == name)
                .unwrap_or_else(|| panic!("SPEC names unknown body {name}"))
        };
        // | C→S request | response (same request_id) | on failure |
        let table = spec
            .split_once("| C→S request | response (same request_id) | on failure |")
            .expect("SPEC §3 request table")
            .1;
        let mut requests = Vec::new();
        for line in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let kind = by_message(cells[1]);
            let response = (cells[2] != "none").then(|| by_message(cells[2]));
            assert!(kind.sent_by_client(), "{kind:?}");
            assert_eq!(kind.info().response, response, "{kind:?}");
            requests.push(kind);
        }
        for kind in BodyKind::ALL {
            let is_request = kind.is_backend_request() || kind.info().response.is_some();
            assert_eq!(
                requests.contains(&kind),
                is_request,
                "{kind:?} in SPEC §3 table"
            );
        }
        // - client only: …; - server only: …; - both: ….
        let lists = spec
            .split_once("Which side may send what:")
            .expect("SPEC §3 direction lists")
            .1;
        let lists: String = lists
            .lines()
            .skip_while(|l| l.trim().is_empty())
            .take_while(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let mut seen = 0;
        for item in lists.split("- ").filter(|i| !i.trim().is_empty()) {
            let (who, names) = item.split_once(':').expect("`who: names`");
            let direction = match who.trim() {
                "client only" => Direction::ClientToServer,
                "server only" => Direction::ServerToClient,
                "both" => Direction::Both,
                other => panic!("unknown direction {other}"),
            };
            for name in names.split(',') {
                let name = name.trim().trim_end_matches(['.', ';']).trim();
                let kind = by_message(name);
                assert_eq!(kind.info().direction, direction, "{kind:?}");
                seen += 1;
            }
        }
        assert_eq!(seen, BodyKind::ALL.len(), "SPEC §3 lists every body once");
    }

    #[test]
    fn routes_and_responses() {
        use BodyKind::*;
        let reads: Vec<_> = BodyKind::ALL
            .into_iter()
            .filter(|k| k.route() == Some(Route::Read))
            .collect();
        assert_eq!(
            reads,
            [PresenceQuery, Sync, History, ListMembers, OpenChannel]
        );
        assert!(PresenceSubscribe.served_from_store() && !Send.served_from_store());
        assert!(Send.expects_response() && !Typing.expects_response());
        assert!(!Receipt.expects_response() && !Ping.expects_response());
        for both in [Ping, Pong, Typing] {
            assert!(both.sent_by_client() && both.sent_by_server());
        }
        let f = |request_id, body: Body| crate::pb::Frame {
            request_id,
            body: Some(body),
        };
        assert!(answers_request(&f(0, SendAck.default_body())));
        assert!(!answers_request(&f(0, MembersChanged.default_body())));
        assert!(answers_request(&f(3, MembersChanged.default_body())));
        assert!(!answers_request(&f(0, Error.default_body())));
        assert!(!answers_request(&f(3, Deliver.default_body())));
        assert!(!answers_request(&crate::pb::Frame::default()));
    }
}
