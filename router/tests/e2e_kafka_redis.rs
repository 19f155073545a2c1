//! End to end on real Apache Kafka and real Redis: `palaver-router`
//! processes (this crate's binary), in-process gateways with the Kafka/Redis
//! bridge, and real TLS clients (palaver-tools' blocking client). The fault
//! matrix on the same stack is `tests/fault_matrix.rs`.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

mod e2e;

use std::time::{Duration, Instant};

use e2e::*;
use palaver_protocol::pb::{self, frame::Body};
use palaver_router::kafka::{records, PUSH_TOPIC};
use palaver_testkit::client::Client;
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;

/// The shared chat suite (`palaver_testkit::chat`, also run against the
/// embedded engine by the gateway's `tests/chat.rs`) across two gateways:
/// 1:1 with receipts and typing, group fan-out, duplicate client_msg_id,
/// order under concurrent senders, offline catch-up by Sync and resume —
/// on `cluster` or not.
fn chat_checks(cluster: bool) {
    let mut s = Stack::start(cluster, 1);
    s.add_gateway("gw1");
    s.add_gateway("gw2");
    palaver_testkit::chat::run_all(&s);
}

#[test]
fn chat_across_gateways_standalone_redis() {
    chat_checks(false);
}

#[test]
fn chat_across_gateways_redis_cluster() {
    chat_checks(true);
}

/// The shared channel suite (`palaver_testkit::channels`, also run on the
/// embedded engine by the gateway's `tests/chat.rs`) across two gateways:
/// one post per message through `palaver.channels`, read by both.
#[test]
fn channels_across_gateways() {
    let mut s = Stack::start(false, 1);
    s.add_gateway("gw1");
    s.add_gateway("gw2");
    palaver_testkit::channels::run_all(&s);
}

/// A registered phone goes offline → push event on palaver.push →
/// reconnect with resume → sync with no gap.
#[test]
fn offline_user_gets_push_then_syncs_without_gap() {
    let mut s = Stack::start(false, 1);
    let g1 = s.add_gateway("gw1");
    let g2 = s.add_gateway("gw2");
    let mut alice = s.login(g1, "alice", "phone");
    let dm = palaver_protocol::direct_conversation_id("alice", "bob");
    // A shared group lets alice see bob's presence below (SPEC §10: the
    // direct conversation counts only once bob wrote in it too).
    group_of(&mut alice, &["bob"]);
    {
        let mut bob = s.login(g2, "bob", "phone");
        // Bob's phone registers for pushes (through Kafka to the router).
        let id = bob
            .request(Body::RegisterPushToken(pb::RegisterPushToken {
                platform: pb::PushPlatform::Fcm.into(),
                token: "fcm-bob-phone".into(),
                ..Default::default()
            }))
            .unwrap();
        let f = bob
            .recv_until(T, "PushTokenRegistered", |f| f.request_id == id)
            .unwrap();
        assert!(
            matches!(f.body, Some(Body::PushTokenRegistered(_))),
            "{f:?}"
        );
        assert_eq!(send_reliably(&mut alice, &dm, "m1").seq, 1);
        assert_eq!(next_deliver(&mut bob).seq, 1);
    } // bob disconnects
    let push_consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", s.kafka.bootstrap())
        .set("group.id", "push-test")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    push_consumer.subscribe(&[PUSH_TOPIC]).unwrap();

    // Wait until bob is registered offline (his close is flushed), then send.
    // Asked by alice's other device: presence is visible to those who share
    // a conversation that counts (SPEC §10), here the group.
    let mut check = s.login(g1, "alice", "tablet");
    let deadline = Instant::now() + T;
    loop {
        let id = check
            .request(Body::PresenceQuery(pb::PresenceQuery {
                user_ids: vec!["bob".into()],
            }))
            .unwrap();
        let f = check
            .recv_until(T, "PresenceResult", |f| f.request_id == id)
            .unwrap();
        let Some(Body::PresenceResult(r)) = f.body else {
            panic!("{f:?}")
        };
        if !r.presences[0].online {
            assert!(r.presences[0].last_seen_ms > 0);
            break;
        }
        assert!(Instant::now() < deadline, "bob never went offline");
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 2..=4 {
        assert_eq!(send_reliably(&mut alice, &dm, &format!("m{i}")).seq, i);
    }

    // One push event for bob (coalesced: the first offline message).
    let deadline = Instant::now() + T;
    let mut pushes = Vec::new();
    while Instant::now() < deadline && pushes.is_empty() {
        if let Some(Ok(m)) = push_consumer.poll(Duration::from_millis(200)) {
            let rec = records::PushRecord::decode(m.payload().unwrap()).unwrap();
            pushes.extend(rec.events);
        }
    }
    assert_eq!(pushes.len(), 1, "{pushes:?}");
    assert_eq!(
        (
            pushes[0].user_id.as_str(),
            pushes[0].conversation_id.as_str(),
            pushes[0].seq
        ),
        ("bob", dm.as_str(), 2)
    );
    assert!(pushes[0].online_device_ids.is_empty(), "{pushes:?}");

    // bob comes back on the other gateway with his cursor: everything after
    // seq 1 arrives, in order, no gap.
    let (mut bob, _) = s.login_with(
        g1,
        "bob",
        "phone",
        vec![pb::Cursor {
            conversation_id: dm.clone(),
            after_seq: 1,
        }],
    );
    let f = bob
        .recv_until(T, "SyncBatch", |f| {
            matches!(f.body, Some(Body::SyncBatch(_)))
        })
        .unwrap();
    let Some(Body::SyncBatch(batch)) = f.body else {
        unreachable!()
    };
    let seqs: Vec<u64> = batch.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![2, 3, 4]);
    assert!(!batch.has_more);
    // Live again: the next message is delivered.
    assert_eq!(send_reliably(&mut alice, &dm, "m5").seq, 5);
    assert_eq!(next_deliver(&mut bob).seq, 5);
}

