//! Chat through the gateway and the embedded engine: 1:1, a group of three,
//! receipts, offline → reconnect → Sync (explicit and via Hello.resume),
//! replacement of an older connection of the same device.

mod common;

use common::*;
use palaver_protocol::pb::{self, frame::Body};
use palaver_testkit::client::{text_send, Client};

fn deliver_of(f: &pb::Frame) -> Option<&pb::Message> {
    match &f.body {
        Some(Body::Deliver(d)) => d.message.as_ref(),
        _ => None,
    }
}

fn send_and_ack(c: &mut Client, conv: &str, text: &str) -> pb::SendAck {
    let id = c.request(text_send(conv, text)).unwrap();
    let f = c.recv_until(T, "SendAck", |f| f.request_id == id).unwrap();
    match f.body {
        Some(Body::SendAck(a)) => a,
        other => panic!("expected SendAck, got {other:?}"),
    }
}

fn next_deliver(c: &mut Client) -> pb::Message {
    let f = c
        .recv_until(T, "Deliver", |f| deliver_of(f).is_some())
        .unwrap();
    deliver_of(&f).unwrap().clone()
}

#[test]
fn two_users_chat_one_to_one_with_receipts() {
    let t = start(|_| {});
    let mut alice = t.login("alice", "phone");
    let mut bob = t.login("bob", "phone");
    let conv = palaver_protocol::direct_conversation_id("alice", "bob");

    let ack = send_and_ack(&mut alice, &conv, "hi bob");
    assert_eq!(ack.seq, 1);
    let m = next_deliver(&mut bob);
    assert_eq!(m.sender_user_id, "alice");
    assert_eq!(m.body, b"hi bob");
    assert_eq!(m.seq, 1);

    let ack = send_and_ack(&mut bob, &conv, "hello alice");
    assert_eq!(ack.seq, 2);
    let m = next_deliver(&mut alice);
    assert_eq!((m.sender_user_id.as_str(), m.seq), ("bob", 2));

    // bob reads alice's message: alice learns it.
    bob.request(Body::Receipt(pb::Receipt {
        conversation_id: conv.clone(),
        kind: pb::ReceiptKind::Read as i32,
        up_to_seq: 1,
    }))
    .unwrap();
    let f = alice
        .recv_until(T, "ReceiptUpdate", |f| {
            matches!(f.body, Some(Body::ReceiptUpdate(_)))
        })
        .unwrap();
    match f.body {
        Some(Body::ReceiptUpdate(r)) => {
            assert_eq!(r.user_id, "bob");
            assert_eq!(r.up_to_seq, 1);
            assert_eq!(r.kind, pb::ReceiptKind::Read as i32);
        }
        _ => unreachable!(),
    }
    // Typing is relayed.
    bob.request(Body::Typing(pb::Typing {
        conversation_id: conv.clone(),
        active: true,
        user_id: String::new(),
    }))
    .unwrap();
    let f = alice
        .recv_until(T, "Typing", |f| matches!(f.body, Some(Body::Typing(_))))
        .unwrap();
    assert!(matches!(f.body, Some(Body::Typing(ref ty)) if ty.user_id == "bob" && ty.active));
}

#[test]
fn three_users_chat_in_a_group() {
    let t = start(|_| {});
    let mut alice = t.login("alice", "phone");
    let mut bob = t.login("bob", "phone");
    let mut carol = t.login("carol", "phone");

    let id = alice
        .request(Body::CreateConversation(pb::CreateConversation {
            kind: pb::ConversationKind::Group as i32,
            title: "trio".into(),
            member_user_ids: vec!["bob".into(), "carol".into()],
        }))
        .unwrap();
    let f = alice
        .recv_until(T, "ConversationCreated", |f| f.request_id == id)
        .unwrap();
    let group = match f.body {
        Some(Body::ConversationCreated(c)) => c.conversation.unwrap(),
        other => panic!("expected ConversationCreated, got {other:?}"),
    };
    assert_eq!(group.members.len(), 3);
    let gid = group.conversation_id.clone();

    send_and_ack(&mut alice, &gid, "hello group");
    for c in [&mut bob, &mut carol] {
        let m = next_deliver(c);
        assert_eq!(
            (m.conversation_id.as_str(), m.body.as_slice()),
            (gid.as_str(), &b"hello group"[..])
        );
    }
    send_and_ack(&mut carol, &gid, "hi from carol");
    for c in [&mut alice, &mut bob] {
        let m = next_deliver(c);
        assert_eq!((m.sender_user_id.as_str(), m.seq), ("carol", 2));
    }
}

