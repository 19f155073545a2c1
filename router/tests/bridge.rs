//! The gateway's Kafka/Redis bridge in-process, with a router worker, on
//! real Kafka and Redis: what it does when its producer fails for good, the
//! limits it reads by, and History below the window from the archive.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use palaver_protocol::pb::{self, frame::Body};
use palaver_router::api::{Backend, DeliverySink, Inbound, Outbound, Session, SessionAddr};
use palaver_router::bridge::{BridgeConfig, KafkaRedisBridge};
use palaver_router::kafka::worker::{RouterWorker, WorkerConfig};
use palaver_router::redis_store::RedisConfig;
use palaver_testkit::stack::{Kafka, Redis};

/// The frames the bridge hands to its gateway.
#[derive(Default)]
struct Frames {
    frames: Mutex<Vec<Outbound>>,
    arrived: Condvar,
}

impl DeliverySink for Frames {
    fn deliver(&self, batch: Vec<Outbound>) {
        self.frames.lock().unwrap().extend(batch);
        self.arrived.notify_all();
    }
    // Channels through the cluster: router/tests/e2e_kafka_redis.rs.
    fn deliver_channel(&self, _posts: Vec<std::sync::Arc<palaver_router::ChannelPost>>) {}
    // This bridge is never reaped (it opens no sessions).
    fn reopen_sessions(&self) {}
}

impl Frames {
    /// Takes the first frame answering `request_id`, waiting up to `patience`.
    fn answer(&self, request_id: u32, patience: Duration) -> Option<pb::Frame> {
        let deadline = Instant::now() + patience;
        let mut frames = self.frames.lock().unwrap();
        loop {
            if let Some(i) = frames.iter().position(|o| o.frame.request_id == request_id) {
                return Some(frames.remove(i).frame);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            frames = self.arrived.wait_timeout(frames, deadline - now).unwrap().0;
        }
    }
}

fn send(request_id: u32, cmid: u8) -> Inbound {
    Inbound {
        from: Session {
            user_id: "alice".into(),
            device_id: "phone".into(),
            addr: SessionAddr {
                gateway_id: "gwt".into(),
                conn: 7,
            },
        },
        request_id,
        body: Body::Send(pb::Send {
            conversation_id: palaver_protocol::direct_conversation_id("alice", "bob"),
            client_msg_id: vec![cmid; 16],
            kind: pb::ContentKind::Text as i32,
            body: vec![cmid],
            ..Default::default()
        }),
        received_ms: 1,
    }
}

/// Sends until acknowledged, resending on UNAVAILABLE or silence as a
/// client does; returns the SendAck and the UNAVAILABLE answers seen.
fn send_until_acked(
    bridge: &KafkaRedisBridge,
    frames: &Frames,
    next_request_id: &mut u32,
    cmid: u8,
) -> (pb::SendAck, usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut unavailable = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "Send {cmid} never acknowledged ({unavailable} UNAVAILABLE answers, {} producers replaced)",
            bridge.producers_replaced()
        );
        *next_request_id += 1;
        bridge.submit(send(*next_request_id, cmid));
        match frames
            .answer(*next_request_id, Duration::from_secs(10))
            .and_then(|f| f.body)
        {
            Some(Body::SendAck(ack)) => return (ack, unavailable),
            Some(Body::Error(e)) if e.code == pb::ErrorCode::Unavailable as u32 => {
                unavailable += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            None => {}
            Some(other) => panic!("Send answered {other:?}"),
        }
    }
}

