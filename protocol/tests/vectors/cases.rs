//! The cases the vectors document holds: valid frames (the SPEC example
//! session included), tolerated encodings, incomplete streams, invalid bytes.

use palaver_protocol::frame;
use palaver_protocol::pb::{self, frame::Body};

use super::*;

pub(super) struct Valid {
    pub(super) name: &'static str,
    pub(super) note: &'static str,
    pub(super) frame: pb::Frame,
}

pub(super) fn valid(name: &'static str, note: &'static str, request_id: u32, body: Body) -> Valid {
    Valid {
        name,
        note,
        frame: frame(request_id, body),
    }
}

/// Bytes that decode to `frame` although re-encoding gives different bytes.
pub(super) struct Tolerated {
    pub(super) name: &'static str,
    pub(super) note: &'static str,
    pub(super) hex: &'static str,
    pub(super) frame: pb::Frame,
}

/// A valid start of a stream: no frame yet, no error, wait for more bytes.
pub(super) struct Incomplete {
    pub(super) name: &'static str,
    pub(super) note: &'static str,
    pub(super) hex: &'static str,
}

pub(super) struct Invalid {
    pub(super) name: &'static str,
    pub(super) note: &'static str,
    pub(super) hex: &'static str,
    pub(super) max_frame_len: usize,
}

pub(super) fn hello() -> pb::Hello {
    pb::Hello {
        protocol_version: 1,
        token: "tok-alice".into(),
        device_id: "phone".into(),
        client_name: "palaver-ios".into(),
        client_version: "1.0.0".into(),
        resume: vec![],
    }
}

pub(super) fn limits() -> pb::Limits {
    palaver_protocol::Limits::default().to_pb()
}

pub(super) fn text_message(seq: u64, sender: &str, body: &str) -> pb::Message {
    pb::Message {
        conversation_id: "dm:alice:bob".into(),
        seq,
        message_id: format!("m-{seq}"),
        sender_user_id: sender.into(),
        sender_device_id: "phone".into(),
        client_msg_id: CMID.to_vec(),
        kind: pb::ContentKind::Text.into(),
        body: body.as_bytes().to_vec(),
        reply_to_seq: 0,
        media: None,
        server_time_ms: T0 + 1_000,
    }
}

pub(super) fn group(members: &[(&str, pb::Role)], last_seq: u64) -> pb::Conversation {
    pb::Conversation {
        conversation_id: "grp:7Hq2x".into(),
        kind: pb::ConversationKind::Group.into(),
        title: "Climbing".into(),
        members: members
            .iter()
            .map(|(u, r)| pb::Member {
                user_id: (*u).into(),
                role: (*r).into(),
            })
            .collect(),
        last_seq,
        channel: Default::default(),
        member_count: Default::default(),
    }
}

/// The example session in SPEC.md, in order (alice on "phone", bob online).
pub(super) fn session_cases() -> Vec<Valid> {
    vec![
        valid(
            "session-1-hello",
            "C->S alice's first frame after TLS",
            1,
            Body::Hello(hello()),
        ),
        valid(
            "session-2-welcome",
            "S->C answer to Hello, same request_id",
            1,
            Body::Welcome(pb::Welcome {
                protocol_version: 1,
                session_id: "s-1".into(),
                user_id: "alice".into(),
                heartbeat_interval_ms: 30_000,
                limits: Some(limits()),
                server_time_ms: T0,
            }),
        ),
        valid(
            "session-3-ping",
            "C->S heartbeat",
            2,
            Body::Ping(pb::Ping { nonce: 1 }),
        ),
        valid(
            "session-4-pong",
            "S->C echoes request_id and nonce",
            2,
            Body::Pong(pb::Pong { nonce: 1 }),
        ),
        valid(
            "session-5-send",
            "C->S text \"hi\" to bob",
            3,
            Body::Send(pb::Send {
                conversation_id: "dm:alice:bob".into(),
                client_msg_id: CMID.to_vec(),
                kind: pb::ContentKind::Text.into(),
                body: b"hi".to_vec(),
                reply_to_seq: 0,
                media: None,
                mention_user_ids: Default::default(),
            }),
        ),
        valid(
            "session-6-send-ack",
            "S->C durable, seq 1",
            3,
            Body::SendAck(pb::SendAck {
                client_msg_id: CMID.to_vec(),
                message_id: "m-1".into(),
                conversation_id: "dm:alice:bob".into(),
                seq: 1,
                server_time_ms: T0 + 1_000,
            }),
        ),
        valid(
            "session-7-deliver",
            "S->C to bob's devices (and alice's other devices), request_id 0",
            0,
            Body::Deliver(pb::Deliver {
                message: Some(text_message(1, "alice", "hi")),
            }),
        ),
        valid(
            "session-8-receipt",
            "C->S bob has read up to seq 1",
            7,
            Body::Receipt(pb::Receipt {
                conversation_id: "dm:alice:bob".into(),
                kind: pb::ReceiptKind::Read.into(),
                up_to_seq: 1,
            }),
        ),
        valid(
            "session-9-receipt-update",
            "S->C to alice: bob read up to seq 1",
            0,
            Body::ReceiptUpdate(pb::ReceiptUpdate {
                conversation_id: "dm:alice:bob".into(),
                user_id: "bob".into(),
                kind: pb::ReceiptKind::Read.into(),
                up_to_seq: 1,
            }),
        ),
    ]
}

