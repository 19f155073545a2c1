//! Shared test helpers: sessions, request builders, frame matchers.
#![allow(dead_code)]

use palaver_protocol::pb::{self, frame::Body};
use palaver_router::{Inbound, Session, SessionAddr};

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
