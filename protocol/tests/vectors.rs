//! Language-neutral test vectors, `protocol/vectors/frames.json`: generated
//! here from the real encoder and checked here against the real decoder.
//!
//! Regenerate after a schema or case change:
//!   cargo test -p palaver-protocol --test vectors -- --ignored regenerate_vectors
//!
//! Frames are written in the canonical proto3 JSON mapping (lowerCamelCase
//! names, enums by name, 64-bit integers as strings, bytes as base64, default
//! values omitted), so other languages can parse them with their stock JSON
//! parser (e.g. Java `JsonFormat`, Swift `init(jsonString:)`).
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use palaver_protocol::pb::{self, frame::Body};
use palaver_protocol::{body_name, encode_frame, frame, DecodeError, FrameDecoder};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use serde_json::Value;

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/vectors/frames.json");
const SPEC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../SPEC.md");
const MAX: usize = 64 * 1024;
const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const CMID: [u8; 16] = [
    0x01, 0x93, 0x0f, 0x3a, 0x7b, 0x2c, 0x7d, 0x4e, 0x8f, 0x10, 0x21, 0x32, 0x43, 0x54, 0x65, 0x76,
];

// ---------------------------------------------------------------- cases ----

struct Valid {
    name: &'static str,
    note: &'static str,
    frame: pb::Frame,
}

fn valid(name: &'static str, note: &'static str, request_id: u32, body: Body) -> Valid {
    Valid {
        name,
        note,
        frame: frame(request_id, body),
    }
}

/// Bytes that decode to `frame` although re-encoding gives different bytes.
struct Tolerated {
    name: &'static str,
    note: &'static str,
    hex: &'static str,
    frame: pb::Frame,
}

/// A valid start of a stream: no frame yet, no error, wait for more bytes.
struct Incomplete {
    name: &'static str,
    note: &'static str,
    hex: &'static str,
}

struct Invalid {
    name: &'static str,
    note: &'static str,
    hex: &'static str,
    max_frame_len: usize,
}

fn hello() -> pb::Hello {
    pb::Hello {
        protocol_version: 1,
        token: "tok-alice".into(),
        device_id: "phone".into(),
        client_name: "palaver-ios".into(),
        client_version: "1.0.0".into(),
        resume: vec![],
    }
}

fn limits() -> pb::Limits {
    palaver_protocol::Limits::default().to_pb()
}

fn text_message(seq: u64, sender: &str, body: &str) -> pb::Message {
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

fn group(members: &[(&str, pb::Role)], last_seq: u64) -> pb::Conversation {
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
    }
}

/// The example session in SPEC.md, in order (alice on "phone", bob online).
fn session_cases() -> Vec<Valid> {
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

fn valid_cases() -> Vec<Valid> {
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
                }),
            }),
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
            "S->C one message, one conversation new to the client, more to come",
            11,
            Body::SyncBatch(pb::SyncBatch {
                messages: vec![text_message(42, "bob", "yo")],
                conversations: vec![group(&[("alice", Member), ("bob", Admin)], 3)],
                has_more: true,
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
            "S->C ascending by seq; older messages exist",
            12,
            Body::HistoryPage(pb::HistoryPage {
                conversation_id: "dm:alice:bob".into(),
                messages: vec![text_message(98, "alice", "a"), text_message(99, "bob", "b")],
                has_more: true,
            }),
        ),
        valid(
            "create-group",
            "C->S group with bob and carol besides the creator",
            13,
            Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Group.into(),
                title: "Climbing".into(),
                member_user_ids: vec!["bob".into(), "carol".into()],
            }),
        ),
        valid(
            "create-direct",
            "C->S direct with bob: answered with dm:alice:bob",
            14,
            Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Direct.into(),
                title: String::new(),
                member_user_ids: vec!["bob".into()],
            }),
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
    ]);
    cases
}