pub(super) fn valid_cases() -> Vec<Valid> {
    use pb::Role::{Admin, Member};
    let mut cases = session_cases();
    cases.extend([
        Valid {
            name: "empty-frame",
            note: "decodes (all fields default) but has no body: a server answers MALFORMED_FRAME, a client ignores it",
            frame: pb::Frame::default(),
        },
        valid(
            "hello-resume",
            "Hello with sync cursors: the server syncs right after Welcome",
            1,
            Body::Hello(pb::Hello {
                resume: vec![
                    pb::Cursor {
                        conversation_id: "dm:alice:bob".into(),
                        after_seq: 41,
                    },
                    pb::Cursor {
                        conversation_id: "grp:7Hq2x".into(),
                        after_seq: 0,
                    },
                ],
                ..hello()
            }),
        ),
        valid(
            "ping-max-request-id",
            "request_id is a uint32; 64-bit nonce",
            u32::MAX,
            Body::Ping(pb::Ping { nonce: u64::MAX }),
        ),
        valid(
            "go-away-shutdown",
            "node draining; reconnect after 2000 ms plus jitter",
            0,
            Body::GoAway(pb::GoAway {
                reason: pb::GoAwayReason::Shutdown.into(),
                reconnect_delay_ms: 2_000,
                message: "draining".into(),
            }),
        ),
        valid(
            "go-away-replaced",
            "the same user+device connected again",
            0,
            Body::GoAway(pb::GoAway {
                reason: pb::GoAwayReason::Replaced.into(),
                reconnect_delay_ms: 0,
                message: String::new(),
            }),
        ),
        valid(
            "go-away-slow-consumer",
            "the client did not read fast enough",
            0,
            Body::GoAway(pb::GoAway {
                reason: pb::GoAwayReason::SlowConsumer.into(),
                reconnect_delay_ms: 1_000,
                message: "outbound queue full".into(),
            }),
        ),
        valid(
            "error-closing",
            "1xxx: the server closes after this frame",
            1,
            Body::Error(pb::Error {
                code: 1003,
                message: "token signature invalid".into(),
                client_msg_id: vec![],
            }),
        ),
        valid(
            "error-send",
            "2xxx answering a Send: carries the Send's client_msg_id",
            4,
            Body::Error(pb::Error {
                code: 2001,
                message: "rate limited".into(),
                client_msg_id: CMID.to_vec(),
            }),
        ),
        valid(
            "send-media-reply",
            "image with attachment reference, replying to seq 12",
            5,
            Body::Send(pb::Send {
                conversation_id: "grp:7Hq2x".into(),
                client_msg_id: CMID.to_vec(),
                kind: pb::ContentKind::Image.into(),
                body: b"look".to_vec(),
                reply_to_seq: 12,
                media: Some(pb::MediaRef {
                    url: "https://media.example.com/a1.jpg".into(),
                    mime_type: "image/jpeg".into(),
                    size_bytes: 482_113,
                    sha256: vec![0xab; 32],
                }), mention_user_ids: Default::default(), }),
        ),
        valid(
            "typing-client",
            "C->S; user_id is filled by the server",
            0,
            Body::Typing(pb::Typing {
                conversation_id: "grp:7Hq2x".into(),
                active: true,
                user_id: String::new(),
            }),
        ),
        valid(
            "typing-server",
            "S->C: bob is typing",
            0,
            Body::Typing(pb::Typing {
                conversation_id: "grp:7Hq2x".into(),
                active: true,
                user_id: "bob".into(),
            }),
        ),
        valid(
            "receipt-delivered",
            "C->S delivered up to seq 5",
            0,
            Body::Receipt(pb::Receipt {
                conversation_id: "grp:7Hq2x".into(),
                kind: pb::ReceiptKind::Delivered.into(),
                up_to_seq: 5,
            }),
        ),
        valid(
            "presence-query",
            "C->S",
            8,
            Body::PresenceQuery(pb::PresenceQuery {
                user_ids: vec!["bob".into(), "carol".into()],
            }),
        ),
        valid(
            "presence-result",
            "S->C: bob online; carol last seen at T0 (last_seen_ms 0 = online or never seen)",
            8,
            Body::PresenceResult(pb::PresenceResult {
                presences: vec![
                    pb::Presence {
                        user_id: "bob".into(),
                        online: true,
                        last_seen_ms: 0,
                    },
                    pb::Presence {
                        user_id: "carol".into(),
                        online: false,
                        last_seen_ms: T0,
                    },
                ],
            }),
        ),
        valid(
            "presence-subscribe",
            "C->S watch bob",
            9,
            Body::PresenceSubscribe(pb::PresenceSubscribe {
                user_ids: vec!["bob".into()],
                unsubscribe: false,
            }),
        ),
        valid(
            "presence-unsubscribe",
            "C->S stop watching bob",
            10,
            Body::PresenceSubscribe(pb::PresenceSubscribe {
                user_ids: vec!["bob".into()],
                unsubscribe: true,
            }),
        ),
        valid(
            "presence-event",
            "S->C bob went offline",
            0,
            Body::PresenceEvent(pb::PresenceEvent {
                presence: Some(pb::Presence {
                    user_id: "bob".into(),
                    online: false,
                    last_seen_ms: T0 + 60_000,
                }),
            }),
        ),
        valid(
            "sync",
            "C->S everything after seq 41 in dm:alice:bob (and from 0 elsewhere), at most 100",
            11,
            Body::Sync(pb::Sync {
                cursors: vec![pb::Cursor {
                    conversation_id: "dm:alice:bob".into(),
                    after_seq: 41,
                }],
                limit: 100,
            }),
        ),
        valid(
            "sync-batch",
            "S->C one message, one conversation new to the client, more to come; the server's history epoch",
            11,
            Body::SyncBatch(pb::SyncBatch {
                messages: vec![text_message(42, "bob", "yo")],
                conversations: vec![group(&[("alice", Member), ("bob", Admin)], 3)],
                has_more: true,
                history_epoch: 0x5eed_cafe_0000_0001,
            }),
        ),
        valid(
            "history",
            "C->S 50 messages before seq 100",
            12,
            Body::History(pb::History {
                conversation_id: "dm:alice:bob".into(),
                before_seq: 100,
                limit: 50,
            }),
        ),
        valid(
            "history-page",
            "S->C ascending by seq; older messages exist; the server's history epoch",
            12,
            Body::HistoryPage(pb::HistoryPage {
                conversation_id: "dm:alice:bob".into(),
                messages: vec![text_message(98, "alice", "a"), text_message(99, "bob", "b")],
                has_more: true,
                history_epoch: 0x5eed_cafe_0000_0001,
            }),
        ),
        valid(
            "create-group",
            "C->S group with bob and carol besides the creator",
            13,
            Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Group.into(),
                title: "Climbing".into(),
                member_user_ids: vec!["bob".into(), "carol".into()], channel: Default::default(), }),
        ),
        valid(
            "create-direct",
            "C->S direct with bob: answered with dm:alice:bob",
            14,
            Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Direct.into(),
                title: String::new(),
                member_user_ids: vec!["bob".into()], channel: Default::default(), }),
        ),
        valid(
            "conversation-created",
            "S->C; the creator is admin",
            13,
            Body::ConversationCreated(pb::ConversationCreated {
                conversation: Some(group(
                    &[("alice", Admin), ("bob", Member), ("carol", Member)],
                    0,
                )),
            }),
        ),
        valid(
            "change-members",
            "C->S admin adds dave, removes carol, promotes bob",
            15,
            Body::ChangeMembers(pb::ChangeMembers {
                conversation_id: "grp:7Hq2x".into(),
                add_user_ids: vec!["dave".into()],
                remove_user_ids: vec!["carol".into()],
                promote_user_ids: vec!["bob".into()],
            }),
        ),
        valid(
            "members-changed",
            "S->C to everyone who was or is a member",
            15,
            Body::MembersChanged(pb::MembersChanged {
                conversation: Some(group(
                    &[("alice", Admin), ("bob", Admin), ("dave", Member)],
                    3,
                )),
                actor_user_id: "alice".into(),
                added_user_ids: vec!["dave".into()],
                removed_user_ids: vec!["carol".into()],
            }),
        ),
        valid(
            "register-push-token-apns",
            "C->S this device's APNs token (hex), production, the app's bundle id as topic",
            16,
            Body::RegisterPushToken(pb::RegisterPushToken {
                platform: pb::PushPlatform::Apns.into(),
                token: "3f0a".repeat(16),
                apns_environment: pb::ApnsEnvironment::Production.into(),
                apns_topic: "com.example.chat".into(),
                locale: "de-CH".into(),
            }),
        ),
        valid(
            "register-push-token-fcm",
            "C->S this device's FCM registration token; no APNs fields",
            17,
            Body::RegisterPushToken(pb::RegisterPushToken {
                platform: pb::PushPlatform::Fcm.into(),
                token: "fK3x:APA91bH-example_token".into(),
                apns_environment: 0,
                apns_topic: String::new(),
                locale: String::new(),
            }),
        ),
        valid(
            "push-token-registered",
            "S->C the registration is stored",
            16,
            Body::PushTokenRegistered(pb::PushTokenRegistered {
                registered_ms: T0 + 2_000,
            }),
        ),
        valid(
            "unregister-push-token",
            "C->S this device wants no more pushes (an empty body)",
            18,
            Body::UnregisterPushToken(pb::UnregisterPushToken {}),
        ),
        valid(
            "push-token-unregistered",
            "S->C the device had a token, now forgotten",
            18,
            Body::PushTokenUnregistered(pb::PushTokenUnregistered {
                was_registered: true,
            }),
        ),
        valid(
            "mute-conversation-until",
            "C->S mute the group for 8 hours",
            19,
            Body::MuteConversation(pb::MuteConversation {
                conversation_id: "grp:7Hq2x".into(),
                muted_until_ms: T0 + 8 * 3_600_000,
                forever: false,
            }),
        ),
        valid(
            "mute-conversation-forever",
            "C->S mute bob until unmuted",
            20,
            Body::MuteConversation(pb::MuteConversation {
                conversation_id: "dm:alice:bob".into(),
                muted_until_ms: 0,
                forever: true,
            }),
        ),
        valid(
            "unmute-conversation",
            "C->S unmute: no time, not forever",
            21,
            Body::MuteConversation(pb::MuteConversation {
                conversation_id: "dm:alice:bob".into(),
                muted_until_ms: 0,
                forever: false,
            }),
        ),
        valid(
            "conversation-muted",
            "S->C the group's mute state after the request",
            19,
            Body::ConversationMuted(pb::ConversationMuted {
                conversation_id: "grp:7Hq2x".into(),
                muted_until_ms: T0 + 8 * 3_600_000,
                forever: false,
            }),
        ),
        valid(
            "create-channel",
            "C->S a public announcement channel (SPEC §21)",
            22,
            Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Channel.into(),
                title: "news".into(),
                member_user_ids: vec!["bob".into()],
                channel: Some(pb::ChannelSettings {
                    public: true,
                    admins_only_post: true,
                }),
            }),
        ),
        valid(
            "channel-created",
            "S->C a channel carries its member count, not its members",
            22,
            Body::ConversationCreated(pb::ConversationCreated {
                conversation: Some(pb::Conversation {
                    conversation_id: "chn:4b9d1e".into(),
                    kind: pb::ConversationKind::Channel.into(),
                    title: "news".into(),
                    members: Vec::new(),
                    last_seq: 0,
                    member_count: 2,
                    channel: Some(pb::ChannelSettings {
                        public: true,
                        admins_only_post: true,
                    }),
                }),
            }),
        ),
        valid(
            "send-channel-mention",
            "C->S a channel message that mentions bob",
            23,
            Body::Send(pb::Send {
                conversation_id: "chn:4b9d1e".into(),
                client_msg_id: (16..32).collect(),
                kind: pb::ContentKind::Text.into(),
                body: b"release 2.0 @bob".to_vec(),
                reply_to_seq: 0,
                media: None,
                mention_user_ids: vec!["bob".into()],
            }),
        ),
        valid(
            "list-members",
            "C->S the next page of a channel's members, after bob",
            24,
            Body::ListMembers(pb::ListMembers {
                conversation_id: "chn:4b9d1e".into(),
                after_user_id: "bob".into(),
                limit: 100,
            }),
        ),
        valid(
            "member-page",
            "S->C a page of members, more to come",
            24,
            Body::MemberPage(pb::MemberPage {
                conversation_id: "chn:4b9d1e".into(),
                members: vec![pb::Member {
                    user_id: "carol".into(),
                    role: pb::Role::Member.into(),
                }],
                has_more: true,
                member_count: 40_000,
            }),
        ),
        valid(
            "open-channel-live",
            "C->S the channel is on screen",
            25,
            Body::OpenChannel(pb::OpenChannel {
                conversation_id: "chn:4b9d1e".into(),
                mode: pb::ChannelMode::Live.into(),
            }),
        ),
        valid(
            "channel-opened",
            "S->C where the channel and the reader are",
            25,
            Body::ChannelOpened(pb::ChannelOpened {
                conversation_id: "chn:4b9d1e".into(),
                mode: pb::ChannelMode::Live.into(),
                last_seq: 812,
                read_seq: 790,
            }),
        ),
        valid(
            "channel-activity",
            "S->C channels open in COUNTS mode that moved, batched",
            0,
            Body::ChannelActivity(pb::ChannelActivity {
                channels: vec![
                    pb::ChannelCount {
                        conversation_id: "chn:4b9d1e".into(),
                        last_seq: 813,
                    },
                    pb::ChannelCount {
                        conversation_id: "chn:a07c33".into(),
                        last_seq: 5,
                    },
                ],
            }),
        ),
    ]);
    cases
}

