//! The router worker on real Kafka and Redis, driven batch by batch: records
//! that cannot be decoded and records whose store work keeps failing go to
//! `palaver.dlq` with the reason, the client gets UNAVAILABLE, and the
//! offsets move on (committed); a record whose handling panics goes to
//! `palaver.dlq` at once, the client gets INTERNAL, and the worker goes on.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../../router-core/tests/common/mod.rs"]
mod common;
use common::TrapClock;

use palaver_protocol::pb::{self, frame::Body};
use palaver_router::api::{Inbound, Session, SessionAddr};
use palaver_router::kafka::worker::{RouterWorker, WorkerConfig};
use palaver_router::kafka::{self, records, DLQ_TOPIC, INBOUND_TOPIC};
use palaver_router::redis_store::RedisConfig;
use palaver_testkit::stack::{Kafka, Redis};
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

fn consumer(brokers: &str, topic: &str) -> BaseConsumer {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-{topic}"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    c
}

fn next_value(c: &BaseConsumer, what: &str) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            return m.unwrap().payload().unwrap_or_default().to_vec();
        }
    }
    panic!("no {what} record");
}

fn send_record(cmid: u8) -> Vec<u8> {
    kafka::inbound_record(&Inbound {
        from: Session {
            user_id: "alice".into(),
            device_id: "phone".into(),
            addr: SessionAddr {
                gateway_id: "gwx".into(),
                conn: 7,
            },
        },
        request_id: cmid as u32,
        body: Body::Send(pb::Send {
            conversation_id: palaver_protocol::direct_conversation_id("alice", "bob"),
            client_msg_id: vec![cmid; 16],
            kind: pb::ContentKind::Text as i32,
            body: b"hi".to_vec(),
            ..Default::default()
        }),
        received_ms: 1,
    })
    .encode_to_vec()
}

/// Kafka with gateway `gwx`'s delivery topic, Redis, and a producer of
/// inbound records: what a worker under test runs on.
struct Rig {
    redis: Redis,
    brokers: String,
    producer: BaseProducer,
    // Dropped last: the broker outlives the clients above.
    _kafka: Kafka,
}

impl Rig {
    fn start() -> Self {
        let kafka = Kafka::start().expect("kafka");
        let brokers = kafka.bootstrap();
        kafka::ensure_topics(
            &brokers,
            &[(&kafka::delivery_topic("gwx"), 1)],
            Duration::from_secs(10),
        )
        .unwrap();
        Rig {
            redis: Redis::start().expect("redis-server"),
            producer: kafka::producer_config(&brokers, 0).create().unwrap(),
            brokers,
            _kafka: kafka,
        }
    }

    /// A worker's config: this rig, one inbound partition.
    fn config(&self) -> WorkerConfig {
        let mut config =
            WorkerConfig::new(&self.brokers, RedisConfig::standalone(self.redis.url()));
        config.inbound_partitions = 1;
        config
    }

    /// Produces one inbound record and waits until Kafka has it.
    fn produce(&self, key: &str, value: &[u8]) {
        self.producer
            .send(BaseRecord::to(INBOUND_TOPIC).key(key).payload(value))
            .map_err(|(e, _)| e)
            .unwrap();
        self.producer.flush(Duration::from_secs(10)).unwrap();
    }
}

/// Runs batches until `n` records were processed (or a deadline).
fn process(worker: &mut RouterWorker, n: u64) {
    let target = worker.stats().records + n;
    let deadline = Instant::now() + Duration::from_secs(60);
    while worker.stats().records < target {
        assert!(
            Instant::now() < deadline,
            "worker processed {:?}",
            worker.stats()
        );
        if let Err(e) = worker.run_batch(Duration::from_millis(200)) {
            panic!("batch failed: {e}");
        }
    }
}