fn tolerated_cases() -> Vec<Tolerated> {
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

fn incomplete_cases() -> Vec<Incomplete> {
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

fn invalid_cases() -> Vec<Invalid> {
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
const SERVER_MUST_REJECT: &[&str] = &[
    "wrong-wire-type-scalar",
    "wrong-wire-type-message",
    "wrong-wire-type-nested",
    "wrong-wire-type-string",
    "invalid-utf8-string",
];

fn must_reject(name: &str) -> &'static str {
    if SERVER_MUST_REJECT.contains(&name) {
        "server"
    } else {
        "all"
    }
}

// ------------------------------------------------------------ rendering ----

fn frame_descriptor() -> MessageDescriptor {
    DescriptorPool::decode(palaver_protocol::FILE_DESCRIPTOR_SET)
        .expect("descriptor set")
        .get_message_by_name("palaver.v1.Frame")
        .expect("Frame in descriptor set")
}

/// Canonical proto3 JSON of a frame, fields in schema order.
fn frame_json(f: &pb::Frame, desc: &MessageDescriptor) -> String {
    let dynamic = DynamicMessage::decode(desc.clone(), f.encode_to_vec().as_slice()).unwrap();
    serde_json::to_string(&dynamic).unwrap()
}

fn frame_from_json(v: &Value, desc: &MessageDescriptor) -> pb::Frame {
    let dynamic = DynamicMessage::deserialize(desc.clone(), v.clone())
        .unwrap_or_else(|e| panic!("{v} is not proto3 JSON of a Frame: {e}"));
    pb::Frame::decode(dynamic.encode_to_vec().as_slice()).unwrap()
}

fn encode_hex(f: &pb::Frame) -> String {
    let mut out = Vec::new();
    encode_frame(f, &mut out);
    hex::encode(out)
}

fn decode_error(hex: &str, max: usize) -> DecodeError {
    let mut dec = FrameDecoder::new(max);
    dec.decode(&hex::decode(hex).unwrap(), |_| {})
        .expect_err("invalid case must fail")
}

fn error_name(code: u32) -> &'static str {
    pb::ErrorCode::try_from(code as i32)
        .expect("known code")
        .as_str_name()
}

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn object(fields: &[(&str, String)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("      {}: {v}", q(k)))
        .collect();
    format!("    {{\n{}\n    }}", body.join(",\n"))
}

fn array(items: Vec<String>) -> String {
    format!("[\n{}\n  ]", items.join(",\n"))
}

/// The whole vectors document. Written by hand (not via serde_json::Value)
/// so that keys stay in a readable order and each frame is on one line.
fn render() -> String {
    let desc = frame_descriptor();
    let valid = valid_cases()
        .iter()
        .map(|c| {
            object(&[
                ("name", q(c.name)),
                ("hex", q(&encode_hex(&c.frame))),
                ("frame", frame_json(&c.frame, &desc)),
                ("note", q(c.note)),
            ])
        })
        .collect();
    let tolerated = tolerated_cases()
        .iter()
        .map(|c| {
            object(&[
                ("name", q(c.name)),
                ("hex", q(c.hex)),
                ("frame", frame_json(&c.frame, &desc)),
                ("note", q(c.note)),
            ])
        })
        .collect();
    let incomplete = incomplete_cases()
        .iter()
        .map(|c| object(&[("name", q(c.name)), ("hex", q(c.hex)), ("note", q(c.note))]))
        .collect();
    let invalid = invalid_cases()
        .iter()
        .map(|c| {
            let code = u32::from(decode_error(c.hex, c.max_frame_len).error_code());
            object(&[
                ("name", q(c.name)),
                ("hex", q(c.hex)),
                (
                    "max_frame_len",
                    c.max_frame_len.min(u32::MAX as usize).to_string(),
                ),
                ("error_code", code.to_string()),
                ("error", q(error_name(code))),
                ("must_reject", q(must_reject(c.name))),
                ("note", q(c.note)),
            ])
        })
        .collect();
    format!(
        "{{\n  \"description\": {},\n  \"protocol_version\": 1,\n  \"default_max_frame_len\": {MAX},\n  \"valid\": {},\n  \"tolerated\": {},\n  \"incomplete\": {},\n  \"invalid\": {}\n}}\n",
        q("Palaver v1 frame test vectors (see SPEC.md). hex = one frame in length-delimited form (varint32 length, then the encoded palaver.v1.Frame). \
valid: decodes to `frame` (canonical proto3 JSON) and `frame` encodes back to exactly `hex` (fields in field-number order, defaults omitted). \
tolerated: decodes to `frame`, but its canonical encoding differs. \
incomplete: a valid stream prefix; a decoder must wait for more bytes, not fail. \
invalid: a decoder with max_frame_len (default_max_frame_len when absent) must reject the bytes; error_code is the Error.code to send before closing; \
must_reject: \"all\" = every receiver must reject them, \"server\" = a server must, a client may accept them (schema checks stock protobuf parsers do not all make, SPEC §2)."),
        array(valid),
        array(tolerated),
        array(incomplete),
        array(invalid),
    )
}

// ---------------------------------------------------------------- tests ----

fn load() -> Value {
    let text = std::fs::read_to_string(VECTORS).expect("vectors/frames.json");
    serde_json::from_str(&text).expect("vectors/frames.json is JSON")
}

fn cases<'a>(doc: &'a Value, section: &str) -> &'a Vec<Value> {
    doc[section].as_array().unwrap()
}