pub(super) fn tolerated_cases() -> Vec<Tolerated> {
    let ping = frame(2, Body::Ping(pb::Ping { nonce: 1 }));
    vec![
        Tolerated {
            name: "unknown-field-ignored",
            note: "Frame field 99 (varint 5) is unknown in v1: skipped",
            hex: "09080298060562020801",
            frame: ping.clone(),
        },
        Tolerated {
            name: "unknown-nested-field-ignored",
            note: "Ping field 2 (string \"x\") is unknown in v1: skipped",
            hex: "09080262050801120178",
            frame: ping.clone(),
        },
        Tolerated {
            name: "unknown-body-ignored",
            note: "a body field this version does not know (field 99, empty message): decodes with no body; clients ignore such frames",
            hex: "0508039a0600",
            frame: pb::Frame {
                request_id: 3,
                body: None,
            },
        },
        Tolerated {
            name: "fields-out-of-order",
            note: "body before request_id: field order is not significant",
            hex: "06620208010802",
            frame: ping.clone(),
        },
        Tolerated {
            name: "non-minimal-length-prefix",
            note: "length 0 written as two varint bytes: accepted (at most 5 bytes)",
            hex: "8000",
            frame: pb::Frame::default(),
        },
        Tolerated {
            name: "unknown-group-field-skipped",
            note: "Frame field 99 as an (empty) group, start and end tag: unknown, skipped",
            hex: "0a08029b069c0662020801",
            frame: ping.clone(),
        },
        Tolerated {
            name: "field-repeated-last-wins",
            note: "request_id written twice (1, then 2): the last value counts",
            hex: "080801080262020801",
            frame: ping.clone(),
        },
        Tolerated {
            name: "two-bodies-last-wins",
            note: "ping then pong in one frame (senders must not): the last body counts",
            hex: "0a0802620208016a020801",
            frame: frame(2, Body::Pong(pb::Pong { nonce: 1 })),
        },
    ]
}

