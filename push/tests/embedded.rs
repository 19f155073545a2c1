//! The in-process push driver (`EmbeddedPush`) on its own, fed as the
//! embedded engine feeds it (events with their contexts, through
//! `PushSink::push_with_context`), against the APNs test server over real
//! TLS and HTTP/2: a burst in one hand-over is one push; a provider outage
//! longer than the sender's own retry window is retried by the driver and
//! ends in exactly one push; an outage that never ends is given up on and
//! counted. (Through a real gateway: `gateway/tests/push.rs`.)
// A test: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use palaver_push::embedded::{EmbeddedPush, EmbeddedPushConfig, EmbeddedPushHandle};
use palaver_push::{ApnsEnvironment, Sender, SenderConfig};
use palaver_router::bus::PushEvent;
use palaver_router::store::{self as rstore, DeviceToken, PushContext, PushToken};
use palaver_router::PushSink;

const LIMIT: Duration = Duration::from_secs(60);

fn await_until(what: &str, mut ready: impl FnMut() -> bool) {
    let began = Instant::now();
    while !ready() {
        assert!(began.elapsed() < LIMIT, "waited {LIMIT:?} for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn event(conversation: &str, seq: u64, badge: u32, token: &str) -> (PushEvent, PushContext) {
    (
        PushEvent {
            user_id: "bob".into(),
            conversation_id: conversation.into(),
            seq,
            message_id: format!("m{seq}"),
            sender_user_id: "alice".into(),
            kind: 0,
            server_time_ms: 0,
            online_device_ids: Vec::new(),
        },
        PushContext {
            tokens: vec![DeviceToken {
                device_id: "phone".into(),
                token: PushToken {
                    platform: rstore::PushPlatform::Apns,
                    token: token.into(),
                    apns_environment: Some(rstore::ApnsEnvironment::Production),
                    apns_topic: TOPIC.into(),
                    locale: String::new(),
                    registered_ms: 1,
                },
            }],
            muted: false,
            already_read: false,
            badge,
        },
    )
}

/// The driver with a sender that gives up within a second (so the
/// driver's own retries are what an outage meets), `max_attempts` batch
/// attempts 50 ms apart.
fn driver(apns: &Apns, max_attempts: u32) -> (EmbeddedPush, EmbeddedPushHandle) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let sender_config = SenderConfig {
        retry_min: Duration::from_millis(20),
        retry_max: Duration::from_millis(100),
        min_retry_window: Duration::from_millis(300),
        max_retry_window: Duration::from_millis(300),
        ..SenderConfig::default()
    };
    let sender = Sender::builder(sender_config.clone())
        .apns(ApnsEnvironment::Production, apns.client())
        .start(runtime.handle());
    EmbeddedPush::with_sender(
        runtime,
        sender,
        EmbeddedPushConfig {
            max_attempts,
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_millis(50),
            sender: sender_config,
            ..EmbeddedPushConfig::default()
        },
    )
}

#[test]
fn a_burst_is_one_push_an_outage_is_retried_to_exactly_one_and_a_lasting_one_is_given_up() {
    init_tracing();
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let apns = servers.block_on(Apns::start(|_| {}));
    let token = apns_token(1);
    let (mut sink, push) = driver(&apns, 100);

    // A burst handed over at once: merged, the highest seq with its badge.
    sink.push_with_context(vec![
        event("c1", 1, 1, &token),
        event("c1", 2, 2, &token),
        event("c1", 3, 3, &token),
    ]);
    await_until("the burst's push", || apns.server.delivered() == 1);
    let got = apns.server.received();
    assert_eq!(got[0].payload["aps"]["badge"], 3, "{}", got[0].payload);
    assert_eq!(got[0].payload["palaver"]["seq"], 3, "{}", got[0].payload);
    await_until("counters", || push.stats().pushed == 1);
    assert_eq!(push.stats().coalesced, 2);

    // APNs down past the sender's retry window: the driver tries the
    // batch again until it is back, then exactly one push.
    apns.server.set_down(true);
    sink.push_with_context(vec![event("c2", 1, 4, &token)]);
    await_until("two driver retries", || push.stats().replays >= 2);
    apns.server.set_down(false);
    await_until("the push after the outage", || apns.server.delivered() == 2);
    await_until("counters", || push.stats().pushed == 2);
    let c2: Vec<_> = apns
        .server
        .received()
        .into_iter()
        .filter(|r| r.status == Some(200) && r.header("apns-collapse-id") == Some("c2"))
        .collect();
    assert_eq!(c2.len(), 1, "exactly once: {c2:?}");
    assert_eq!(push.stats().abandoned, 0);

    // An outage that does not end: given up after the attempts, counted.
    let (mut brief, gives_up) = driver(&apns, 2);
    apns.server.set_down(true);
    brief.push_with_context(vec![event("c3", 1, 5, &token)]);
    await_until("given up", || gives_up.stats().abandoned == 1);
    assert_eq!(gives_up.stats().pushed, 0);
    apns.server.set_down(false);
}
