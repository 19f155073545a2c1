//! The router logic, driven directly (no threads) over the in-memory store
//! wrapped in a call counter.
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
use palaver_router::store::SessionChange;
use palaver_router::{
    direct_conversation_id, Inbound, ManualClock, Output, PresenceVisibility, Router, RouterConfig,
    Session, SessionAddr,
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

// ---- Send / deliver ------------------------------------------------------

#[test]
fn direct_send_acks_sender_and_delivers_to_other_devices() {
    let mut h = Harness::new();
    let alice_phone = h.open("alice", "phone", 1);
    let alice_laptop = h.open("alice", "laptop", 2);
    let bob = h.open("bob", "phone", 3);

    let out = h.send(&alice_phone, DM, 5);
    let a = ack(reply_to(&out, &alice_phone, 5)).expect("SendAck");
    assert_eq!(a.seq, 1);
    assert_eq!(a.client_msg_id, cmid(5));
    assert_eq!(a.conversation_id, DM);
    assert_eq!(a.server_time_ms, T0);
    assert!(!a.message_id.is_empty());

    for s in [&alice_laptop, &bob] {
        let frames = to(&out, &s.addr);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].request_id, 0);
        let m = delivered(frames[0]).expect("Deliver");
        assert_eq!(m.seq, 1);
        assert_eq!(m.message_id, a.message_id);
        assert_eq!(m.sender_user_id, "alice");
        assert_eq!(m.sender_device_id, "phone");
        assert_eq!(m.body, b"message 5");
        assert_eq!(m.client_msg_id, cmid(5));
        assert_eq!(m.server_time_ms, T0);
    }
    assert_eq!(out.frames.len(), 3);
    assert!(out.pushes.is_empty());

    // Bob answers: alice's two devices get it.
    let out = h.send(&bob, DM, 6);
    assert_eq!(ack(reply_to(&out, &bob, 6)).unwrap().seq, 2);
    assert_eq!(to(&out, &alice_phone.addr).len(), 1);
    assert_eq!(to(&out, &alice_laptop.addr).len(), 1);
}

/// The recipients' Delivers leave before the sender's SendAck (the
/// delivery is the latency that counts), in one Send and in a batch of
/// them; each connection's own order is unchanged.
#[test]
fn delivers_are_written_before_the_senders_ack() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    h.open("bob", "phone", 2);
    h.open("bob", "laptop", 3);

    let out = h.send(&alice, DM, 1);
    let order: Vec<(u64, bool)> = out
        .frames
        .iter()
        .map(|f| (f.to.conn, ack(&f.frame).is_some()))
        .collect();
    // Bob's devices in the store's order, then alice's ack.
    assert_eq!(order.len(), 3, "{order:?}");
    assert_eq!(order[2], (1, true), "{order:?}");
    let mut delivered_to: Vec<u64> = order[..2]
        .iter()
        .map(|&(conn, is_ack)| {
            assert!(!is_ack);
            conn
        })
        .collect();
    delivered_to.sort_unstable();
    assert_eq!(delivered_to, [2, 3]);

    let reqs: Vec<Inbound> = (2..4)
        .map(|n| request(&alice, n, send_body(DM, n, "batched")))
        .collect();
    let mut out = Output::default();
    let mut progress = palaver_router::logic::BatchProgress::default();
    h.router
        .handle_batch(&reqs, &mut out, &mut progress)
        .expect("memory store does not fail");
    let seqs: Vec<(u64, u64)> = out
        .frames
        .iter()
        .map(|f| match &f.frame.body {
            Some(Body::SendAck(a)) => (f.to.conn, a.seq),
            _ => (f.to.conn, delivered(&f.frame).expect("Deliver").seq),
        })
        .collect();
    // Per Send, in input order: its two Delivers, then its ack.
    let sends: Vec<u64> = seqs.iter().map(|&(_, seq)| seq).collect();
    assert_eq!(sends, [2, 2, 2, 3, 3, 3]);
    let acks: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].0 == 1).collect();
    assert_eq!(acks, [2, 5], "{seqs:?}");
}

#[test]
fn direct_conversation_lists_for_both_users_after_first_message() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    h.send(&alice, DM, 1);
    for s in [&alice, &bob] {
        let out = h.req(s, 3, Body::Sync(pb::Sync::default()));
        let Some(Body::SyncBatch(batch)) = &reply_to(&out, s, 3).body else {
            panic!("expected SyncBatch");
        };
        assert_eq!(batch.conversations.len(), 1);
        let c = &batch.conversations[0];
        assert_eq!(c.conversation_id, DM);
        assert_eq!(c.kind, pb::ConversationKind::Direct as i32);
        assert_eq!(c.last_seq, 1);
        let members: Vec<&str> = c.members.iter().map(|m| m.user_id.as_str()).collect();
        assert_eq!(members, ["alice", "bob"]);
        assert_eq!(seqs(&batch.messages), [1]);
    }
}

/// A repeat gets the original ack, stores nothing, and delivers the
/// original again (at-least-once: its first attempt may have stopped
/// before delivering); the repeat's own content is discarded.
#[test]
fn duplicate_send_gets_original_ack_is_not_stored_and_redelivers_the_original() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let first = h.send(&alice, DM, 9);
    let original = ack(reply_to(&first, &alice, 9)).unwrap().clone();
    let delivered_first = delivered(to(&first, &bob.addr)[0]).unwrap().clone();

    h.clock.advance(60_000);
    let again = h.req(&alice, 10, send_body(DM, 9, "different body, same id"));
    assert_eq!(ack(reply_to(&again, &alice, 10)).unwrap(), &original);
    let redelivered = to(&again, &bob.addr);
    assert_eq!(redelivered.len(), 1, "the original, once more");
    assert_eq!(delivered(redelivered[0]).unwrap(), &delivered_first);

    // The next new message is seq 2: the duplicate used no seq.
    let next = h.send(&alice, DM, 11);
    assert_eq!(ack(reply_to(&next, &alice, 11)).unwrap().seq, 2);
    let out = h.req(
        &bob,
        1,
        Body::History(pb::History {
            conversation_id: DM.into(),
            ..Default::default()
        }),
    );
    let Some(Body::HistoryPage(page)) = &reply_to(&out, &bob, 1).body else {
        panic!("expected HistoryPage");
    };
    assert_eq!(seqs(&page.messages), [1, 2]);
    assert_eq!(page.messages[0].body, b"message 9");

    // After 24 h the id is forgotten: a new message.
    h.clock.advance(24 * 60 * 60 * 1000);
    let late = h.send(&alice, DM, 9);
    assert_eq!(ack(reply_to(&late, &alice, 9)).unwrap().seq, 3);
}

#[test]
fn seqs_are_gapless_and_delivered_in_order_under_many_sends() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let carol = h.open("carol", "phone", 3);
    let group = h.create_group(&alice, &["bob", "carol"]);
    let mut carol_seen = Vec::new();
    let mut message_ids = std::collections::HashSet::new();
    for n in 1..=2000u32 {
        let from = if n % 2 == 0 { &alice } else { &bob };
        let out = h.send(from, &group, n);
        let a = ack(reply_to(&out, from, n)).unwrap();
        assert_eq!(a.seq, n as u64);
        assert!(
            message_ids.insert(a.message_id.clone()),
            "message id reused"
        );
        carol_seen.extend(
            to(&out, &carol.addr)
                .iter()
                .map(|f| delivered(f).unwrap().seq),
        );
    }
    assert_eq!(carol_seen, (1..=2000).collect::<Vec<u64>>());
}

#[test]
fn group_fan_out_to_1000_members_delivers_each_exactly_once_in_one_lookup() {
    let mut h = Harness::new();
    let creator = h.open("u0000", "phone", 0);
    let creator_tablet = h.open("u0000", "tablet", 10_000);
    let others: Vec<String> = (1..1000).map(|i| format!("u{i:04}")).collect();
    let mut sessions = Vec::new();
    for (i, user) in others.iter().enumerate() {
        // Every tenth member is offline.
        if i % 10 != 0 {
            sessions.push(h.open(user, "phone", i as u64 + 1));
        }
    }
    let refs: Vec<&str> = others.iter().map(String::as_str).collect();
    let group = h.create_group(&creator, &refs);

    let lookups_before = h.calls().count("sessions_of_users");
    let calls_before = h.calls().total();
    let out = h.send(&creator, &group, 1);
    assert_eq!(h.calls().count("sessions_of_users"), lookups_before + 1);
    // Constant store calls per send, whatever the group size.
    assert!(
        h.calls().total() - calls_before <= 6,
        "{:?}",
        h.calls().calls
    );

    let mut per_conn: HashMap<u64, usize> = HashMap::new();
    for f in &out.frames {
        if let Some(m) = delivered(&f.frame) {
            assert_eq!(m.seq, 1);
            *per_conn.entry(f.to.conn).or_default() += 1;
        }
    }
    assert_eq!(per_conn.len(), sessions.len() + 1);
    assert!(per_conn.values().all(|n| *n == 1));
    for s in &sessions {
        assert_eq!(per_conn.get(&s.addr.conn), Some(&1), "{s:?}");
    }
    assert_eq!(per_conn.get(&creator_tablet.addr.conn), Some(&1));
    assert!(!per_conn.contains_key(&creator.addr.conn));
    // The 100 offline members get one push each.
    assert_eq!(out.pushes.len(), 100);
    assert!(out
        .pushes
        .iter()
        .all(|p| p.conversation_id == group && p.seq == 1));
}

#[test]
fn pushes_are_coalesced_until_connect_or_receipt() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let out = h.send(&alice, DM, 1);
    assert_eq!(out.pushes.len(), 1);
    assert_eq!(out.pushes[0].user_id, "bob");
    assert_eq!(out.pushes[0].sender_user_id, "alice");
    assert!(
        h.send(&alice, DM, 2).pushes.is_empty(),
        "second push not coalesced"
    );

    // Bob connects and leaves again: the next message pushes again.
    let bob = h.open("bob", "phone", 2);
    h.close(&bob, T0 + 5);
    assert_eq!(h.send(&alice, DM, 3).pushes.len(), 1);
    assert!(h.send(&alice, DM, 4).pushes.is_empty());

    // A receipt (from another device session that then closes) clears it too.
    let bob = h.open("bob", "tablet", 3);
    h.close(&bob, T0 + 6);
    h.send(&alice, DM, 5);
    h.req(
        &bob,
        1,
        Body::Receipt(pb::Receipt {
            conversation_id: DM.into(),
            kind: pb::ReceiptKind::Delivered as i32,
            up_to_seq: 5,
        }),
    );
    assert_eq!(h.send(&alice, DM, 6).pushes.len(), 1);
    // The sender never gets a push for her own message.
    let out = h.send(&alice, DM, 7);
    assert!(out.pushes.iter().all(|p| p.user_id != "alice"));
}

