//! The measurement behind the durable embedded store's choice of crate
//! (router/src/disk/, bench/results/2026-12-07-durable-embedded/): redb
//! against SQLite (rusqlite) doing what the store does most.
//!
//! 1. Append N messages (default 200,000; encoded `pb::Message`, 64-byte
//!    body) round-robin over C conversations (default 200), each with a
//!    per-conversation seq counter read and written beside it, in group
//!    commits of B messages (default 256), every commit fsync'd
//!    (redb `Durability::Immediate`; SQLite WAL with `synchronous=FULL`).
//! 2. Read 2,000 History pages of 50 messages, newest first below a random
//!    seq of a random conversation, each in its own read transaction.
//! 3. Bytes on disk per message (the files after the run, WAL checkpointed).
//!
//! redb twice: as it comes, and with `quick_repair` as `DiskStore` runs it.
//!
//! `cargo run --release -p palaver-router --example store_choice -- [N] [C] [B] [DIR]`
// An example: a failed unwrap is a failed run (the workspace's unwrap_used
// floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use palaver_protocol::pb;
use prost::Message as _;

const PAGE: usize = 50;
const READS: usize = 2_000;

fn message(conversation: usize, n: u64) -> Vec<u8> {
    let mut cmid = [0u8; 16];
    cmid[..8].copy_from_slice(&n.to_le_bytes());
    // As the durable store keeps it: conversation id and seq are in the key.
    pb::Message {
        conversation_id: String::new(),
        seq: 0,
        client_msg_id: cmid.to_vec(),
        message_id: format!("{n:026}"),
        sender_user_id: format!("user{}", conversation % 1000),
        server_time_ms: 1_700_000_000_000 + n as i64,
        body: vec![b'x'; 64],
        ..Default::default()
    }
    .encode_to_vec()
}

fn conversation_id(c: usize) -> String {
    format!("dm:user{c:05}:user{:05}", c + 1)
}

