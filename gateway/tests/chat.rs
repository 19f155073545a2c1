//! Chat through the gateway and the embedded engine: the shared chat suite
//! (`palaver_testkit::chat`, also run against the Kafka/Redis stack by the
//! router's `tests/e2e_kafka_redis.rs`), then what only a single gateway
//! shows: replacement of an older connection of the same device, a
//! SyncBatch larger than the output limit, two gateways on one port.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use palaver_protocol::pb::{self, frame::Body};
use palaver_testkit::chat::{self, next_deliver, ChatServer};
use palaver_testkit::client::Client;

/// One gateway on the embedded engine: every scenario's users meet there.
impl ChatServer for TestGateway {
    fn gateways(&self) -> usize {
        1
    }

    fn login_resuming(
        &self,
        _gateway: usize,
        user: &str,
        device: &str,
        resume: Vec<pb::Cursor>,
    ) -> Client {
        let mut c = self.connect();
        let hello = pb::Hello {
            protocol_version: palaver_protocol::PROTOCOL_VERSION,
            token: self.token(user),
            device_id: device.into(),
            resume,
            ..Default::default()
        };
        let w = c.hello_with(hello, T).expect("welcome");
        assert_eq!(w.user_id, user);
        c
    }

    fn patience(&self) -> Duration {
        T
    }
}

fn send_and_ack(c: &mut Client, conv: &str, text: &str) -> pb::SendAck {
    chat::send_reliably(c, conv, text, T)
}

/// `--cores 1 --ephemeral`: the in-memory engine runs on the only core, so
/// every message of the suite is read, handled and delivered on one thread.
/// (The tests below run on the default, durable engine.)
#[test]
fn the_chat_suite_on_one_core() {
    chat::run_all(&start(|c| {
        c.cores = 1;
        c.backend = palaver_gateway::config::BackendConfig::ephemeral();
    }));
}

/// `engine_thread = true`: the engine on a thread of its own, as before
/// hosting (every message crosses two threads).
#[test]
fn the_chat_suite_with_the_engine_on_its_own_thread() {
    chat::run_all(&start(|c| {
        c.backend = palaver_gateway::config::BackendConfig::Embedded {
            engine_thread: true,
            durable: false,
            retention_days: 0,
        }
    }));
}

/// The embedded engine's storage quota, configured in the gateway (SPEC
/// §13): three messages of 1,000 bytes fit an account quota of 3 × 1,256,
/// the fourth is refused QUOTA_EXCEEDED, and a retry of a stored one still
/// gets its original SendAck.
#[test]
fn the_account_storage_quota_refuses_a_send_beyond_it() {
    let t = start(|c| c.limits.account_bytes_per_day = 3 * (1000 + 256));
    let mut alice = t.login("alice", "phone");
    let dm = palaver_protocol::direct_conversation_id("alice", "bob");
    let send = |n: u8| {
        Body::Send(pb::Send {
            conversation_id: dm.clone(),
            client_msg_id: vec![n; 16],
            kind: pb::ContentKind::Text as i32,
            body: vec![b'x'; 1000],
            ..Default::default()
        })
    };
    let answer = |c: &mut Client, n: u8| {
        let id = c.request(send(n)).unwrap();
        c.recv_until(T, "the Send's answer", |f| f.request_id == id)
            .unwrap()
            .body
            .unwrap()
    };
    for n in 1..=3u8 {
        assert!(matches!(answer(&mut alice, n), Body::SendAck(a) if a.seq == u64::from(n)));
    }
    match answer(&mut alice, 4) {
        Body::Error(e) => {
            assert_eq!(e.code, pb::ErrorCode::QuotaExceeded as u32, "{e:?}");
            assert_eq!(e.client_msg_id, vec![4u8; 16]);
        }
        other => panic!("expected QUOTA_EXCEEDED, got {other:?}"),
    }
    assert!(matches!(answer(&mut alice, 2), Body::SendAck(a) if a.seq == 2));
}

#[test]
fn two_users_chat_one_to_one_with_receipts() {
    chat::one_to_one_with_receipts_and_typing(&start(|_| {}));
}

#[test]
fn three_users_chat_in_a_group() {
    chat::group_of_three_fans_out(&start(|_| {}));
}

#[test]
fn offline_user_catches_up_with_sync_and_resume() {
    chat::offline_user_catches_up_with_sync_and_resume(&start(|_| {}));
}

#[test]
fn a_duplicate_client_msg_id_is_stored_once_and_delivered_again() {
    chat::duplicate_client_msg_id_is_stored_once_and_delivered_again(&start(|_| {}));
}

#[test]
fn concurrent_senders_get_gapless_seqs_in_order() {
    chat::concurrent_senders_get_gapless_seqs_in_order(&start(|_| {}));
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
    assert_eq!(next_deliver(&mut new, T).body, b"still there?");
}

#[test]
fn a_sync_batch_larger_than_the_outbound_limit_still_arrives() {
    let t = start(|c| {
        c.limits.max_outbound_bytes = 128 * 1024;
        c.limits.max_sends_per_second = 100_000;
        c.limits.max_account_sends_per_second = 100_000;
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

/// The shared channel suite (`palaver_testkit::channels`, also run through
/// Kafka and Redis by the router's `tests/e2e_kafka_redis.rs`).
#[test]
fn channels_fan_out_on_read() {
    let t = start(|_| {});
    palaver_testkit::channels::run_all(&t);
}

/// A connection has at most `max_open_channels_per_connection` channels
/// open; changing a mode or closing one frees nothing or a place.
#[test]
fn a_connection_opens_at_most_its_share_of_channels() {
    use palaver_testkit::channels::{create_channel, open_channel};
    let t = start(|c| c.limits.max_open_channels_per_connection = 2);
    let mut alice = t.login("alice", "phone");
    let settings = pb::ChannelSettings::default();
    let channels: Vec<String> = (0..3)
        .map(|_| create_channel(&mut alice, &[], settings, T))
        .collect();
    open_channel(&mut alice, &channels[0], pb::ChannelMode::Live, T).unwrap();
    open_channel(&mut alice, &channels[1], pb::ChannelMode::Counts, T).unwrap();
    let refused = open_channel(&mut alice, &channels[2], pb::ChannelMode::Live, T).unwrap_err();
    assert_eq!(refused.code, pb::ErrorCode::QuotaExceeded as u32);
    assert!(refused.message.contains("max_open_channels_per_connection"));
    // A mode change is no new one; closing one makes room.
    open_channel(&mut alice, &channels[1], pb::ChannelMode::Live, T).unwrap();
    open_channel(&mut alice, &channels[0], pb::ChannelMode::Closed, T).unwrap();
    open_channel(&mut alice, &channels[2], pb::ChannelMode::Live, T).unwrap();
    let open = t.wait_metric(
        "two channels open",
        |m| {
            m.channel_subscriptions
                .load(std::sync::atomic::Ordering::Relaxed)
        },
        |n| n == 2,
    );
    assert_eq!(open, 2);
    drop(alice);
    t.wait_metric(
        "the closed connection's channels gone",
        |m| {
            m.channel_subscriptions
                .load(std::sync::atomic::Ordering::Relaxed)
        },
        |n| n == 0,
    );
}
