//! The embedded engine through the `Backend` trait, as a gateway uses it:
//! frames arrive on the gateways' sinks from the engine's worker thread
//! (threaded), or from the turns the test runs itself (hosted, at the end).
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

#[path = "../../router-core/tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::*;
use palaver_protocol::pb::{self, frame::Body, ErrorCode};
use palaver_router::{
    Backend, BackendHost, DeliverySink, EmbeddedConfig, EmbeddedEngine, ManualClock, Outbound,
    PresenceVisibility, PushEvent, PushSink, RouterConfig, Session,
};

const DEADLINE: Duration = Duration::from_secs(20);
const DM: &str = "dm:alice:bob";

/// Items delivered from the engine's thread, with a way to await them.
struct Collected<T> {
    items: Mutex<Vec<T>>,
    changed: Condvar,
}

impl<T> Default for Collected<T> {
    fn default() -> Self {
        Self {
            items: Mutex::new(Vec::new()),
            changed: Condvar::new(),
        }
    }
}

impl<T: std::fmt::Debug> Collected<T> {
    fn add(&self, batch: Vec<T>) {
        self.items.lock().unwrap().extend(batch);
        self.changed.notify_all();
    }

    /// Wait (with a deadline) until `check` finds what it looks for.
    fn wait_for<R>(&self, what: &str, mut check: impl FnMut(&[T]) -> Option<R>) -> R {
        let deadline = Instant::now() + DEADLINE;
        let mut items = self.items.lock().unwrap();
        loop {
            if let Some(found) = check(&items) {
                return found;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for {what}; have {:?}",
                *items
            );
            items = self.changed.wait_timeout(items, deadline - now).unwrap().0;
        }
    }
}

/// A gateway's sink that keeps every frame.
type CollectSink = Collected<Outbound>;

impl DeliverySink for CollectSink {
    fn deliver(&self, batch: Vec<Outbound>) {
        self.add(batch);
    }
    // Channels are tested through the gateway (gateway/tests/channels.rs).
    fn deliver_channel(&self, _posts: Vec<std::sync::Arc<palaver_router::ChannelPost>>) {}
    // The embedded engine never loses sessions.
    fn reopen_sessions(&self) {}
}

impl CollectSink {
    /// Wait for the response to `request_id` on `conn`.
    fn reply(&self, conn: u64, request_id: u32) -> pb::Frame {
        self.wait_for(&format!("reply {request_id} on conn {conn}"), |frames| {
            frames
                .iter()
                .find(|o| o.conn == conn && o.frame.request_id == request_id)
                .map(|o| o.frame.clone())
        })
    }

    fn frames_for(&self, conn: u64) -> Vec<pb::Frame> {
        self.items
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.conn == conn)
            .map(|o| o.frame.clone())
            .collect()
    }
}

#[derive(Clone, Default)]
struct CollectPush(Arc<Collected<PushEvent>>);

impl PushSink for CollectPush {
    fn push(&mut self, events: Vec<PushEvent>) {
        self.0.add(events);
    }
}

struct Setup {
    engine: EmbeddedEngine,
    g1: Arc<CollectSink>,
    g2: Arc<CollectSink>,
    pushes: CollectPush,
}

fn setup(config: EmbeddedConfig) -> Setup {
    let pushes = CollectPush::default();
    let engine = EmbeddedEngine::with_parts(
        config,
        Arc::new(ManualClock::new(1_700_000_000_000)),
        pushes.clone(),
    );
    let g1 = Arc::new(CollectSink::default());
    let g2 = Arc::new(CollectSink::default());
    engine.start("g1", g1.clone()).unwrap();
    engine.start("g2", g2.clone()).unwrap();
    Setup {
        engine,
        g1,
        g2,
        pushes,
    }
}

fn open(engine: &EmbeddedEngine, user: &str, device: &str, gateway: &str, conn: u64) -> Session {
    let s = session(user, device, gateway, conn);
    engine.session_opened(&s);
    s
}