fn str_field<'a>(case: &'a Value, field: &str) -> &'a str {
    case[field].as_str().unwrap()
}

/// Decodes a whole buffer, both in one call and one byte at a time.
fn decode_both_ways(bytes: &[u8], max: usize) -> Result<Vec<pb::Frame>, DecodeError> {
    let mut whole = Vec::new();
    FrameDecoder::new(max).decode(bytes, |f| whole.push(f))?;
    let mut dec = FrameDecoder::new(max);
    let mut bytewise = Vec::new();
    for b in bytes {
        dec.decode(std::slice::from_ref(b), |f| bytewise.push(f))?;
    }
    assert_eq!(whole, bytewise);
    assert_eq!(dec.pending_bytes(), 0);
    Ok(whole)
}

#[test]
#[ignore = "writes vectors/frames.json; run explicitly to regenerate"]
fn regenerate_vectors() {
    std::fs::create_dir_all(std::path::Path::new(VECTORS).parent().unwrap()).unwrap();
    std::fs::write(VECTORS, render()).unwrap();
}

#[test]
fn vectors_file_is_current() {
    let on_disk = std::fs::read_to_string(VECTORS).unwrap_or_default();
    assert!(
        on_disk == render(),
        "vectors/frames.json is stale; regenerate with: \
         cargo test -p palaver-protocol --test vectors -- --ignored regenerate_vectors"
    );
}

#[test]
fn valid_vectors_decode_to_their_json_and_reencode_to_their_hex() {
    let desc = frame_descriptor();
    let doc = load();
    let mut bodies = BTreeSet::new();
    for case in cases(&doc, "valid") {
        let name = str_field(case, "name");
        let bytes = hex::decode(str_field(case, "hex")).unwrap();
        let frames = decode_both_ways(&bytes, MAX).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(frames.len(), 1, "{name}");
        let expected = frame_from_json(&case["frame"], &desc);
        assert_eq!(frames[0], expected, "{name}");
        assert_eq!(encode_hex(&expected), str_field(case, "hex"), "{name}");
        if let Some(body) = &frames[0].body {
            bodies.insert(body_name(body));
        }
    }
    // Every body in the schema has at least one vector.
    let all = desc.oneofs().find(|o| o.name() == "body").unwrap();
    assert_eq!(bodies.len(), all.fields().count(), "covered: {bodies:?}");
}