// ---- Authorization -------------------------------------------------------

#[test]
fn membership_is_enforced() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let mallory = h.open("mallory", "phone", 2);
    let group = h.create_group(&alice, &["bob"]);

    let e = assert_error(
        &h.send(&mallory, &group, 1),
        &mallory,
        1,
        ErrorCode::Forbidden,
    );
    assert_eq!(e.client_msg_id, cmid(1));
    assert_error(&h.send(&mallory, DM, 2), &mallory, 2, ErrorCode::Forbidden);
    let e = assert_error(
        &h.send(&mallory, "grp:nope", 3),
        &mallory,
        3,
        ErrorCode::NotFound,
    );
    assert_eq!(e.client_msg_id, cmid(3));

    let typing = Body::Typing(pb::Typing {
        conversation_id: group.clone(),
        active: true,
        user_id: String::new(),
    });
    assert_error(
        &h.req(&mallory, 4, typing),
        &mallory,
        4,
        ErrorCode::Forbidden,
    );
    let history = Body::History(pb::History {
        conversation_id: group.clone(),
        ..Default::default()
    });
    assert_error(
        &h.req(&mallory, 5, history),
        &mallory,
        5,
        ErrorCode::Forbidden,
    );
    let receipt = Body::Receipt(pb::Receipt {
        conversation_id: DM.into(),
        kind: pb::ReceiptKind::Read as i32,
        up_to_seq: 1,
    });
    assert_error(
        &h.req(&mallory, 6, receipt),
        &mallory,
        6,
        ErrorCode::Forbidden,
    );
    let change = Body::ChangeMembers(pb::ChangeMembers {
        conversation_id: group.clone(),
        add_user_ids: vec!["mallory".into()],
        ..Default::default()
    });
    assert_error(
        &h.req(&mallory, 7, change),
        &mallory,
        7,
        ErrorCode::Forbidden,
    );
    // Mallory's Sync never shows the group.
    let out = h.req(&mallory, 8, Body::Sync(pb::Sync::default()));
    let Some(Body::SyncBatch(batch)) = &reply_to(&out, &mallory, 8).body else {
        panic!("expected SyncBatch");
    };
    assert!(batch.conversations.is_empty() && batch.messages.is_empty());
}

// ---- Groups --------------------------------------------------------------

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

#[test]
fn group_creation_roles_and_notification() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let alice_tablet = h.open("alice", "tablet", 4);
    let bob = h.open("bob", "phone", 2);
    let out = h.req(
        &alice,
        5,
        create_group_body("Friends", &["carol", "bob", "alice", "bob"]),
    );
    let Some(Body::ConversationCreated(created)) = &reply_to(&out, &alice, 5).body else {
        panic!("expected ConversationCreated");
    };
    let c = created.conversation.as_ref().unwrap();
    assert!(c.conversation_id.starts_with("grp:"));
    assert_eq!(c.kind, pb::ConversationKind::Group as i32);
    assert_eq!(c.title, "Friends");
    let got: Vec<(&str, pb::Role)> = c
        .members
        .iter()
        .map(|m| (m.user_id.as_str(), m.role()))
        .collect();
    assert_eq!(
        got,
        [
            ("alice", pb::Role::Admin),
            ("bob", pb::Role::Member),
            ("carol", pb::Role::Member)
        ]
    );
    // Other online member devices learn about it with request_id 0.
    for s in [&bob, &alice_tablet] {
        let frames = to(&out, &s.addr);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].request_id, 0);
        assert!(matches!(frames[0].body, Some(Body::ConversationCreated(_))));
    }
    // Two groups never share an id.
    let other = h.create_group(&alice, &["bob"]);
    assert_ne!(other, c.conversation_id);
}

#[test]
fn group_size_is_capped_on_create_and_add() {
    let mut h = Harness::with_config(RouterConfig {
        max_group_members: 3,
        ..RouterConfig::default()
    });
    let alice = h.open("alice", "phone", 1);
    let out = h.req(&alice, 1, create_group_body("big", &["b", "c", "d"]));
    assert_error(&out, &alice, 1, ErrorCode::TooManyMembers);
    let group = h.create_group(&alice, &["b", "c"]);
    let change = Body::ChangeMembers(pb::ChangeMembers {
        conversation_id: group.clone(),
        add_user_ids: vec!["d".into()],
        ..Default::default()
    });
    assert_error(
        &h.req(&alice, 2, change),
        &alice,
        2,
        ErrorCode::TooManyMembers,
    );
    // Swapping one member for another stays within the cap.
    let swap = Body::ChangeMembers(pb::ChangeMembers {
        conversation_id: group,
        add_user_ids: vec!["d".into()],
        remove_user_ids: vec!["c".into()],
        ..Default::default()
    });
    let out = h.req(&alice, 3, swap);
    let changed = members_changed(reply_to(&out, &alice, 3));
    assert_eq!(changed.added_user_ids, ["d"]);
    assert_eq!(changed.removed_user_ids, ["c"]);
}

#[test]
fn admin_rules_for_changing_members() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let alice_laptop = h.open("alice", "laptop", 11);
    let bob = h.open("bob", "phone", 2);
    let carol = h.open("carol", "phone", 3);
    let dave = h.open("dave", "phone", 4);
    let group = h.create_group(&alice, &["bob", "carol"]);
    let change = |add: &[&str], remove: &[&str], promote: &[&str]| {
        Body::ChangeMembers(pb::ChangeMembers {
            conversation_id: group.clone(),
            add_user_ids: add.iter().map(|s| s.to_string()).collect(),
            remove_user_ids: remove.iter().map(|s| s.to_string()).collect(),
            promote_user_ids: promote.iter().map(|s| s.to_string()).collect(),
        })
    };

    // A member may not add, remove others or promote.
    assert_error(
        &h.req(&bob, 1, change(&["dave"], &[], &[])),
        &bob,
        1,
        ErrorCode::Forbidden,
    );
    assert_error(
        &h.req(&bob, 2, change(&[], &["carol"], &[])),
        &bob,
        2,
        ErrorCode::Forbidden,
    );
    assert_error(
        &h.req(&bob, 3, change(&[], &[], &["bob"])),
        &bob,
        3,
        ErrorCode::Forbidden,
    );
    assert_error(
        &h.req(&bob, 4, change(&[], &[], &[])),
        &bob,
        4,
        ErrorCode::InvalidArgument,
    );
    assert_error(
        &h.req(&alice, 5, change(&["dave"], &["dave"], &[])),
        &alice,
        5,
        ErrorCode::InvalidArgument,
    );
    assert_error(
        &h.req(&alice, 6, change(&[], &[], &["zed"])),
        &alice,
        6,
        ErrorCode::InvalidArgument,
    );

    // The admin adds dave as admin and removes carol.
    let out = h.req(&alice, 7, change(&["dave"], &["carol"], &["dave"]));
    let changed = members_changed(reply_to(&out, &alice, 7));
    assert_eq!(changed.actor_user_id, "alice");
    assert_eq!(changed.added_user_ids, ["dave"]);
    assert_eq!(changed.removed_user_ids, ["carol"]);
    assert_eq!(
        roles(changed),
        [
            ("alice".to_string(), pb::Role::Admin),
            ("bob".to_string(), pb::Role::Member),
            ("dave".to_string(), pb::Role::Admin)
        ]
    );
    // Everyone before and after hears it, with request_id 0, with the
    // whole conversation after the change: the actor's other devices, the
    // added, the removed and the other members.
    for s in [&alice_laptop, &carol, &dave, &bob] {
        let frames = to(&out, &s.addr);
        assert_eq!(frames.len(), 1, "{s:?}");
        assert_eq!(frames[0].request_id, 0);
        assert_eq!(members_changed(frames[0]), changed);
    }
    // Carol is out, dave is in.
    assert_error(&h.send(&carol, &group, 8), &carol, 8, ErrorCode::Forbidden);
    assert_eq!(
        ack(reply_to(&h.send(&dave, &group, 9), &dave, 9))
            .unwrap()
            .seq,
        1
    );

    // A member may leave on their own.
    let out = h.req(&bob, 10, change(&[], &["bob"], &[]));
    assert_eq!(
        members_changed(reply_to(&out, &bob, 10)).removed_user_ids,
        ["bob"]
    );
    assert_eq!(to(&out, &alice.addr).len(), 1);
    assert_error(&h.send(&bob, &group, 11), &bob, 11, ErrorCode::Forbidden);

    // Dave (an admin) leaves; alice adds two members and leaves as the last admin.
    h.req(&dave, 12, change(&[], &["dave"], &[]));
    let out = h.req(&alice, 13, change(&["erin", "frank"], &[], &[]));
    assert_eq!(
        members_changed(reply_to(&out, &alice, 13)).added_user_ids,
        ["erin", "frank"]
    );
    let out = h.req(&alice, 14, change(&[], &["alice"], &[]));
    // The last admin left: the smallest remaining user id becomes admin.
    assert_eq!(
        roles(members_changed(reply_to(&out, &alice, 14))),
        [
            ("erin".to_string(), pb::Role::Admin),
            ("frank".to_string(), pb::Role::Member)
        ]
    );

    // Direct conversations have fixed members; unknown groups are not found.
    let dm = Body::ChangeMembers(pb::ChangeMembers {
        conversation_id: DM.into(),
        add_user_ids: vec!["carol".into()],
        ..Default::default()
    });
    assert_error(
        &h.req(&alice, 15, dm),
        &alice,
        15,
        ErrorCode::InvalidArgument,
    );
    let unknown = Body::ChangeMembers(pb::ChangeMembers {
        conversation_id: "grp:unknown".into(),
        add_user_ids: vec!["carol".into()],
        ..Default::default()
    });
    assert_error(&h.req(&alice, 16, unknown), &alice, 16, ErrorCode::NotFound);
}

#[test]
fn membership_changes_update_conversation_lists() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let group = h.create_group(&alice, &[]);
    let listed = |h: &mut Harness, s: &Session| -> Vec<String> {
        let out = h.req(s, 1, Body::Sync(pb::Sync::default()));
        let Some(Body::SyncBatch(b)) = &reply_to(&out, s, 1).body else {
            panic!("expected SyncBatch");
        };
        b.conversations
            .iter()
            .map(|c| c.conversation_id.clone())
            .collect()
    };
    assert!(listed(&mut h, &bob).is_empty());
    h.req(
        &alice,
        2,
        Body::ChangeMembers(pb::ChangeMembers {
            conversation_id: group.clone(),
            add_user_ids: vec!["bob".into()],
            ..Default::default()
        }),
    );
    assert_eq!(listed(&mut h, &bob), vec![group.clone()]);
    h.req(
        &bob,
        3,
        Body::ChangeMembers(pb::ChangeMembers {
            conversation_id: group.clone(),
            remove_user_ids: vec!["bob".into()],
            ..Default::default()
        }),
    );
    assert!(listed(&mut h, &bob).is_empty());
}

