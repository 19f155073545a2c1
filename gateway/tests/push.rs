//! The embedded engine's in-process push worker through a real gateway: the
//! default backend (durable embedded engine) with `[push] providers` naming
//! an APNs key and the APNs test server (`palaver-push`'s `test-server`:
//! HTTP/2 over TLS, JWT and headers checked). Phones register their tokens
//! over the protocol (SPEC §20) and disconnect; messages to them must come
//! out as pushes at the test server.
//!
//! Ordering: the engine hands push events to the push thread in the order
//! it stores messages, and the push thread sends them in that order, so a
//! "fence" (a message to carol, whose phone is asleep too, from a sender
//! never seen before) whose push has arrived proves that every push event
//! stored before it was handled.
// A test: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};

use common::*;
use palaver_gateway::config::BackendConfig;
use palaver_protocol::pb::{self, frame::Body};
use palaver_push::embedded::EmbeddedPushHandle;
use palaver_push::testing::{
    ApnsReceived, ApnsReply, ApnsServerConfig, ApnsTestServer, TestKeyPair,
};
use palaver_router::PresenceVisibility;
use palaver_testkit::chat::{send_reliably, wait_offline};
use palaver_testkit::client::Client;

const TEAM: &str = "TEAM123456";
const KEY_ID: &str = "KEY1234567";
const TOPIC: &str = "com.example.palaver";
const BOB_TOKEN: &str = "b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0";
const CAROL_TOKEN: &str = "ca01ca01ca01ca01ca01ca01ca01ca01ca01ca01ca01ca01ca01ca01ca01ca01";

fn dm(a: &str, b: &str) -> String {
    palaver_protocol::direct_conversation_id(a, b)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

struct Rig {
    gw: TestGateway,
    push: EmbeddedPushHandle,
    apns: ApnsTestServer,
    /// Watches presence (visibility `everyone`).
    watcher: Client,
    fences: AtomicU32,
    _runtime: tokio::runtime::Runtime,
}

impl Rig {
    /// The APNs test server, a providers file naming it, and a gateway
    /// with `[push]` on `backend` (the default: the durable embedded
    /// engine on its own thread).
    fn start(backend: BackendConfig) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let key = TestKeyPair::apns();
        let mut server = ApnsServerConfig::new(TEAM, KEY_ID, &key.public_pem);
        server.topics = vec![TOPIC.into()];
        let apns = runtime.block_on(ApnsTestServer::start(server)).unwrap();
        let files = temp_dir("push-providers");
        let providers = apns.write_providers(&files, &key).unwrap();
        let mut push = None;
        let gw = start_with_backend(
            |c| {
                c.push.providers = Some(providers);
                c.presence_visibility = PresenceVisibility::Everyone;
                c.backend = backend;
            },
            |c| {
                let (backend, handle) = palaver_gateway::build_backend_with_push(c).unwrap();
                push = handle;
                backend
            },
        );
        let push = push.expect("[push] providers: the in-process push worker runs");
        assert_eq!(push.serves(), ["apns"]);
        gw.gw().report_push(push.clone());
        let watcher = gw.login("watcher", "desk");
        Rig {
            gw,
            push,
            apns,
            watcher,
            fences: AtomicU32::new(0),
            _runtime: runtime,
        }
    }

    /// `user` connects on `device`, registers `token`, and disconnects;
    /// returns once the engine has them offline.
    fn register_and_sleep(&mut self, user: &str, device: &str, token: &str) {
        let mut c = self.gw.login(user, device);
        let id = c
            .request(Body::RegisterPushToken(pb::RegisterPushToken {
                platform: pb::PushPlatform::Apns.into(),
                token: token.into(),
                apns_environment: pb::ApnsEnvironment::Production.into(),
                apns_topic: TOPIC.into(),
                locale: String::new(),
            }))
            .unwrap();
        let f = c
            .recv_until(T, "PushTokenRegistered", |f| f.request_id == id)
            .unwrap();
        assert!(
            matches!(f.body, Some(Body::PushTokenRegistered(_))),
            "{f:?}"
        );
        drop(c);
        wait_offline(&mut self.watcher, user, T);
    }

    /// `from` (a new connection) sends `n` messages to `to`.
    fn send(&self, from: &str, to: &str, n: u32) {
        let mut c = self.gw.login(from, "laptop");
        for i in 0..n {
            send_reliably(&mut c, &dm(from, to), &format!("secret body {i}"), T);
        }
    }

    /// Pushes the APNs test server answered with `status` for `token`
    /// about `conversation`.
    fn pushes(&self, token: &str, conversation: &str, status: u16) -> Vec<ApnsReceived> {
        self.apns
            .received()
            .into_iter()
            .filter(|r| {
                r.device_token == token
                    && r.status == Some(status)
                    && r.header("apns-collapse-id") == Some(conversation)
            })
            .collect()
    }

    /// Waits for `what` to hold.
    fn wait(&self, what: &str, ready: impl FnMut() -> bool) {
        wait_until(T * 3, what, ready);
    }

    /// A message to carol from a sender never seen before, and its push:
    /// every push event stored before it has been handled.
    fn fence(&self) {
        let n = self.fences.fetch_add(1, Ordering::Relaxed) + 1;
        let from = format!("fence{n}");
        self.send(&from, "carol", 1);
        let conversation = dm(&from, "carol");
        self.wait(&format!("the push of {from}"), || {
            !self.pushes(CAROL_TOKEN, &conversation, 200).is_empty()
        });
    }
}

