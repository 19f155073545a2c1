//! The history archive on real Kafka, Redis and Apache Cassandra (SPEC §7):
//! routers stream what they store, the archiver writes it to Cassandra, the
//! Redis window trims only what is archived, and reads below the window come
//! from Cassandra — gapless, through an archive outage too.
// A test: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use palaver_archive::{ArchiveConfig, CassandraArchive};
use palaver_protocol::pb::{self, frame::Body};
use palaver_router::api::{Inbound, Session, SessionAddr};
use palaver_router::kafka::archiver::{Archiver, ArchiverConfig};
use palaver_router::kafka::worker::{ArchiveSettings, RouterWorker, WorkerConfig};
use palaver_router::kafka::{self, INBOUND_TOPIC};
use palaver_router::redis_store::{ArchiveLink, RedisConfig, RedisStore};
use palaver_router::store::{Appended, ConversationStore, RangeRead, Retention};
use palaver_testkit::stack::{Cassandra, Kafka, Redis};
use prost::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const WINDOW: usize = 50;

fn conversation() -> String {
    palaver_protocol::direct_conversation_id("alice", "bob")
}

fn send_record(n: u32) -> Vec<u8> {
    kafka::inbound_record(&Inbound {
        from: Session {
            user_id: "alice".into(),
            device_id: "phone".into(),
            addr: SessionAddr {
                gateway_id: "gwx".into(),
                conn: 7,
            },
        },
        request_id: n,
        body: Body::Send(pb::Send {
            conversation_id: conversation(),
            client_msg_id: (n as u128).to_be_bytes().to_vec(),
            kind: pb::ContentKind::Text as i32,
            body: format!("message {n}").into_bytes(),
            ..Default::default()
        }),
        received_ms: 1,
    })
    .encode_to_vec()
}

/// Kafka, Redis and Cassandra, and a producer of inbound records.
struct Rig {
    cassandra: Cassandra,
    redis: Redis,
    brokers: String,
    producer: BaseProducer,
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
            cassandra: Cassandra::start().expect("cassandra"),
            redis: Redis::start().expect("redis-server"),
            producer: kafka::producer_config(&brokers, 0).create().unwrap(),
            brokers,
            _kafka: kafka,
        }
    }

    fn archive_config(&self) -> ArchiveConfig {
        let mut c = ArchiveConfig::new(vec![self.cassandra.address()]);
        c.timeout = Duration::from_secs(2);
        c
    }

    fn redis(&self) -> RedisConfig {
        RedisConfig::standalone(self.redis.url())
    }

    /// A router with a window of [`WINDOW`] messages and the archive behind.
    fn router(&self) -> RouterWorker {
        let mut config = WorkerConfig::new(&self.brokers, self.redis());
        config.inbound_partitions = 1;
        config.router.history_window = WINDOW;
        config.archive = Some(ArchiveSettings {
            cassandra: self.archive_config(),
            max_unarchived: 100_000,
        });
        RouterWorker::new(config).expect("router")
    }

    fn archiver(&self) -> Archiver {
        let mut config = ArchiverConfig::new(&self.brokers, self.redis(), self.archive_config());
        config.consumer.retry_backoff = Duration::from_millis(50);
        Archiver::new(config).expect("archiver")
    }

    /// The store as a router reads it: the window, the archive below.
    fn reader(&self) -> RedisStore {
        let archive = CassandraArchive::connect(&self.archive_config()).unwrap();
        RedisStore::connect(self.redis())
            .unwrap()
            .with_archive(ArchiveLink {
                archive: Arc::new(archive),
                max_unarchived: 100_000,
            })
    }

    fn send(&self, from: u32, to: u32) {
        for n in from..=to {
            self.producer
                .send(
                    BaseRecord::to(INBOUND_TOPIC)
                        .key(&conversation())
                        .payload(&send_record(n)),
                )
                .map_err(|(e, _)| e)
                .unwrap();
        }
        self.producer.flush(Duration::from_secs(10)).unwrap();
    }
}