// ---- Receipts and typing -------------------------------------------------

fn receipt_update(frame: &pb::Frame) -> &pb::ReceiptUpdate {
    match &frame.body {
        Some(Body::ReceiptUpdate(r)) => r,
        other => panic!("expected ReceiptUpdate, got {other:?}"),
    }
}

#[test]
fn receipts_go_to_senders_of_the_covered_range_and_the_readers_other_devices() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let carol = h.open("carol", "phone", 3);
    let carol_tablet = h.open("carol", "tablet", 4);
    let group = h.create_group(&alice, &["bob", "carol"]);
    h.send(&alice, &group, 1); // seq 1
    h.send(&alice, &group, 2); // seq 2
    h.send(&bob, &group, 3); // seq 3
    h.send(&carol, &group, 4); // seq 4
    let receipt = |kind: pb::ReceiptKind, up_to_seq| {
        Body::Receipt(pb::Receipt {
            conversation_id: group.clone(),
            kind: kind as i32,
            up_to_seq,
        })
    };

    let out = h.req(&carol, 10, receipt(pb::ReceiptKind::Read, 2));
    assert_eq!(out.frames.len(), 2, "{:?}", out.frames);
    let update = receipt_update(to(&out, &alice.addr)[0]);
    assert_eq!(
        update,
        &pb::ReceiptUpdate {
            conversation_id: group.clone(),
            user_id: "carol".into(),
            kind: pb::ReceiptKind::Read as i32,
            up_to_seq: 2
        }
    );
    assert_eq!(receipt_update(to(&out, &carol_tablet.addr)[0]), update);
    assert!(to(&out, &bob.addr).is_empty());
    assert!(to(&out, &carol.addr).is_empty());

    // Not increasing: ignored.
    assert!(h
        .req(&carol, 11, receipt(pb::ReceiptKind::Read, 2))
        .frames
        .is_empty());
    assert!(h
        .req(&carol, 12, receipt(pb::ReceiptKind::Read, 1))
        .frames
        .is_empty());
    // READ implied DELIVERED up to 2.
    assert!(h
        .req(&carol, 13, receipt(pb::ReceiptKind::Delivered, 2))
        .frames
        .is_empty());

    // Beyond the last seq: clamped to 4. Range (2, 4] was sent by bob and carol.
    let out = h.req(&carol, 14, receipt(pb::ReceiptKind::Read, 99));
    assert_eq!(receipt_update(to(&out, &bob.addr)[0]).up_to_seq, 4);
    assert_eq!(to(&out, &carol_tablet.addr).len(), 1);
    assert!(to(&out, &alice.addr).is_empty());
    assert_eq!(out.frames.len(), 2);

    // A delivered receipt from bob reaches alice (seqs 1, 2) and carol (4).
    let out = h.req(&bob, 15, receipt(pb::ReceiptKind::Delivered, 4));
    assert_eq!(
        receipt_update(to(&out, &alice.addr)[0]).kind,
        pb::ReceiptKind::Delivered as i32
    );
    assert_eq!(to(&out, &carol.addr).len(), 1);
    assert_eq!(to(&out, &carol_tablet.addr).len(), 1);
    assert!(to(&out, &bob.addr).is_empty());

    let bad = Body::Receipt(pb::Receipt {
        conversation_id: group.clone(),
        kind: 0,
        up_to_seq: 1,
    });
    assert_error(&h.req(&bob, 16, bad), &bob, 16, ErrorCode::InvalidArgument);
}

#[test]
fn typing_goes_to_other_members_only_with_the_server_set_user() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let alice_laptop = h.open("alice", "laptop", 2);
    let bob = h.open("bob", "phone", 3);
    let bob_tablet = h.open("bob", "tablet", 4);
    let out = h.req(
        &alice,
        7,
        Body::Typing(pb::Typing {
            conversation_id: DM.into(),
            active: true,
            user_id: "bob".into(), // a lie; the server overwrites it
        }),
    );
    assert_eq!(out.frames.len(), 2);
    assert!(to(&out, &alice_laptop.addr).is_empty());
    for s in [&bob, &bob_tablet] {
        let frames = to(&out, &s.addr);
        assert_eq!(frames[0].request_id, 0);
        assert_eq!(
            frames[0].body,
            Some(Body::Typing(pb::Typing {
                conversation_id: DM.into(),
                active: true,
                user_id: "alice".into()
            }))
        );
    }
    // Never stored.
    let out = h.req(
        &bob,
        8,
        Body::History(pb::History {
            conversation_id: DM.into(),
            ..Default::default()
        }),
    );
    let Some(Body::HistoryPage(page)) = &reply_to(&out, &bob, 8).body else {
        panic!("expected HistoryPage");
    };
    assert!(page.messages.is_empty());
}

// ---- Sync and history ----------------------------------------------------

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

#[test]
fn sync_with_cursors_lists_unknown_conversations_and_pages() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let group = h.create_group(&alice, &["bob"]);
    for n in 1..=5 {
        h.send(&alice, DM, n);
    }
    for n in 6..=8 {
        h.send(&alice, &group, n);
    }

    // Fresh device: everything, both conversations listed.
    let batch = sync(&mut h, &bob, &[], 0);
    assert!(!batch.has_more);
    let mut listed: Vec<(&str, u64)> = batch
        .conversations
        .iter()
        .map(|c| (c.conversation_id.as_str(), c.last_seq))
        .collect();
    listed.sort();
    let mut expected = vec![(DM, 5), (group.as_str(), 3)];
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(batch.messages.len(), 8);

    // With a cursor for the DM: only its newer messages, and only the group
    // is listed (it is absent from the cursors).
    let batch = sync(&mut h, &bob, &[(DM, 3)], 0);
    let dm: Vec<u64> = batch
        .messages
        .iter()
        .filter(|m| m.conversation_id == DM)
        .map(|m| m.seq)
        .collect();
    let grp: Vec<u64> = batch
        .messages
        .iter()
        .filter(|m| m.conversation_id == group)
        .map(|m| m.seq)
        .collect();
    assert_eq!(dm, [4, 5]);
    assert_eq!(grp, [1, 2, 3]);
    assert_eq!(batch.conversations.len(), 1);
    assert_eq!(batch.conversations[0].conversation_id, group);

    // Up to date: nothing.
    let batch = sync(&mut h, &bob, &[(DM, 5), (&group, 3)], 0);
    assert!(batch.messages.is_empty() && batch.conversations.is_empty() && !batch.has_more);

    // Paging with limit 3: advance cursors from what arrives until done.
    let mut cursors: HashMap<String, u64> = HashMap::new();
    let mut got: Vec<(String, u64)> = Vec::new();
    let mut rounds = 0;
    loop {
        let cs: Vec<(&str, u64)> = cursors.iter().map(|(c, s)| (c.as_str(), *s)).collect();
        let batch = sync(&mut h, &bob, &cs, 3);
        assert!(batch.messages.len() <= 3);
        for c in &batch.conversations {
            cursors.entry(c.conversation_id.clone()).or_insert(0);
        }
        for m in &batch.messages {
            let cursor = cursors
                .get_mut(&m.conversation_id)
                .expect("message of an unlisted conversation");
            assert_eq!(m.seq, *cursor + 1, "gap or reorder");
            *cursor = m.seq;
            got.push((m.conversation_id.clone(), m.seq));
        }
        rounds += 1;
        if !batch.has_more {
            break;
        }
        assert!(rounds < 10);
    }
    assert_eq!(got.len(), 8);
    assert_eq!(rounds, 3);
}

#[test]
fn sync_limit_is_capped_at_max_batch() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    for n in 1..=600 {
        h.send(&alice, DM, n);
    }
    let batch = sync(&mut h, &alice, &[], 10_000);
    assert_eq!(batch.messages.len(), 500);
    assert!(batch.has_more);
    assert_eq!(seqs(&batch.messages), (1..=500).collect::<Vec<_>>());
    let batch = sync(&mut h, &alice, &[(DM, 500)], 0);
    assert_eq!(seqs(&batch.messages), (501..=600).collect::<Vec<_>>());
    assert!(!batch.has_more);
}

