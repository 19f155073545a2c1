//! Shared test helpers: sessions, request builders, frame matchers.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

use palaver_protocol::pb::{self, frame::Body};
use palaver_router_core::{Clock, Inbound, Session, SessionAddr, SystemClock};

pub fn addr(gateway: &str, conn: u64) -> SessionAddr {
    SessionAddr {
        gateway_id: gateway.into(),
        conn,
    }
}

pub fn session(user: &str, device: &str, gateway: &str, conn: u64) -> Session {
    Session {
        user_id: user.into(),
        device_id: device.into(),
        addr: addr(gateway, conn),
    }
}

pub fn request(from: &Session, request_id: u32, body: Body) -> Inbound {
    Inbound {
        from: from.clone(),
        request_id,
        body,
        received_ms: 0,
    }
}

pub fn cmid(n: u32) -> Vec<u8> {
    let mut id = vec![0xAB; 16];
    id[..4].copy_from_slice(&n.to_be_bytes());
    id
}

pub fn send_body(conversation_id: &str, n: u32, body: &str) -> Body {
    Body::Send(pb::Send {
        conversation_id: conversation_id.into(),
        client_msg_id: cmid(n),
        kind: pb::ContentKind::Text as i32,
        body: body.as_bytes().to_vec(),
        ..Default::default()
    })
}

pub fn create_group_body(title: &str, members: &[&str]) -> Body {
    Body::CreateConversation(pb::CreateConversation {
        kind: pb::ConversationKind::Group as i32,
        title: title.into(),
        member_user_ids: members.iter().map(|m| m.to_string()).collect(),
        channel: None,
    })
}

/// A CreateConversation of a channel (SPEC §21).
pub fn create_channel_body(
    title: &str,
    members: &[&str],
    public: bool,
    admins_only_post: bool,
) -> Body {
    Body::CreateConversation(pb::CreateConversation {
        kind: pb::ConversationKind::Channel as i32,
        title: title.into(),
        member_user_ids: members.iter().map(|m| m.to_string()).collect(),
        channel: Some(pb::ChannelSettings {
            public,
            admins_only_post,
        }),
    })
}

pub fn ack(frame: &pb::Frame) -> Option<&pb::SendAck> {
    match &frame.body {
        Some(Body::SendAck(a)) => Some(a),
        _ => None,
    }
}

pub fn delivered(frame: &pb::Frame) -> Option<&pb::Message> {
    match &frame.body {
        Some(Body::Deliver(d)) => d.message.as_ref(),
        _ => None,
    }
}

pub fn error(frame: &pb::Frame) -> Option<&pb::Error> {
    match &frame.body {
        Some(Body::Error(e)) => Some(e),
        _ => None,
    }
}

/// A clock that panics the next two times it is read after `arm`: a
/// stand-in for a bug that makes one request's handling panic every time it
/// is handled (a Send reads the clock before it touches the store). A driver
/// runs a batch as one unit first (one clock read for a run of Sends); when
/// that panics it runs the requests one at a time, and the one that panics
/// again is the one given up on.
#[derive(Default)]
pub struct TrapClock {
    armed: AtomicU32,
}

impl TrapClock {
    pub fn arm(&self) {
        self.armed.store(2, Ordering::SeqCst);
    }
}

impl Clock for TrapClock {
    fn now_ms(&self) -> i64 {
        if self
            .armed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("trap: this request's handling panics");
        }
        SystemClock.now_ms()
    }
}