#[test]
fn the_embedded_engine_pushes_once_per_burst_with_the_badge_never_to_online_or_muted_and_forgets_a_dead_token(
) {
    one_push_per_burst_none_online_none_muted_dead_token_forgotten(BackendConfig::default());
}

/// The same on the in-memory engine hosted on gateway core 0 (no thread of
/// its own: the dead token's job wakes that core).
#[test]
fn the_hosted_in_memory_engine_pushes_the_same_way() {
    one_push_per_burst_none_online_none_muted_dead_token_forgotten(BackendConfig::ephemeral());
}

fn one_push_per_burst_none_online_none_muted_dead_token_forgotten(backend: BackendConfig) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("palaver_push=info,palaver_router=info")
        .with_test_writer()
        .try_init();
    let mut rig = Rig::start(backend);
    rig.register_and_sleep("carol", "phone", CAROL_TOKEN);
    rig.register_and_sleep("bob", "phone", BOB_TOKEN);

    // 1. A burst to a sleeping phone: one push, at the first message (the
    //    engine's push-pending mark holds back the rest until bob looks),
    //    id-only, with the badge of what is unread then.
    let alice = dm("alice", "bob");
    rig.send("alice", "bob", 1);
    rig.wait("the push of alice's first message", || {
        !rig.pushes(BOB_TOKEN, &alice, 200).is_empty()
    });
    rig.send("alice", "bob", 4);
    rig.fence();
    let got = rig.pushes(BOB_TOKEN, &alice, 200);
    assert_eq!(got.len(), 1, "one push for the burst of 5: {got:?}");
    let push = &got[0];
    assert_eq!(push.header("apns-topic"), Some(TOPIC));
    assert_eq!(push.header("apns-push-type"), Some("alert"));
    assert_eq!(push.payload["aps"]["badge"], 1, "{}", push.payload);
    assert_eq!(push.payload["palaver"]["conversation"], alice.as_str());
    assert_eq!(push.payload["palaver"]["seq"], 1, "{}", push.payload);
    assert!(
        !push.payload.to_string().contains("secret body"),
        "id-only: {}",
        push.payload
    );
    // The next conversation's push counts everything unread: alice's 5
    // and erin's 1.
    let erin = dm("erin", "bob");
    rig.send("erin", "bob", 1);
    rig.wait("the push of erin's message", || {
        !rig.pushes(BOB_TOKEN, &erin, 200).is_empty()
    });
    let got = rig.pushes(BOB_TOKEN, &erin, 200);
    assert_eq!(got[0].payload["aps"]["badge"], 6, "{}", got[0].payload);

    // 2. Bob online: no push. While online he mutes dave.
    let mut bob = rig.gw.login("bob", "phone");
    let dave = dm("dave", "bob");
    let id = bob
        .request(Body::MuteConversation(pb::MuteConversation {
            conversation_id: dave.clone(),
            muted_until_ms: 0,
            forever: true,
        }))
        .unwrap();
    bob.recv_until(T, "ConversationMuted", |f| f.request_id == id)
        .unwrap();
    let online = dm("olga", "bob");
    rig.send("olga", "bob", 1);
    palaver_testkit::chat::next_deliver(&mut bob, T);
    rig.fence();
    assert_eq!(
        rig.pushes(BOB_TOKEN, &online, 200).len(),
        0,
        "online: no push"
    );
    drop(bob);
    wait_offline(&mut rig.watcher, "bob", T);

    // 3. A muted conversation: no push.
    let skipped_muted = rig.push.stats().skipped_muted;
    rig.send("dave", "bob", 3);
    rig.fence();
    assert_eq!(rig.pushes(BOB_TOKEN, &dave, 200).len(), 0, "muted: no push");
    assert!(
        rig.push.stats().skipped_muted > skipped_muted,
        "{:?}",
        rig.push.stats()
    );

    // 4. APNs says bob's token is dead (410, at a time after its
    //    registration): the engine forgets it, so a later message pushes
    //    nothing; a re-registration restores pushes.
    rig.apns
        .script(BOB_TOKEN, [ApnsReply::unregistered(unix_ms())]);
    let frank = dm("frank", "bob");
    rig.send("frank", "bob", 1);
    rig.wait("the 410 handed to the engine", || {
        rig.push.stats().invalidated == 1
    });
    assert_eq!(rig.pushes(BOB_TOKEN, &frank, 410).len(), 1);
    // Queued behind the removal on the engine's thread.
    let gus = dm("gus", "bob");
    rig.send("gus", "bob", 1);
    rig.fence();
    let to_gus: Vec<_> = rig
        .apns
        .received()
        .into_iter()
        .filter(|r| r.header("apns-collapse-id") == Some(gus.as_str()))
        .collect();
    assert!(to_gus.is_empty(), "the dead token is gone: {to_gus:?}");
    rig.register_and_sleep("bob", "phone", BOB_TOKEN);
    let henry = dm("henry", "bob");
    rig.send("henry", "bob", 2);
    rig.wait("a push after the re-registration", || {
        !rig.pushes(BOB_TOKEN, &henry, 200).is_empty()
    });
    rig.fence();
    assert_eq!(rig.pushes(BOB_TOKEN, &henry, 200).len(), 1);

    // Nothing was sent twice, nothing dropped, everything over the one
    // HTTP/2 connection.
    for conversation in [&alice, &erin, &henry] {
        assert_eq!(rig.pushes(BOB_TOKEN, conversation, 200).len(), 1);
    }
    rig.wait("the last batch's counters", || {
        rig.push.stats().pushed == rig.apns.delivered()
    });
    let stats = rig.push.stats();
    let metrics = rig.gw.gw().metrics_text();
    assert!(
        metrics.contains(&format!(
            "palaver_push_sent_total{{gateway=\"gw-test\"}} {}",
            stats.pushed
        )),
        "{metrics}"
    );
    assert_eq!(
        (
            stats.queue_full,
            stats.abandoned,
            stats.dead_lettered,
            stats.no_provider
        ),
        (0, 0, 0, 0),
        "{stats:?}"
    );
    assert_eq!(rig.apns.connections(), 1);
    drop(rig.gw);
}