#[test]
fn send_across_two_gateways_acks_and_delivers() {
    let t = setup(EmbeddedConfig::default());
    let alice = open(&t.engine, "alice", "phone", "g1", 1);
    open(&t.engine, "alice", "laptop", "g1", 2);
    open(&t.engine, "bob", "phone", "g2", 7);

    t.engine
        .submit(request(&alice, 11, send_body(DM, 1, "hello bob")));
    let a = t.g1.reply(1, 11);
    assert_eq!(ack(&a).expect("SendAck").seq, 1);
    let bob_got = t.g2.wait_for("deliver to bob", |frames| {
        frames
            .iter()
            .find(|o| o.conn == 7)
            .and_then(|o| delivered(&o.frame).cloned())
    });
    assert_eq!(bob_got.body, b"hello bob");
    assert_eq!(bob_got.sender_user_id, "alice");
    t.g1.wait_for("deliver to alice's laptop", |frames| {
        frames
            .iter()
            .find(|o| o.conn == 2 && delivered(&o.frame).is_some())
            .map(|_| ())
    });
    // The sending connection got only its ack.
    assert_eq!(t.g1.frames_for(1).len(), 1);
    assert!(t.pushes.0.items.lock().unwrap().is_empty());
}

#[test]
fn group_of_1000_across_gateways_delivers_each_member_exactly_once() {
    let t = setup(EmbeddedConfig::default());
    let creator = open(&t.engine, "m0000", "phone", "g1", 0);
    let members: Vec<String> = (1..1000).map(|i| format!("m{i:04}")).collect();
    for (i, m) in members.iter().enumerate() {
        let gateway = if i % 2 == 0 { "g1" } else { "g2" };
        open(&t.engine, m, "phone", gateway, i as u64 + 1);
    }
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    t.engine
        .submit(request(&creator, 1, create_group_body("all hands", &refs)));
    let group = match t.g1.reply(0, 1).body {
        Some(Body::ConversationCreated(c)) => c.conversation.unwrap().conversation_id,
        other => panic!("expected ConversationCreated, got {other:?}"),
    };
    t.engine
        .submit(request(&creator, 2, send_body(&group, 1, "hi all")));
    assert_eq!(ack(&t.g1.reply(0, 2)).unwrap().seq, 1);
    // The engine is FIFO: once the answer to a later request is there,
    // everything the send produced has been delivered.
    t.engine.submit(request(
        &creator,
        3,
        Body::PresenceQuery(pb::PresenceQuery::default()),
    ));
    t.g1.reply(0, 3);

    let mut deliveries: HashMap<(String, u64), usize> = HashMap::new();
    for (name, sink) in [("g1", &t.g1), ("g2", &t.g2)] {
        for o in sink.items.lock().unwrap().iter() {
            if let Some(m) = delivered(&o.frame) {
                assert_eq!(m.conversation_id, group);
                *deliveries.entry((name.to_string(), o.conn)).or_default() += 1;
            }
        }
    }
    assert_eq!(deliveries.len(), 999);
    assert!(deliveries.values().all(|n| *n == 1));
    assert!(!deliveries.contains_key(&("g1".to_string(), 0)));
}

#[test]
fn reconnect_on_another_gateway_replaces_the_old_connection() {
    let t = setup(EmbeddedConfig::default());
    let old = open(&t.engine, "bob", "phone", "g1", 5);
    let new = open(&t.engine, "bob", "phone", "g2", 6);
    let go_away = t.g1.wait_for("GoAway on the old connection", |frames| {
        frames.iter().find(|o| o.conn == 5).cloned()
    });
    assert!(go_away.closes_connection());
    match go_away.frame.body {
        Some(Body::GoAway(g)) => assert_eq!(g.reason, pb::GoAwayReason::Replaced as i32),
        other => panic!("expected GoAway, got {other:?}"),
    }
    // The old connection's late close does not unregister the new one.
    t.engine.session_closed(&old, 1);
    let alice = open(&t.engine, "alice", "phone", "g1", 1);
    t.engine
        .submit(request(&alice, 1, send_body(DM, 1, "still there?")));
    t.g2.wait_for("deliver on the new connection", |frames| {
        frames
            .iter()
            .find(|o| o.conn == new.addr.conn && delivered(&o.frame).is_some())
            .map(|_| ())
    });
    assert!(t.pushes.0.items.lock().unwrap().is_empty());
}

