//! End to end on real Apache Kafka and real Redis: `palaver-router`
//! processes (this crate's binary), in-process gateways with the Kafka/Redis
//! bridge, and real TLS clients (palaver-tools' blocking client).

// Configs are filled field by field, like an operator's config file.
#![allow(clippy::field_reassign_with_default)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palaver_gateway::bridge::presence::PresenceTiming;
use palaver_gateway::bridge::{BridgeConfig, KafkaRedisBridge};
use palaver_gateway::config::BackendConfig;
use palaver_gateway::{auth, devcerts, Config, GatewayHandle};
use palaver_protocol::pb::{self, frame::Body};
use palaver_router::kafka::{records, PUSH_TOPIC};
use palaver_router::redis_store::RedisConfig;
use palaver_tools::client::{new_client_msg_id, text_send, Client, ConnectOptions};
use palaver_tools::stack::{Kafka, Redis, RedisCluster, WorkDir};
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;

const T: Duration = Duration::from_secs(30);

/// A `palaver-router` process, killed on drop.
struct RouterProcess {
    child: Child,
}

impl RouterProcess {
    fn start(brokers: &str, redis: &str, id: &str, log_dir: &std::path::Path) -> Self {
        let log = std::fs::File::create(log_dir.join(format!("{id}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_palaver-router"))
            .args(["--brokers", brokers, "--redis", redis, "--router-id", id])
            .args(["--partitions", "4", "--max-batch", "200"])
            .env("RUST_LOG", "info,rdkafka=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn palaver-router");
        Self { child }
    }

    /// SIGKILL: no flush, no commit, no goodbye to the group.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Redis, Kafka, routers and gateways of one test.
struct Stack {
    _redis: Option<Redis>,
    _cluster: Option<RedisCluster>,
    redis_spec: String,
    redis_config: RedisConfig,
    kafka: Kafka,
    routers: Vec<RouterProcess>,
    gateways: Vec<Gateway>,
    dir: WorkDir,
}

struct Gateway {
    handle: Option<GatewayHandle>,
    bridge: Arc<KafkaRedisBridge>,
    opts: ConnectOptions,
}

impl Stack {
    fn start(cluster: bool, routers: usize) -> Self {
        let kafka = Kafka::start().expect("start Kafka");
        let (redis, redis_cluster, redis_spec, redis_config) = if cluster {
            let c = RedisCluster::start(3).expect("start Redis Cluster");
            let hosts: Vec<String> = c
                .nodes()
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port()))
                .collect();
            let spec = format!("redis+cluster://{}", hosts.join(","));
            let config = RedisConfig::cluster(c.urls());
            (None, Some(c), spec, config)
        } else {
            let r = Redis::start().expect("start redis-server");
            let spec = r.url();
            let config = RedisConfig::standalone(r.url());
            (Some(r), None, spec, config)
        };
        let dir = WorkDir::temp("e2e").unwrap();
        let mut stack = Stack {
            _redis: redis,
            _cluster: redis_cluster,
            redis_spec,
            redis_config,
            kafka,
            routers: Vec::new(),
            gateways: Vec::new(),
            dir,
        };
        for i in 0..routers {
            stack.add_router(&format!("router-{i}"));
        }
        stack
    }

    fn add_router(&mut self, id: &str) {
        let r = RouterProcess::start(
            &self.kafka.bootstrap(),
            &self.redis_spec,
            id,
            self.dir.path(),
        );
        self.routers.push(r);
    }

    /// Starts gateway `id` (2 cores) with a short lease for the fault tests.
    fn add_gateway(&mut self, id: &str) -> usize {
        let data_dir: PathBuf = self.dir.path().join("gw-data");
        let mut config = Config::default();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.cores = 2;
        config.data_dir = data_dir.clone();
        config.gateway_id = id.into();
        config.backend = BackendConfig::Kafka {
            brokers: self.kafka.bootstrap(),
            redis: self.redis_spec.clone(),
        };
        let mut bridge_config =
            BridgeConfig::new(self.kafka.bootstrap(), self.redis_config.clone());
        bridge_config.presence = PresenceTiming {
            flush_interval: Duration::from_millis(50),
            tick: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(3),
        };
        bridge_config.inbound_partitions = 4;
        let bridge = Arc::new(KafkaRedisBridge::new(bridge_config));
        let handle = GatewayHandle::start(config, bridge.clone()).expect("gateway starts");
        let ca = std::fs::read(data_dir.join(devcerts::CA_CERT_FILE)).unwrap();
        self.gateways.push(Gateway {
            opts: ConnectOptions::new(handle.local_addr, ca),
            handle: Some(handle),
            bridge,
        });
        self.gateways.len() - 1
    }

