//! The router logic, driven directly (no threads) over the in-memory store
//! wrapped in a call counter. This file holds the harness and the helpers;
//! the tests are in `router_logic/`, one file per request family.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/instrumented.rs"]
mod instrumented;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use instrumented::Instrumented;
use palaver_protocol::pb::{self, frame::Body, ErrorCode};
use palaver_router_core::store::SessionChange;
use palaver_router_core::{
    direct_conversation_id, Clock, Inbound, ManualClock, Output, PresenceVisibility, Router,
    RouterConfig, Session, SessionAddr,
};

const T0: i64 = 1_700_000_000_000;
const DM: &str = "dm:alice:bob";

struct Harness {
    router: Router<Instrumented>,
    clock: Arc<ManualClock>,
}

impl Harness {
    fn new() -> Self {
        Self::with_config(RouterConfig::default())
    }

    fn with_config(config: RouterConfig) -> Self {
        let clock = Arc::new(ManualClock::new(T0));
        Self {
            router: Router::new(Instrumented::default(), config, clock.clone()),
            clock,
        }
    }

    fn run(&mut self, request: Inbound) -> Output {
        let mut out = Output::default();
        self.router
            .handle(&request, &mut out)
            .expect("memory store does not fail");
        out
    }

    fn req(&mut self, from: &Session, request_id: u32, body: Body) -> Output {
        self.run(request(from, request_id, body))
    }

    /// Session changes, as the embedded engine applies a batch of them.
    fn sessions(&mut self, changes: &[SessionChange]) -> Output {
        let mut out = Output::default();
        self.router
            .apply_session_changes(changes, Duration::from_secs(60), &mut out)
            .expect("memory store does not fail");
        out
    }

    fn opened(&mut self, s: &Session) -> Output {
        self.sessions(&[SessionChange::Opened(s.clone())])
    }

    fn open(&mut self, user: &str, device: &str, conn: u64) -> Session {
        let s = session(user, device, "g1", conn);
        self.opened(&s);
        s
    }

    fn close(&mut self, s: &Session, at_ms: i64) -> Output {
        self.sessions(&[SessionChange::Closed {
            session: s.clone(),
            at_ms,
        }])
    }

    fn send(&mut self, from: &Session, conversation_id: &str, n: u32) -> Output {
        self.req(
            from,
            n,
            send_body(conversation_id, n, &format!("message {n}")),
        )
    }

    fn create_group(&mut self, creator: &Session, members: &[&str]) -> String {
        let out = self.req(creator, 77, create_group_body("team", members));
        let frame = reply_to(&out, creator, 77);
        match &frame.body {
            Some(Body::ConversationCreated(c)) => {
                c.conversation.as_ref().unwrap().conversation_id.clone()
            }
            other => panic!("expected ConversationCreated, got {other:?}"),
        }
    }

    fn calls(&self) -> &Instrumented {
        self.router.store()
    }

    /// Registers an FCM token for `user`'s `device` in the store (what a
    /// RegisterPushToken from that device does): the device gets pushes
    /// while it is not online.
    fn register_token(&mut self, user: &str, device: &str) {
        use palaver_router_core::store::{PushPlatform, PushStore, PushToken};
        let token = PushToken {
            platform: PushPlatform::Fcm,
            token: format!("fcm-{user}-{device}"),
            apns_environment: None,
            apns_topic: String::new(),
            locale: String::new(),
            registered_ms: self.clock.now_ms(),
        };
        self.router
            .store_mut()
            .register_push_token(user, device, &token, 20)
            .unwrap();
    }
}

/// All frames addressed to `addr`, in order.
fn to<'a>(out: &'a Output, addr: &SessionAddr) -> Vec<&'a pb::Frame> {
    out.frames
        .iter()
        .filter(|f| f.to == *addr)
        .map(|f| &f.frame)
        .collect()
}

/// The single frame for the requester, which must echo `request_id`.
fn reply_to<'a>(out: &'a Output, s: &Session, request_id: u32) -> &'a pb::Frame {
    let frames = to(out, &s.addr);
    assert_eq!(
        frames.len(),
        1,
        "expected one frame to {s:?}, got {frames:?}"
    );
    assert_eq!(frames[0].request_id, request_id);
    frames[0]
}

/// The request failed with `code` and produced nothing else.
fn assert_error(out: &Output, s: &Session, request_id: u32, code: ErrorCode) -> pb::Error {
    assert_eq!(
        out.frames.len(),
        1,
        "expected only an error, got {:?}",
        out.frames
    );
    assert!(out.pushes.is_empty());
    let e = error(reply_to(out, s, request_id))
        .unwrap_or_else(|| panic!("expected Error {code:?}, got {:?}", out.frames))
        .clone();
    assert_eq!(e.code, code as u32, "{e:?}");
    assert!(!e.message.is_empty());
    e
}