#[test]
fn offline_recipient_gets_one_push_event() {
    let t = setup(EmbeddedConfig::default());
    // Bob's phone registers its push token, then goes offline.
    let bob = open(&t.engine, "bob", "phone", "g2", 7);
    t.engine.submit(request(
        &bob,
        3,
        Body::RegisterPushToken(pb::RegisterPushToken {
            platform: pb::PushPlatform::Fcm.into(),
            token: "fcm-bob-phone".into(),
            ..Default::default()
        }),
    ));
    match t.g2.reply(7, 3).body {
        Some(Body::PushTokenRegistered(_)) => {}
        other => panic!("expected PushTokenRegistered, got {other:?}"),
    }
    t.engine.session_closed(&bob, 1_700_000_000_001);
    let alice = open(&t.engine, "alice", "phone", "g1", 1);
    t.engine
        .submit(request(&alice, 1, send_body(DM, 1, "wake up")));
    t.engine
        .submit(request(&alice, 2, send_body(DM, 2, "are you there")));
    t.g1.reply(1, 2);
    // Output is flushed pushes first: once the reply is here, so are the
    // pushes of both sends.
    let pushes = t.pushes.0.items.lock().unwrap().clone();
    assert_eq!(pushes.len(), 1, "{pushes:?}");
    assert_eq!(pushes[0].user_id, "bob");
    assert_eq!(pushes[0].seq, 1);
    assert!(pushes[0].online_device_ids.is_empty());
}

#[test]
fn presence_events_cross_gateways() {
    // Watcher and bob share no conversation: visibility is out of the way here
    // (router_logic presence_privacy_* and the gateway's presence_privacy test
    // cover the default rule).
    let t = setup(EmbeddedConfig {
        router: RouterConfig {
            presence_visibility: PresenceVisibility::Everyone,
            ..RouterConfig::default()
        },
        ..EmbeddedConfig::default()
    });
    let watcher = open(&t.engine, "watcher", "phone", "g1", 1);
    t.engine.submit(request(
        &watcher,
        4,
        Body::PresenceSubscribe(pb::PresenceSubscribe {
            user_ids: vec!["bob".into()],
            unsubscribe: false,
        }),
    ));
    t.g1.reply(1, 4);
    let bob = open(&t.engine, "bob", "phone", "g2", 9);
    t.engine.session_closed(&bob, 1234);
    let events = t.g1.wait_for("online and offline events", |frames| {
        let events: Vec<(bool, i64)> = frames
            .iter()
            .filter_map(|o| match &o.frame.body {
                Some(Body::PresenceEvent(pb::PresenceEvent { presence: Some(p) })) => {
                    Some((p.online, p.last_seen_ms))
                }
                _ => None,
            })
            .collect();
        (events.len() == 2).then_some(events)
    });
    assert_eq!(events, [(true, 0), (false, 1234)]);
}

#[test]
fn overload_is_answered_unavailable_at_once() {
    let t = setup(EmbeddedConfig {
        max_queued_requests: 0,
        ..EmbeddedConfig::default()
    });
    let alice = open(&t.engine, "alice", "phone", "g1", 1);
    t.engine.submit(request(&alice, 8, send_body(DM, 3, "x")));
    let e = t.g1.reply(1, 8);
    let e = error(&e).expect("Error");
    assert_eq!(e.code, ErrorCode::Unavailable as u32);
    assert_eq!(e.client_msg_id, cmid(3));
}

#[test]
fn shutdown_flushes_queued_work_then_refuses() {
    let t = setup(EmbeddedConfig::default());
    let alice = open(&t.engine, "alice", "phone", "g1", 1);
    for n in 1..=200 {
        t.engine
            .submit(request(&alice, n, send_body(DM, n, "queued")));
    }
    t.engine.shutdown();
    // Every queued request was answered before shutdown returned.
    let acks =
        t.g1.frames_for(1)
            .iter()
            .filter(|f| ack(f).is_some())
            .count();
    assert_eq!(acks, 200);

    t.engine
        .submit(request(&alice, 999, send_body(DM, 999, "late")));
    let e = t.g1.reply(1, 999);
    assert_eq!(error(&e).unwrap().code, ErrorCode::Unavailable as u32);
    assert!(t.engine.start("g3", t.g2.clone()).is_err());
    t.engine.shutdown(); // idempotent
}

