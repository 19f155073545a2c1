//! Palaver wire protocol (sans-io): the protobuf schema, the length-delimited
//! frame codec, protocol limits and the connection state machines for both
//! ends. No sockets, no threads, no clock reads: callers pass bytes and times in.
//!
//! Also owns the small rules every component needs: error-code classes,
//! frame constructors, conversation id and user/device id syntax.

#![forbid(unsafe_code)]

pub mod bodies;
pub mod codec;
pub mod limits;
pub mod push;
pub mod state;

pub use bodies::{BodyInfo, BodyKind, Direction, Route};
pub use codec::{encode_frame, encoded_frame_len, DecodeError, FrameDecoder};
pub use limits::Limits;
pub use state::{ClientConn, ServerConn, StateError, Timeout, Verdict};

/// Generated protobuf types for `palaver.v1`.
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/palaver.v1.rs"));

    impl From<ErrorCode> for u32 {
        fn from(code: ErrorCode) -> u32 {
            // Every ErrorCode value is a non-negative number below 10000.
            code as i32 as u32
        }
    }
}

/// The schema as an encoded `google.protobuf.FileDescriptorSet`, for
/// reflection (e.g. rendering frames as proto3 JSON).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/palaver.fds"));

/// Protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u32 = 1;
/// Protocol versions this crate can serve (named in UNSUPPORTED_VERSION errors).
pub const SUPPORTED_VERSIONS: &[u32] = &[PROTOCOL_VERSION];
/// TLS ALPN identifier for protocol version 1.
pub const ALPN: &[u8] = b"palaver/1";
/// Length of `Send.client_msg_id` / `Message.client_msg_id`.
pub const CLIENT_MSG_ID_LEN: usize = 16;

/// 1xxx: the sender closes the connection right after the Error frame.
pub fn closes_connection(code: u32) -> bool {
    (1000..2000).contains(&code)
}

/// 2xxx: the request failed for a reason retrying will not fix.
pub fn is_request_error(code: u32) -> bool {
    (2000..3000).contains(&code)
}

/// 3xxx: transient server-side failure; retry the same request later.
pub fn is_retryable(code: u32) -> bool {
    (3000..4000).contains(&code)
}

/// A frame with the given request id and body.
pub fn frame(request_id: u32, body: pb::frame::Body) -> pb::Frame {
    pb::Frame {
        request_id,
        body: Some(body),
    }
}

/// The `Error` frame answering `request_id` (0 when not answering a
/// request). Every Error frame the servers send is built here or by
/// [`error_reply_to`] / [`send_error_reply`].
pub fn error_reply(request_id: u32, code: impl Into<u32>, message: impl Into<String>) -> pb::Frame {
    send_error_reply(request_id, Vec::new(), code, message)
}

/// The `Error` frame refusing a Send: it echoes the Send's `client_msg_id`
/// so the client knows which message failed (SPEC §8).
pub fn send_error_reply(
    request_id: u32,
    client_msg_id: Vec<u8>,
    code: impl Into<u32>,
    message: impl Into<String>,
) -> pb::Frame {
    frame(
        request_id,
        pb::frame::Body::Error(pb::Error {
            code: code.into(),
            message: message.into(),
            client_msg_id,
        }),
    )
}

/// The `Error` frame answering the request `request` sent as `request_id`:
/// [`send_error_reply`] for a Send, else [`error_reply`].
pub fn error_reply_to(
    request_id: u32,
    request: &pb::frame::Body,
    code: impl Into<u32>,
    message: impl Into<String>,
) -> pb::Frame {
    send_error_reply(request_id, sent_client_msg_id(request), code, message)
}

/// The `client_msg_id` of a Send (empty for any other body): what an Error
/// answering the request must echo.
pub fn sent_client_msg_id(request: &pb::frame::Body) -> Vec<u8> {
    match request {
        pb::frame::Body::Send(send) => send.client_msg_id.clone(),
        _ => Vec::new(),
    }
}

/// The Error a server sends when `Hello.protocol_version` is not supported:
/// the message names the supported versions.
pub fn unsupported_version_frame(request_id: u32, requested: u32) -> pb::Frame {
    let supported: Vec<String> = SUPPORTED_VERSIONS.iter().map(u32::to_string).collect();
    error_reply(
        request_id,
        pb::ErrorCode::UnsupportedVersion,
        format!(
            "protocol version {requested} is not supported; supported: {}",
            supported.join(",")
        ),
    )
}

/// The schema name of a frame body (its `Frame` oneof field name), for
/// errors, logs and metrics.
pub fn body_name(body: &pb::frame::Body) -> &'static str {
    BodyKind::of(body).name()
}