#[test]
fn offline_user_catches_up_with_sync_and_resume() {
    let t = start(|_| {});
    let mut alice = t.login("alice", "phone");
    let conv = palaver_protocol::direct_conversation_id("alice", "bob");
    {
        let mut bob = t.login("bob", "phone");
        send_and_ack(&mut alice, &conv, "one");
        assert_eq!(next_deliver(&mut bob).seq, 1);
    }
    // bob is offline now (wait until the gateway has seen the close).
    wait_until(T, "bob's connection to close", || t.gw().connections() == 1);
    send_and_ack(&mut alice, &conv, "two");
    send_and_ack(&mut alice, &conv, "three");

    // Explicit Sync with a cursor.
    let mut bob = t.login("bob", "phone");
    let id = bob
        .request(Body::Sync(pb::Sync {
            cursors: vec![pb::Cursor {
                conversation_id: conv.clone(),
                after_seq: 1,
            }],
            limit: 0,
        }))
        .unwrap();
    let f = bob
        .recv_until(T, "SyncBatch", |f| f.request_id == id)
        .unwrap();
    match f.body {
        Some(Body::SyncBatch(b)) => {
            let got: Vec<(u64, &[u8])> = b
                .messages
                .iter()
                .map(|m| (m.seq, m.body.as_slice()))
                .collect();
            assert_eq!(got, vec![(2, &b"two"[..]), (3, &b"three"[..])]);
            assert!(!b.has_more);
        }
        other => panic!("expected SyncBatch, got {other:?}"),
    }
    drop(bob);
    wait_until(T, "bob's connection to close", || t.gw().connections() == 1);
    send_and_ack(&mut alice, &conv, "four");

    // Hello.resume starts the sync right after Welcome.
    let mut bob = t.connect();
    let hello = pb::Hello {
        protocol_version: 1,
        token: t.token("bob"),
        device_id: "phone".into(),
        resume: vec![pb::Cursor {
            conversation_id: conv.clone(),
            after_seq: 3,
        }],
        ..Default::default()
    };
    bob.hello_with(hello, T).unwrap();
    let f = bob
        .recv_until(T, "SyncBatch", |f| {
            matches!(f.body, Some(Body::SyncBatch(_)))
        })
        .unwrap();
    match f.body {
        Some(Body::SyncBatch(b)) => {
            assert_eq!(b.messages.len(), 1);
            assert_eq!(b.messages[0].body, b"four");
        }
        _ => unreachable!(),
    }
}

#[test]
fn same_device_reconnecting_replaces_the_old_connection() {
    let t = start(|_| {});
    let mut old = t.login("alice", "phone");
    let mut new = t.login("alice", "phone");
    let frames = old.expect_close(T).unwrap();
    assert!(
        frames.iter().any(|f| matches!(&f.body,
            Some(Body::GoAway(g)) if g.reason == pb::GoAwayReason::Replaced as i32)),
        "expected GoAway(REPLACED), got {frames:?}"
    );
    assert_healthy(&mut new);
    // Messages now reach the new connection.
    let mut bob = t.login("bob", "phone");
    let conv = palaver_protocol::direct_conversation_id("alice", "bob");
    send_and_ack(&mut bob, &conv, "still there?");
    assert_eq!(next_deliver(&mut new).body, b"still there?");
}

#[test]
fn a_sync_batch_larger_than_the_outbound_limit_still_arrives() {
    let t = start(|c| {
        c.limits.max_outbound_bytes = 128 * 1024;
        c.limits.max_sends_per_second = 100_000;
    });
    let mut alice = t.login("alice", "phone");
    let conv = palaver_protocol::direct_conversation_id("alice", "bob");
    let body = "y".repeat(2000);
    for _ in 0..150 {
        send_and_ack(&mut alice, &conv, &body);
    }
    // One SyncBatch of ~300 KB: more than the limit, but nothing else is queued.
    let mut bob = t.login("bob", "phone");
    let id = bob
        .request(Body::Sync(pb::Sync {
            cursors: vec![],
            limit: 500,
        }))
        .unwrap();
    let f = bob
        .recv_until(T, "SyncBatch", |f| f.request_id == id)
        .unwrap();
    match f.body {
        Some(Body::SyncBatch(b)) => assert_eq!(b.messages.len(), 150),
        other => panic!("expected SyncBatch, got {other:?}"),
    }
    assert_healthy(&mut bob);
    assert_eq!(
        t.metric(|m| m
            .slow_consumer_disconnects
            .load(std::sync::atomic::Ordering::Relaxed) as i64),
        0
    );
}

#[test]
fn two_gateways_share_one_port() {
    let a = start(|c| c.gateway_id = "gw-a".into());
    let port = a.addr;
    let b = start(move |c| {
        c.gateway_id = "gw-b".into();
        c.listen = port;
    });
    assert_eq!(a.addr, b.addr);
    // Both gateways use the same dev CA only if they share a data dir; they
    // do not, so trust either CA and count who answered.
    let mut seen = std::collections::HashSet::new();
    let mut clients = Vec::new();
    for i in 0..40 {
        let user = format!("u{i}");
        for t in [&a, &b] {
            if let Ok(mut c) = Client::connect(&t.opts()) {
                let w = c.hello(&t.token(&user), "phone", T).unwrap();
                seen.insert(w.session_id.split('/').next().unwrap().to_string());
                clients.push(c);
                break;
            }
        }
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "the kernel spreads connections over both gateways"
    );
}