fn presence_of(c: &mut Client, user: &str) -> pb::Presence {
    c.presence(user, T).expect("PresenceResult")
}

fn next_presence_event(c: &mut Client) -> pb::Presence {
    let f = c
        .recv_until(T, "PresenceEvent", |f| {
            matches!(f.body, Some(Body::PresenceEvent(_)))
        })
        .unwrap();
    match f.body {
        Some(Body::PresenceEvent(e)) => e.presence.unwrap(),
        _ => unreachable!(),
    }
}

/// A gateway that stalls past its lease (a paused VM) is taken for dead:
/// the other reaps it and its users go offline. When it runs again it
/// registers again and reopens its live sessions: its users are back online
/// (watchers get the event) and messages reach their still-open connections
/// live, not only a later Sync. A phone that reconnected through the other
/// gateway during the stall keeps its new connection; its old one is the
/// one replaced.
#[test]
fn a_gateway_stalled_past_its_lease_opens_its_sessions_again() {
    let mut s = Stack::start(false, 1);
    let g1 = s.add_gateway("gw1");
    let g2 = s.add_gateway("gw2");
    let mut alice = s.login(g1, "alice", "phone");
    let mut bob = s.login(g2, "bob", "phone");
    let mut carol_old = s.login(g2, "carol", "phone");
    let dm = palaver_protocol::direct_conversation_id("alice", "bob");
    // A shared group: presence is visible (SPEC §10; their direct
    // conversation counts only once both wrote in it).
    group_of(&mut alice, &["bob"]);
    assert_eq!(send_reliably(&mut alice, &dm, "before").seq, 1);
    assert_eq!(next_deliver(&mut bob).seq, 1);
    assert!(alice.subscribe_presence("bob", T).unwrap().online);

    s.gateways[g2].pause().expect("SIGSTOP gw2");
    // gw1 reaps gw2 once its lease (3 s) has run out.
    let e = next_presence_event(&mut alice);
    assert_eq!((e.user_id.as_str(), e.online), ("bob", false));
    // carol's phone gives up on gw2 and connects through gw1.
    let mut carol_new = s.login(g1, "carol", "phone");
    s.gateways[g2].resume().expect("SIGCONT gw2");
    let e = next_presence_event(&mut alice);
    assert_eq!(
        (e.user_id.as_str(), e.online),
        ("bob", true),
        "bob's session opened again"
    );

    assert_eq!(send_reliably(&mut alice, &dm, "after").seq, 2);
    assert_eq!(
        next_deliver(&mut bob).seq,
        2,
        "delivered live to bob's connection"
    );
    let last = carol_old
        .expect_close(T)
        .expect("carol's old connection closed");
    assert!(
        last.iter().any(|f| matches!(&f.body,
            Some(Body::GoAway(g)) if g.reason == pb::GoAwayReason::Replaced as i32)),
        "the old connection was replaced: {last:?}"
    );
    let to_carol = palaver_protocol::direct_conversation_id("alice", "carol");
    send_reliably(&mut alice, &to_carol, "still there?");
    assert_eq!(
        next_deliver(&mut carol_new).body,
        b"still there?",
        "the new connection stays"
    );
}

