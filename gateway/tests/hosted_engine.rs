//! The embedded engine hosted on a gateway core thread (what
//! `build_backend` runs for the in-memory engine, `durable = false`:
//! `EmbeddedEngine::hosted`, on core 0; the durable one has its own thread). With two
//! cores a message takes one of three paths: both connections on core 0
//! (no thread hop), one on each core (one hop), both on core 1 (two hops:
//! core 1 → core 0's engine → core 1). Each test places connections on
//! known cores (the per-core session gauges say where a login landed) and
//! checks what must hold on every path.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::*;
use palaver_gateway::Config;
use palaver_protocol::pb::{self, frame::Body, ErrorCode};
use palaver_protocol::{direct_conversation_id, encode_frame, frame};
use palaver_router::api::Backend;
use palaver_router::{EmbeddedConfig, EmbeddedEngine};
use palaver_testkit::chat::{self, deliver_of, next_deliver};
use palaver_testkit::client::{new_client_msg_id, Client};

/// The hosted (in-memory) engine, and one Send per connection is not
/// enough here: lift the per-second limits (the connection's and its
/// account's).
fn lifted(c: &mut Config) {
    c.backend = palaver_gateway::config::BackendConfig::ephemeral();
    c.limits.max_sends_per_second = 100_000;
    c.limits.max_account_sends_per_second = 100_000;
}

/// A welcomed connection and the core thread that holds it.
struct Placed {
    c: Client,
    user: String,
    core: usize,
}

fn sessions_per_core(t: &TestGateway) -> Vec<i64> {
    t.gw()
        .core_metrics()
        .iter()
        .map(|m| m.sessions.load(std::sync::atomic::Ordering::Relaxed))
        .collect()
}

/// Logs in `{prefix}{i}` one at a time until every core holds at least
/// `per_core` of them. The core's session gauge moves before its Welcome
/// is written, so the gauge that moved names the connection's core.
fn place(t: &TestGateway, prefix: &str, per_core: usize) -> Vec<Placed> {
    let cores = t.gw().config().core_count();
    let mut placed: Vec<Placed> = Vec::new();
    for i in 0..200 {
        if (0..cores).all(|k| placed.iter().filter(|p| p.core == k).count() >= per_core) {
            return placed;
        }
        let before = sessions_per_core(t);
        let user = format!("{prefix}{i}");
        let c = t.login(&user, "phone");
        let after = sessions_per_core(t);
        let moved: Vec<usize> = (0..cores).filter(|&k| after[k] != before[k]).collect();
        assert_eq!(
            moved.len(),
            1,
            "one core gained the session: {before:?} → {after:?}"
        );
        placed.push(Placed {
            c,
            user,
            core: moved[0],
        });
    }
    panic!("200 logins never reached {per_core} on every core");
}

/// The first placed connection on `core`, removed from `placed`.
fn take(placed: &mut Vec<Placed>, core: usize) -> Placed {
    let i = placed
        .iter()
        .position(|p| p.core == core)
        .unwrap_or_else(|| panic!("no connection left on core {core}"));
    placed.remove(i)
}

fn send_frame(c: &mut Client, conv: &str, text: &str) -> pb::Frame {
    frame(
        c.next_request_id(),
        Body::Send(pb::Send {
            conversation_id: conv.into(),
            client_msg_id: new_client_msg_id(),
            kind: pb::ContentKind::Text as i32,
            body: text.as_bytes().to_vec(),
            ..Default::default()
        }),
    )
}

/// Writes `n` Sends in one write (so the gateway reads them in one turn
/// and hands them over as one batch); returns their request ids.
fn pipeline_sends(c: &mut Client, conv: &str, tag: &str, n: usize) -> Vec<u32> {
    let mut buf = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let f = send_frame(c, conv, &format!("{tag}{i}"));
        ids.push(f.request_id);
        encode_frame(&f, &mut buf);
    }
    c.send_raw(&buf).expect("write");
    ids
}