/// `submit_batch` (a gateway core's turn) and single `submit`s interleaved:
/// every request is answered, in the order submitted, per connection and
/// across batches, and the recipient sees the sender's order.
#[test]
fn batches_keep_order_per_connection_and_across_batches() {
    let t = setup(EmbeddedConfig {
        max_commands_per_flush: 7, // batches straddle flushes
        ..EmbeddedConfig::default()
    });
    let alice = open(&t.engine, "alice", "phone", "g1", 1);
    let carol = open(&t.engine, "carol", "phone", "g1", 3);
    open(&t.engine, "bob", "phone", "g2", 7);
    let mut n = 0;
    for round in 0..20 {
        let mut batch = Vec::new();
        for _ in 0..(round % 5) + 1 {
            n += 1;
            batch.push(request(&alice, n, send_body(DM, n, &n.to_string())));
            batch.push(request(
                &carol,
                n,
                send_body("dm:bob:carol", n, &n.to_string()),
            ));
        }
        t.engine.submit_batch(batch);
        n += 1;
        t.engine
            .submit(request(&alice, n, send_body(DM, n, &n.to_string())));
        t.engine.submit_batch(Vec::new());
    }
    t.g1.reply(1, n);
    t.g2.wait_for("every delivery to bob", |frames| {
        (frames
            .iter()
            .filter(|o| delivered(&o.frame).is_some())
            .count()
            == n as usize + (n as usize - 20))
            .then_some(())
    });
    let alice_acks: Vec<(u32, u64)> =
        t.g1.frames_for(1)
            .iter()
            .map(|f| (f.request_id, ack(f).expect("SendAck").seq))
            .collect();
    let expected: Vec<(u32, u64)> = (1..=n).map(|i| (i, u64::from(i))).collect();
    assert_eq!(alice_acks, expected, "acks in request order, seq in order");
    let bodies: Vec<String> =
        t.g2.frames_for(7)
            .iter()
            .filter_map(delivered)
            .filter(|m| m.conversation_id == DM)
            .map(|m| String::from_utf8(m.body.clone()).unwrap())
            .collect();
    let sent: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
    assert_eq!(bodies, sent);
}

#[test]
fn a_batch_over_the_queue_limit_is_refused_from_the_tail() {
    let t = setup(EmbeddedConfig {
        max_queued_requests: 1,
        ..EmbeddedConfig::default()
    });
    let alice = open(&t.engine, "alice", "phone", "g1", 1);
    t.engine.submit_batch(vec![
        request(&alice, 1, send_body(DM, 1, "x")),
        request(&alice, 2, send_body(DM, 2, "y")),
        request(&alice, 3, send_body(DM, 3, "z")),
    ]);
    assert_eq!(ack(&t.g1.reply(1, 1)).expect("SendAck").seq, 1);
    for id in [2, 3] {
        let e = t.g1.reply(1, id);
        let e = error(&e).expect("Error");
        assert_eq!(e.code, ErrorCode::Unavailable as u32);
        assert_eq!(e.client_msg_id, cmid(id));
    }
}

/// A hosted engine (`EmbeddedEngine::hosted`) run by hand from the test
/// thread, as a gateway core thread runs it: nothing happens between turns,
/// and `wake` counts the calls asking the host for one.
struct HostedSetup {
    engine: EmbeddedEngine,
    host: Box<dyn BackendHost>,
    wakes: Arc<AtomicUsize>,
    g1: Arc<CollectSink>,
    g2: Arc<CollectSink>,
}

fn hosted(config: EmbeddedConfig, before_host: impl FnOnce(&EmbeddedEngine)) -> HostedSetup {
    let engine = EmbeddedEngine::hosted_with_parts(
        config,
        Arc::new(ManualClock::new(1_700_000_000_000)),
        CollectPush::default(),
    );
    let g1 = Arc::new(CollectSink::default());
    let g2 = Arc::new(CollectSink::default());
    engine.start("g1", g1.clone()).unwrap();
    engine.start("g2", g2.clone()).unwrap();
    before_host(&engine);
    let wakes = Arc::new(AtomicUsize::new(0));
    let w = wakes.clone();
    let host = engine
        .take_host(Arc::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        }))
        .expect("a hosted engine hands over its loop");
    HostedSetup {
        engine,
        host,
        wakes,
        g1,
        g2,
    }
}

fn acks_on(sink: &CollectSink, conn: u64) -> Vec<(u32, u64)> {
    sink.frames_for(conn)
        .iter()
        .filter_map(|f| ack(f).map(|a| (f.request_id, a.seq)))
        .collect()
}