/// Presence across gateways; a crashed gateway's users go offline within
/// the lease time, with events to watchers on other gateways.
#[test]
fn presence_across_gateways_and_gateway_crash() {
    let mut s = Stack::start(false, 1);
    let g1 = s.add_gateway("gw1");
    let g2 = s.add_gateway("gw2");
    let mut alice = s.login(g1, "alice", "phone");
    // Presence is visible to those who share a conversation (SPEC §10).
    group_of(&mut alice, &["bob"]);
    assert!(!alice.subscribe_presence("bob", T).unwrap().online);

    let bob = s.login(g2, "bob", "phone");
    let e = next_presence_event(&mut alice);
    assert_eq!((e.user_id.as_str(), e.online), ("bob", true));
    assert!(presence_of(&mut alice, "bob").online);

    // A clean disconnect: offline event with last seen.
    drop(bob);
    let e = next_presence_event(&mut alice);
    assert_eq!((e.user_id.as_str(), e.online), ("bob", false));
    assert!(e.last_seen_ms > 0);

    // bob back on gw2, then gw2 crashes.
    let _bob = s.login(g2, "bob", "phone");
    assert!(next_presence_event(&mut alice).online);
    // Nothing tells Redis that gw2 is gone: only its lease (3 s) running out,
    // which gw1's tick notices.
    s.crash_gateway(g2);
    let e = next_presence_event(&mut alice);
    assert_eq!((e.user_id.as_str(), e.online), ("bob", false));
    assert!(e.last_seen_ms > 0);
    assert!(!presence_of(&mut alice, "bob").online);
}