/// The answer to each of `ids` (frames for other requests are kept aside
/// in `others`), in the order they arrived.
fn answers(c: &mut Client, ids: &[u32], others: &mut Vec<pb::Frame>) -> Vec<pb::Frame> {
    let mut got = Vec::new();
    while got.len() < ids.len() {
        let f = c.recv_timeout(T, "answers").expect("answer");
        if ids.contains(&f.request_id) {
            got.push(f);
        } else {
            others.push(f);
        }
    }
    got
}

fn ack_seq(f: &pb::Frame) -> Option<u64> {
    match &f.body {
        Some(Body::SendAck(a)) => Some(a.seq),
        _ => None,
    }
}

/// `from` sends `n` messages to `to` back to back; both see them in order.
fn exchange(from: &mut Placed, to: &mut Placed, n: usize, path: &str) {
    let conv = direct_conversation_id(&from.user, &to.user);
    let ids = pipeline_sends(&mut from.c, &conv, "m", n);
    let acks = answers(&mut from.c, &ids, &mut Vec::new());
    let acked: Vec<(u32, Option<u64>)> = acks.iter().map(|f| (f.request_id, ack_seq(f))).collect();
    let expected: Vec<(u32, Option<u64>)> = ids
        .iter()
        .zip(1..)
        .map(|(id, seq)| (*id, Some(seq)))
        .collect();
    assert_eq!(acked, expected, "{path}: acks in send order, seqs 1..={n}");
    for (i, seq) in (0..n).zip(1..) {
        let m = next_deliver(&mut to.c, T);
        assert_eq!(
            (m.seq, m.body.as_slice(), m.sender_user_id.as_str()),
            (seq, format!("m{i}").as_bytes(), from.user.as_str()),
            "{path}: deliveries in order"
        );
    }
}

#[test]
fn messages_within_and_across_cores_arrive_in_order() {
    let t = start(lifted);
    let mut p = place(&t, "u", 2);
    let (mut a0, mut a1) = (take(&mut p, 0), take(&mut p, 0));
    let (mut b0, mut b1) = (take(&mut p, 1), take(&mut p, 1));
    exchange(
        &mut a0,
        &mut a1,
        30,
        "core 0 → core 0 (the engine's core: no hop)",
    );
    exchange(
        &mut b0,
        &mut b1,
        30,
        "core 1 → core 1 (via the engine on core 0)",
    );
    exchange(&mut a0, &mut b0, 30, "core 0 → core 1");
    exchange(&mut b1, &mut a1, 30, "core 1 → core 0");
    // Nothing was dropped on the way to either core.
    assert_eq!(
        t.metric(|m| m
            .delivery_queue_drops
            .load(std::sync::atomic::Ordering::Relaxed) as i64),
        0
    );
}

/// Both ends send into one conversation at once from different cores:
/// one order (the seqs) that both see, with no gap.
#[test]
fn one_conversation_written_from_both_cores_keeps_one_order() {
    let t = start(lifted);
    let mut p = place(&t, "o", 1);
    let mut a = take(&mut p, 0);
    let mut b = take(&mut p, 1);
    let conv = direct_conversation_id(&a.user, &b.user);
    let n = 50;
    let a_ids = pipeline_sends(&mut a.c, &conv, "a", n);
    let b_ids = pipeline_sends(&mut b.c, &conv, "b", n);
    let mut all_seqs = BTreeSet::new();
    for (me, ids, peer_tag) in [(&mut a, &a_ids, "b"), (&mut b, &b_ids, "a")] {
        let mut others = Vec::new();
        let acks = answers(&mut me.c, ids, &mut others);
        let own: Vec<u64> = acks.iter().map(|f| ack_seq(f).expect("SendAck")).collect();
        assert!(
            own.windows(2).all(|w| w[0] < w[1]),
            "own acks rise: {own:?}"
        );
        // The peer's messages: the ones that came with the acks, then the rest.
        let mut seen: Vec<pb::Message> = others.iter().filter_map(deliver_of).cloned().collect();
        while seen.len() < n {
            seen.push(next_deliver(&mut me.c, T));
        }
        let seqs: Vec<u64> = seen.iter().map(|m| m.seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "deliveries rise: {seqs:?}"
        );
        let bodies: Vec<Vec<u8>> = seen.iter().map(|m| m.body.clone()).collect();
        let sent: Vec<Vec<u8>> = (0..n)
            .map(|i| format!("{peer_tag}{i}").into_bytes())
            .collect();
        assert_eq!(bodies, sent, "the peer's messages in its send order");
        all_seqs.extend(own);
    }
    assert_eq!(all_seqs, (1..=2 * n as u64).collect(), "one gapless order");
}

