//! Storage bounds of the embedded engine's `MemoryStore`:
//!
//! 1. RSS after N messages (default 1,000,000) appended to C conversations
//!    (default 10, so each passes its 10,000-message history window), each
//!    message with its own client_msg_id, 16-byte body.
//! 2. Worst-case single `append_message` latency in one fresh conversation,
//!    and the message numbers where the slowest ones fall.
//!
//! `cargo run -p palaver-router --example store_bounds -- [N] [C]`
//! (measured with `--release` or with the router at opt-level 3; see
//! bench/results/2026-11-29-storage-bounds/README.md).
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use palaver_protocol::pb;
use palaver_router::memory::MemoryStore;
use palaver_router::store::{ConversationStore, Retention};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn message(conversation: &str, n: u64) -> pb::Message {
    let mut cmid = [0u8; 16];
    cmid[..8].copy_from_slice(&n.to_le_bytes());
    pb::Message {
        conversation_id: conversation.to_owned(),
        client_msg_id: cmid.to_vec(),
        message_id: format!("{n:026}"),
        sender_user_id: "alice".into(),
        server_time_ms: 1_700_000_000_000 + n as i64,
        body: b"0123456789abcdef".to_vec(),
        ..Default::default()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).map_or(1_000_000, |a| a.parse().expect("N"));
    let c: u64 = args.get(2).map_or(10, |a| a.parse().expect("C"));
    let retention = |now_ms| Retention {
        now_ms,
        dedup_ttl_ms: 24 * 60 * 60 * 1000,
        history_window: 10_000,
    };

    // Part 1: RSS.
    let conversations: Vec<String> = (0..c).map(|i| format!("conv-{i}")).collect();
    let mut store = MemoryStore::new();
    let rss0 = rss_kib();
    for i in 0..n {
        let conv = &conversations[(i % c) as usize];
        store
            .append_message(conv, message(conv, i), &retention(i as i64))
            .unwrap();
        if (i + 1) % (n / 4).max(1) == 0 {
            println!(
                "after {:>9} messages: RSS {:>8} KiB (+{} KiB)",
                i + 1,
                rss_kib(),
                rss_kib() - rss0
            );
        }
    }
    let rss1 = rss_kib();
    println!(
        "RSS delta after {n} messages in {c} conversations: {} KiB ({:.1} bytes/message)",
        rss1 - rss0,
        (rss1 - rss0) as f64 * 1024.0 / n as f64
    );
    drop(store);

    // Part 2: worst-case insert latency, one conversation, 20,000 messages, 5 runs.
    for run in 0..5 {
        let mut store = MemoryStore::new();
        let mut samples: Vec<(u128, u64)> = Vec::with_capacity(20_000);
        for i in 0..20_000u64 {
            let m = message("solo", i);
            let t = Instant::now();
            store
                .append_message("solo", m, &retention(i as i64))
                .unwrap();
            samples.push((t.elapsed().as_nanos(), i + 1));
        }
        let mut sorted: Vec<u128> = samples.iter().map(|s| s.0).collect();
        sorted.sort_unstable();
        samples.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
        let top: Vec<String> = samples[..5]
            .iter()
            .map(|(ns, at)| format!("#{at}: {:.1} µs", *ns as f64 / 1000.0))
            .collect();
        println!(
            "run {run}: p50 {:.2} µs, p99.9 {:.1} µs, max {:.1} µs; slowest {}",
            sorted[sorted.len() / 2] as f64 / 1000.0,
            sorted[sorted.len() * 999 / 1000] as f64 / 1000.0,
            *sorted.last().unwrap() as f64 / 1000.0,
            top.join(", ")
        );
    }
}