pub(super) fn incomplete_cases() -> Vec<Incomplete> {
    vec![
        Incomplete {
            name: "prefix-only",
            note: "length 6 read, no body bytes yet",
            hex: "06",
        },
        Incomplete {
            name: "split-prefix",
            note: "first byte of a two-byte length prefix",
            hex: "80",
        },
        Incomplete {
            name: "partial-body",
            note: "length 6, three of six bytes",
            hex: "06080162",
        },
    ]
}

pub(super) fn invalid_cases() -> Vec<Invalid> {
    vec![
        Invalid {
            name: "prefix-longer-than-5-bytes",
            note: "the length varint continues past 5 bytes",
            hex: "808080808000",
            max_frame_len: MAX,
        },
        Invalid {
            name: "prefix-over-u32",
            note: "5-byte varint with a value above 2^32-1",
            hex: "ffffffff1f",
            max_frame_len: usize::MAX,
        },
        Invalid {
            name: "length-over-max",
            note: "65537 > 65536: rejected as soon as the prefix is read, before any body byte",
            hex: "818004",
            max_frame_len: MAX,
        },
        Invalid {
            name: "length-over-small-max",
            note: "a valid 6-byte Ping frame with max_frame_len 5",
            hex: "06080262020801",
            max_frame_len: 5,
        },
        Invalid {
            name: "truncated-field-varint",
            note: "request_id varint cut off by the frame end",
            hex: "020880",
            max_frame_len: MAX,
        },
        Invalid {
            name: "nested-length-overrun",
            note: "ping claims 5 bytes, 2 remain in the frame",
            hex: "0462050801",
            max_frame_len: MAX,
        },
        Invalid {
            name: "wrong-wire-type-scalar",
            note: "request_id (field 1) sent as length-delimited",
            hex: "030a0100",
            max_frame_len: MAX,
        },
        Invalid {
            name: "wrong-wire-type-message",
            note: "ping (field 12) sent as varint",
            hex: "026001",
            max_frame_len: MAX,
        },
        Invalid {
            name: "field-number-zero",
            note: "tag with field number 0",
            hex: "020000",
            max_frame_len: MAX,
        },
        Invalid {
            name: "invalid-utf8-string",
            note: "Send.conversation_id holding the byte 0xff",
            hex: "06a201030a01ff",
            max_frame_len: MAX,
        },
        Invalid {
            name: "end-group-without-start",
            note: "wire type 4 (end group) with no open group",
            hex: "010c",
            max_frame_len: MAX,
        },
        Invalid {
            name: "garbage",
            note: "five 0xff bytes as a frame",
            hex: "05ffffffffff",
            max_frame_len: MAX,
        },
        Invalid {
            name: "wire-type-7",
            note: "tag with wire type 7, which does not exist",
            hex: "010f",
            max_frame_len: MAX,
        },
        Invalid {
            name: "start-group-without-end",
            note: "unknown field 2 opened as a group (wire type 3) and never closed",
            hex: "0113",
            max_frame_len: MAX,
        },
        Invalid {
            name: "wrong-wire-type-nested",
            note: "Ping.nonce (field 1, uint64) sent as length-delimited",
            hex: "07080262030a0100",
            max_frame_len: MAX,
        },
        Invalid {
            name: "wrong-wire-type-string",
            note: "Send.conversation_id (field 1, string) sent as varint",
            hex: "05a201020805",
            max_frame_len: MAX,
        },
    ]
}

/// Invalid cases only a server must reject (SPEC §2): schema checks that
/// stock protobuf parsers do not all make (Python's keeps a field with the
/// wrong wire type as an unknown field). A client MAY accept these.
pub(super) const SERVER_MUST_REJECT: &[&str] = &[
    "wrong-wire-type-scalar",
    "wrong-wire-type-message",
    "wrong-wire-type-nested",
    "wrong-wire-type-string",
    "invalid-utf8-string",
];

pub(super) fn must_reject(name: &str) -> &'static str {
    if SERVER_MUST_REJECT.contains(&name) {
        "server"
    } else {
        "all"
    }
}
