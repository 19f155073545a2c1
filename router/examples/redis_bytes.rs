//! Redis `used_memory` per stored message with `RedisStore`: history ZSET
//! trimmed to the window, dedup hash + order list trimmed with it (one entry
//! per message in the window, whatever the traffic).
//!
//! `cargo run --release -p palaver-router --example redis_bytes -- [N] [C] [BATCH]`
//! (default 1,000,000 messages over 10 conversations, appended through
//! `append_messages` BATCH = 100 at a time as the router worker does; starts
//! its own redis-server on a free loopback port, AOF `appendfsync always`).
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use palaver_protocol::pb;
use palaver_router::redis_store::{RedisConfig, RedisStore};
use palaver_router::store::{ConversationStore, Retention};
use palaver_testkit::stack::Redis;

fn used_memory(url: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_connection().unwrap();
    let info: String = redis::cmd("INFO").arg("memory").query(&mut con).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn dbsize(url: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_connection().unwrap();
    redis::cmd("DBSIZE").query(&mut con).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).map_or(1_000_000, |a| a.parse().expect("N"));
    let c: u64 = args.get(2).map_or(10, |a| a.parse().expect("C"));
    let redis = Redis::start().expect("redis-server");
    let url = redis.url();
    let mut store = RedisStore::connect(RedisConfig::standalone(url.clone())).unwrap();
    let before = used_memory(&url);
    let batch: u64 = args.get(3).map_or(100, |a| a.parse().expect("BATCH"));
    let mut pending = Vec::new();
    let report_every = (n / 4).max(1);
    for i in 0..n {
        let conv = format!("conv-{}", i % c);
        let mut cmid = [0u8; 16];
        cmid[..8].copy_from_slice(&i.to_le_bytes());
        let m = pb::Message {
            conversation_id: conv.clone(),
            client_msg_id: cmid.to_vec(),
            message_id: format!("{i:026}"),
            sender_user_id: "alice".into(),
            server_time_ms: 1_700_000_000_000 + i as i64,
            body: b"0123456789abcdef".to_vec(),
            ..Default::default()
        };
        pending.push((conv, m));
        if pending.len() as u64 == batch || (i + 1) % report_every == 0 || i + 1 == n {
            let retention = Retention {
                now_ms: 1_700_000_000_000 + i as i64,
                dedup_ttl_ms: 24 * 60 * 60 * 1000,
                history_window: 10_000,
            };
            store
                .append_messages(std::mem::take(&mut pending), &retention)
                .unwrap();
        }
        if (i + 1) % report_every == 0 {
            let used = used_memory(&url);
            println!(
                "after {:>9} messages: used_memory +{} bytes ({:.1} bytes/message passed), {} keys",
                i + 1,
                used - before,
                (used - before) as f64 / (i + 1) as f64,
                dbsize(&url)
            );
        }
    }
}
