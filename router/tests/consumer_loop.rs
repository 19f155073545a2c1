//! The at-least-once consumer loop (`palaver_router::kafka::consumer_loop`)
//! on real Apache Kafka, without the router: an echo handler copies each
//! record of `loop.in` to `loop.out`. What the loop promises every worker
//! built on it: output acknowledged before the offsets are committed, a
//! poisoned record dead-lettered without stopping its partition, a
//! producer that failed for good replaced and its batch run again, a new
//! member resuming after the last commit.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use palaver_router::kafka::consumer_loop::{Batch, ConsumerLoop, Handler, LoopConfig};
use palaver_router::kafka::{self, records, DLQ_TOPIC};
use palaver_testkit::stack::Kafka;
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

const IN: &str = "loop.in";
const OUT: &str = "loop.out";
const GROUP: &str = "echo";

/// Copies each record to `loop.out` as `echo:<value>`; `poison` panics,
/// `refuse` is dead-lettered by the handler itself.
#[derive(Default)]
struct Echo {
    handled: Vec<String>,
    panics_seen: usize,
}

impl Handler for Echo {
    fn handle(&mut self, records: &[OwnedMessage], out: &mut Batch<'_>) {
        for record in records {
            let value = String::from_utf8_lossy(record.payload().unwrap_or_default()).to_string();
            if value == "poison" {
                panic!("poison record");
            }
            if value == "refuse" {
                out.dead_letter(record, "refused by the handler".into(), 1);
                continue;
            }
            self.handled.push(value.clone());
            let _ = out.produce(OUT, b"k", format!("echo:{value}").as_bytes());
        }
    }

    fn after_panic(&mut self) {
        self.panics_seen += 1;
    }
}

struct Rig {
    brokers: String,
    producer: BaseProducer,
    _kafka: Kafka,
}

impl Rig {
    fn start() -> Rig {
        let kafka = Kafka::start().expect("kafka");
        let brokers = kafka.bootstrap();
        kafka::ensure_topics(
            &brokers,
            &[(IN, 1), (OUT, 1), (DLQ_TOPIC, 1)],
            Duration::from_secs(10),
        )
        .unwrap();
        Rig {
            producer: kafka::producer_config(&brokers, 0).create().unwrap(),
            brokers,
            _kafka: kafka,
        }
    }

    fn member(&self, client_id: &str) -> ConsumerLoop {
        let mut config = LoopConfig::new(&self.brokers, GROUP, client_id, &[IN]);
        config.max_batch = 100;
        config.session_timeout = Duration::from_secs(6);
        ConsumerLoop::new(config).expect("consumer loop")
    }

    fn produce(&self, values: &[&str]) {
        for v in values {
            self.producer
                .send(BaseRecord::to(IN).key("k").payload(*v))
                .map_err(|(e, _)| e)
                .unwrap();
        }
        self.producer.flush(Duration::from_secs(10)).unwrap();
    }

    /// Every value in `topic` from the start, until `done` says so.
    fn read_until(&self, topic: &str, done: impl Fn(&[Vec<u8>]) -> bool) -> Vec<Vec<u8>> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", format!("reader-{topic}-{}", rand_suffix()))
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        c.subscribe(&[topic]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut values = Vec::new();
        while !done(&values) {
            assert!(Instant::now() < deadline, "{topic}: {values:?}");
            if let Some(m) = c.poll(Duration::from_millis(200)) {
                values.push(m.unwrap().payload().unwrap_or_default().to_vec());
            }
        }
        values
    }

    /// Waits until the group's committed offset of `loop.in` is `offset`.
    fn wait_committed(&self, offset: i64) {
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", GROUP)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(IN, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let committed = probe
                .committed_offsets(tpl.clone(), Duration::from_secs(10))
                .unwrap();
            let now = committed.find_partition(IN, 0).unwrap().offset();
            if now == Offset::Offset(offset) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "committed {now:?}, expected {offset}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Runs batches until `n` more records were processed.
fn process(member: &mut ConsumerLoop, handler: &mut Echo, n: u64) {
    let target = member.stats().records + n;
    let deadline = Instant::now() + Duration::from_secs(60);
    while member.stats().records < target {
        assert!(Instant::now() < deadline, "{:?}", member.stats());
        member
            .run_batch(handler, Duration::from_millis(200))
            .expect("batch");
    }
}

#[test]
fn the_loop_produces_commits_dead_letters_and_replays_without_the_router() {
    let rig = Rig::start();
    let mut member = rig.member("m1");
    let mut echo = Echo::default();

    // Output first, then the commit; a poisoned record and a refused one
    // are dead-lettered with their reasons, the rest of the batch goes on.
    rig.produce(&["a", "poison", "b", "refuse", "c"]);
    process(&mut member, &mut echo, 5);
    // The panicking pass had produced a's echo already; at least once.
    let mut out: Vec<String> = rig
        .read_until(OUT, |v| v.len() == 4)
        .into_iter()
        .map(|v| String::from_utf8(v).unwrap())
        .collect();
    out.dedup();
    assert_eq!(out, ["echo:a", "echo:b", "echo:c"]);
    let letters: Vec<records::DeadLetter> = rig
        .read_until(DLQ_TOPIC, |v| v.len() == 2)
        .iter()
        .map(|v| records::DeadLetter::decode(v.as_slice()).unwrap())
        .collect();
    let reasons: Vec<(&[u8], &str, i64)> = letters
        .iter()
        .map(|l| (l.value.as_slice(), l.reason.as_str(), l.offset))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (&b"poison"[..], "panicked: poison record", 1),
            (&b"refuse"[..], "refused by the handler", 3),
        ]
    );
    assert_eq!(letters[0].topic, IN);
    assert_eq!(letters[0].router_id, "m1");
    let stats = member.stats();
    assert_eq!((stats.panics, stats.dead_letters), (1, 2));
    assert_eq!(
        echo.panics_seen, 2,
        "after the batch's panic and the record's"
    );
    // An idle poll commits what was processed.
    member
        .run_batch(&mut echo, Duration::from_millis(100))
        .unwrap();
    rig.wait_committed(5);

    // A producer that failed for good fails the batch: it is rewound,
    // the producer replaced, and the batch runs again.
    rig.produce(&["d"]);
    member.raise_fatal_producer_error("test: out of sequence");
    let deadline = Instant::now() + Duration::from_secs(60);
    while member.stats().records < 6 {
        assert!(Instant::now() < deadline, "{:?}", member.stats());
        let _ = member.run_batch(&mut echo, Duration::from_millis(200));
    }
    let stats = member.stats();
    assert!(
        stats.replays >= 1 && stats.producers_replaced == 1,
        "{stats:?}"
    );
    // The replayed batch's output arrives.
    rig.read_until(OUT, |v| v.iter().any(|v| v.as_slice() == b"echo:d"));
    assert_eq!(
        echo.handled.iter().filter(|v| *v == "d").count(),
        2,
        "handled twice: at least once"
    );
    member
        .run_batch(&mut echo, Duration::from_millis(100))
        .unwrap();
    rig.wait_committed(6);
    drop(member);

    // A new member of the group resumes after the last commit.
    rig.produce(&["e"]);
    let mut second = rig.member("m2");
    let mut fresh = Echo::default();
    process(&mut second, &mut fresh, 1);
    assert_eq!(fresh.handled, vec!["e"]);
}