/// Issue 18 through the cluster: a member removed by a ChangeMembers that
/// its sender follows with a close at once (one write, close_notify + FIN)
/// gets the removal and nothing of the close: no PresenceEvent with the
/// remover's last seen. A member who stays, on the same gateway, hears the
/// close.
#[test]
fn a_member_removed_with_the_close_in_one_write_hears_nothing_of_the_close() {
    let mut s = Stack::start(false, 1);
    let g1 = s.add_gateway("gw1");
    let g2 = s.add_gateway("gw2");
    for round in 0..3 {
        let (v, w, k) = (
            format!("victim{round}"),
            format!("removed{round}"),
            format!("stays{round}"),
        );
        let mut victim = s.login(g1, &v, "phone");
        let mut removed = s.login(g2, &w, "phone");
        let mut stays = s.login(g2, &k, "phone");
        let group = group_of(&mut victim, &[&w, &k]);
        assert!(removed.subscribe_presence(&v, T).unwrap().online);
        assert!(stays.subscribe_presence(&v, T).unwrap().online);

        let remove = pb::Frame {
            request_id: 7,
            body: Some(Body::ChangeMembers(pb::ChangeMembers {
                conversation_id: group.clone(),
                remove_user_ids: vec![w.clone()],
                ..Default::default()
            })),
        };
        victim.send_then_close(&[remove]).unwrap();
        let e = next_presence_event(&mut stays);
        assert_eq!((e.user_id.as_str(), e.online), (v.as_str(), false));
        // The removed member's gateway fanned the same change out in the
        // same call: anything for it is there by now (read what arrived).
        let mut got = Vec::new();
        let is_removal = |b: &Option<Body>| matches!(b, Some(Body::MembersChanged(m)) if m.removed_user_ids == [w.clone()]);
        let deadline = Instant::now() + T;
        while !got.iter().any(is_removal) {
            let left = deadline.saturating_duration_since(Instant::now());
            match removed.recv(left).unwrap() {
                Some(f) => got.push(f.body),
                None => panic!("round {round}: no removal for the removed member: {got:?}"),
            }
        }
        while let Some(f) = removed.recv(Duration::from_millis(300)).unwrap() {
            got.push(f.body);
        }
        assert!(
            !got.iter()
                .any(|b| matches!(b, Some(Body::PresenceEvent(_)))),
            "round {round}: the removed member heard of the close: {got:?}"
        );
    }
}

/// SPEC §4 across gateways: mallory holds the cap (16 devices) on gw1; gw1
/// refuses a 17th device at Hello; gw2, which holds none of hers, welcomes
/// one, and closes it with `Error{TOO_MANY_CONNECTIONS}` (request_id 0) once
/// the session registry shows it is one too many. A device of the 16 moving
/// to gw2 replaces its connection and stays. Others are unaffected.
#[test]
fn a_connection_over_the_account_cap_across_gateways_is_closed() {
    let mut s = Stack::start(false, 1);
    let g1 = s.add_gateway("gw1");
    let g2 = s.add_gateway("gw2");
    let mut neighbour = s.login(g2, "neighbour", "phone");
    let mut held: Vec<Client> = (0..16)
        .map(|i| s.login(g1, "mallory", &format!("d{i}")))
        .collect();

    let mut c = Client::connect(&s.gateway_addrs()[g1]).expect("TLS connect");
    let token = palaver_credentials::auth::mint_hs256(&s.secret(), "mallory", None, 3600);
    match c.hello(&token, "d16", T) {
        Err(palaver_testkit::client::ClientError::Server(e)) => {
            assert_eq!(e.code, pb::ErrorCode::TooManyConnections as u32)
        }
        other => panic!("a 17th device on the same gateway: {other:?}"),
    }

    // gw1's sessions reach Redis within its flush interval (50 ms here).
    std::thread::sleep(Duration::from_millis(500));
    let mut extra = s.login(g2, "mallory", "d16");
    let frames = extra
        .expect_close(T)
        .expect("the 17th connection is closed");
    assert!(
        frames.iter().any(|f| f.request_id == 0
            && matches!(&f.body, Some(Body::Error(e))
                if e.code == pb::ErrorCode::TooManyConnections as u32)),
        "{frames:?}"
    );

    // d3 moves to gw2: not one more.
    let mut moved = s.login(g2, "mallory", "d3");
    let frames = held[3]
        .expect_close(T)
        .expect("d3's old connection is replaced");
    assert!(
        frames
            .iter()
            .any(|f| matches!(&f.body, Some(Body::GoAway(g))
            if g.reason == pb::GoAwayReason::Replaced as i32)),
        "{frames:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    moved.ping(1, T).expect("the moved device stays");
    held[0].ping(2, T).expect("the others stay");
    neighbour.ping(3, T).expect("a neighbour is unaffected");
}
