//! What one channel message costs the router tier, at 10,000 and at
//! 100,000 members (SPEC §21, issue 22): Redis commands (INFO commandstats,
//! every command the router's `RedisStore` sent, scripts counted once per
//! call), frames addressed to connections, and channel posts (one
//! `palaver.channels` Kafka record each). Also Redis memory per member.
//! Deterministic counts, not timings: any load gives the same figures.
//!
//! `cargo run --release -p palaver-router --example channel_cost -- [MESSAGES]`
//! (default 200 messages per channel size, in router batches of 20 as the
//! worker polls them; starts its own redis-server on a free loopback port).
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use palaver_protocol::pb::{self, frame::Body};
use palaver_router::logic::BatchProgress;
use palaver_router::redis_store::{RedisConfig, RedisStore};
use palaver_router::store::ChannelStore;
use palaver_router::{Inbound, Output, Router, RouterConfig, Session, SessionAddr, SystemClock};
use palaver_testkit::stack::Redis;

fn info(url: &str, section: &str) -> String {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_connection().unwrap();
    redis::cmd("INFO").arg(section).query(&mut con).unwrap()
}

/// Commands Redis executed since the last `CONFIG RESETSTAT`, all kinds.
fn commands(url: &str) -> u64 {
    info(url, "commandstats")
        .lines()
        .filter_map(|l| {
            l.split_once("calls=")?
                .1
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn reset_stats(url: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_connection().unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut con)
        .unwrap();
}

fn used_memory(url: &str) -> u64 {
    info(url, "memory")
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn request(user: &str, request_id: u32, body: Body) -> Inbound {
    Inbound {
        from: Session {
            user_id: user.into(),
            device_id: "phone".into(),
            addr: SessionAddr {
                gateway_id: "gw1".into(),
                conn: 1,
            },
        },
        request_id,
        body,
        received_ms: 1_700_000_000_000 + i64::from(request_id),
    }
}

fn main() {
    let messages: u32 = std::env::args()
        .nth(1)
        .map_or(200, |a| a.parse().expect("MESSAGES"));
    let redis = Redis::start().expect("redis-server");
    let url = redis.url();
    let store = RedisStore::connect(RedisConfig::standalone(url.clone())).unwrap();
    let mut router = Router::new(store, RouterConfig::default(), Arc::new(SystemClock));
    println!(
        "| members | Redis commands / message | frames / message | channel posts (Kafka records) / message | Redis bytes / member |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for (round, members) in [10_000u32, 100_000].into_iter().enumerate() {
        let owner = format!("owner{round}");
        let mut out = Output::default();
        let create = request(
            &owner,
            1,
            Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Channel as i32,
                title: "bench".into(),
                member_user_ids: Vec::new(),
                channel: Some(pb::ChannelSettings::default()),
            }),
        );
        router.handle(&create, &mut out).unwrap();
        let channel = match &out.frames[0].frame.body {
            Some(Body::ConversationCreated(c)) => {
                c.conversation.as_ref().unwrap().conversation_id.clone()
            }
            other => panic!("expected ConversationCreated, got {other:?}"),
        };
        let before = used_memory(&url);
        let users: Vec<String> = (0..members - 1).map(|i| format!("user{i:07}")).collect();
        for chunk in users.chunks(5_000) {
            router
                .store_mut()
                .change_channel_members(&channel, chunk, &[], &[], 1_000_000)
                .unwrap()
                .unwrap();
        }
        let per_member = (used_memory(&url) - before) / u64::from(members - 1);
        reset_stats(&url);
        let mut frames = 0;
        let mut posts = 0;
        let mut progress = BatchProgress::default();
        for start in (0..messages).step_by(20) {
            let batch: Vec<Inbound> = (start..(start + 20).min(messages))
                .map(|i| {
                    let mut cmid = [0u8; 16];
                    cmid[..4].copy_from_slice(&i.to_le_bytes());
                    cmid[4] = round as u8;
                    request(
                        &owner,
                        10 + i,
                        Body::Send(pb::Send {
                            conversation_id: channel.clone(),
                            client_msg_id: cmid.to_vec(),
                            kind: pb::ContentKind::Text as i32,
                            body: format!("message {i}").into_bytes(),
                            ..Default::default()
                        }),
                    )
                })
                .collect();
            let mut out = Output::default();
            router
                .handle_batch(&batch, &mut out, &mut progress)
                .unwrap();
            frames += out.frames.len();
            posts += out.channel_posts.len();
        }
        let per = |n: f64| n / f64::from(messages);
        println!(
            "| {members} | {:.2} | {:.2} | {:.2} | {per_member} |",
            per(commands(&url) as f64),
            per(frames as f64),
            per(posts as f64),
        );
    }
}