/// Prefix of direct (1:1) conversation ids.
pub const DIRECT_PREFIX: &str = "dm:";
/// Prefix of group conversation ids (the rest is opaque, assigned by the server).
pub const GROUP_PREFIX: &str = "grp:";
/// Prefix of channel ids (`chn:<opaque>`, assigned at creation, SPEC §21).
pub const CHANNEL_PREFIX: &str = "chn:";
/// Longest user id, device id, or opaque part of a group id.
pub const MAX_ID_LEN: usize = 64;

/// User and device ids: 1..=64 bytes of `[A-Za-z0-9_.@-]`.
pub fn is_valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

/// The direct conversation between two users: `dm:<a>:<b>` with `a < b`
/// bytewise. Callers validate both ids first; a conversation with oneself does
/// not exist (`parse_direct` rejects `a == b`).
pub fn direct_conversation_id(a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut id = String::with_capacity(DIRECT_PREFIX.len() + lo.len() + 1 + hi.len());
    id.push_str(DIRECT_PREFIX);
    id.push_str(lo);
    id.push(':');
    id.push_str(hi);
    id
}

/// The two members of a direct conversation id, if it is a well-formed one
/// (both valid user ids, strictly ordered).
pub fn parse_direct(id: &str) -> Option<(&str, &str)> {
    let (a, b) = id.strip_prefix(DIRECT_PREFIX)?.split_once(':')?;
    (is_valid_id(a) && is_valid_id(b) && a < b).then_some((a, b))
}

/// True for `grp:<opaque>` where the opaque part obeys the id syntax.
pub fn is_group_id(id: &str) -> bool {
    id.strip_prefix(GROUP_PREFIX).is_some_and(is_valid_id)
}

/// True for `chn:<opaque>` where the opaque part obeys the id syntax.
pub fn is_channel_id(id: &str) -> bool {
    id.strip_prefix(CHANNEL_PREFIX).is_some_and(is_valid_id)
}

/// True for any well-formed conversation id (direct, group or channel).
pub fn is_valid_conversation_id(id: &str) -> bool {
    parse_direct(id).is_some() || is_group_id(id) || is_channel_id(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes() {
        assert!(closes_connection(1000) && closes_connection(1009));
        assert!(!closes_connection(2001) && !closes_connection(3000) && !closes_connection(0));
        assert!(is_request_error(2005) && !is_request_error(1005));
        assert!(is_retryable(3000) && is_retryable(3001) && !is_retryable(2000));
    }

    #[test]
    fn error_reply_carries_code_and_message() {
        let f = error_reply(7, pb::ErrorCode::RateLimited, "slow down");
        assert_eq!(f.request_id, 7);
        match f.body {
            Some(pb::frame::Body::Error(e)) => {
                assert_eq!(e.code, 2001);
                assert_eq!(e.message, "slow down");
                assert!(e.client_msg_id.is_empty());
            }
            other => panic!("{other:?}"),
        }
        let send = pb::frame::Body::Send(pb::Send {
            client_msg_id: vec![7; CLIENT_MSG_ID_LEN],
            ..Default::default()
        });
        for (body, id) in [
            (&send, vec![7; CLIENT_MSG_ID_LEN]),
            (&pb::frame::Body::Sync(Default::default()), vec![]),
        ] {
            match error_reply_to(4, body, pb::ErrorCode::Unavailable, "later").body {
                Some(pb::frame::Body::Error(e)) => {
                    assert_eq!((e.code, e.client_msg_id), (3000, id));
                }
                other => panic!("{other:?}"),
            }
        }
        let f = unsupported_version_frame(1, 9);
        match f.body {
            Some(pb::frame::Body::Error(e)) => {
                assert_eq!(e.code, 1002);
                assert!(e.message.ends_with("supported: 1"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ids() {
        assert!(is_valid_id("alice"));
        assert!(is_valid_id("a.b-c_d@example.com"));
        assert!(is_valid_id(&"x".repeat(64)));
        assert!(!is_valid_id(&"x".repeat(65)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a:b"));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("é"));
    }

    #[test]
    fn direct_ids() {
        assert_eq!(direct_conversation_id("bob", "alice"), "dm:alice:bob");
        assert_eq!(direct_conversation_id("alice", "bob"), "dm:alice:bob");
        // Bytewise: uppercase sorts before lowercase.
        assert_eq!(direct_conversation_id("b", "Z"), "dm:Z:b");
        assert_eq!(parse_direct("dm:alice:bob"), Some(("alice", "bob")));
        assert_eq!(parse_direct("dm:bob:alice"), None);
        assert_eq!(parse_direct("dm:alice:alice"), None);
        assert_eq!(parse_direct("dm:alice"), None);
        assert_eq!(parse_direct("dm:alice:bob:carol"), None);
        assert_eq!(parse_direct("grp:x"), None);
        assert!(is_group_id("grp:01HZX"));
        assert!(!is_group_id("grp:"));
        assert!(is_valid_conversation_id("dm:a:b"));
        assert!(is_valid_conversation_id("grp:g1"));
        assert!(!is_valid_conversation_id("chan:1"));
    }
}