#[test]
fn a_hosted_engine_runs_in_its_hosts_turns_only() {
    let mut alice = None;
    let mut t = hosted(EmbeddedConfig::default(), |engine| {
        // Work queued before any gateway took the loop waits for it.
        let a = open(engine, "alice", "phone", "g1", 1);
        open(engine, "bob", "phone", "g2", 7);
        engine.submit(request(&a, 1, send_body(DM, 1, "early")));
        alice = Some(a);
    });
    let alice = alice.unwrap();
    assert_eq!(
        t.wakes.load(Ordering::SeqCst),
        1,
        "taking the loop asks for a turn"
    );
    assert!(t.g1.frames_for(1).is_empty(), "no thread ran it");
    assert!(!t.host.run_turn(), "everything queued fits one turn");
    // The turn delivered synchronously, on this thread.
    assert_eq!(acks_on(&t.g1, 1), vec![(1, 1)]);
    assert_eq!(delivered(&t.g2.frames_for(7)[0]).unwrap().body, b"early");

    t.engine
        .submit(request(&alice, 2, send_body(DM, 2, "later")));
    assert_eq!(t.wakes.load(Ordering::SeqCst), 2, "new work wakes the host");
    assert_eq!(acks_on(&t.g1, 1).len(), 1, "nothing runs between turns");
    assert!(!t.host.run_turn());
    assert_eq!(acks_on(&t.g1, 1), vec![(1, 1), (2, 2)]);
    assert!(!t.host.run_turn(), "an idle turn does nothing");

    // One host per engine; a threaded engine has none to give.
    assert!(t.engine.take_host(Arc::new(|| {})).is_none());
    let threaded = EmbeddedEngine::new(EmbeddedConfig::default());
    assert!(threaded.take_host(Arc::new(|| {})).is_none());
}

#[test]
fn a_hosted_turn_is_bounded_and_says_when_work_is_left() {
    let mut t = hosted(
        EmbeddedConfig {
            max_commands_per_flush: 7,
            ..EmbeddedConfig::default()
        },
        |_| {},
    );
    let alice = open(&t.engine, "alice", "phone", "g1", 1);
    for n in 1..=20 {
        t.engine.submit(request(&alice, n, send_body(DM, n, "x")));
    }
    // The session opening and 6 sends, then the host's connections get a go.
    assert!(t.host.run_turn(), "work left after a bounded turn");
    assert_eq!(acks_on(&t.g1, 1).len(), 6);
    let mut turns = 1;
    loop {
        turns += 1;
        if !t.host.run_turn() {
            break;
        }
    }
    assert_eq!(turns, 3, "a session opening and 20 sends, 7 per turn");
    let expected: Vec<(u32, u64)> = (1..=20).map(|n| (n, u64::from(n))).collect();
    assert_eq!(acks_on(&t.g1, 1), expected, "in order across turns");
}

#[test]
fn a_hosted_engine_shut_down_finishes_in_its_next_turn_then_refuses() {
    let mut t = hosted(EmbeddedConfig::default(), |_| {});
    let alice = open(&t.engine, "alice", "phone", "g1", 1);
    for n in 1..=5 {
        t.engine
            .submit(request(&alice, n, send_body(DM, n, "queued")));
    }
    t.engine.shutdown();
    assert!(t.engine.start("g3", t.g2.clone()).is_err());
    assert!(!t.host.run_turn(), "the turn that meets Stop is the last");
    assert_eq!(acks_on(&t.g1, 1).len(), 5, "queued before Stop: handled");
    t.engine
        .submit(request(&alice, 9, send_body(DM, 9, "late")));
    let e = t.g1.reply(1, 9);
    assert_eq!(error(&e).unwrap().code, ErrorCode::Unavailable as u32);
    assert!(!t.host.run_turn());
}

#[test]
fn a_hosted_engine_goes_on_on_its_own_thread_when_its_host_stops() {
    let t = hosted(EmbeddedConfig::default(), |_| {});
    let alice = open(&t.engine, "alice", "phone", "g1", 1);
    open(&t.engine, "bob", "phone", "g2", 7);
    t.engine
        .submit(request(&alice, 1, send_body(DM, 1, "queued")));
    // The host's core exits without running that (a stopped gateway).
    drop(t.host);
    assert_eq!(ack(&t.g1.reply(1, 1)).expect("SendAck").seq, 1);
    t.engine
        .submit(request(&alice, 2, send_body(DM, 2, "later")));
    assert_eq!(ack(&t.g1.reply(1, 2)).expect("SendAck").seq, 2);
    t.g2.wait_for("both deliveries to bob", |frames| {
        (frames
            .iter()
            .filter(|o| delivered(&o.frame).is_some())
            .count()
            == 2)
            .then_some(())
    });
    t.engine.shutdown();
    t.engine
        .submit(request(&alice, 3, send_body(DM, 3, "after shutdown")));
    let e = t.g1.reply(1, 3);
    assert_eq!(error(&e).unwrap().code, ErrorCode::Unavailable as u32);
}

