//! End-to-end latency of 1:1 messages through Kafka and Redis: alice (on
//! gateway gw1) sends to bob (on gw2) at a fixed rate; the time from just
//! before alice's Send is written to bob's Deliver being read is recorded.
//!
//! `cargo run --release -p palaver-gateway --example e2e_latency -- [MESSAGES] [RATE_PER_S]`
//!
//! Everything is real: Kafka, redis-server, one router worker (this crate's
//! `RouterWorker`, in-process), two gateways with the Kafka/Redis bridge,
//! TLS clients. Prints median, p90, p99, max.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]
// Configs are filled field by field, like an operator's config file.
#![allow(clippy::field_reassign_with_default)]

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use palaver_gateway::config::BackendConfig;
use palaver_gateway::{auth, devcerts, Config, GatewayHandle};
use palaver_protocol::pb::{self, frame::Body};
use palaver_router::bridge::{BridgeConfig, KafkaRedisBridge};
use palaver_router::kafka::worker::{RouterWorker, WorkerConfig};
use palaver_router::redis_store::RedisConfig;
use palaver_testkit::client::{new_client_msg_id, Client, ConnectOptions};
use palaver_testkit::stack::{Kafka, Redis, WorkDir};

fn gateway(id: &str, dir: &WorkDir, kafka: &Kafka, redis: &Redis) -> GatewayHandle {
    let mut config = Config::default();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.cores = 1;
    config.data_dir = dir.path().to_path_buf();
    config.gateway_id = id.into();
    config.limits.max_sends_per_second = 100_000;
    config.limits.max_account_sends_per_second = 100_000;
    config.backend = BackendConfig::Kafka {
        brokers: kafka.bootstrap(),
        redis: redis.url(),
        cassandra: None,
    };
    let bridge = Arc::new(KafkaRedisBridge::new(BridgeConfig::new(
        kafka.bootstrap(),
        RedisConfig::standalone(redis.url()),
    )));
    GatewayHandle::start(config, bridge).expect("gateway")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let messages: u64 = args.get(1).map_or(10_000, |a| a.parse().expect("MESSAGES"));
    let rate: u64 = args.get(2).map_or(500, |a| a.parse().expect("RATE_PER_S"));

    let redis = Redis::start().expect("redis-server");
    let kafka = Kafka::start().expect("kafka");
    let dir = WorkDir::temp("latency").unwrap();
    let mut worker_config =
        WorkerConfig::new(kafka.bootstrap(), RedisConfig::standalone(redis.url()));
    worker_config.inbound_partitions = 4;
    let mut worker = RouterWorker::new(worker_config).expect("router worker");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker_stop = stop.clone();
    let router = thread::spawn(move || worker.run(&worker_stop));

    let gw1 = gateway("gw1", &dir, &kafka, &redis);
    let gw2 = gateway("gw2", &dir, &kafka, &redis);
    let ca = std::fs::read(dir.path().join(devcerts::CA_CERT_FILE)).unwrap();
    let secret = devcerts::read_secret(&dir.path().join(devcerts::JWT_SECRET_FILE)).unwrap();
    let login = |gw: &GatewayHandle, user: &str| {
        let mut c = Client::connect(&ConnectOptions::new(gw.local_addr, ca.clone())).unwrap();
        c.hello(
            &auth::mint_hs256(&secret, user, None, 3600),
            "phone",
            Duration::from_secs(30),
        )
        .unwrap();
        c
    };
    let mut alice = login(&gw1, "alice");
    let mut bob = login(&gw2, "bob");
    let conv = palaver_protocol::direct_conversation_id("alice", "bob");
    let epoch = Instant::now();

    // Warm up: one message end to end (topics, group join, connections).
    let send = |c: &mut Client, n: u64| {
        let t = epoch.elapsed().as_nanos() as u64;
        let mut body = n.to_le_bytes().to_vec();
        body.extend_from_slice(&t.to_le_bytes());
        c.request(Body::Send(pb::Send {
            conversation_id: conv.clone(),
            client_msg_id: new_client_msg_id(),
            kind: pb::ContentKind::Text as i32,
            body,
            ..Default::default()
        }))
        .unwrap();
    };
    send(&mut alice, u64::MAX);
    bob.recv_until(Duration::from_secs(60), "warm-up Deliver", |f| {
        matches!(f.body, Some(Body::Deliver(_)))
    })
    .unwrap();

    let receiver = thread::spawn(move || {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        while hist.len() < messages {
            let f = bob
                .recv_until(Duration::from_secs(60), "Deliver", |f| {
                    matches!(f.body, Some(Body::Deliver(_)))
                })
                .expect("Deliver");
            let Some(Body::Deliver(d)) = f.body else {
                unreachable!()
            };
            let body = d.message.unwrap().body;
            let sent = u64::from_le_bytes(body[8..16].try_into().unwrap());
            let now = epoch.elapsed().as_nanos() as u64;
            hist.record(((now - sent) / 1000).max(1)).unwrap();
        }
        hist
    });
    // Alice's acks are drained on a thread of their own so her socket never backs up.
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = Instant::now();
    for n in 0..messages {
        let due = start + interval * n as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        send(&mut alice, n);
        while let Ok(Some(_)) = alice.recv(Duration::ZERO) {}
    }
    let hist = receiver.join().unwrap();
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "messages {} rate {}/s: median {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        hist.len(),
        rate,
        ms(hist.value_at_quantile(0.5)),
        ms(hist.value_at_quantile(0.9)),
        ms(hist.value_at_quantile(0.99)),
        ms(hist.max())
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    gw1.stop();
    gw2.stop();
    gw1.join();
    gw2.join();
    let _ = router.join();
}