/// Waits for `what` to hold, checking every 50 ms, at most `limit`.
fn await_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) -> Duration {
    let began = Instant::now();
    while !ready() {
        assert!(began.elapsed() < limit, "waited {limit:?} for {what}");
        thread::sleep(Duration::from_millis(50));
    }
    began.elapsed()
}

fn last_seq(store: &mut RedisStore) -> u64 {
    store.last_seqs(&[conversation()]).unwrap()[0]
}

fn archived_seq(store: &mut RedisStore) -> u64 {
    store.archived_seqs(&[conversation()]).unwrap()[0]
}

fn window_len(rig: &Rig) -> usize {
    let key = format!("c:{{{}}}:h", conversation());
    rig.redis
        .command(&format!("ZCARD {key}"))
        .unwrap()
        .trim_start_matches(':')
        .trim()
        .parse()
        .unwrap()
}

/// Pages History from the newest message down to seq 1, `page` at a time,
/// as a client scrolls back; returns the seqs newest first.
fn scroll_back(store: &mut RedisStore, page: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut before = 0;
    loop {
        let slice = store
            .messages_before(&conversation(), before, page, 1 << 20)
            .unwrap();
        assert!(
            slice.messages.windows(2).all(|w| w[0].seq + 1 == w[1].seq),
            "a page is contiguous, oldest first"
        );
        seqs.extend(slice.messages.iter().rev().map(|m| m.seq));
        match slice.messages.first() {
            Some(m) if slice.has_more => before = m.seq,
            _ => return seqs,
        }
    }
}

/// Syncs from `after` to the end, `limit` at a time; returns the seqs.
fn sync_from(store: &mut RedisStore, after: u64, limit: usize) -> Vec<u64> {
    let last = last_seq(store);
    let mut seqs = Vec::new();
    let mut after_seq = after;
    while after_seq < last {
        let got = store
            .messages_after(&[RangeRead {
                conversation_id: conversation(),
                after_seq,
                limit,
                max_bytes: 1 << 20,
            }])
            .unwrap()
            .remove(0);
        assert!(!got.is_empty(), "sync after {after_seq} returned nothing");
        assert_eq!(got[0].seq, after_seq + 1, "sync continues where it was");
        after_seq = got.last().unwrap().seq;
        seqs.extend(got.iter().map(|m| m.seq));
    }
    seqs
}

/// Runs `worker` on its own thread until the returned flag is set.
fn spawn_loop<W: Send + 'static>(
    mut worker: W,
    run: fn(&mut W, &AtomicBool),
) -> (Arc<AtomicBool>, thread::JoinHandle<W>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = thread::spawn(move || {
        run(&mut worker, &flag);
        worker
    });
    (stop, handle)
}

#[test]
fn fifty_thousand_messages_page_back_to_seq_1_and_sync_across_the_window_without_a_gap() {
    let rig = Rig::start();
    let (stop_router, router) = spawn_loop(rig.router(), RouterWorker::run);
    let (stop_archiver, archiver) = spawn_loop(rig.archiver(), Archiver::run);
    let mut store = rig.reader();

    let n = 50_000;
    rig.send(1, n);
    await_until("every Send stored", Duration::from_secs(120), || {
        last_seq(&mut store) == n as u64
    });
    await_until("everything archived", Duration::from_secs(120), || {
        archived_seq(&mut store) == n as u64
    });
    // The window trims what is archived (a few hundred per append), so a
    // few more Sends bring it back to its size.
    rig.send(n + 1, n + 20);
    let total = (n + 20) as u64;
    await_until(
        "the window trimmed to its size",
        Duration::from_secs(60),
        || last_seq(&mut store) == total && window_len(&rig) <= WINDOW + 1,
    );

    // Scrolling back from the newest crosses from the window into the
    // archive and reaches seq 1 with nothing missing or repeated.
    let seqs = scroll_back(&mut store, 499);
    assert_eq!(seqs, (1..=total).rev().collect::<Vec<_>>());
    // A phone offline since seq 10 syncs everything, in order.
    let seqs = sync_from(&mut store, 10, 500);
    assert_eq!(seqs, (11..=total).collect::<Vec<_>>());

    stop_router.store(true, Ordering::Relaxed);
    stop_archiver.store(true, Ordering::Relaxed);
    let archiver = archiver.join().unwrap();
    router.join().unwrap();
    assert!(archiver.stats().archived >= total - 20);
}