struct Figures {
    appends_per_s: f64,
    commit_p50_ms: f64,
    commit_p99_ms: f64,
    read_p50_us: f64,
    read_p99_us: f64,
    bytes_per_message: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Random but reproducible (xorshift).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn run_redb(dir: &Path, n: u64, convs: usize, batch: u64) -> Figures {
    redb_with(dir, n, convs, batch, false)
}

/// redb with `quick_repair` (what `DiskStore` uses: a commit also saves the
/// allocator state, two-phase, so opening after a crash is quick).
fn run_redb_quick_repair(dir: &Path, n: u64, convs: usize, batch: u64) -> Figures {
    redb_with(dir, n, convs, batch, true)
}

fn redb_with(dir: &Path, n: u64, convs: usize, batch: u64, quick_repair: bool) -> Figures {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
    const SEQS: TableDefinition<&str, u64> = TableDefinition::new("seqs");
    let db = redb::Database::create(dir.join("store.redb")).unwrap();
    let ids: Vec<String> = (0..convs).map(conversation_id).collect();
    let mut commits = Vec::new();
    let started = Instant::now();
    let mut i = 0u64;
    while i < n {
        let mut txn = db.begin_write().unwrap();
        txn.set_quick_repair(quick_repair);
        {
            let mut messages = txn.open_table(MESSAGES).unwrap();
            let mut seqs = txn.open_table(SEQS).unwrap();
            for _ in 0..batch.min(n - i) {
                let c = (i as usize) % convs;
                let id = ids[c].as_str();
                let seq = seqs.get(id).unwrap().map_or(0, |v| v.value()) + 1;
                seqs.insert(id, seq).unwrap();
                messages
                    .insert((id, seq), message(c, i).as_slice())
                    .unwrap();
                i += 1;
            }
        }
        let t = Instant::now();
        txn.commit().unwrap();
        commits.push(t.elapsed());
    }
    let appends_per_s = n as f64 / started.elapsed().as_secs_f64();
    let per_conv = n / convs as u64;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut reads = Vec::with_capacity(READS);
    for _ in 0..READS {
        let id = ids[rng.below(convs as u64) as usize].as_str();
        let before = rng.below(per_conv) + 1;
        let t = Instant::now();
        let txn = db.begin_read().unwrap();
        let messages = txn.open_table(MESSAGES).unwrap();
        let page: Vec<pb::Message> = messages
            .range((id, 0)..(id, before))
            .unwrap()
            .rev()
            .take(PAGE)
            .map(|e| pb::Message::decode(e.unwrap().1.value()).unwrap())
            .collect();
        reads.push(t.elapsed());
        assert!(page.len() <= PAGE);
    }
    drop(db);
    figures(commits, reads, appends_per_s, dir_bytes(dir), n)
}

fn run_sqlite(dir: &Path, n: u64, convs: usize, batch: u64) -> Figures {
    let mut db = rusqlite::Connection::open(dir.join("store.sqlite")).unwrap();
    db.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
         CREATE TABLE messages (conv TEXT NOT NULL, seq INTEGER NOT NULL, msg BLOB NOT NULL,
                                PRIMARY KEY (conv, seq)) WITHOUT ROWID;
         CREATE TABLE seqs (conv TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;",
    )
    .unwrap();
    let ids: Vec<String> = (0..convs).map(conversation_id).collect();
    let mut commits = Vec::new();
    let started = Instant::now();
    let mut i = 0u64;
    while i < n {
        let txn = db.transaction().unwrap();
        {
            let mut get_seq = txn
                .prepare_cached("SELECT seq FROM seqs WHERE conv = ?1")
                .unwrap();
            let mut put_seq = txn
                .prepare_cached("INSERT OR REPLACE INTO seqs (conv, seq) VALUES (?1, ?2)")
                .unwrap();
            let mut put = txn
                .prepare_cached("INSERT INTO messages (conv, seq, msg) VALUES (?1, ?2, ?3)")
                .unwrap();
            for _ in 0..batch.min(n - i) {
                let c = (i as usize) % convs;
                let id = ids[c].as_str();
                let seq: i64 = get_seq.query_row([id], |r| r.get(0)).unwrap_or(0i64) + 1;
                put_seq.execute(rusqlite::params![id, seq]).unwrap();
                put.execute(rusqlite::params![id, seq, message(c, i)])
                    .unwrap();
                i += 1;
            }
        }
        let t = Instant::now();
        txn.commit().unwrap();
        commits.push(t.elapsed());
    }
    let appends_per_s = n as f64 / started.elapsed().as_secs_f64();
    let per_conv = n / convs as u64;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut reads = Vec::with_capacity(READS);
    for _ in 0..READS {
        let id = ids[rng.below(convs as u64) as usize].as_str();
        let before = rng.below(per_conv) + 1;
        let t = Instant::now();
        let txn = db.transaction().unwrap();
        let page: Vec<pb::Message> = {
            let mut stmt = txn
                .prepare_cached(
                    "SELECT msg FROM messages WHERE conv = ?1 AND seq < ?2
                     ORDER BY seq DESC LIMIT ?3",
                )
                .unwrap();
            stmt.query_map(rusqlite::params![id, before as i64, PAGE as i64], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .unwrap()
            .map(|m| pb::Message::decode(m.unwrap().as_slice()).unwrap())
            .collect()
        };
        txn.commit().unwrap();
        reads.push(t.elapsed());
        assert!(page.len() <= PAGE);
    }
    db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
    drop(db);
    figures(commits, reads, appends_per_s, dir_bytes(dir), n)
}

fn figures(
    mut commits: Vec<Duration>,
    mut reads: Vec<Duration>,
    appends_per_s: f64,
    bytes: u64,
    n: u64,
) -> Figures {
    commits.sort();
    reads.sort();
    Figures {
        appends_per_s,
        commit_p50_ms: percentile(&commits, 0.5).as_secs_f64() * 1e3,
        commit_p99_ms: percentile(&commits, 0.99).as_secs_f64() * 1e3,
        read_p50_us: percentile(&reads, 0.5).as_secs_f64() * 1e6,
        read_p99_us: percentile(&reads, 0.99).as_secs_f64() * 1e6,
        bytes_per_message: bytes as f64 / n as f64,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: u64| args.get(i).map_or(default, |s| s.parse().unwrap());
    let n = arg(0, 200_000);
    let convs = arg(1, 200) as usize;
    let batch = arg(2, 256);
    let base = args
        .get(3)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("store-choice-{}", std::process::id()));
    let encoded = message(0, 1).len();
    println!(
        "{n} messages ({encoded} bytes encoded each), {convs} conversations, \
         {batch} per fsync'd commit; {READS} pages of {PAGE}"
    );
    println!(
        "{:<8} {:>10} {:>11} {:>11} {:>12} {:>12} {:>10}",
        "store", "appends/s", "commit p50", "commit p99", "page p50", "page p99", "bytes/msg"
    );
    for (name, run) in [
        ("redb", run_redb as fn(&Path, u64, usize, u64) -> Figures),
        ("redb+qr", run_redb_quick_repair),
        ("sqlite", run_sqlite),
    ] {
        let dir = base.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let f = run(&dir, n, convs, batch);
        println!(
            "{name:<8} {:>10.0} {:>9.2}ms {:>9.2}ms {:>10.0}µs {:>10.0}µs {:>10.1}",
            f.appends_per_s,
            f.commit_p50_ms,
            f.commit_p99_ms,
            f.read_p50_us,
            f.read_p99_us,
            f.bytes_per_message
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let _ = std::fs::remove_dir_all(&base);
}