/// An idempotent producer with a fatal error fails every write for good
/// (librdkafka raises one when a broker answers out of sequence, as after a
/// stall it could not follow). The bridge replaces it: writes are answered
/// UNAVAILABLE at most until then, and the client's resend is acknowledged.
#[test]
fn a_producer_that_failed_for_good_is_replaced_and_writes_go_through_again() {
    let kafka = Kafka::start().expect("kafka");
    let redis = Redis::start().expect("redis-server");
    let brokers = kafka.bootstrap();
    let redis_config = RedisConfig::standalone(redis.url());

    let mut worker_config = WorkerConfig::new(&brokers, redis_config.clone());
    worker_config.inbound_partitions = 1;
    let mut worker = RouterWorker::new(worker_config).expect("worker");
    let stop = Arc::new(AtomicBool::new(false));
    let router = {
        let stop = stop.clone();
        std::thread::spawn(move || worker.run(&stop))
    };

    let mut config = BridgeConfig::new(&brokers, redis_config);
    config.inbound_partitions = 1;
    let bridge = KafkaRedisBridge::new(config);
    let frames = Arc::new(Frames::default());
    bridge.start("gwt", frames.clone()).expect("bridge starts");
    let mut request_id = 0;

    let (ack, _) = send_until_acked(&bridge, &frames, &mut request_id, 1);
    assert_eq!(ack.seq, 1);

    bridge.raise_fatal_producer_error("test: out of sequence");
    let (ack, unavailable) = send_until_acked(&bridge, &frames, &mut request_id, 2);
    assert_eq!(ack.seq, 2, "stored once, after the first");
    assert_eq!(bridge.producers_replaced(), 1);
    eprintln!("{unavailable} UNAVAILABLE answers before the new producer took over");

    bridge.shutdown();
    stop.store(true, Ordering::Relaxed);
    router.join().expect("router worker");
}

/// One source of the limits clients are told: every router publishes the
/// limits it enforces in Redis when it starts, and a gateway's bridge
/// reports them (the gateway announces them in Welcome whatever its own
/// file says) and serves its reads by them.
#[test]
fn the_bridge_reports_and_reads_by_the_limits_the_routers_enforce() {
    let kafka = Kafka::start().expect("kafka");
    let redis = Redis::start().expect("redis-server");
    let brokers = kafka.bootstrap();
    let redis_config = RedisConfig::standalone(redis.url());

    let mut worker_config = WorkerConfig::new(&brokers, redis_config.clone());
    worker_config.inbound_partitions = 1;
    worker_config.router.max_group_members = 7;
    worker_config.router.max_batch = 3;
    worker_config.router.max_channel_members = 5_000;
    let mut worker = RouterWorker::new(worker_config.clone()).expect("worker");
    let stop = Arc::new(AtomicBool::new(false));
    let router = {
        let stop = stop.clone();
        std::thread::spawn(move || worker.run(&stop))
    };

    // The bridge's own config says 1000 and 500, as a gateway's would.
    let mut config = BridgeConfig::new(&brokers, redis_config.clone());
    config.inbound_partitions = 1;
    let bridge = KafkaRedisBridge::new(config);
    let tier = bridge
        .enforced_limits()
        .expect("the router published its limits");
    assert_eq!(
        (
            tier.max_group_members,
            tier.max_batch,
            tier.max_channel_members
        ),
        (7, 3, 5_000),
        "{tier:?}"
    );
    let frames = Arc::new(Frames::default());
    bridge.start("gwt", frames.clone()).expect("bridge starts");
    let mut request_id = 0;
    for cmid in 1..=5 {
        send_until_acked(&bridge, &frames, &mut request_id, cmid);
    }
    // A History read served by this gateway honours the routers' max_batch.
    request_id += 1;
    bridge.submit(Inbound {
        body: Body::History(pb::History {
            conversation_id: palaver_protocol::direct_conversation_id("alice", "bob"),
            before_seq: 0,
            limit: 100,
        }),
        ..send(request_id, 0)
    });
    match frames
        .answer(request_id, Duration::from_secs(10))
        .and_then(|f| f.body)
    {
        Some(Body::HistoryPage(page)) => {
            let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, [3, 4, 5]);
            assert!(page.has_more);
        }
        other => panic!("History answered {other:?}"),
    }
    stop.store(true, Ordering::Relaxed);
    router.join().unwrap();
    bridge.shutdown();

    // A router started with other limits replaces them (and says so).
    worker_config.router.max_group_members = 9;
    drop(RouterWorker::new(worker_config).expect("second worker"));
    let mut store = palaver_router::redis_store::RedisStore::connect(redis_config).expect("Redis");
    assert_eq!(store.tier_limits().unwrap().unwrap().max_group_members, 9);
}