/// APNs down while a push is due: the sender keeps retrying (within its
/// retry window, with backoff); once APNs is back the push arrives, once.
#[test]
fn an_apns_outage_delays_the_push_without_losing_or_doubling_it() {
    let mut rig = Rig::start(BackendConfig::default());
    rig.register_and_sleep("carol", "phone", CAROL_TOKEN);
    rig.register_and_sleep("bob", "phone", BOB_TOKEN);
    rig.apns.set_down(true);
    let alice = dm("alice", "bob");
    rig.send("alice", "bob", 1);
    rig.wait("connections refused in the outage", || {
        rig.apns.refused() >= 2
    });
    assert_eq!(rig.pushes(BOB_TOKEN, &alice, 200).len(), 0);
    rig.apns.set_down(false);
    rig.wait("the push after the outage", || {
        !rig.pushes(BOB_TOKEN, &alice, 200).is_empty()
    });
    rig.fence();
    assert_eq!(rig.pushes(BOB_TOKEN, &alice, 200).len(), 1, "exactly once");
    rig.wait("the last batch's counters", || {
        rig.push.stats().pushed == rig.apns.delivered()
    });
    let stats = rig.push.stats();
    assert_eq!((stats.abandoned, stats.queue_full), (0, 0), "{stats:?}");
}

/// `[push]` with a providers file naming no provider: the gateway starts,
/// says so, and counts what it would have sent.
#[test]
fn without_credentials_the_embedded_push_worker_counts_what_it_would_have_sent() {
    let files = temp_dir("push-none");
    let providers = files.join("push.toml");
    std::fs::write(&providers, "# no [apns], no [fcm]\n").unwrap();
    let mut push = None;
    let gw = start_with_backend(
        |c| {
            c.push.providers = Some(providers);
            c.presence_visibility = PresenceVisibility::Everyone;
        },
        |c| {
            let (backend, handle) = palaver_gateway::build_backend_with_push(c).unwrap();
            push = handle;
            backend
        },
    );
    let push = push.unwrap();
    assert!(push.serves().is_empty());
    let mut watcher = gw.login("watcher", "desk");
    let mut bob = gw.login("bob", "phone");
    let id = bob
        .request(Body::RegisterPushToken(pb::RegisterPushToken {
            platform: pb::PushPlatform::Apns.into(),
            token: BOB_TOKEN.into(),
            apns_environment: pb::ApnsEnvironment::Production.into(),
            apns_topic: TOPIC.into(),
            locale: String::new(),
        }))
        .unwrap();
    bob.recv_until(T, "PushTokenRegistered", |f| f.request_id == id)
        .unwrap();
    drop(bob);
    wait_offline(&mut watcher, "bob", T);
    let mut alice = gw.login("alice", "laptop");
    send_reliably(&mut alice, &dm("alice", "bob"), "hi", T);
    wait_until(T, "the push counted", || push.stats().no_provider == 1);
    assert_eq!(push.stats().pushed, 0);
}