fn presence_event(f: &pb::Frame) -> Option<&pb::Presence> {
    match &f.body {
        Some(Body::PresenceEvent(e)) => e.presence.as_ref(),
        _ => None,
    }
}

/// What `observer` sees next of `user`: a message or a presence change
/// (other frames are skipped).
fn next_news(observer: &mut Client, user: &str) -> String {
    let f = observer
        .recv_until(T, "a Deliver or PresenceEvent", |f| {
            deliver_of(f).is_some() || presence_event(f).is_some_and(|p| p.user_id == user)
        })
        .expect("news");
    match (deliver_of(&f), presence_event(&f)) {
        (Some(m), _) => format!("message {}", String::from_utf8_lossy(&m.body)),
        (_, Some(p)) if p.online => "online".into(),
        _ => "offline".into(),
    }
}

/// A Send read in the same round as the connection's close reaches the
/// engine before the close, and a reconnect's session after both: the
/// observer sees the message, then offline, then online, then the next
/// message. For a sender on each core and an observer on each core, the
/// sender closing with close_notify + FIN (in one segment with the Send)
/// or with a bare FIN.
#[test]
fn send_then_close_then_reconnect_reach_the_engine_in_order() {
    let t = start(lifted);
    let mut p = place(&t, "s", 8);
    let cases = [(0, 1), (1, 0), (0, 0), (1, 1)];
    for ((sender_core, observer_core), close_notify) in
        cases.into_iter().flat_map(|c| [(c, true), (c, false)])
    {
        let mut s = take(&mut p, sender_core);
        let mut o = take(&mut p, observer_core);
        let path = format!(
            "sender on core {sender_core}, observer on core {observer_core}, {}",
            if close_notify {
                "close_notify + FIN"
            } else {
                "FIN"
            }
        );
        let conv = direct_conversation_id(&s.user, &o.user);
        // A direct conversation both wrote in makes presence visible
        // (SPEC §10).
        chat::send_reliably(&mut s.c, &conv, "hello", T);
        assert_eq!(next_deliver(&mut o.c, T).body, b"hello");
        chat::send_reliably(&mut o.c, &conv, "hi", T);
        assert_eq!(next_deliver(&mut s.c, T).body, b"hi");
        o.c.subscribe_presence(&s.user, T).unwrap();

        let last = send_frame(&mut s.c, &conv, "last words");
        if close_notify {
            s.c.send_then_close(&[last]).unwrap();
        } else {
            // The Send and the FIN back to back: usually both are queued
            // before the gateway reads (one readiness edge for both).
            s.c.send(&last).unwrap();
            s.c.tcp().shutdown(std::net::Shutdown::Write).unwrap();
        }
        assert_eq!(next_news(&mut o.c, &s.user), "message last words", "{path}");
        assert_eq!(next_news(&mut o.c, &s.user), "offline", "{path}");

        let mut again = t.login(&s.user, "phone");
        assert_eq!(next_news(&mut o.c, &s.user), "online", "{path}");
        chat::send_reliably(&mut again, &conv, "back", T);
        assert_eq!(next_news(&mut o.c, &s.user), "message back", "{path}");
    }
}