    fn secret(&self) -> Vec<u8> {
        devcerts::read_secret(
            &self
                .dir
                .path()
                .join("gw-data")
                .join(devcerts::JWT_SECRET_FILE),
        )
        .unwrap()
    }

    fn login(&self, gateway: usize, user: &str, device: &str) -> Client {
        self.login_with(gateway, user, device, Vec::new()).0
    }

    /// Hello with resume cursors; returns the client and the Welcome.
    fn login_with(
        &self,
        gateway: usize,
        user: &str,
        device: &str,
        resume: Vec<pb::Cursor>,
    ) -> (Client, pb::Welcome) {
        let mut c = Client::connect(&self.gateways[gateway].opts).expect("TLS connect");
        let token = auth::mint_hs256(&self.secret(), user, None, 3600);
        let w = c
            .hello_with(
                pb::Hello {
                    protocol_version: palaver_protocol::PROTOCOL_VERSION,
                    token,
                    device_id: device.into(),
                    client_name: "e2e".into(),
                    client_version: "0".into(),
                    resume,
                },
                T,
            )
            .expect("welcome");
        (c, w)
    }

    /// A gateway crash as the cluster sees it: the bridge stops at once
    /// (no presence flush, no lease renewal), then the sockets go away.
    fn crash_gateway(&mut self, gateway: usize) {
        let gw = &mut self.gateways[gateway];
        gw.bridge.halt();
        if let Some(h) = gw.handle.take() {
            h.stop();
            h.join();
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for gw in &mut self.gateways {
            if let Some(h) = gw.handle.take() {
                h.stop();
                h.join();
            }
        }
        self.routers.clear();
    }
}

fn deliver_of(f: &pb::Frame) -> Option<&pb::Message> {
    match &f.body {
        Some(Body::Deliver(d)) => d.message.as_ref(),
        _ => None,
    }
}

fn ack_of(f: &pb::Frame) -> Option<&pb::SendAck> {
    match &f.body {
        Some(Body::SendAck(a)) => Some(a),
        _ => None,
    }
}

/// Sends and waits for the ack, retrying with the same client_msg_id on
/// UNAVAILABLE or silence (what a real client does).
fn send_reliably(c: &mut Client, conv: &str, text: &str) -> pb::SendAck {
    try_send_reliably(c, conv, text, Duration::from_secs(90))
        .unwrap_or_else(|| panic!("no SendAck for {text}"))
}

/// [`send_reliably`] that gives up after `patience` without an ack.
fn try_send_reliably(
    c: &mut Client,
    conv: &str,
    text: &str,
    patience: Duration,
) -> Option<pb::SendAck> {
    let cmid = new_client_msg_id();
    let deadline = Instant::now() + patience;
    loop {
        if Instant::now() >= deadline {
            return None;
        }
        let id = c
            .request(Body::Send(pb::Send {
                conversation_id: conv.into(),
                client_msg_id: cmid.clone(),
                kind: pb::ContentKind::Text as i32,
                body: text.as_bytes().to_vec(),
                ..Default::default()
            }))
            .unwrap();
        match c.recv_until(Duration::from_secs(20), "SendAck or Error", |f| {
            f.request_id == id
        }) {
            Ok(f) => match &f.body {
                Some(Body::SendAck(a)) => return Some(a.clone()),
                // A client's retry back-off.
                Some(Body::Error(e)) if e.code == pb::ErrorCode::Unavailable as u32 => {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                other => panic!("unexpected answer to Send: {other:?}"),
            },
            Err(_) => continue,
        }
    }
}

fn next_deliver(c: &mut Client) -> pb::Message {
    let f = c
        .recv_until(T, "Deliver", |f| deliver_of(f).is_some())
        .unwrap();
    deliver_of(&f).unwrap().clone()
}

fn group_of(c: &mut Client, members: &[&str]) -> String {
    let id = c
        .request(Body::CreateConversation(pb::CreateConversation {
            kind: pb::ConversationKind::Group as i32,
            title: "team".into(),
            member_user_ids: members.iter().map(|s| s.to_string()).collect(),
        }))
        .unwrap();
    let f = c
        .recv_until(T, "ConversationCreated", |f| f.request_id == id)
        .unwrap();
    match f.body {
        Some(Body::ConversationCreated(cc)) => cc.conversation.unwrap().conversation_id,
        other => panic!("expected ConversationCreated, got {other:?}"),
    }
}

/// 1:1 across two gateways, group fan-out, receipts, typing, duplicate
/// client_msg_id, and order under concurrent senders — on `cluster` or not.
fn chat_checks(cluster: bool) {
    let mut s = Stack::start(cluster, 1);
    let g1 = s.add_gateway("gw1");
    let g2 = s.add_gateway("gw2");
    let mut alice = s.login(g1, "alice", "phone");
    let mut bob = s.login(g2, "bob", "phone");
    let mut carol = s.login(g2, "carol", "tablet");
    let dm = palaver_protocol::direct_conversation_id("alice", "bob");

    // 1:1 across gateways.
    let ack = send_reliably(&mut alice, &dm, "hi bob");
    assert_eq!(ack.seq, 1);
    let m = next_deliver(&mut bob);
    assert_eq!(
        (m.sender_user_id.as_str(), m.seq, m.body.as_slice()),
        ("alice", 1, &b"hi bob"[..])
    );
    let ack = send_reliably(&mut bob, &dm, "hi alice");
    assert_eq!(ack.seq, 2);
    assert_eq!(next_deliver(&mut alice).seq, 2);

    // Receipts round trip: bob read 1 → alice hears of it.
    bob.request(Body::Receipt(pb::Receipt {
        conversation_id: dm.clone(),
        kind: pb::ReceiptKind::Read as i32,
        up_to_seq: 1,
    }))
    .unwrap();
    let f = alice
        .recv_until(T, "ReceiptUpdate", |f| {
            matches!(f.body, Some(Body::ReceiptUpdate(_)))
        })
        .unwrap();
    let Some(Body::ReceiptUpdate(r)) = f.body else {
        unreachable!()
    };
    assert_eq!(
        (r.user_id.as_str(), r.up_to_seq, r.kind),
        ("bob", 1, pb::ReceiptKind::Read as i32)
    );

    // Typing is relayed, never stored.
    alice
        .request(Body::Typing(pb::Typing {
            conversation_id: dm.clone(),
            active: true,
            user_id: String::new(),
        }))
        .unwrap();
    let f = bob
        .recv_until(T, "Typing", |f| matches!(f.body, Some(Body::Typing(_))))
        .unwrap();
    let Some(Body::Typing(t)) = f.body else {
        unreachable!()
    };
    assert_eq!((t.user_id.as_str(), t.active), ("alice", true));

    // Group fan-out across gateways.
    let grp = group_of(&mut alice, &["bob", "carol"]);
    let ack = send_reliably(&mut alice, &grp, "hello team");
    assert_eq!(ack.seq, 1);
    for c in [&mut bob, &mut carol] {
        let m = next_deliver(c);
        assert_eq!((m.conversation_id.as_str(), m.seq), (grp.as_str(), 1));
    }

    // The same client_msg_id twice: one seq, one ack value, one delivery.
    let cmid = new_client_msg_id();
    let send = Body::Send(pb::Send {
        conversation_id: dm.clone(),
        client_msg_id: cmid.clone(),
        kind: pb::ContentKind::Text as i32,
        body: b"once".to_vec(),
        ..Default::default()
    });
    let id1 = alice.request(send.clone()).unwrap();
    let a1 = alice
        .recv_until(T, "ack 1", |f| f.request_id == id1)
        .unwrap();
    let id2 = alice.request(send).unwrap();
    let a2 = alice
        .recv_until(T, "ack 2", |f| f.request_id == id2)
        .unwrap();
    let (a1, a2) = (ack_of(&a1).unwrap().clone(), ack_of(&a2).unwrap().clone());
    assert_eq!(a1, a2, "the retry gets the original ack");
    assert_eq!(a1.seq, 3);
    assert_eq!(next_deliver(&mut bob).client_msg_id, cmid);
    // A later message arrives next: the duplicate was not delivered again.
    let ack = send_reliably(&mut alice, &dm, "after");
    assert_eq!(ack.seq, 4);
    assert_eq!(next_deliver(&mut bob).seq, 4);

    // Concurrent senders in one conversation: seqs are 1..=2N without gaps,
    // every member sees them in seq order, each sender's own order is kept.
    let conc = group_of(&mut carol, &["alice", "bob"]);
    const N: usize = 40;
    let mut senders = Vec::new();
    for (user, gw) in [("alice", g1), ("carol", g2)] {
        let mut c = s.login(gw, user, "second");
        let conv = conc.clone();
        senders.push(std::thread::spawn(move || {
            let ids: Vec<u32> = (0..N)
                .map(|i| c.request(text_send(&conv, &format!("{user}:{i}"))).unwrap())
                .collect();
            let mut seqs = Vec::new();
            for id in ids {
                let f = c.recv_until(T, "SendAck", |f| f.request_id == id).unwrap();
                seqs.push(ack_of(&f).expect("ack").seq);
            }
            seqs
        }));
    }
    let mut all: Vec<u64> = Vec::new();
    for h in senders {
        let seqs = h.join().unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "per-sender order {seqs:?}"
        );
        all.extend(seqs);
    }
    all.sort();
    assert_eq!(all, (1..=2 * N as u64).collect::<Vec<_>>());
    let mut got = Vec::new();
    while got.len() < 2 * N {
        let m = next_deliver(&mut bob);
        if m.conversation_id == conc {
            got.push(m.seq);
        }
    }
    assert_eq!(
        got,
        (1..=2 * N as u64).collect::<Vec<_>>(),
        "bob sees seq order"
    );
}

#[test]
fn chat_across_gateways_standalone_redis() {
    chat_checks(false);
}

#[test]
fn chat_across_gateways_redis_cluster() {
    chat_checks(true);
}

/// Offline → push event on palaver.push → reconnect with resume → sync with
/// no gap.
#[test]
fn offline_user_gets_push_then_syncs_without_gap() {
    let mut s = Stack::start(false, 1);
    let g1 = s.add_gateway("gw1");
    let g2 = s.add_gateway("gw2");
    let mut alice = s.login(g1, "alice", "phone");
    let dm = palaver_protocol::direct_conversation_id("alice", "bob");
    {
        let mut bob = s.login(g2, "bob", "phone");
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
    let mut check = s.login(g1, "carol", "phone");
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
    let id = c
        .request(Body::PresenceQuery(pb::PresenceQuery {
            user_ids: vec![user.into()],
        }))
        .unwrap();
    let f = c
        .recv_until(T, "PresenceResult", |f| f.request_id == id)
        .unwrap();
    match f.body {
        Some(Body::PresenceResult(mut r)) => r.presences.remove(0),
        other => panic!("expected PresenceResult, got {other:?}"),
    }
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

/// Presence across gateways; a crashed gateway's users go offline within
/// the lease time, with events to watchers on other gateways.
#[test]
fn presence_across_gateways_and_gateway_crash() {
    let mut s = Stack::start(false, 1);
    let g1 = s.add_gateway("gw1");
    let g2 = s.add_gateway("gw2");
    let mut alice = s.login(g1, "alice", "phone");
    let id = alice
        .request(Body::PresenceSubscribe(pb::PresenceSubscribe {
            user_ids: vec!["bob".into()],
            unsubscribe: false,
        }))
        .unwrap();
    let f = alice
        .recv_until(T, "PresenceResult", |f| f.request_id == id)
        .unwrap();
    let Some(Body::PresenceResult(r)) = f.body else {
        panic!("{f:?}")
    };
    assert!(!r.presences[0].online);

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

/// Two routers; one is SIGKILLed while senders stream messages, and (as a
/// supervisor would) a replacement is started. Every acknowledged message is
/// in the history afterwards, seqs contiguous and unique, order kept.
///
/// The replacement matters with the former stand-in broker: when the killed router was the
/// group leader, it kept the dead leader's stale assignment until the
/// group's membership changes again, so the survivor alone would not take
/// over the dead router's partitions.
#[test]
fn killing_a_router_mid_stream_loses_no_acknowledged_message() {
    let mut s = Stack::start(false, 2);
    let g1 = s.add_gateway("gw1");
    const PER_SENDER: usize = 150;
    let acked_so_far = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    let convs: Vec<String> = (0..4)
        .map(|i| palaver_protocol::direct_conversation_id("alice", &format!("peer{i}")))
        .collect();
    for (i, conv) in convs.iter().enumerate() {
        let mut c = s.login(g1, "alice", &format!("dev{i}"));
        let conv = conv.clone();
        let acked_so_far = acked_so_far.clone();
        senders.push(std::thread::spawn(move || {
            // A sender stops at its first message that gets no ack within
            // 60 s: with the former stand-in broker a partition can stay unassigned after the
            // group leader dies (see above). That is a liveness problem of
            // the broker; what this test checks is safety: nothing acked is
            // lost, reordered or duplicated.
            let mut acks = Vec::new();
            for n in 0..PER_SENDER {
                let text = n.to_string();
                match try_send_reliably(&mut c, &conv, &text, Duration::from_secs(60)) {
                    Some(ack) => acks.push(ack),
                    None => break,
                }
                acked_so_far.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            acks
        }));
    }
    // Kill a router once traffic flows.
    let acked = || acked_so_far.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + T;
    while acked() < 20 {
        assert!(Instant::now() < deadline, "no traffic before the kill");
        std::thread::sleep(Duration::from_millis(5));
    }
    let revocations = |s: &Stack| {
        std::fs::read_to_string(s.dir.path().join("router-1.log"))
            .unwrap_or_default()
            .matches("partitions revoked")
            .count()
    };
    let before = revocations(&s);
    s.routers[0].kill();
    let acked_at_kill = acked();
    assert!(
        acked_at_kill < 4 * PER_SENDER,
        "the kill came after the stream ended"
    );
    // The replacement joins once the group noticed the death (router-1's
    // partitions are revoked for a rebalance), as a supervisor's restart
    // would after its back-off.
    let deadline = Instant::now() + Duration::from_secs(60);
    while revocations(&s) == before {
        assert!(
            Instant::now() < deadline,
            "the group never noticed the dead router"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s.add_router("router-2");
    let mut acked: HashMap<String, Vec<pb::SendAck>> = HashMap::new();
    for (h, conv) in senders.into_iter().zip(&convs) {
        acked.insert(conv.clone(), h.join().unwrap());
    }
    let total: usize = acked.values().map(Vec::len).sum();
    eprintln!(
        "acked {total} of {} ({acked_at_kill} before the kill)",
        4 * PER_SENDER
    );
    let mut reader = s.login(g1, "alice", "reader");
    for conv in &convs {
        let acks = &acked[conv];
        let id = reader
            .request(Body::History(pb::History {
                conversation_id: conv.clone(),
                before_seq: 0,
                limit: 500,
            }))
            .unwrap();
        let f = reader
            .recv_until(T, "HistoryPage", |f| f.request_id == id)
            .unwrap();
        let Some(Body::HistoryPage(page)) = f.body else {
            panic!("{f:?}")
        };
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        // Gapless from 1. A sender that gave up may have one more message
        // stored than acked (stored, ack not delivered before it gave up).
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{conv}");
        let unacked_stored = seqs.len() - acks.len();
        assert!(
            unacked_stored == 0 || (unacked_stored == 1 && acks.len() < PER_SENDER),
            "{conv}: {} stored, {} acked",
            seqs.len(),
            acks.len()
        );
        let stored: HashSet<(u64, String)> = page
            .messages
            .iter()
            .map(|m| (m.seq, m.message_id.clone()))
            .collect();
        for ack in acks {
            assert!(
                stored.contains(&(ack.seq, ack.message_id.clone())),
                "acked {ack:?} not stored"
            );
        }
        let bodies: Vec<String> = page
            .messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .collect();
        assert_eq!(
            bodies,
            (0..seqs.len()).map(|n| n.to_string()).collect::<Vec<_>>(),
            "order kept in {conv}"
        );
    }
}

/// Kafka down: a Send is answered UNAVAILABLE, carrying its client_msg_id
/// (the client retries it later with the same id).
///
/// Not covered: recovery after the broker restarts. With Kafka 0.6 on SQLite
/// the bridge's idempotent producer got "Unknown broker error" for every
/// record after the restart, in this setup (a standalone producer recovers);
/// that needs its own investigation.
#[test]
fn kafka_outage_answers_unavailable() {
    let mut s = Stack::start(false, 1);
    let g1 = s.add_gateway("gw1");
    let g2 = s.add_gateway("gw2");
    let mut alice = s.login(g1, "alice", "phone");
    let mut bob = s.login(g2, "bob", "phone");
    let dm = palaver_protocol::direct_conversation_id("alice", "bob");
    assert_eq!(send_reliably(&mut alice, &dm, "before").seq, 1);
    assert_eq!(next_deliver(&mut bob).seq, 1);

    s.kafka.kill();
    let cmid = new_client_msg_id();
    let id = alice
        .request(Body::Send(pb::Send {
            conversation_id: dm.clone(),
            client_msg_id: cmid.clone(),
            kind: pb::ContentKind::Text as i32,
            body: b"during".to_vec(),
            ..Default::default()
        }))
        .unwrap();
    let f = alice
        .recv_until(T, "answer", |f| f.request_id == id)
        .unwrap();
    match &f.body {
        Some(Body::Error(e)) => {
            assert_eq!(e.code, pb::ErrorCode::Unavailable as u32, "{e:?}");
            assert_eq!(e.client_msg_id, cmid);
        }
        other => panic!("expected UNAVAILABLE while Kafka is down, got {other:?}"),
    }
    // The connection stays usable.
    alice.ping(7, T).unwrap();
}