#[test]
fn an_archive_killed_mid_stream_loses_nothing_and_the_window_holds_the_backlog() {
    let mut rig = Rig::start();
    let (stop_router, router) = spawn_loop(rig.router(), RouterWorker::run);
    let (stop_archiver, archiver) = spawn_loop(rig.archiver(), Archiver::run);
    let mut store = RedisStore::connect(rig.redis()).unwrap();

    rig.send(1, 500);
    await_until("the first 500 archived", Duration::from_secs(120), || {
        archived_seq(&mut store) == 500
    });

    // Cassandra dies (SIGKILL); Sends go on.
    rig.cassandra.kill();
    rig.send(501, 1_500);
    await_until("every Send stored", Duration::from_secs(120), || {
        last_seq(&mut store) == 1_500
    });
    assert!(archived_seq(&mut store) < 1_500);
    // Nothing unarchived was trimmed: the window holds the backlog.
    let archived = archived_seq(&mut store);
    assert!(
        window_len(&rig) as u64 >= 1_500 - archived,
        "window {} holds every unarchived seq above {archived}",
        window_len(&rig)
    );

    rig.cassandra.restart().expect("cassandra restart");
    let caught_up = await_until("the archiver caught up", Duration::from_secs(180), || {
        archived_seq(&mut store) == 1_500
    });
    eprintln!("archiver caught up {caught_up:?} after Cassandra served again");

    let mut reader = rig.reader();
    rig.send(1_501, 1_510);
    await_until("the window trimmed", Duration::from_secs(60), || {
        last_seq(&mut reader) == 1_510 && window_len(&rig) <= WINDOW + 1
    });
    let seqs = scroll_back(&mut reader, 200);
    assert_eq!(seqs, (1..=1_510).rev().collect::<Vec<_>>());

    stop_router.store(true, Ordering::Relaxed);
    stop_archiver.store(true, Ordering::Relaxed);
    let archiver = archiver.join().unwrap();
    router.join().unwrap();
    assert!(archiver.stats().archived >= 1_500);
}

#[test]
fn past_its_bound_of_unarchived_messages_a_conversation_refuses_sends_until_the_archive_catches_up()
{
    let rig = Rig::start();
    let archive = CassandraArchive::connect(&rig.archive_config()).unwrap();
    let mut store = RedisStore::connect(rig.redis())
        .unwrap()
        .with_archive(ArchiveLink {
            archive: Arc::new(archive),
            max_unarchived: 5,
        });
    let retention = Retention {
        now_ms: 1,
        dedup_ttl_ms: 60_000,
        history_window: 2,
    };
    let message = |n: u8| pb::Message {
        conversation_id: conversation(),
        sender_user_id: "alice".into(),
        client_msg_id: vec![n; 16],
        body: vec![n],
        ..Default::default()
    };
    for n in 1..=5 {
        let a = store
            .append_message(&conversation(), message(n), &retention)
            .unwrap();
        assert!(matches!(a, Appended::Stored(m) if m.seq == n as u64));
    }
    // No archiver ran: the window kept all five though it is 2, and the
    // sixth is refused without using a seq.
    assert_eq!(window_len(&rig), 5);
    let a = store
        .append_message(&conversation(), message(6), &retention)
        .unwrap();
    assert_eq!(a, Appended::Backlogged { last_seq: 5 });
    assert_eq!(last_seq(&mut store), 5);

    // The archive confirms up to 4: room for more, and the window trims.
    store.confirm_archived(&[(conversation(), 4)]).unwrap();
    store.confirm_archived(&[(conversation(), 2)]).unwrap();
    assert_eq!(
        archived_seq(&mut store),
        4,
        "a confirmation never goes back"
    );
    let a = store
        .append_message(&conversation(), message(6), &retention)
        .unwrap();
    assert!(matches!(a, Appended::Stored(m) if m.seq == 6));
    assert_eq!(
        window_len(&rig),
        2,
        "seqs 1..=4 archived and out of the window"
    );
}