/// The engine runs on a gateway's core 0 in production: a request whose
/// handling panics (a bug) is answered INTERNAL and counted, and the other
/// requests of the same batch and the ones after it are served. Before the
/// one runner the panic unwound the engine's thread (and, hosted, core 0
/// with every connection on it).
#[test]
fn a_panicking_request_is_answered_internal_and_its_neighbours_served() {
    let clock = Arc::new(TrapClock::default());
    let engine = EmbeddedEngine::with_parts(
        EmbeddedConfig::default(),
        clock.clone(),
        CollectPush::default(),
    );
    let g1 = Arc::new(CollectSink::default());
    engine.start("g1", g1.clone()).unwrap();
    let alice = open(&engine, "alice", "phone", "g1", 1);
    let bob = open(&engine, "bob", "phone", "g1", 2);
    let carol = open(&engine, "carol", "phone", "g1", 3);
    // Wait until the sessions are in (the clock is read for them).
    engine.submit(request(&alice, 1, Body::PresenceQuery(Default::default())));
    g1.reply(1, 1);
    // One batch: the batch panics, then alice's Send alone panics again;
    // bob's in the same batch is served.
    clock.arm();
    engine.submit_batch(vec![
        request(&alice, 2, send_body(DM, 1, "boom")),
        request(&bob, 3, send_body(DM, 2, "fine")),
    ]);
    let refused = g1.reply(1, 2);
    match &refused.body {
        Some(Body::Error(e)) => {
            assert_eq!(e.code, ErrorCode::Internal as u32);
            assert_eq!(e.client_msg_id, cmid(1), "the Send's id is echoed");
        }
        other => panic!("expected INTERNAL, got {other:?}"),
    }
    assert_eq!(ack(&g1.reply(2, 3)).expect("bob's SendAck").seq, 1);
    // And the engine goes on.
    engine.submit(request(&carol, 4, send_body("dm:bob:carol", 3, "after")));
    assert_eq!(ack(&g1.reply(3, 4)).expect("carol's SendAck").seq, 1);
    assert_eq!(engine.dead_letters(), 1);
}

/// Group commit on the durable store: a turn whose commit fails is answered
/// UNAVAILABLE whole: no SendAck, no delivery, no push, and no seq used (the
/// retry after the disk recovered gets seq 1, delivered once).
#[test]
fn a_turn_that_cannot_be_made_durable_is_answered_unavailable_and_uses_no_seq() {
    use palaver_router::disk::{DiskConfig, DiskStore};
    let dir = palaver_testkit::stack::WorkDir::temp("engine-disk").unwrap();
    let store = DiskStore::open(dir.path(), &DiskConfig::default()).unwrap();
    let refuse = store.commit_failures();
    let pushes = CollectPush::default();
    let engine = EmbeddedEngine::with_store(
        store,
        EmbeddedConfig::default(),
        Arc::new(ManualClock::new(1_700_000_000_000)),
        pushes.clone(),
        true,
    );
    let g1 = Arc::new(CollectSink::default());
    engine.start("g1", g1.clone()).unwrap();
    let alice = open(&engine, "alice", "phone", "g1", 1);
    let bob = open(&engine, "bob", "phone", "g1", 7);
    // The sessions are in (FIFO) before the disk starts refusing.
    engine.submit(request(&bob, 1, Body::PresenceQuery(Default::default())));
    g1.reply(7, 1);

    refuse.store(true, Ordering::Relaxed);
    engine.submit(request(&alice, 11, send_body(DM, 1, "not on disk")));
    let refused = g1.reply(1, 11);
    assert_eq!(
        error(&refused).map(|e| e.code),
        Some(ErrorCode::Unavailable as u32),
        "{refused:?}"
    );
    refuse.store(false, Ordering::Relaxed);
    engine.submit(request(&alice, 12, send_body(DM, 1, "not on disk")));
    assert_eq!(ack(&g1.reply(1, 12)).expect("SendAck").seq, 1);
    engine.submit(request(&bob, 2, Body::PresenceQuery(Default::default())));
    g1.reply(7, 2);
    let delivered_to_bob: Vec<u64> = g1
        .frames_for(7)
        .iter()
        .filter_map(|f| delivered(f).map(|m| m.seq))
        .collect();
    assert_eq!(delivered_to_bob, vec![1], "one delivery, after the commit");
    assert!(pushes.0.items.lock().unwrap().is_empty());
}