fn seqs(messages: &[pb::Message]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

fn members_changed(frame: &pb::Frame) -> &pb::MembersChanged {
    match &frame.body {
        Some(Body::MembersChanged(m)) => m,
        other => panic!("expected MembersChanged, got {other:?}"),
    }
}

fn roles(c: &pb::MembersChanged) -> Vec<(String, pb::Role)> {
    c.conversation
        .as_ref()
        .unwrap()
        .members
        .iter()
        .map(|m| (m.user_id.clone(), m.role()))
        .collect()
}

fn receipt_update(frame: &pb::Frame) -> &pb::ReceiptUpdate {
    match &frame.body {
        Some(Body::ReceiptUpdate(r)) => r,
        other => panic!("expected ReceiptUpdate, got {other:?}"),
    }
}

fn sync(h: &mut Harness, s: &Session, cursors: &[(&str, u64)], limit: u32) -> pb::SyncBatch {
    let body = Body::Sync(pb::Sync {
        cursors: cursors
            .iter()
            .map(|(c, after)| pb::Cursor {
                conversation_id: c.to_string(),
                after_seq: *after,
            })
            .collect(),
        limit,
    });
    let out = h.req(s, 42, body);
    match &reply_to(&out, s, 42).body {
        Some(Body::SyncBatch(b)) => b.clone(),
        other => panic!("expected SyncBatch, got {other:?}"),
    }
}

fn history(
    h: &mut Harness,
    s: &Session,
    conversation_id: &str,
    before_seq: u64,
    limit: u32,
) -> pb::HistoryPage {
    let out = h.req(
        s,
        9,
        Body::History(pb::History {
            conversation_id: conversation_id.into(),
            before_seq,
            limit,
        }),
    );
    match &reply_to(&out, s, 9).body {
        Some(Body::HistoryPage(p)) => p.clone(),
        other => panic!("expected HistoryPage, got {other:?}"),
    }
}

fn presence_result(frame: &pb::Frame) -> Vec<(String, bool, i64)> {
    match &frame.body {
        Some(Body::PresenceResult(r)) => r
            .presences
            .iter()
            .map(|p| (p.user_id.clone(), p.online, p.last_seen_ms))
            .collect(),
        other => panic!("expected PresenceResult, got {other:?}"),
    }
}

fn presence_event(frame: &pb::Frame) -> (String, bool, i64) {
    match &frame.body {
        Some(Body::PresenceEvent(pb::PresenceEvent { presence: Some(p) })) => {
            (p.user_id.clone(), p.online, p.last_seen_ms)
        }
        other => panic!("expected PresenceEvent, got {other:?}"),
    }
}

fn presence_query(ids: &[&str]) -> Body {
    Body::PresenceQuery(pb::PresenceQuery {
        user_ids: ids.iter().map(|s| s.to_string()).collect(),
    })
}

fn presence_subscribe(ids: &[&str], unsubscribe: bool) -> Body {
    Body::PresenceSubscribe(pb::PresenceSubscribe {
        user_ids: ids.iter().map(|s| s.to_string()).collect(),
        unsubscribe,
    })
}

/// Creates a group as `creator` under `request_id` (group ids derive from the
/// request's identity, so each group needs its own request id).
fn new_group(h: &mut Harness, creator: &Session, request_id: u32, members: &[&str]) -> String {
    let out = h.req(creator, request_id, create_group_body("g", members));
    match &reply_to(&out, creator, request_id).body {
        Some(Body::ConversationCreated(c)) => {
            c.conversation.as_ref().unwrap().conversation_id.clone()
        }
        other => panic!("expected ConversationCreated, got {other:?}"),
    }
}

fn change(conversation_id: &str, add: &[&str], remove: &[&str], promote: &[&str]) -> Body {
    let ids = |l: &[&str]| l.iter().map(|u| u.to_string()).collect();
    Body::ChangeMembers(pb::ChangeMembers {
        conversation_id: conversation_id.into(),
        add_user_ids: ids(add),
        remove_user_ids: ids(remove),
        promote_user_ids: ids(promote),
    })
}

/// Frames with the router-chosen message ids blanked (two routers never
/// choose the same ones).
fn comparable(out: &Output) -> Vec<(SessionAddr, pb::Frame)> {
    out.frames
        .iter()
        .map(|f| {
            let mut frame = f.frame.clone();
            match &mut frame.body {
                Some(Body::SendAck(a)) => a.message_id.clear(),
                Some(Body::Deliver(d)) => {
                    if let Some(m) = d.message.as_mut() {
                        m.message_id.clear()
                    }
                }
                _ => {}
            }
            (f.to.clone(), frame)
        })
        .collect()
}

fn direct_create(peer: &str) -> Body {
    Body::CreateConversation(pb::CreateConversation {
        kind: pb::ConversationKind::Direct as i32,
        member_user_ids: vec![peer.into()],
        ..Default::default()
    })
}

/// Gives `user` `n` direct conversations (each created by another user) and
/// `groups` groups of their own with one other member.
fn busy_user(h: &mut Harness, user: &str, n: u32, groups: u32) {
    for i in 0..n {
        let peer = session(
            &format!("{user}-peer{i}"),
            "d",
            "g1",
            100_000 + u64::from(i),
        );
        let out = h.req(&peer, 1, direct_create(user));
        assert!(error(reply_to(&out, &peer, 1)).is_none());
    }
    let owner = session(user, "setup", "g1", 99_999);
    for i in 0..groups {
        new_group(h, &owner, 1000 + i, &[&format!("{user}-peer{i}")]);
    }
}

#[path = "router_logic/channels.rs"]
mod channels;
#[path = "router_logic/conversations.rs"]
mod conversations;
#[path = "router_logic/messages.rs"]
mod messages;
#[path = "router_logic/presence.rs"]
mod presence;
#[path = "router_logic/push.rs"]
mod push;
#[path = "router_logic/receipts_typing.rs"]
mod receipts_typing;
#[path = "router_logic/spec.rs"]
mod spec;
#[path = "router_logic/sync_history.rs"]
mod sync_history;