#[test]
fn tolerated_vectors_decode_but_are_not_canonical() {
    let desc = frame_descriptor();
    let doc = load();
    for case in cases(&doc, "tolerated") {
        let name = str_field(case, "name");
        let bytes = hex::decode(str_field(case, "hex")).unwrap();
        let frames = decode_both_ways(&bytes, MAX).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            frames,
            vec![frame_from_json(&case["frame"], &desc)],
            "{name}"
        );
        assert_ne!(encode_hex(&frames[0]), str_field(case, "hex"), "{name}");
    }
}

#[test]
fn incomplete_vectors_wait_for_more_bytes() {
    let doc = load();
    for case in cases(&doc, "incomplete") {
        let name = str_field(case, "name");
        let bytes = hex::decode(str_field(case, "hex")).unwrap();
        let mut dec = FrameDecoder::new(MAX);
        let mut n = 0;
        dec.decode(&bytes, |_| n += 1)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((n, dec.pending_bytes()), (0, bytes.len()), "{name}");
    }
}

#[test]
fn invalid_vectors_fail_with_their_error_code() {
    let doc = load();
    let invalid = cases(&doc, "invalid");
    assert!(invalid.len() >= 10);
    for case in invalid {
        let name = str_field(case, "name");
        let max = case["max_frame_len"].as_u64().unwrap() as usize;
        let bytes = hex::decode(str_field(case, "hex")).unwrap();
        let err = decode_both_ways(&bytes, max).expect_err(name);
        let code = case["error_code"].as_u64().unwrap() as u32;
        assert_eq!(u32::from(err.error_code()), code, "{name}: {err}");
        assert_eq!(error_name(code), str_field(case, "error"), "{name}");
        assert!(
            matches!(str_field(case, "must_reject"), "all" | "server"),
            "{name}"
        );
    }
}

/// The cases marked `"server"` are exactly those a lenient stock parser
/// accepts: decoded while skipping every field whose wire type does not match
/// the schema, and without checking UTF-8, they parse; every `"all"` case
/// still fails that way.
#[test]
fn server_only_vectors_are_the_ones_a_lenient_parser_accepts() {
    let doc = load();
    let names: BTreeSet<&str> = cases(&doc, "invalid")
        .iter()
        .map(|c| str_field(c, "name"))
        .collect();
    for name in SERVER_MUST_REJECT {
        assert!(names.contains(name), "no invalid vector {name}");
    }
    let desc = frame_descriptor();
    for case in cases(&doc, "invalid") {
        let name = str_field(case, "name");
        let max = case["max_frame_len"].as_u64().unwrap() as usize;
        let bytes = hex::decode(str_field(case, "hex")).unwrap();
        let lenient = lenient_parse(&bytes, max, &desc);
        match str_field(case, "must_reject") {
            "server" => assert!(lenient, "{name}: a lenient parser should accept it"),
            _ => assert!(!lenient, "{name}: even a lenient parser must reject it"),
        }
    }
}

/// A model of a lenient stock protobuf parser: framing as SPEC §2, then a
/// walk over the tags that keeps a schema field with an unexpected wire type
/// as an unknown field (Python's parser does: it accepts the four
/// `wrong-wire-type-*` vectors) and does not check UTF-8 (some parsers do
/// not). Returns whether it accepts `bytes` as one frame.
fn lenient_parse(bytes: &[u8], max: usize, desc: &MessageDescriptor) -> bool {
    let mut prefix = 0u64;
    let mut at = 0;
    loop {
        let Some(&b) = bytes.get(at) else {
            return false;
        };
        prefix |= u64::from(b & 0x7f) << (7 * at);
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at == 5 {
            return false;
        }
    }
    if prefix > u64::from(u32::MAX) || prefix as usize > max {
        return false;
    }
    let body = &bytes[at..];
    body.len() == prefix as usize && lenient_message(body, Some(desc))
}

fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Walks one message; `desc` is None for unknown (skipped) content.
fn lenient_message(bytes: &[u8], desc: Option<&MessageDescriptor>) -> bool {
    use prost_reflect::Kind;
    let mut at = 0;
    let mut groups = Vec::new();
    while at < bytes.len() {
        let Some(tag) = read_varint(bytes, &mut at) else {
            return false;
        };
        let (number, wire_type) = (tag >> 3, tag & 7);
        if number == 0 {
            return false;
        }
        match wire_type {
            0 => {
                if read_varint(bytes, &mut at).is_none() {
                    return false;
                }
            }
            1 | 5 => {
                at += if wire_type == 1 { 8 } else { 4 };
                if at > bytes.len() {
                    return false;
                }
            }
            2 => {
                let Some(len) = read_varint(bytes, &mut at) else {
                    return false;
                };
                let Some(end) = at.checked_add(len as usize).filter(|e| *e <= bytes.len()) else {
                    return false;
                };
                // A nested message the schema knows (only when the wire type
                // matches it, and not inside an unknown group) is walked too.
                let field = desc
                    .filter(|_| groups.is_empty())
                    .and_then(|d| d.get_field(number as u32));
                if let Some(Kind::Message(inner)) = field.map(|f| f.kind()) {
                    if !lenient_message(&bytes[at..end], Some(&inner)) {
                        return false;
                    }
                }
                at = end;
            }
            3 => groups.push(number),
            4 => {
                if groups.pop() != Some(number) {
                    return false;
                }
            }
            _ => return false,
        }
    }
    groups.is_empty()
}

/// SPEC.md's worked example must show exactly the bytes the encoder writes.
#[test]
fn spec_example_session_uses_the_vector_bytes() {
    let spec = std::fs::read_to_string(SPEC).expect("SPEC.md at the repository root");
    for case in session_cases() {
        let hex = encode_hex(&case.frame);
        assert!(
            spec.contains(&hex),
            "SPEC.md lacks the bytes of {}: {hex}",
            case.name
        );
    }
}

/// SPEC.md documents every message (a `###` heading naming it), every field
/// (a table row naming it) and every enum of the schema.
#[test]
fn spec_covers_every_message_field_and_enum() {
    let spec = std::fs::read_to_string(SPEC).expect("SPEC.md at the repository root");
    let pool = DescriptorPool::decode(palaver_protocol::FILE_DESCRIPTOR_SET).unwrap();
    let reference = spec
        .split_once("\n## 17. Message reference\n")
        .expect("SPEC.md section 17")
        .1;
    let reference = reference.split("\n## ").next().unwrap();
    let headings: Vec<&str> = reference
        .lines()
        .filter(|l| l.starts_with("### "))
        .collect();
    for message in pool.all_messages() {
        let name = message.name();
        let heading = headings
            .iter()
            .find(|h| {
                // "### Ping / Pong (both directions)" names Ping and Pong.
                let title = h[4..].split(" (").next().unwrap_or_default();
                title.split(" / ").any(|w| w.trim() == name)
            })
            .unwrap_or_else(|| panic!("SPEC.md has no heading for message {name}"));
        // The section under that heading lists every field.
        let section: String = reference
            .split_once(&format!("\n{heading}\n"))
            .unwrap()
            .1
            .lines()
            .take_while(|l| !l.starts_with("### "))
            .collect::<Vec<_>>()
            .join("\n");
        for field in message.fields() {
            if field.containing_oneof().is_some() {
                continue; // the Frame body fields are listed in prose
            }
            assert!(
                section.contains(&format!("| {} |", field.name())),
                "SPEC.md section for {name} lacks field {}",
                field.name()
            );
        }
    }
    let body_oneof = frame_descriptor().oneofs().next().expect("Frame.body");
    for body in body_oneof.fields() {
        assert!(
            spec.contains(&format!("{} {}", body.name(), body.number())),
            "SPEC.md lacks body field number {} {}",
            body.name(),
            body.number()
        );
    }
    for e in pool.all_enums() {
        assert!(spec.contains(e.name()), "SPEC.md lacks enum {}", e.name());
    }
}
