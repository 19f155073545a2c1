//! Presence privacy (SPEC §10) through a real gateway on the embedded engine:
//! by default a user sees presence and last seen only of users sharing a
//! conversation with them; everyone else looks like a user never seen, and a
//! subscription to them yields no events. `presence_visibility = everyone`
//! turns the rule off.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use palaver_protocol::pb::{self, frame::Body};
use palaver_router::PresenceVisibility;
use palaver_testkit::client::Client;

fn presences(c: &mut Client, body: Body) -> Vec<(String, bool, i64)> {
    let id = c.request(body).unwrap();
    let f = c
        .recv_until(T, "PresenceResult", |f| f.request_id == id)
        .unwrap();
    match f.body {
        Some(Body::PresenceResult(r)) => r
            .presences
            .into_iter()
            .map(|p| (p.user_id, p.online, p.last_seen_ms))
            .collect(),
        other => panic!("expected PresenceResult, got {other:?}"),
    }
}

fn query(c: &mut Client, ids: &[&str]) -> Vec<(String, bool, i64)> {
    presences(
        c,
        Body::PresenceQuery(pb::PresenceQuery {
            user_ids: ids.iter().map(|s| s.to_string()).collect(),
        }),
    )
}

fn subscribe(c: &mut Client, ids: &[&str]) -> Vec<(String, bool, i64)> {
    presences(
        c,
        Body::PresenceSubscribe(pb::PresenceSubscribe {
            user_ids: ids.iter().map(|s| s.to_string()).collect(),
            unsubscribe: false,
        }),
    )
}

fn create_group(c: &mut Client, members: &[&str]) -> String {
    c.create_group("team", members, T)
        .expect("ConversationCreated")
        .conversation_id
}

/// Presence events received within `wait`, other frames dropped.
fn events(c: &mut Client, wait: Duration) -> Vec<(String, bool, i64)> {
    let deadline = std::time::Instant::now() + wait;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match c.recv(left).unwrap() {
            Some(pb::Frame {
                body: Some(Body::PresenceEvent(pb::PresenceEvent { presence: Some(p) })),
                ..
            }) => got.push((p.user_id, p.online, p.last_seen_ms)),
            Some(_) => {}
            None => return got,
        }
    }
}

#[test]
fn a_stranger_sees_nothing_a_group_member_sees_online_and_last_seen() {
    let t = start(|_| {});
    let mut alice = t.login("alice", "phone");
    let mut mallory = t.login("mallory", "phone");
    create_group(&mut alice, &["bob"]);

    // Bob was online once: he has a last seen.
    let bob = t.login("bob", "phone");
    drop(bob);
    let mut last_seen = 0;
    wait_until(T, "bob's last seen", || {
        let got = query(&mut alice, &["bob"]);
        last_seen = got[0].2;
        !got[0].1 && last_seen > 0
    });

    // Mallory shares nothing with alice or bob: both look never seen, though
    // alice is online and bob has a last seen.
    assert_eq!(
        query(&mut mallory, &["alice", "bob", "nobody"]),
        [
            ("alice".into(), false, 0),
            ("bob".into(), false, 0),
            ("nobody".into(), false, 0)
        ]
    );
    // A subscription is answered the same way...
    assert_eq!(
        subscribe(&mut mallory, &["bob"]),
        [("bob".into(), false, 0)]
    );
    assert_eq!(
        subscribe(&mut alice, &["bob"]),
        [("bob".into(), false, last_seen)]
    );

    // ...and when bob connects, only alice hears of it.
    let _bob = t.login("bob", "tablet");
    let mut alice_events = Vec::new();
    wait_until(T, "alice's event", || {
        alice_events.extend(events(&mut alice, Duration::from_millis(100)));
        !alice_events.is_empty()
    });
    assert_eq!(alice_events, [("bob".into(), true, 0)]);
    assert_eq!(
        events(&mut mallory, Duration::from_millis(500)),
        [],
        "a stranger's subscription gets no PresenceEvent"
    );
    assert_eq!(query(&mut alice, &["bob"]), [("bob".into(), true, 0)]);
    assert_eq!(query(&mut mallory, &["bob"]), [("bob".into(), false, 0)]);
}

#[test]
fn everyone_visibility_shows_presence_to_strangers() {
    let t = start(|c| c.presence_visibility = PresenceVisibility::Everyone);
    let _alice = t.login("alice", "phone");
    let mut mallory = t.login("mallory", "phone");
    assert_eq!(query(&mut mallory, &["alice"]), [("alice".into(), true, 0)]);
    assert_eq!(
        subscribe(&mut mallory, &["bob"]),
        [("bob".into(), false, 0)]
    );
    let _bob = t.login("bob", "phone");
    let mut got = Vec::new();
    wait_until(T, "mallory's event", || {
        got.extend(events(&mut mallory, Duration::from_millis(100)));
        !got.is_empty()
    });
    assert_eq!(got, [("bob".into(), true, 0)]);
}