/// The engine's queue bound answers the excess UNAVAILABLE, on the
/// engine's core and on the other, and nobody else notices.
#[test]
fn overload_is_answered_unavailable_and_neighbours_carry_on() {
    let t = start_with_backend(lifted, |_| {
        Arc::new(EmbeddedEngine::hosted(EmbeddedConfig {
            max_queued_requests: 4,
            ..Default::default()
        })) as Arc<dyn Backend>
    });
    let mut p = place(&t, "v", 2);
    for core in [0, 1] {
        let mut abuser = take(&mut p, core);
        let mut neighbour = take(&mut p, 1 - core);
        let conv = direct_conversation_id(&abuser.user, &neighbour.user);
        // 48 Sends in one write: one batch, more than the queue holds.
        let ids = pipeline_sends(&mut abuser.c, &conv, "x", 48);
        let got = answers(&mut abuser.c, &ids, &mut Vec::new());
        let mut acked = Vec::new();
        let mut refused = 0;
        for f in &got {
            match &f.body {
                Some(Body::SendAck(a)) => acked.push(a.seq),
                Some(Body::Error(e)) => {
                    assert_eq!(e.code, ErrorCode::Unavailable as u32, "core {core}: {e:?}");
                    assert_eq!(e.client_msg_id.len(), 16, "the refusal names the Send");
                    refused += 1;
                }
                other => panic!("core {core}: unexpected {other:?}"),
            }
        }
        assert!(refused > 0, "core {core}: 48 at once into a queue of 4");
        assert_eq!(
            acked,
            (1..=acked.len() as u64).collect::<Vec<_>>(),
            "core {core}: what was taken is stored in order"
        );
        // The neighbour on the other core is served, and so is the abuser's
        // next message: the refusals cost nothing but the refused requests.
        let ack = chat::send_reliably(&mut neighbour.c, &conv, "still here", T);
        assert_eq!(ack.seq, acked.len() as u64 + 1, "core {core}");
        let ack = chat::send_reliably(&mut abuser.c, &conv, "and me", T);
        assert_eq!(ack.seq, acked.len() as u64 + 2, "core {core}");
        assert_healthy(&mut abuser.c);
    }
}

/// A drain with sessions on both cores: every session gets its GoAway,
/// every core thread (the engine's last) finishes, and the engine is shut
/// down behind them.
#[test]
fn drain_with_sessions_on_both_cores_finishes() {
    let t = start(|c| {
        c.backend = palaver_gateway::config::BackendConfig::ephemeral();
        c.drain.reconnect_delay_ms = 0;
        c.drain.reconnect_jitter_ms = 0;
        c.drain.deadline_ms = 2000;
    });
    let mut p = place(&t, "d", 2);
    t.gw().drain();
    for placed in &mut p {
        let frames = placed.c.expect_close(T).expect("closed by the drain");
        assert!(
            frames
                .iter()
                .any(|f| matches!(&f.body, Some(Body::GoAway(g)) if g.reason == pb::GoAwayReason::Shutdown as i32)),
            "core {}: {frames:?}",
            placed.core
        );
    }
    wait_until(T, "every core thread to finish", || t.gw().is_finished());
}

/// Two gateways on one hosted engine (the first to start hosts it, the
/// other's requests wake the host): users on either meet, and when the host
/// gateway stops, the engine goes on for the other one.
#[test]
fn a_second_gateway_attaches_to_a_hosted_engine() {
    let engine: Arc<dyn Backend> = Arc::new(EmbeddedEngine::hosted(EmbeddedConfig::default()));
    let e1 = engine.clone();
    let t1 = start_with_backend(|c| c.gateway_id = "gw-host".into(), move |_| e1);
    let t2 = start_with_backend(|c| c.gateway_id = "gw-guest".into(), move |_| engine);
    let mut alice = t1.login("alice", "phone");
    let mut bob = t2.login("bob", "phone");
    let conv = direct_conversation_id("alice", "bob");
    assert_eq!(
        chat::send_reliably(&mut alice, &conv, "to the guest", T).seq,
        1
    );
    assert_eq!(next_deliver(&mut bob, T).body, b"to the guest");
    assert_eq!(
        chat::send_reliably(&mut bob, &conv, "to the host", T).seq,
        2
    );
    assert_eq!(next_deliver(&mut alice, T).body, b"to the host");

    // The host's core threads exit (no `join`: that would shut the shared
    // engine down, as it does a threaded one).
    t1.gw().stop();
    wait_until(T, "the host gateway's threads to finish", || {
        t1.gw().is_finished()
    });
    let mut carol = t2.login("carol", "phone");
    let conv = direct_conversation_id("bob", "carol");
    assert_eq!(
        chat::send_reliably(&mut bob, &conv, "still served", T).seq,
        1
    );
    assert_eq!(next_deliver(&mut carol, T).body, b"still served");
}