#[test]
fn sync_batches_respect_the_byte_budget() {
    let mut h = Harness::with_config(RouterConfig {
        max_batch_bytes: 3000,
        ..RouterConfig::default()
    });
    let alice = h.open("alice", "phone", 1);
    let big = "x".repeat(1000);
    for n in 1..=10 {
        h.req(&alice, n, send_body(DM, n, &big));
    }
    let batch = sync(&mut h, &alice, &[(DM, 0)], 0);
    assert!(batch.has_more);
    assert!(
        !batch.messages.is_empty() && batch.messages.len() < 4,
        "{}",
        batch.messages.len()
    );
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

#[test]
fn history_pages_backwards_within_the_window() {
    let mut h = Harness::with_config(RouterConfig {
        history_window: 20,
        ..RouterConfig::default()
    });
    let alice = h.open("alice", "phone", 1);
    for n in 1..=25 {
        h.send(&alice, DM, n);
    }
    let page = history(&mut h, &alice, DM, 0, 10);
    assert_eq!(page.conversation_id, DM);
    assert_eq!(seqs(&page.messages), (16..=25).collect::<Vec<_>>());
    assert!(page.has_more);
    let page = history(&mut h, &alice, DM, 16, 10);
    assert_eq!(seqs(&page.messages), (6..=15).collect::<Vec<_>>());
    // Seqs 1..=5 left the 20-message window.
    assert!(!page.has_more);
    let page = history(&mut h, &alice, DM, 6, 10);
    assert!(page.messages.is_empty() && !page.has_more);
    // Limit 0 means the default; a group nobody created is not found.
    assert_eq!(history(&mut h, &alice, DM, 0, 0).messages.len(), 20);
    let out = h.req(
        &alice,
        3,
        Body::History(pb::History {
            conversation_id: "grp:none".into(),
            ..Default::default()
        }),
    );
    assert_error(&out, &alice, 3, ErrorCode::NotFound);
}

// ---- Presence --------------------------------------------------------------

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

#[test]
fn presence_query_reflects_sessions_and_last_seen() {
    // The mechanics, with visibility out of the way (see presence_privacy_*).
    let mut h = Harness::with_config(RouterConfig {
        presence_visibility: PresenceVisibility::Everyone,
        ..RouterConfig::default()
    });
    let watcher = h.open("watcher", "phone", 1);
    let query = |ids: &[&str]| {
        Body::PresenceQuery(pb::PresenceQuery {
            user_ids: ids.iter().map(|s| s.to_string()).collect(),
        })
    };
    let out = h.req(&watcher, 1, query(&["bob", "never"]));
    assert_eq!(
        presence_result(reply_to(&out, &watcher, 1)),
        [("bob".into(), false, 0), ("never".into(), false, 0)]
    );
    let phone = h.open("bob", "phone", 2);
    let tablet = h.open("bob", "tablet", 3);
    let out = h.req(&watcher, 2, query(&["bob"]));
    assert_eq!(
        presence_result(reply_to(&out, &watcher, 2)),
        [("bob".into(), true, 0)]
    );
    h.close(&phone, T0 + 10);
    let out = h.req(&watcher, 3, query(&["bob"]));
    assert_eq!(
        presence_result(reply_to(&out, &watcher, 3)),
        [("bob".into(), true, 0)]
    );
    h.close(&tablet, T0 + 20);
    let out = h.req(&watcher, 4, query(&["bob", "bob"]));
    assert_eq!(
        presence_result(reply_to(&out, &watcher, 4)),
        [("bob".into(), false, T0 + 20)]
    );

    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let body = Body::PresenceQuery(pb::PresenceQuery { user_ids: too_many });
    assert_error(
        &h.req(&watcher, 5, body),
        &watcher,
        5,
        ErrorCode::InvalidArgument,
    );
}

#[test]
fn presence_subscriptions_get_transition_events_until_closed() {
    let mut h = Harness::with_config(RouterConfig {
        max_watches_per_connection: 2,
        presence_visibility: PresenceVisibility::Everyone,
        ..RouterConfig::default()
    });
    let watcher = h.open("watcher", "phone", 1);
    let other_watcher = h.open("watcher", "tablet", 9);
    let subscribe = |ids: &[&str], unsubscribe| {
        Body::PresenceSubscribe(pb::PresenceSubscribe {
            user_ids: ids.iter().map(|s| s.to_string()).collect(),
            unsubscribe,
        })
    };
    let bob_phone = h.open("bob", "phone", 2);
    let out = h.req(&watcher, 1, subscribe(&["bob", "carol"], false));
    assert_eq!(
        presence_result(reply_to(&out, &watcher, 1)),
        [("bob".into(), true, 0), ("carol".into(), false, 0)]
    );
    // Cap of 2: a third user is refused, re-subscribing a watched one is fine.
    let out = h.req(&watcher, 2, subscribe(&["dave"], false));
    assert_error(&out, &watcher, 2, ErrorCode::InvalidArgument);
    let out = h.req(&watcher, 3, subscribe(&["bob"], false));
    assert_eq!(presence_result(reply_to(&out, &watcher, 3)).len(), 1);

    // Carol comes online: one event, only to the subscribed connection.
    let carol = session("carol", "phone", "g1", 3);
    let out = h.opened(&carol);
    assert_eq!(out.frames.len(), 1);
    assert_eq!(
        presence_event(to(&out, &watcher.addr)[0]),
        ("carol".into(), true, 0)
    );
    let out = h.opened(&carol);
    assert!(
        out.frames.is_empty(),
        "re-opening the same addr is no transition"
    );
    let carol_tablet = session("carol", "tablet", "g1", 4);
    let out = h.opened(&carol_tablet);
    assert!(out.frames.is_empty(), "second device is no transition");
    assert!(
        h.close(&carol_tablet, T0 + 1).frames.is_empty(),
        "carol still has her phone"
    );

    let out = h.close(&bob_phone, T0 + 5);
    assert_eq!(out.frames.len(), 1);
    assert_eq!(to(&out, &watcher.addr).len(), 1);
    assert_eq!(
        presence_event(to(&out, &watcher.addr)[0]),
        ("bob".into(), false, T0 + 5)
    );
    assert!(to(&out, &other_watcher.addr).is_empty());

    let out = h.opened(&bob_phone);
    assert_eq!(
        presence_event(to(&out, &watcher.addr)[0]),
        ("bob".into(), true, 0)
    );

    // Unsubscribe from carol: acknowledged with an empty result, no events.
    let out = h.req(&watcher, 4, subscribe(&["carol"], true));
    assert!(presence_result(reply_to(&out, &watcher, 4)).is_empty());
    assert!(h.close(&carol, T0 + 7).frames.is_empty());

    // The watching connection closes: its subscriptions are gone.
    h.close(&watcher, T0 + 8);
    assert!(h.close(&bob_phone, T0 + 9).frames.is_empty());
}

/// The session-change path: a reconnect of the same device replaces the old
/// connection (one GoAway(REPLACED), wherever the changes fall in batches),
/// the replaced and closed connections' watches go, and the new
/// connection's own subscription keeps working whatever the order of the
/// old connection's late close.
#[test]
fn a_reconnect_replaces_the_old_connection_and_only_the_new_one_watches() {
    let mut h = Harness::with_config(RouterConfig {
        presence_visibility: PresenceVisibility::Everyone,
        ..RouterConfig::default()
    });
    let carol = h.open("carol", "phone", 9);
    let old = h.open("alice", "phone", 1);
    h.req(&old, 1, presence_subscribe(&["carol"], false));
    let new = session("alice", "phone", "g1", 2);
    let out = h.opened(&new);
    assert_eq!(out.frames.len(), 1, "only the GoAway: {out:?}");
    assert!(matches!(
        &to(&out, &old.addr)[0].body,
        Some(Body::GoAway(g)) if g.reason == pb::GoAwayReason::Replaced as i32
    ));
    // Replaced: the old connection watches nothing any more.
    let out = h.close(&carol, T0 + 1);
    assert!(out.frames.is_empty(), "to the replaced connection: {out:?}");
    h.opened(&carol);
    let out = h.req(&new, 1, presence_subscribe(&["carol"], false));
    assert_eq!(
        presence_result(reply_to(&out, &new, 1)),
        [("carol".into(), true, 0)]
    );
    // The old connection's close comes after the new one subscribed: it
    // neither takes alice offline nor touches the new connection's watches.
    let out = h.close(&old, T0 + 2);
    assert!(out.frames.is_empty(), "{out:?}");
    let out = h.close(&carol, T0 + 3);
    assert_eq!(to(&out, &new.addr).len(), 1);
    assert_eq!(
        presence_event(to(&out, &new.addr)[0]),
        ("carol".into(), false, T0 + 3)
    );

    // All in one batch: the old connection closes, its device reconnects,
    // carol comes online. No GoAway (already closed), one event each.
    let newer = session("alice", "phone", "g2", 3);
    h.req(&new, 2, presence_subscribe(&["carol"], false));
    let out = h.sessions(&[
        SessionChange::Closed {
            session: new.clone(),
            at_ms: T0 + 4,
        },
        SessionChange::Opened(newer.clone()),
        SessionChange::Opened(carol.clone()),
    ]);
    assert!(out.frames.is_empty(), "closed watches get nothing: {out:?}");
    h.req(&newer, 1, presence_subscribe(&["carol"], false));
    let out = h.close(&carol, T0 + 5);
    assert_eq!(
        presence_event(to(&out, &newer.addr)[0]),
        ("carol".into(), false, T0 + 5)
    );
    assert_eq!(out.frames.len(), 1);
}

/// One batch: a user coming online and going offline again in it produces
/// both events, in order; changes of several gateways in one batch are
/// written as one store call per gateway run.
#[test]
fn a_session_batch_applies_in_order() {
    let mut h = Harness::with_config(RouterConfig {
        presence_visibility: PresenceVisibility::Everyone,
        ..RouterConfig::default()
    });
    let watcher = h.open("watcher", "phone", 1);
    h.req(&watcher, 1, presence_subscribe(&["bob"], false));
    let on_g1 = session("bob", "phone", "g1", 2);
    let on_g2 = session("bob", "tablet", "g2", 3);
    let writes = h.calls().count("apply_sessions");
    let out = h.sessions(&[
        SessionChange::Opened(on_g1.clone()),
        SessionChange::Closed {
            session: on_g1,
            at_ms: T0 + 1,
        },
        SessionChange::Opened(on_g2),
    ]);
    let events: Vec<_> = to(&out, &watcher.addr)
        .into_iter()
        .map(presence_event)
        .collect();
    assert_eq!(
        events,
        [
            ("bob".into(), true, 0),
            ("bob".into(), false, T0 + 1),
            ("bob".into(), true, 0)
        ]
    );
    assert_eq!(
        h.calls().count("apply_sessions"),
        writes + 2,
        "g1 run, g2 run"
    );
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

#[test]
fn presence_privacy_strangers_look_never_seen_members_and_self_are_visible() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let stranger = h.open("stranger", "phone", 2);
    let bob = h.open("bob", "phone", 3);
    // Bob shares a DM both have written in with alice; carol shares a
    // group with alice; dave shares nothing with anyone.
    h.send(&alice, DM, 1);
    h.send(&bob, DM, 2);
    h.create_group(&alice, &["carol"]);
    let carol = h.open("carol", "phone", 4);
    let dave = h.open("dave", "phone", 5);
    h.close(&carol, T0 + 30);
    h.close(&dave, T0 + 40);

    let out = h.req(
        &alice,
        1,
        presence_query(&["bob", "carol", "dave", "alice"]),
    );
    assert_eq!(
        presence_result(reply_to(&out, &alice, 1)),
        [
            ("bob".into(), true, 0),
            ("carol".into(), false, T0 + 30),
            ("dave".into(), false, 0),
            ("alice".into(), true, 0),
        ],
        "DM peer and group member visible, self visible, stranger never seen"
    );
    // The stranger sees nobody: online alice and bob, last-seen carol, all
    // exactly like a user who was never seen; only themself.
    let out = h.req(
        &stranger,
        2,
        presence_query(&["alice", "bob", "carol", "never", "stranger"]),
    );
    assert_eq!(
        presence_result(reply_to(&out, &stranger, 2)),
        [
            ("alice".into(), false, 0),
            ("bob".into(), false, 0),
            ("carol".into(), false, 0),
            ("never".into(), false, 0),
            ("stranger".into(), true, 0),
        ]
    );
    // A subscription answers the same way.
    let out = h.req(&stranger, 3, presence_subscribe(&["alice", "carol"], false));
    assert_eq!(
        presence_result(reply_to(&out, &stranger, 3)),
        [("alice".into(), false, 0), ("carol".into(), false, 0)]
    );
    let _ = bob;

    // `everyone` turns the rule off.
    let mut open = Harness::with_config(RouterConfig {
        presence_visibility: PresenceVisibility::Everyone,
        ..RouterConfig::default()
    });
    let stranger = open.open("stranger", "phone", 2);
    let alice = open.open("alice", "phone", 1);
    let out = open.req(&stranger, 1, presence_query(&["alice"]));
    assert_eq!(
        presence_result(reply_to(&out, &stranger, 1)),
        [("alice".into(), true, 0)]
    );
    open.close(&alice, T0 + 5);
    let out = open.req(&stranger, 2, presence_query(&["alice"]));
    assert_eq!(
        presence_result(reply_to(&out, &stranger, 2)),
        [("alice".into(), false, T0 + 5)]
    );
}

#[test]
fn presence_privacy_is_checked_when_events_are_sent() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let watcher = h.open("watcher", "phone", 2);
    let out = h.req(&watcher, 1, presence_subscribe(&["carol"], false));
    assert_eq!(
        presence_result(reply_to(&out, &watcher, 1)),
        [("carol".into(), false, 0)]
    );
    // Carol connects and leaves: the stranger gets no event.
    let carol = h.open("carol", "phone", 3);
    h.close(&carol, T0 + 1);
    let out = h.opened(&carol);
    assert!(to(&out, &watcher.addr).is_empty(), "stranger got {out:?}");

    // Alice puts watcher and carol in a group: the existing subscription now
    // produces events.
    let group = h.create_group(&alice, &["watcher", "carol"]);
    let out = h.close(&carol, T0 + 10);
    assert_eq!(to(&out, &watcher.addr).len(), 1);
    assert_eq!(
        presence_event(to(&out, &watcher.addr)[0]),
        ("carol".into(), false, T0 + 10)
    );
    let out = h.opened(&carol);
    assert_eq!(
        presence_event(to(&out, &watcher.addr)[0]),
        ("carol".into(), true, 0)
    );

    // Carol is removed from the last shared group: events stop, and a query
    // answers "never seen" again.
    let out = h.req(
        &alice,
        2,
        Body::ChangeMembers(pb::ChangeMembers {
            conversation_id: group.clone(),
            remove_user_ids: vec!["carol".into()],
            ..Default::default()
        }),
    );
    assert!(
        to(&out, &alice.addr).iter().all(|f| error(f).is_none()),
        "{out:?}"
    );
    let out = h.close(&carol, T0 + 20);
    assert!(
        to(&out, &watcher.addr).is_empty(),
        "removed member: {out:?}"
    );
    let out = h.req(&watcher, 3, presence_query(&["carol"]));
    assert_eq!(
        presence_result(reply_to(&out, &watcher, 3)),
        [("carol".into(), false, 0)]
    );
}

