//! History served from the Redis window vs from the Cassandra archive, and
//! the bytes a message takes in Cassandra: the store calls a router makes
//! for a History page, timed one at a time on real Redis and Cassandra
//! started on loopback (release build; run alone: it measures latency).
//!
//! ```sh
//! cargo run --release -p palaver-router --example history_from_archive -- 20000 50
//! ```
//! Arguments: messages in the conversation (default 20,000), page size
//! (default 50). The window is 1,000 messages; everything is archived.
//! Bodies are 100 random bytes (as encrypted bodies are).
// An example: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use palaver_archive::{ArchiveConfig, CassandraArchive};
use palaver_protocol::pb;
use palaver_router::redis_store::{ArchiveLink, RedisConfig, RedisStore};
use palaver_router::store::{ConversationStore, Retention};
use palaver_testkit::stack::{Cassandra, Redis};
use prost::Message as _;

const WINDOW: usize = 1_000;
const SAMPLES: usize = 2_000;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map_or(20_000, |a| a.parse().unwrap());
    let page: usize = args.next().map_or(50, |a| a.parse().unwrap());
    let mut cassandra = Cassandra::start().unwrap();
    let redis = Redis::start().unwrap();
    let config = ArchiveConfig::new(vec![cassandra.address()]);
    let archive = Arc::new(CassandraArchive::connect(&config).unwrap());
    let mut store = RedisStore::connect(RedisConfig::standalone(redis.url()))
        .unwrap()
        .with_archive(ArchiveLink {
            archive: archive.clone(),
            max_unarchived: n + 1,
        });
    let conv = palaver_protocol::direct_conversation_id("alice", "bob");

    // n messages of a 100-byte body, archived as the archiver would, then
    // confirmed so the window trims to its size.
    let retention = Retention {
        now_ms: 1_700_000_000_000,
        dedup_ttl_ms: 60_000,
        history_window: WINDOW,
    };
    let mut encoded_bytes = 0usize;
    for chunk in (1..=n).collect::<Vec<_>>().chunks(500) {
        let appends: Vec<(String, pb::Message)> = chunk
            .iter()
            .map(|&i| {
                (
                    conv.clone(),
                    pb::Message {
                        conversation_id: conv.clone(),
                        message_id: format!("{i:026}"),
                        sender_user_id: "alice".into(),
                        sender_device_id: "phone".into(),
                        client_msg_id: (i as u128).to_be_bytes().to_vec(),
                        // Bodies are opaque, usually encrypted: random
                        // bytes, which no compression shrinks.
                        body: noise(i, 100),
                        server_time_ms: 1_700_000_000_000 + i as i64,
                        ..Default::default()
                    },
                )
            })
            .collect();
        let stored: Vec<pb::Message> = store
            .append_messages(appends, &retention)
            .unwrap()
            .into_iter()
            .map(|a| match a {
                palaver_router::store::Appended::Stored(m) => m,
                other => panic!("{other:?}"),
            })
            .collect();
        encoded_bytes += stored.iter().map(|m| m.encoded_len()).sum::<usize>();
        let rows: Vec<(&str, &pb::Message)> = stored.iter().map(|m| (conv.as_str(), m)).collect();
        archive.write(&rows).unwrap();
        store
            .confirm_archived(&[(conv.clone(), stored.last().unwrap().seq)])
            .unwrap();
    }
    // The window trims on appends: a few more bring it to its size.
    let oldest_in_window = n - WINDOW as u64 + 1;

    // `before` of each page: spread over [lo, hi] so no one page is cached.
    let mut time = |lo: u64, hi: u64| {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for i in 0..SAMPLES {
            let b = lo + (i as u64 * 7919) % (hi - lo + 1);
            let began = Instant::now();
            let slice = store.messages_before(&conv, b, page, 1 << 20).unwrap();
            h.record(began.elapsed().as_micros() as u64).unwrap();
            assert_eq!(slice.messages.len(), page);
        }
        h
    };
    // Pages within the window (its newer half: the window is at least
    // WINDOW, more until the next appends trim it).
    let window = time(n + 1 - WINDOW as u64 / 2, n + 1);
    // Pages whose every message is below the window: all from Cassandra.
    let below = time(page as u64 + 1, oldest_in_window - WINDOW as u64);
    let pct = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "history page of {page}, {SAMPLES} pages each, conversation of {n} (window {WINDOW}):"
    );
    println!(
        "  from the Redis window : p50 {:.2} ms  p99 {:.2} ms",
        pct(&window, 0.5),
        pct(&window, 0.99)
    );
    println!(
        "  from Cassandra        : p50 {:.2} ms  p99 {:.2} ms",
        pct(&below, 0.5),
        pct(&below, 0.99)
    );

    // Bytes on disk: a clean stop (SIGTERM) makes Cassandra flush its
    // memtables to SSTables; then the table's directory holds what it
    // stores (compressed, with indexes and bloom filters).
    let pid = cassandra.pid();
    palaver_testkit::stack::signal(pid, libc_sigterm()).unwrap();
    let began = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && began.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let data = find_table_dir(&cassandra);
    let on_disk = dir_size(&data);
    println!(
        "  Cassandra table on disk after flush: {on_disk} bytes for {n} messages = {:.0} B/message \
         (the message encoded: {:.0} B)",
        on_disk as f64 / n as f64,
        encoded_bytes as f64 / n as f64
    );
    cassandra.kill();
}

/// `len` pseudo-random bytes (xorshift, seeded by `seed`).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn libc_sigterm() -> i32 {
    15
}

fn find_table_dir(cassandra: &Cassandra) -> std::path::PathBuf {
    let ks = cassandra.data_dir().join("data").join("palaver");
    std::fs::read_dir(&ks)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("messages-"))
        })
        .unwrap()
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                dir_size(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}