/// With the router tier's archive configured, a gateway serves History
/// below the Redis window from Cassandra: one page from the newest message
/// back to seq 1 (without the archive it ends at the window: tried, it
/// returns only seqs 54..=63).
#[test]
fn a_gateway_with_the_archive_serves_history_below_the_window() {
    use palaver_router::kafka::archiver::{Archiver, ArchiverConfig};
    use palaver_router::kafka::worker::ArchiveSettings;

    let kafka = Kafka::start().expect("kafka");
    let redis = Redis::start().expect("redis-server");
    let cassandra = palaver_testkit::stack::Cassandra::start().expect("cassandra");
    let brokers = kafka.bootstrap();
    let redis_config = RedisConfig::standalone(redis.url());
    let archive = palaver_archive::ArchiveConfig::new(vec![cassandra.address()]);

    let mut worker_config = WorkerConfig::new(&brokers, redis_config.clone());
    worker_config.inbound_partitions = 1;
    worker_config.router.history_window = 10;
    worker_config.archive = Some(ArchiveSettings {
        cassandra: archive.clone(),
        max_unarchived: 100_000,
    });
    let mut worker = RouterWorker::new(worker_config).expect("worker");
    let mut archiver = Archiver::new(ArchiverConfig::new(
        &brokers,
        redis_config.clone(),
        archive.clone(),
    ))
    .expect("archiver");
    let stop = Arc::new(AtomicBool::new(false));
    let threads = [
        {
            let stop = stop.clone();
            std::thread::spawn(move || worker.run(&stop))
        },
        {
            let stop = stop.clone();
            std::thread::spawn(move || archiver.run(&stop))
        },
    ];

    let mut config = BridgeConfig::new(&brokers, redis_config.clone());
    config.inbound_partitions = 1;
    let bridge = KafkaRedisBridge::new(config).with_archive(Some(archive));
    let frames = Arc::new(Frames::default());
    bridge.start("gwt", frames.clone()).expect("bridge starts");
    let conversation = palaver_protocol::direct_conversation_id("alice", "bob");
    let mut store = palaver_router::redis_store::RedisStore::connect(redis_config).unwrap();
    let mut request_id = 0;
    let archived = |store: &mut palaver_router::redis_store::RedisStore| {
        store
            .archived_seqs(std::slice::from_ref(&conversation))
            .unwrap()[0]
    };
    for cmid in 1..=60 {
        send_until_acked(&bridge, &frames, &mut request_id, cmid);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while archived(&mut store) < 60 {
        assert!(
            Instant::now() < deadline,
            "archived {}",
            archived(&mut store)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Archived: the next appends trim the window to its 10.
    for cmid in 61..=63 {
        send_until_acked(&bridge, &frames, &mut request_id, cmid);
    }
    let window: Vec<pb::Message> = store.window_after(&conversation, 0, 100).unwrap();
    assert!(window.len() <= 11, "the window trimmed to {}", window.len());

    request_id += 1;
    bridge.submit(Inbound {
        body: Body::History(pb::History {
            conversation_id: conversation.clone(),
            before_seq: 0,
            limit: 100,
        }),
        ..send(request_id, 0)
    });
    match frames
        .answer(request_id, Duration::from_secs(10))
        .and_then(|f| f.body)
    {
        Some(Body::HistoryPage(page)) => {
            let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, (1..=63).collect::<Vec<u64>>());
            assert!(!page.has_more);
        }
        other => panic!("History answered {other:?}"),
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    bridge.shutdown();
}