#[test]
fn same_device_reconnecting_replaces_the_old_connection() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let old = h.open("bob", "phone", 2);
    let new = session("bob", "phone", "g2", 3);
    let out = h.opened(&new);
    let frames = to(&out, &old.addr);
    assert_eq!(frames.len(), 1);
    match &frames[0].body {
        Some(Body::GoAway(g)) => assert_eq!(g.reason, pb::GoAwayReason::Replaced as i32),
        other => panic!("expected GoAway, got {other:?}"),
    }
    // The old connection closing late leaves bob online at the new address.
    h.close(&old, T0 + 1);
    let out = h.send(&alice, DM, 1);
    assert_eq!(to(&out, &new.addr).len(), 1);
    assert!(to(&out, &old.addr).is_empty());
    assert!(out.pushes.is_empty());
}

// ---- Errors ----------------------------------------------------------------

#[test]
fn every_bad_request_gets_the_right_error_code() {
    let mut h = Harness::with_config(RouterConfig {
        max_body_bytes: 10,
        ..RouterConfig::default()
    });
    let alice = h.open("alice", "phone", 1);
    let send = |conversation_id: &str, client_msg_id: Vec<u8>, kind: i32, body: &[u8]| {
        Body::Send(pb::Send {
            conversation_id: conversation_id.into(),
            client_msg_id,
            kind,
            body: body.to_vec(),
            ..Default::default()
        })
    };
    let text = pb::ContentKind::Text as i32;
    let cases: Vec<(Body, ErrorCode)> = vec![
        (
            send(DM, vec![1; 15], text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send(DM, vec![1; 17], text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (send(DM, cmid(1), text, &[0; 11]), ErrorCode::BodyTooLarge),
        (send(DM, cmid(1), 0, b"hi"), ErrorCode::InvalidArgument),
        (send(DM, cmid(1), 99, b"hi"), ErrorCode::InvalidArgument),
        (
            send("dm:bob:alice", cmid(1), text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send("dm:alice:alice", cmid(1), text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send("dm:alice", cmid(1), text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send("dm:alice:b:c", cmid(1), text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send("chan:1", cmid(1), text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send("grp:", cmid(1), text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send(&format!("grp:{}", "x".repeat(400)), cmid(1), text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send("grp:missing", cmid(1), text, b"hi"),
            ErrorCode::NotFound,
        ),
        (
            send("dm:bob:carol", cmid(1), text, b"hi"),
            ErrorCode::Forbidden,
        ),
        (
            Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Direct as i32,
                member_user_ids: vec!["alice".into()],
                ..Default::default()
            }),
            ErrorCode::InvalidArgument,
        ),
        (
            Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Direct as i32,
                member_user_ids: vec!["bob".into(), "carol".into()],
                ..Default::default()
            }),
            ErrorCode::InvalidArgument,
        ),
        (
            Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Direct as i32,
                member_user_ids: vec!["b:c".into()],
                ..Default::default()
            }),
            ErrorCode::InvalidArgument,
        ),
        (
            Body::CreateConversation(pb::CreateConversation {
                kind: 0,
                member_user_ids: vec!["bob".into()],
                ..Default::default()
            }),
            ErrorCode::InvalidArgument,
        ),
        (
            create_group_body(&"t".repeat(300), &["bob"]),
            ErrorCode::InvalidArgument,
        ),
        (create_group_body("t", &[""]), ErrorCode::InvalidArgument),
        (
            Body::Deliver(pb::Deliver::default()),
            ErrorCode::InvalidArgument,
        ),
        (
            Body::Hello(pb::Hello::default()),
            ErrorCode::InvalidArgument,
        ),
        (Body::Ping(pb::Ping::default()), ErrorCode::InvalidArgument),
        (
            Body::Receipt(pb::Receipt {
                conversation_id: DM.into(),
                kind: 7,
                up_to_seq: 1,
            }),
            ErrorCode::InvalidArgument,
        ),
        (
            Body::PresenceSubscribe(pb::PresenceSubscribe {
                user_ids: vec![String::new()],
                unsubscribe: false,
            }),
            ErrorCode::InvalidArgument,
        ),
    ];
    for (i, (body, code)) in cases.into_iter().enumerate() {
        let request_id = 1000 + i as u32;
        let is_send = matches!(body, Body::Send(_));
        let client_msg_id = match &body {
            Body::Send(s) => s.client_msg_id.clone(),
            _ => Vec::new(),
        };
        let out = h.req(&alice, request_id, body);
        let e = assert_error(&out, &alice, request_id, code);
        if is_send {
            assert_eq!(e.client_msg_id, client_msg_id, "case {i}");
        }
    }
    // Nothing was stored by any of them.
    let batch = sync(&mut h, &alice, &[], 0);
    assert!(batch.messages.is_empty());
}

#[test]
fn direct_create_returns_the_canonical_id() {
    let mut h = Harness::new();
    let bob = h.open("bob", "phone", 1);
    let out = h.req(
        &bob,
        3,
        Body::CreateConversation(pb::CreateConversation {
            kind: pb::ConversationKind::Direct as i32,
            member_user_ids: vec!["alice".into()],
            ..Default::default()
        }),
    );
    let Some(Body::ConversationCreated(c)) = &reply_to(&out, &bob, 3).body else {
        panic!("expected ConversationCreated");
    };
    let c = c.conversation.as_ref().unwrap();
    assert_eq!(c.conversation_id, DM);
    assert_eq!(c.conversation_id, direct_conversation_id("bob", "alice"));
    assert_eq!(c.kind, pb::ConversationKind::Direct as i32);
    assert_eq!(c.last_seq, 0);
    // It is listed for alice right away.
    let alice = h.open("alice", "phone", 2);
    let batch = sync(&mut h, &alice, &[], 0);
    assert_eq!(batch.conversations.len(), 1);
}

#[test]
fn store_failures_become_unavailable_for_the_driver() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    h.router.store_mut().failing = true;
    let send = request(&alice, 5, send_body(DM, 1, "hi"));
    let mut out = Output::default();
    let err = h.router.handle(&send, &mut out).expect_err("store fails");
    assert!(out.frames.is_empty());
    let reply = Router::<Instrumented>::unavailable_reply(&send, &err);
    assert_eq!(reply.to, alice.addr);
    assert_eq!(reply.frame.request_id, 5);
    let e = error(&reply.frame).unwrap();
    assert_eq!(e.code, ErrorCode::Unavailable as u32);
    assert_eq!(e.client_msg_id, cmid(1));

    // Once the store is back, the retried send is stored exactly once.
    h.router.store_mut().failing = false;
    let mut out = Output::default();
    h.router.handle(&send, &mut out).unwrap();
    let mut again = Output::default();
    h.router.handle(&send, &mut again).unwrap();
    assert_eq!(
        ack(&out.frames[0].frame).unwrap(),
        ack(&again.frames[0].frame).unwrap()
    );
}

#[test]
fn a_batch_whose_push_mark_fails_leaves_no_frame_of_its_sends() {
    // The Sends' frames go straight into `out`: when a later Send's push
    // mark fails, the earlier Send's Deliver and ack are taken back (what
    // `out` held before stays), and the retry acks each Send with the seq
    // it got.
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    h.open("bob", "phone", 2);
    let reqs = vec![
        request(&alice, 1, send_body(DM, 1, "to bob, online")),
        request(
            &alice,
            2,
            send_body("dm:alice:carol", 2, "to carol, offline"),
        ),
    ];
    let mut out = Output::default();
    let earlier = Router::<Instrumented>::internal_error_reply(&reqs[0]);
    out.frames.push(earlier.clone());
    h.router.store_mut().fail_on = Some("mark_push_pending");
    let mut progress = palaver_router::logic::BatchProgress::default();
    h.router
        .handle_batch(&reqs, &mut out, &mut progress)
        .expect_err("the push mark fails");
    assert_eq!(out.frames, vec![earlier]);
    assert!(out.pushes.is_empty());
    assert_eq!((progress.done, progress.frames), (0, 1));

    h.router.store_mut().fail_on = None;
    let mut out = Output::default();
    h.router
        .handle_batch(&reqs, &mut out, &mut progress)
        .expect("memory store does not fail");
    let acks: Vec<(u32, u64)> = to(&out, &alice.addr)
        .iter()
        .filter_map(|f| ack(f).map(|a| (f.request_id, a.seq)))
        .collect();
    assert_eq!(acks, vec![(1, 1), (2, 1)]);
    // The first attempt stored both before failing, so the retry finds
    // duplicates; it still delivers to bob and pushes to carol, which the
    // failed attempt never did.
    let bob_addr = session("bob", "phone", "g1", 2).addr;
    let to_bob: Vec<u64> = to(&out, &bob_addr)
        .iter()
        .filter_map(|f| delivered(f).map(|m| m.seq))
        .collect();
    assert_eq!(to_bob, vec![1]);
    let pushed: Vec<(&str, u64)> = out
        .pushes
        .iter()
        .map(|p| (p.user_id.as_str(), p.seq))
        .collect();
    assert_eq!(pushed, vec![("carol", 1)]);
}

#[test]
fn sync_terminates_when_a_listed_group_record_is_missing() {
    use palaver_router::store::{ConversationStore, Retention, UserStore};
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    h.send(&alice, DM, 1);
    // A group with messages and a listing but no record (lost data).
    let store = &mut h.router.store_mut().inner;
    store
        .add_conversation_to_users("grp:ghost", &["alice".to_string()])
        .unwrap();
    let retention = Retention {
        now_ms: T0,
        dedup_ttl_ms: 1000,
        history_window: 10,
    };
    let message = pb::Message {
        client_msg_id: cmid(1),
        ..Default::default()
    };
    store
        .append_message("grp:ghost", message, &retention)
        .unwrap();
    let batch = sync(&mut h, &alice, &[], 0);
    assert!(!batch.has_more);
    assert_eq!(batch.conversations.len(), 1);
    assert_eq!(seqs(&batch.messages), [1]);
}

// ---- SPEC v1 clarifications -------------------------------------------------

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

/// SPEC §14 "Error codes per request": one case per row, in the table's
/// order, plus cases where two rows fail and the earlier row decides.
#[test]
fn spec_error_codes_per_request() {
    let mut h = Harness::with_config(RouterConfig {
        max_body_bytes: 10,
        max_group_members: 3,
        max_watches_per_connection: 2,
        ..RouterConfig::default()
    });
    let alice = h.open("alice", "phone", 1);
    let carol = h.open("carol", "phone", 3);
    // alice is admin of `own`, a plain member of `member_of`, never in
    // `foreign`, removed from `left`.
    let own = new_group(&mut h, &alice, 501, &["bob"]);
    let member_of = new_group(&mut h, &carol, 502, &["alice"]);
    let foreign = new_group(&mut h, &carol, 503, &["dave"]);
    let left = new_group(&mut h, &carol, 504, &["alice"]);
    h.req(&carol, 505, change(&left, &[], &["alice"], &[]));

    let text = pb::ContentKind::Text as i32;
    let send = |conversation_id: &str, client_msg_id: Vec<u8>, kind: i32, body: &[u8]| {
        Body::Send(pb::Send {
            conversation_id: conversation_id.into(),
            client_msg_id,
            kind,
            body: body.to_vec(),
            ..Default::default()
        })
    };
    let receipt = |conversation_id: &str, kind: i32| {
        Body::Receipt(pb::Receipt {
            conversation_id: conversation_id.into(),
            kind,
            up_to_seq: 1,
        })
    };
    let read = pb::ReceiptKind::Read as i32;
    let typing = |conversation_id: &str| {
        Body::Typing(pb::Typing {
            conversation_id: conversation_id.into(),
            active: true,
            user_id: String::new(),
        })
    };
    let history = |conversation_id: &str| {
        Body::History(pb::History {
            conversation_id: conversation_id.into(),
            ..Default::default()
        })
    };
    let create = |kind: i32, title: &str, members: &[&str]| {
        Body::CreateConversation(pb::CreateConversation {
            kind,
            title: title.into(),
            member_user_ids: members.iter().map(|m| m.to_string()).collect(),
        })
    };
    let direct = pb::ConversationKind::Direct as i32;
    let group = pb::ConversationKind::Group as i32;
    let presence = |ids: Vec<String>, subscribe: bool| {
        if subscribe {
            Body::PresenceSubscribe(pb::PresenceSubscribe {
                user_ids: ids,
                unsubscribe: false,
            })
        } else {
            Body::PresenceQuery(pb::PresenceQuery { user_ids: ids })
        }
    };
    let ids = |l: &[&str]| l.iter().map(|u| u.to_string()).collect::<Vec<_>>();

    use ErrorCode::*;
    let mut cases: Vec<(&str, Body, ErrorCode)> = Vec::new();
    // Conversation check c1..c4, through each request that names one.
    let c1 = [
        "",
        "chan:1",
        "dm:bob:alice",
        "dm:alice:alice",
        "dm:alice",
        "dm:alice:b:c",
        "dm:alice:b c",
        "grp:",
        "grp:a b",
    ];
    let checks: Vec<(&str, ErrorCode)> = c1
        .iter()
        .map(|id| (*id, InvalidArgument))
        .chain([
            ("dm:bob:carol", Forbidden),
            ("grp:missing", NotFound),
            (foreign.as_str(), Forbidden),
            (left.as_str(), Forbidden),
        ])
        .collect();
    for (id, code) in &checks {
        cases.push(("send c1-c4", send(id, cmid(1), text, b"hi"), *code));
        cases.push(("receipt c1-c4", receipt(id, read), *code));
        cases.push(("typing c1-c4", typing(id), *code));
        cases.push(("history c1-c4", history(id), *code));
    }
    cases.extend([
        // Send
        ("send body", send(DM, cmid(1), text, &[0; 11]), BodyTooLarge),
        (
            "send body first",
            send(DM, vec![], 0, &[0; 11]),
            BodyTooLarge,
        ),
        (
            "send no cmid",
            send(DM, vec![], text, b"hi"),
            InvalidArgument,
        ),
        (
            "send 15-byte cmid",
            send(DM, vec![1; 15], text, b"hi"),
            InvalidArgument,
        ),
        ("send kind 0", send(DM, cmid(1), 0, b"hi"), InvalidArgument),
        (
            "send kind 99",
            send(DM, cmid(1), 99, b"hi"),
            InvalidArgument,
        ),
        (
            "send kind first",
            send("grp:missing", cmid(1), 0, b"hi"),
            InvalidArgument,
        ),
        // Receipt
        ("receipt kind 0", receipt(DM, 0), InvalidArgument),
        ("receipt kind 9", receipt(DM, 9), InvalidArgument),
        (
            "receipt kind first",
            receipt("grp:missing", 0),
            InvalidArgument,
        ),
        // Presence
        (
            "query 1001 ids",
            presence(vec!["u".into(); 1001], false),
            InvalidArgument,
        ),
        (
            "subscribe 1001 ids",
            presence(vec!["u".into(); 1001], true),
            InvalidArgument,
        ),
        (
            "query empty id",
            presence(ids(&[""]), false),
            InvalidArgument,
        ),
        (
            "subscribe bad id",
            presence(ids(&["a b"]), true),
            InvalidArgument,
        ),
        (
            "subscribe over watch limit",
            presence(ids(&["u1", "u2", "u3"]), true),
            InvalidArgument,
        ),
        // CreateConversation
        ("create kind 0", create(0, "", &["bob"]), InvalidArgument),
        ("create kind 9", create(9, "", &["bob"]), InvalidArgument),
        ("direct none", create(direct, "", &[]), InvalidArgument),
        (
            "direct two",
            create(direct, "", &["bob", "carol"]),
            InvalidArgument,
        ),
        (
            "direct self and other",
            create(direct, "", &["alice", "bob"]),
            InvalidArgument,
        ),
        (
            "direct self",
            create(direct, "", &["alice"]),
            InvalidArgument,
        ),
        (
            "direct bad id",
            create(direct, "", &["b c"]),
            InvalidArgument,
        ),
        (
            "group long title",
            create(group, &"t".repeat(257), &["bob"]),
            InvalidArgument,
        ),
        (
            "group empty id",
            create(group, "", &["bob", ""]),
            InvalidArgument,
        ),
        (
            "group too big",
            create(group, "", &["b", "c", "d"]),
            TooManyMembers,
        ),
        (
            "group id before size",
            create(group, "", &["b", "c", "d", ""]),
            InvalidArgument,
        ),
        // ChangeMembers
        (
            "change direct",
            change(DM, &["carol"], &[], &[]),
            InvalidArgument,
        ),
        (
            "change malformed",
            change("", &["carol"], &[], &[]),
            InvalidArgument,
        ),
        (
            "change missing",
            change("grp:missing", &["carol"], &[], &[]),
            NotFound,
        ),
        (
            "change bad id",
            change(&own, &["a b"], &[], &[]),
            InvalidArgument,
        ),
        (
            "change ids before membership",
            change(&foreign, &[""], &[], &[]),
            InvalidArgument,
        ),
        (
            "change non-member",
            change(&foreign, &["erin"], &[], &[]),
            Forbidden,
        ),
        (
            "change removed member",
            change(&left, &[], &["alice"], &[]),
            Forbidden,
        ),
        (
            "change nothing",
            change(&own, &[], &[], &[]),
            InvalidArgument,
        ),
        (
            "change add+remove",
            change(&own, &["carol"], &["carol"], &[]),
            InvalidArgument,
        ),
        (
            "change promote+remove",
            change(&own, &[], &["bob"], &["bob"]),
            InvalidArgument,
        ),
        (
            "change promote stranger",
            change(&own, &[], &[], &["zed"]),
            InvalidArgument,
        ),
        (
            "change as non-admin",
            change(&member_of, &["erin"], &[], &[]),
            Forbidden,
        ),
        (
            "change remove other as non-admin",
            change(&member_of, &[], &["carol"], &[]),
            Forbidden,
        ),
        (
            "change over size",
            change(&own, &["x", "y"], &[], &[]),
            TooManyMembers,
        ),
    ]);
    for (i, (what, body, code)) in cases.into_iter().enumerate() {
        let request_id = 1000 + i as u32;
        let client_msg_id = match &body {
            Body::Send(s) => s.client_msg_id.clone(),
            _ => Vec::new(),
        };
        let out = h.req(&alice, request_id, body);
        let frames = to(&out, &alice.addr);
        let e = frames
            .first()
            .and_then(|f| error(f))
            .unwrap_or_else(|| panic!("{what}: expected {code:?}, got {frames:?}"));
        assert_eq!((e.code, frames.len()), (code as u32, 1), "{what}: {e:?}");
        assert_eq!(frames[0].request_id, request_id, "{what}");
        assert_eq!(e.client_msg_id, client_msg_id, "{what}");
    }
    // Nothing was stored by any of them, and alice's groups are unchanged.
    let batch = sync(&mut h, &alice, &[], 0);
    assert!(batch.messages.is_empty());
    let mut listed: Vec<String> = batch
        .conversations
        .iter()
        .map(|c| c.conversation_id.clone())
        .collect();
    listed.sort();
    let mut expected = vec![own.clone(), member_of.clone()];
    expected.sort();
    assert_eq!(listed, expected);
}

/// SPEC §6, §7, §11: what the server accepts and corrects without an error.
#[test]
fn spec_silent_corrections() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let carol = h.open("carol", "phone", 3);

    // DIRECT: the other user listed twice counts once; title ignored.
    let out = h.req(
        &alice,
        1,
        Body::CreateConversation(pb::CreateConversation {
            kind: pb::ConversationKind::Direct as i32,
            title: "ignored".into(),
            member_user_ids: vec!["bob".into(), "bob".into()],
        }),
    );
    let Some(Body::ConversationCreated(c)) = &reply_to(&out, &alice, 1).body else {
        panic!("expected ConversationCreated");
    };
    let c = c.conversation.as_ref().unwrap();
    assert_eq!((c.conversation_id.as_str(), c.title.as_str()), (DM, ""));

    // GROUP: duplicates count once, the listed creator is left out (and
    // stays the one admin), an empty list makes a group of the creator alone.
    let out = h.req(&alice, 2, create_group_body("t", &["bob", "alice", "bob"]));
    let Some(Body::ConversationCreated(c)) = &reply_to(&out, &alice, 2).body else {
        panic!("expected ConversationCreated");
    };
    let members: Vec<(&str, pb::Role)> = c
        .conversation
        .as_ref()
        .unwrap()
        .members
        .iter()
        .map(|m| (m.user_id.as_str(), m.role()))
        .collect();
    assert_eq!(
        members,
        [("alice", pb::Role::Admin), ("bob", pb::Role::Member)]
    );
    let group = c.conversation.as_ref().unwrap().conversation_id.clone();
    let alone = new_group(&mut h, &alice, 3, &[]);

    // ChangeMembers: adding a member and promoting an admin change nothing;
    // only the requester hears about it.
    let out = h.req(
        &alice,
        4,
        change(&group, &["bob", "bob"], &["zed"], &["alice"]),
    );
    let changed = members_changed(reply_to(&out, &alice, 4));
    assert!(changed.added_user_ids.is_empty() && changed.removed_user_ids.is_empty());
    assert_eq!(out.frames.len(), 1);

    // Sync: cursors of foreign or malformed conversations are ignored and
    // never listed; of several cursors for one conversation the last counts.
    let foreign = new_group(&mut h, &carol, 5, &["dave"]);
    h.send(&carol, &foreign, 6);
    for n in 1..=3 {
        h.send(&alice, &alone, n);
    }
    let batch = sync(
        &mut h,
        &alice,
        &[
            (&foreign, 0),
            ("dm:bob:carol", 0),
            ("not an id", 0),
            (&alone, 0),
            (&alone, 2),
            (&group, 0),
            (DM, 0),
        ],
        0,
    );
    assert!(batch.conversations.is_empty(), "{:?}", batch.conversations);
    assert_eq!(seqs(&batch.messages), [3]);
    assert!(batch.messages.iter().all(|m| m.conversation_id == alone));
    assert!(!batch.has_more);
}

/// SPEC §11 "History and late joiners": a member added later reads the
/// whole history; a removed one reads none of it; re-added, all of it.
#[test]
fn spec_late_joiners_read_the_whole_history() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let dave = h.open("dave", "phone", 4);
    let group = new_group(&mut h, &alice, 1, &["bob"]);
    for n in 1..=3 {
        h.send(&alice, &group, 10 + n);
    }
    h.req(&alice, 2, change(&group, &["dave"], &[], &[]));
    assert_eq!(
        seqs(&history(&mut h, &dave, &group, 0, 0).messages),
        [1, 2, 3]
    );
    let batch = sync(&mut h, &dave, &[], 0);
    assert_eq!(batch.conversations.len(), 1);
    assert_eq!(batch.conversations[0].conversation_id, group);
    assert_eq!(seqs(&batch.messages), [1, 2, 3]);

    h.req(&alice, 3, change(&group, &[], &["dave"], &[]));
    let out = h.req(
        &dave,
        5,
        Body::History(pb::History {
            conversation_id: group.clone(),
            ..Default::default()
        }),
    );
    assert_error(&out, &dave, 5, ErrorCode::Forbidden);
    assert!(sync(&mut h, &dave, &[(&group, 0)], 0).messages.is_empty());

    h.req(&alice, 4, change(&group, &["dave"], &[], &[]));
    assert_eq!(
        seqs(&history(&mut h, &dave, &group, 0, 0).messages),
        [1, 2, 3]
    );
}

/// The router handles every body the protocol's table routes to the backend,
/// and refuses the rest: a body added to the table as a request without a
/// handler (or the reverse) fails here.
#[test]
fn router_handles_exactly_the_backend_requests_of_the_body_table() {
    use palaver_protocol::BodyKind;
    for kind in BodyKind::ALL {
        let mut h = Harness::new();
        let alice = h.open("alice", "phone", 1);
        let out = h.req(&alice, 9, kind.default_body());
        let refused = to(&out, &alice.addr).iter().any(|f| {
            error(f).is_some_and(|e| e.message.ends_with("is not a request the server accepts"))
        });
        assert_eq!(refused, !kind.is_backend_request(), "{kind:?}: {out:?}");
    }
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

#[test]
fn a_batch_is_handled_like_one_request_at_a_time_with_one_append_and_one_lookup_per_run_of_sends() {
    let requests = |alice: &Session, bob: &Session| {
        let mut bad = send_body(DM, 9, "bad");
        if let Body::Send(s) = &mut bad {
            s.client_msg_id = vec![1, 2, 3];
        }
        let carol_dm = direct_conversation_id("alice", "carol");
        vec![
            request(alice, 1, send_body(DM, 1, "one")),
            request(alice, 2, send_body(DM, 2, "two")),
            request(bob, 3, send_body(DM, 3, "three")),
            request(alice, 4, send_body(&carol_dm, 4, "four")),
            // A retry of #2 inside the same run: the original ack, and the
            // original delivered again (as one at a time).
            request(alice, 5, send_body(DM, 2, "two again")),
            request(alice, 6, bad),
            request(
                bob,
                7,
                Body::Receipt(pb::Receipt {
                    conversation_id: DM.into(),
                    kind: pb::ReceiptKind::Read as i32,
                    up_to_seq: 2,
                }),
            ),
            request(alice, 8, send_body(DM, 8, "eight")),
        ]
    };

    let mut batched = Harness::new();
    let mut single = Harness::new();
    let mut outs = Vec::new();
    for h in [&mut batched, &mut single] {
        let alice = h.open("alice", "phone", 1);
        let bob = h.open("bob", "phone", 2);
        h.open("carol", "phone", 3);
        outs.push((requests(&alice, &bob), alice, bob));
    }
    let (reqs, alice, bob) = &outs[0];

    let before = batched.calls().calls.clone();
    let mut out = Output::default();
    let mut progress = palaver_router::logic::BatchProgress::default();
    batched
        .router
        .handle_batch(reqs, &mut out, &mut progress)
        .expect("memory store does not fail");
    assert_eq!(progress.done, reqs.len());
    let delta = |name: &str| batched.calls().count(name) - before.get(name).copied().unwrap_or(0);
    // Two runs of Sends (the Receipt splits them): one append batch and one
    // session lookup each, plus the Receipt's own fan-out lookup.
    assert_eq!(delta("append_messages"), 2, "{:?}", batched.calls().calls);
    assert_eq!(delta("append_message"), 0);
    assert_eq!(delta("sessions_of_users"), 3);

    let mut one_by_one = Output::default();
    for c in &outs[1].0 {
        single
            .router
            .handle(c, &mut one_by_one)
            .expect("memory store does not fail");
    }
    assert_eq!(comparable(&out), comparable(&one_by_one));

    // Consecutive seqs in input order; the retry got #2's seq.
    let acks: Vec<(u32, u64)> = to(&out, &alice.addr)
        .iter()
        .filter_map(|f| ack(f).map(|a| (f.request_id, a.seq)))
        .collect();
    assert_eq!(acks, vec![(1, 1), (2, 2), (4, 1), (5, 2), (8, 4)]);
    let to_bob: Vec<u64> = to(&out, &bob.addr)
        .iter()
        .filter_map(|f| delivered(f).map(|m| m.seq))
        .collect();
    // #2 twice: its retry delivers the original again.
    assert_eq!(to_bob, vec![1, 2, 2, 4]);
    assert!(to(&out, &alice.addr)
        .iter()
        .any(|f| f.request_id == 6 && error(f).is_some()));
}

// ---- Consent before reach (issue 18) ----------------------------------------

fn direct_create(peer: &str) -> Body {
    Body::CreateConversation(pb::CreateConversation {
        kind: pb::ConversationKind::Direct as i32,
        member_user_ids: vec![peer.into()],
        ..Default::default()
    })
}

/// Presence privacy bypass: creating a DIRECT conversation (nothing the
/// victim sees or accepts), or writing into it alone, does not make the
/// victim's presence visible; it counts once both have written (SPEC §10).
#[test]
fn consent_a_direct_conversation_counts_for_presence_once_both_have_written() {
    let mut h = Harness::new();
    let victim = h.open("victim", "phone", 1);
    let mallory = h.open("mallory", "phone", 2);
    let dm = direct_conversation_id("mallory", "victim");
    let out = h.req(&mallory, 1, direct_create("victim"));
    assert!(error(reply_to(&out, &mallory, 1)).is_none());
    h.close(&victim, T0 + 5);

    let hidden = [("victim".to_string(), false, 0)];
    let out = h.req(&mallory, 2, presence_query(&["victim"]));
    assert_eq!(presence_result(reply_to(&out, &mallory, 2)), hidden);
    let out = h.req(&mallory, 3, presence_subscribe(&["victim"], false));
    assert_eq!(presence_result(reply_to(&out, &mallory, 3)), hidden);
    // Writing alone does not count either, however much.
    for n in 10..15 {
        h.send(&mallory, &dm, n);
    }
    let victim = h.open("victim", "phone", 3);
    let out = h.close(&victim, T0 + 20);
    assert!(to(&out, &mallory.addr).is_empty(), "{out:?}");
    let out = h.req(&mallory, 4, presence_query(&["victim"]));
    assert_eq!(presence_result(reply_to(&out, &mallory, 4)), hidden);

    // The victim answers: now both see each other, and the existing
    // subscription produces events from the next change on.
    let victim = h.open("victim", "phone", 4);
    h.send(&victim, &dm, 20);
    let out = h.req(&mallory, 5, presence_query(&["victim"]));
    assert_eq!(
        presence_result(reply_to(&out, &mallory, 5)),
        [("victim".to_string(), true, 0)]
    );
    let out = h.req(&victim, 6, presence_query(&["mallory"]));
    assert_eq!(
        presence_result(reply_to(&out, &victim, 6)),
        [("mallory".to_string(), true, 0)]
    );
    let out = h.close(&victim, T0 + 30);
    assert_eq!(
        presence_event(to(&out, &mallory.addr)[0]),
        ("victim".into(), false, T0 + 30)
    );
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

/// Timing oracle: a PresenceQuery for a hidden user with 10,000
/// conversations does exactly the store work of one for an id never seen
/// (same calls, same items read, same lookups inside the store), and the
/// answers are the same; the asker's own groups are walked, never the
/// target's data.
#[test]
fn a_presence_query_costs_the_same_for_a_hidden_busy_user_and_an_unknown_id() {
    let mut h = Harness::new();
    busy_user(&mut h, "victim", 10_000, 50);
    let _victim = h.open("victim", "phone", 1);
    let mallory = h.open("mallory", "phone", 2);
    // Mallory has groups of her own, none with the victim.
    for i in 0..3 {
        new_group(&mut h, &mallory, 500 + i, &[&format!("sidekick{i}")]);
    }

    let answer = |h: &mut Harness, id: &str, request_id| {
        let before = h.router.store_mut().reset_counts();
        let out = h.req(&mallory, request_id, presence_query(&[id]));
        let (calls, items, lookups) = h.calls().work();
        let result = presence_result(reply_to(&out, &mallory, request_id));
        (result[0].1, result[0].2, calls, items, lookups - before)
    };
    let hidden = answer(&mut h, "victim", 10);
    let unknown = answer(&mut h, "never-seen", 11);
    println!("hidden: {hidden:?}\nunknown: {unknown:?}");
    assert_eq!(
        (&hidden.2, &hidden.3, hidden.4),
        (&unknown.2, &unknown.3, unknown.4),
        "the same work for a hidden user with 10,000 conversations and an unknown id"
    );
    assert_eq!((hidden.0, hidden.1), (false, 0));
    assert_eq!((unknown.0, unknown.1), (false, 0));
    // One direct-conversation lookup plus one probe per group of mallory.
    assert_eq!(hidden.4, 1 + 3);
}

/// Presence fan-out cost: one user watching another from 1,000
/// connections; each change of the watched user checks visibility once (one
/// pair: the watching user), and that check's work does not grow with the
/// watched user's conversations.
#[test]
fn a_presence_change_checks_each_watching_user_once_whatever_the_watched_users_conversations() {
    let mut h = Harness::new();
    let target = h.open("target", "phone", 1);
    let watcher_conns: Vec<Session> = (0..1000)
        .map(|i| h.open("watcher", &format!("d{i}"), 10 + i))
        .collect();
    let group = h.create_group(&target, &["watcher"]);
    for (i, w) in watcher_conns.iter().enumerate() {
        h.req(w, 2000 + i as u32, presence_subscribe(&["target"], false));
    }
    let change = |h: &mut Harness, at_ms| {
        let before = h.router.store_mut().reset_counts();
        let out = h.close(&target, at_ms);
        let (calls, items, lookups) = h.calls().work();
        let events = watcher_conns
            .iter()
            .filter(|w| to(&out, &w.addr).len() == 1)
            .count();
        (events, calls, items, lookups - before)
    };
    let few = change(&mut h, T0 + 1);
    h.opened(&target);
    busy_user(&mut h, "target", 10_000, 100);
    let many = change(&mut h, T0 + 2);
    println!("10 conversations: {few:?}\n10,000 more: {many:?}");
    assert_eq!(few.0, 1000, "every watching connection gets the event");
    assert_eq!(many.0, 1000);
    assert_eq!((&few.1, &few.2, few.3), (&many.1, &many.2, many.3));
    assert_eq!(h.calls().count("presence_links"), 1);
    assert!(
        few.2.contains(&("presence_links", 1)),
        "one pair for 1,000 connections of one user: {:?}",
        few.2
    );
    let _ = group;
}

/// Group-notification flood: a stranger may add a user to groups only a
/// few times a day (all strangers together), one adder a few more; the
/// user's contacts are not limited by the strangers' budget; and churn in
/// a big group costs the other members bytes per change, not per member.
#[test]
fn group_adds_are_limited_per_day_and_a_groups_changes_per_hour() {
    let config = RouterConfig::default();
    let mut h = Harness::new();
    let victim = h.open("victim", "phone", 1);
    let mallory = h.open("mallory", "phone", 2);
    let eve = h.open("eve", "phone", 3);
    let friend = h.open("friend", "phone", 4);
    let dm = direct_conversation_id("friend", "victim");
    h.send(&friend, &dm, 1);
    h.send(&victim, &dm, 2);

    let strangers = config.max_group_adds_by_strangers_per_day;
    for i in 0..strangers {
        let adder = if i % 2 == 0 { &mallory } else { &eve };
        new_group(&mut h, adder, 100 + i, &["victim"]);
    }
    let out = h.req(&mallory, 200, create_group_body("more", &["victim"]));
    let e = assert_error(&out, &mallory, 200, ErrorCode::QuotaExceeded);
    assert!(e.message.contains("victim"), "{e:?}");
    let out = h.req(&eve, 201, create_group_body("more", &["victim", "other"]));
    assert_error(&out, &eve, 201, ErrorCode::QuotaExceeded);
    // Nothing was created for the refused requests: the victim is in
    // exactly the groups allowed.
    use palaver_router::store::UserStore as _;
    let groups = h.router.store_mut().group_counts(&["victim".into()]);
    assert_eq!(groups.unwrap(), [strangers as usize]);
    // A neighbour is unaffected: mallory can still add someone else.
    new_group(&mut h, &mallory, 202, &["neighbour"]);
    // A contact is not held back by the strangers' budget, only by its own.
    for i in 0..config.max_group_adds_per_adder_per_day {
        new_group(&mut h, &friend, 300 + i, &["victim"]);
    }
    let out = h.req(&friend, 399, create_group_body("one more", &["victim"]));
    assert_error(&out, &friend, 399, ErrorCode::QuotaExceeded);
    // The next UTC day the budgets are there again.
    h.clock.advance(24 * 60 * 60 * 1000);
    new_group(&mut h, &mallory, 400, &["victim"]);
    new_group(&mut h, &friend, 401, &["victim"]);

    // Churn in mallory's big group: every change reaches the victim with
    // the whole member list (SPEC §11 keeps v1's MembersChanged), so the
    // group's changes are limited per hour: the victim hears of at most
    // that many, and a neighbouring group is not held back.
    let members: Vec<String> = (0..997).map(|i| format!("crowd{i}")).collect();
    let mut refs: Vec<&str> = members.iter().map(String::as_str).collect();
    refs.push("victim");
    let big = new_group(&mut h, &mallory, 402, &refs);
    let limit = config.max_membership_changes_per_group_per_hour as u32;
    let mut victim_frames = 0;
    let mut victim_bytes = 0;
    for i in 0..limit + 5 {
        // A new sybil each time: the per-adder limit is not what binds.
        let sybil = format!("sybil{}", i / 2);
        // Past the limit only adds: a removal of a user never added would
        // change nothing (answered, not counted).
        let (add, remove): (&[&str], &[&str]) = if i % 2 == 0 || i >= limit {
            (&[&sybil], &[])
        } else {
            (&[], &[&sybil])
        };
        let out = h.req(&mallory, 1000 + i, change(&big, add, remove, &[]));
        let frames = to(&out, &victim.addr);
        if i < limit {
            assert_eq!(frames.len(), 1, "change {i}");
            let got = members_changed(frames[0]);
            assert!(
                got.conversation.as_ref().unwrap().members.len() >= 998,
                "the whole list"
            );
            use prost::Message as _;
            victim_bytes += frames[0].encoded_len();
            victim_frames += 1;
        } else {
            let e = assert_error(&out, &mallory, 1000 + i, ErrorCode::QuotaExceeded);
            assert!(e.message.contains("this hour"), "{e:?}");
            assert!(frames.is_empty());
        }
    }
    println!(
        "{} changes asked of a 1,000-member group in an hour: {victim_frames} reached a member ({victim_bytes} bytes)",
        limit + 5
    );
    let other = new_group(&mut h, &mallory, 1500, &["neighbour"]);
    let out = h.req(&mallory, 1501, change(&other, &["sybil"], &[], &[]));
    assert!(matches!(
        reply_to(&out, &mallory, 1501).body,
        Some(Body::MembersChanged(_))
    ));
    // The next hour the group may change again.
    h.clock.advance(60 * 60 * 1000);
    let out = h.req(&mallory, 1600, change(&big, &["sybil2"], &[], &[]));
    assert_eq!(to(&out, &victim.addr).len(), 1);
}

/// A removed member gets nothing more of the group: no ReceiptUpdate for
/// the messages it sent while a member, no Typing, no Deliver, no presence
/// event through it.
#[test]
fn a_removed_member_gets_nothing_more_of_the_group() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let carol = h.open("carol", "phone", 3);
    let group = h.create_group(&alice, &["bob", "carol"]);
    h.send(&carol, &group, 1);
    h.send(&carol, &group, 2);
    h.req(&carol, 3, presence_subscribe(&["bob"], false));
    let out = h.req(&alice, 4, change(&group, &[], &["carol"], &[]));
    assert_eq!(to(&out, &carol.addr).len(), 1, "the removal itself");

    let read = Body::Receipt(pb::Receipt {
        conversation_id: group.clone(),
        kind: pb::ReceiptKind::Read as i32,
        up_to_seq: 2,
    });
    let out = h.req(&bob, 5, read);
    assert!(to(&out, &carol.addr).is_empty(), "{:?}", out.frames);
    let typing = Body::Typing(pb::Typing {
        conversation_id: group.clone(),
        active: true,
        user_id: String::new(),
    });
    let out = h.req(&bob, 6, typing);
    assert!(to(&out, &carol.addr).is_empty());
    assert_eq!(to(&out, &alice.addr).len(), 1);
    let out = h.send(&bob, &group, 7);
    assert!(to(&out, &carol.addr).is_empty());
    let out = h.close(&bob, T0 + 9);
    assert!(to(&out, &carol.addr).is_empty());
}

/// Every member hears of a change with the whole list after it, each
/// member once with its final role: here the added user is also the heir
/// of the admin who left in the same request.
#[test]
fn members_changed_carries_the_whole_list_to_every_member() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let zoe = h.open("zoe", "phone", 2);
    let group = h.create_group(&alice, &["zoe"]);
    let out = h.req(&alice, 3, change(&group, &["aaron"], &["alice"], &[]));
    let whole = members_changed(reply_to(&out, &alice, 3));
    let want = [
        ("aaron".to_string(), pb::Role::Admin),
        ("zoe".to_string(), pb::Role::Member),
    ];
    assert_eq!(roles(whole), want);
    let bystander = members_changed(to(&out, &zoe.addr)[0]);
    assert_eq!(roles(bystander), want);
    assert_eq!(bystander.added_user_ids, ["aaron"]);
    assert_eq!(bystander.removed_user_ids, ["alice"]);
}