#[test]
fn bad_and_failing_records_go_to_the_dlq_and_offsets_move_on() {
    let mut rig = Rig::start();
    let brokers = rig.brokers.clone();
    let mut config = rig.config();
    config.max_attempts = 3;
    config.consumer.retry_backoff = Duration::from_millis(10);
    let mut worker = RouterWorker::new(config).expect("worker");
    let deliveries = consumer(&brokers, &kafka::delivery_topic("gwx"));
    let dlq = consumer(&brokers, DLQ_TOPIC);

    // Garbage, then a good Send: the garbage is dead-lettered, the Send acked.
    rig.produce("k", b"\xff\xfe not protobuf");
    rig.produce("dm:alice:bob", &send_record(1));
    process(&mut worker, 2);
    let letter = records::DeadLetter::decode(next_value(&dlq, "dead letter").as_slice()).unwrap();
    assert_eq!(letter.value, b"\xff\xfe not protobuf");
    assert!(letter.reason.contains("InboundRecord"), "{}", letter.reason);
    assert_eq!((letter.topic.as_str(), letter.offset), (INBOUND_TOPIC, 0));
    let batch = kafka::decode_delivery_batch(&next_value(&deliveries, "delivery")).unwrap();
    assert!(matches!(&batch[0].frame.body, Some(Body::SendAck(a)) if a.seq == 1));

    // Redis gone: the Send fails every attempt → dead letter with the reason,
    // UNAVAILABLE to the client, and the worker moves on.
    rig.redis.kill();
    rig.produce("dm:alice:bob", &send_record(2));
    process(&mut worker, 1);
    let letter = records::DeadLetter::decode(next_value(&dlq, "dead letter").as_slice()).unwrap();
    assert_eq!(letter.attempts, 3);
    assert!(letter.reason.contains("unavailable"), "{}", letter.reason);
    assert_eq!(letter.value, send_record(2));
    let batch = kafka::decode_delivery_batch(&next_value(&deliveries, "delivery")).unwrap();
    match &batch[0].frame.body {
        Some(Body::Error(e)) => {
            assert_eq!(e.code, pb::ErrorCode::Unavailable as u32);
            assert_eq!(e.client_msg_id, vec![2u8; 16]);
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    assert_eq!(worker.stats().dead_letters, 2);

    // All three offsets get committed for the router group (the worker
    // commits asynchronously after each batch).
    wait_committed(&brokers, 3);
}

/// Waits until the router group's committed offset of inbound partition 0
/// is `offset` (the worker commits asynchronously after each batch).
fn wait_committed(brokers: &str, offset: i64) {
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "palaver-router")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(INBOUND_TOPIC, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let committed = probe
            .committed_offsets(tpl.clone(), Duration::from_secs(10))
            .unwrap();
        let now = committed.find_partition(INBOUND_TOPIC, 0).unwrap().offset();
        if now == Offset::Offset(offset) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "committed offset stays at {now:?}, expected {offset}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Frames delivered to gateway `gwx`, until `n` have arrived.
fn next_frames(c: &BaseConsumer, n: usize) -> Vec<pb::Frame> {
    let mut frames = Vec::new();
    while frames.len() < n {
        let batch = kafka::decode_delivery_batch(&next_value(c, "delivery")).unwrap();
        frames.extend(batch.into_iter().map(|o| o.frame));
    }
    frames
}

#[test]
fn a_record_whose_handling_panics_is_dead_lettered_and_the_worker_moves_on() {
    let rig = Rig::start();
    let brokers = rig.brokers.clone();
    let clock = Arc::new(TrapClock::default());
    let mut worker = RouterWorker::with_clock(rig.config(), clock.clone()).expect("worker");
    let deliveries = consumer(&brokers, &kafka::delivery_topic("gwx"));
    let dlq = consumer(&brokers, DLQ_TOPIC);
    let produce = |value: &[u8]| rig.produce("dm:alice:bob", value);

    produce(&send_record(1));
    process(&mut worker, 1);
    // The next record's handling panics; the one after it is fine.
    clock.arm();
    produce(&send_record(2));
    produce(&send_record(3));
    // Before the guard the panic unwound out of run_batch (in palaver-router:
    // the process died, and its restart replayed the same record).
    process(&mut worker, 2);

    let letter = records::DeadLetter::decode(next_value(&dlq, "dead letter").as_slice()).unwrap();
    assert_eq!(letter.value, send_record(2));
    assert_eq!((letter.topic.as_str(), letter.offset), (INBOUND_TOPIC, 1));
    assert!(
        letter.reason.starts_with("panicked: trap"),
        "{}",
        letter.reason
    );
    let stats = worker.stats();
    assert_eq!((stats.panics, stats.dead_letters), (1, 1), "{stats:?}");

    // The client of the panicking Send gets INTERNAL; the next Send is acked
    // with the next seq (the panicking one took none).
    let frames = next_frames(&deliveries, 3);
    assert!(matches!(&frames[0].body, Some(Body::SendAck(a)) if a.seq == 1));
    match &frames[1].body {
        Some(Body::Error(e)) => {
            assert_eq!(e.code, pb::ErrorCode::Internal as u32);
            assert_eq!(e.client_msg_id, vec![2u8; 16]);
        }
        other => panic!("expected INTERNAL, got {other:?}"),
    }
    assert!(
        matches!(&frames[2].body, Some(Body::SendAck(a)) if a.seq == 2),
        "{:?}",
        frames[2]
    );

    // The offsets moved past the panicking record (committed).
    wait_committed(&brokers, 3);
}

fn send_from(user: &str, gateway: &str, conn: u64, to: &str, request_id: u32, cmid: u8) -> Vec<u8> {
    kafka::inbound_record(&Inbound {
        from: Session {
            user_id: user.into(),
            device_id: "phone".into(),
            addr: SessionAddr {
                gateway_id: gateway.into(),
                conn,
            },
        },
        request_id,
        body: Body::Send(pb::Send {
            conversation_id: palaver_protocol::direct_conversation_id(user, to),
            client_msg_id: vec![cmid; 16],
            kind: pb::ContentKind::Text as i32,
            body: vec![cmid],
            ..Default::default()
        }),
        received_ms: 1,
    })
    .encode_to_vec()
}

/// A poll batch is one unit: six Sends (one a retry) polled together get
/// consecutive seqs in order, and their output leaves the router as exactly
/// one delivery record per destination gateway (SendAcks to the senders'
/// gateway, Delivers to the recipient's).
#[test]
fn a_poll_batch_gets_consecutive_seqs_and_one_delivery_record_per_gateway() {
    let kafka = Kafka::start().expect("kafka");
    let redis = Redis::start().expect("redis-server");
    let brokers = kafka.bootstrap();
    let (gw_a, gw_b) = (kafka::delivery_topic("gwa"), kafka::delivery_topic("gwb"));
    kafka::ensure_topics(&brokers, &[(&gw_a, 1), (&gw_b, 1)], Duration::from_secs(10)).unwrap();
    let mut store =
        palaver_router::redis_store::RedisStore::connect(RedisConfig::standalone(redis.url()))
            .unwrap();
    use palaver_router::store::{SessionChange, SessionStore as _};
    for (user, gateway, conn) in [("alice", "gwa", 7), ("bob", "gwb", 9)] {
        let opened = SessionChange::Opened(Session {
            user_id: user.into(),
            device_id: "phone".into(),
            addr: SessionAddr {
                gateway_id: gateway.into(),
                conn,
            },
        });
        store
            .apply_sessions(gateway, Duration::from_secs(30), 1, &[opened])
            .unwrap();
    }
    let mut config = WorkerConfig::new(&brokers, RedisConfig::standalone(redis.url()));
    config.inbound_partitions = 1;
    let mut worker = RouterWorker::new(config).expect("worker");
    let producer: BaseProducer = kafka::producer_config(&brokers, 0).create().unwrap();
    let dm = palaver_protocol::direct_conversation_id("alice", "bob");
    // cmid 3 twice: the second is a retry.
    for (request_id, cmid) in [(1, 1), (2, 2), (3, 3), (4, 3), (5, 4), (6, 5)] {
        producer
            .send(
                BaseRecord::to(INBOUND_TOPIC)
                    .key(&dm)
                    .payload(&send_from("alice", "gwa", 7, "bob", request_id, cmid)),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    // All six were in the topic before the worker's first fetch, so they
    // arrive in one poll batch.
    process(&mut worker, 6);
    assert_eq!(worker.stats().batches, 1, "{:?}", worker.stats());

    // run_batch returned only after Kafka acknowledged its output: exactly
    // one record on each gateway's topic.
    let probe = consumer(&brokers, &gw_a);
    for topic in [&gw_a, &gw_b] {
        let (low, high) = probe
            .fetch_watermarks(topic, 0, Duration::from_secs(10))
            .unwrap();
        assert_eq!(high - low, 1, "{topic}");
    }
    let acks = kafka::decode_delivery_batch(&next_value(&probe, "acks")).unwrap();
    let acks: Vec<(u32, u64)> = acks
        .iter()
        .map(|o| match &o.frame.body {
            Some(Body::SendAck(a)) => (o.frame.request_id, a.seq),
            other => panic!("expected SendAck, got {other:?}"),
        })
        .collect();
    assert_eq!(acks, vec![(1, 1), (2, 2), (3, 3), (4, 3), (5, 4), (6, 5)]);
    let delivers =
        kafka::decode_delivery_batch(&next_value(&consumer(&brokers, &gw_b), "delivers")).unwrap();
    let seqs: Vec<(u64, u64)> = delivers
        .iter()
        .map(|o| match &o.frame.body {
            Some(Body::Deliver(d)) => (o.conn, d.message.as_ref().unwrap().seq),
            other => panic!("expected Deliver, got {other:?}"),
        })
        .collect();
    // seq 3 twice: the retry delivers the original again (at-least-once).
    assert_eq!(seqs, vec![(9, 1), (9, 2), (9, 3), (9, 3), (9, 4), (9, 5)]);
}

/// An idempotent producer with a fatal error fails every write for good
/// (librdkafka raises one when a broker answers out of sequence, as after a
/// stall it could not follow). The worker replaces it, and the batch that
/// failed runs again: the client's Send is acknowledged, stored once.
#[test]
fn a_producer_that_failed_for_good_is_replaced_and_its_batch_runs_again() {
    let rig = Rig::start();
    let mut worker = RouterWorker::new(rig.config()).expect("worker");
    let deliveries = consumer(&rig.brokers, &kafka::delivery_topic("gwx"));
    let produce = |value: &[u8]| rig.produce("dm:alice:bob", value);
    produce(&send_record(1));
    process(&mut worker, 1);

    worker.raise_fatal_producer_error("test: out of sequence");
    produce(&send_record(2));
    // The first attempt fails on the dead producer; later ones succeed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failures = 0;
    while worker.stats().records < 2 {
        assert!(
            Instant::now() < deadline,
            "the Send was never processed: {failures} failed batches, {:?}",
            worker.stats()
        );
        if worker.run_batch(Duration::from_millis(200)).is_err() {
            failures += 1;
        }
    }
    let stats = worker.stats();
    assert_eq!(stats.producers_replaced, 1, "{stats:?}");
    assert!(failures >= 1 && stats.replays >= 1, "{failures} {stats:?}");

    let frames = next_frames(&deliveries, 2);
    assert!(matches!(&frames[0].body, Some(Body::SendAck(a)) if a.seq == 1));
    assert!(
        matches!(&frames[1].body, Some(Body::SendAck(a)) if a.seq == 2),
        "{:?}",
        frames[1]
    );
}
