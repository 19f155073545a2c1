//! Measures what idle connections cost Redis with the Kafka/Redis bridge's
//! batched presence: Redis commands per second (from `INFO commandstats`)
//! while N idle TLS connections heartbeat every 15 s.
//!
//! `cargo run -p palaver-gateway --example presence_commandstats -- 1000 15000`
//!
//! The process runs Redis, Kafka and one gateway (2 cores, bridge backend,
//! presence tick 1 s); the clients live in a child process (this same
//! executable with `clients N`) so neither side needs more than 20,000 open
//! files. For each N: connect N clients (Hello each), wait until presence is
//! flushed, reset Redis' stats, let them heartbeat for the measuring window,
//! then read the command counters.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]
// Configs are filled field by field, like an operator's config file.
#![allow(clippy::field_reassign_with_default)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palaver_gateway::config::BackendConfig;
use palaver_gateway::{auth, devcerts, Config, GatewayHandle};
use palaver_protocol::pb::{self, frame::Body};
use palaver_router::bridge::{BridgeConfig, KafkaRedisBridge};
use palaver_router::redis_store::RedisConfig;
use palaver_testkit::client::{Client, ConnectOptions};
use palaver_testkit::stack::{Kafka, Redis, WorkDir};

const HEARTBEAT: Duration = Duration::from_secs(15);
const WINDOW: Duration = Duration::from_secs(60);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("clients") {
        clients(&args[2..]);
        return;
    }
    let counts: Vec<usize> = args[1..].iter().map(|a| a.parse().expect("N")).collect();
    let counts = if counts.is_empty() {
        vec![1000, 15000]
    } else {
        counts
    };

    let redis = Redis::start().expect("redis-server");
    let kafka = Kafka::start().expect("kafka");
    let dir = WorkDir::temp("presence-bench").unwrap();
    let mut config = Config::default();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.cores = 2;
    config.data_dir = dir.path().to_path_buf();
    config.gateway_id = "gw-bench".into();
    config.limits.heartbeat_interval_ms = HEARTBEAT.as_millis() as u32;
    config.backend = BackendConfig::Kafka {
        brokers: kafka.bootstrap(),
        redis: redis.url(),
        cassandra: None,
    };
    let bridge = Arc::new(KafkaRedisBridge::new(BridgeConfig::new(
        kafka.bootstrap(),
        RedisConfig::standalone(redis.url()),
    )));
    let gw = GatewayHandle::start(config, bridge).expect("gateway");
    let ca = dir.path().join(devcerts::CA_CERT_FILE);
    let secret = devcerts::read_secret(&dir.path().join(devcerts::JWT_SECRET_FILE)).unwrap();

    println!(
        "| idle connections | heartbeat | window | Redis commands | commands/s | by command |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for n in counts {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["clients", &n.to_string(), &gw.local_addr.to_string()])
            .arg(&ca)
            .arg(hex::encode(&secret))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("client process");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.next().expect("client output").expect("line");
        assert_eq!(ready, format!("connected {n}"), "client process");
        let deadline = Instant::now() + Duration::from_secs(60);
        while gw.connections() < n {
            assert!(
                Instant::now() < deadline,
                "gateway sees {} of {n}",
                gw.connections()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Let the connect storm's presence writes drain, then measure idle.
        std::thread::sleep(Duration::from_secs(3));
        redis.command("CONFIG RESETSTAT").unwrap();
        std::thread::sleep(WINDOW);
        let stats = redis.command("INFO commandstats").unwrap();
        let mut total = 0u64;
        let mut by_command = Vec::new();
        for line in stats.lines() {
            // cmdstat_set:calls=60,usec=...
            if let Some(rest) = line.strip_prefix("cmdstat_") {
                let (name, fields) = rest.split_once(':').unwrap();
                let calls: u64 = fields
                    .split(',')
                    .find_map(|f| f.strip_prefix("calls="))
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                if name == "info" || name == "config|resetstat" {
                    continue;
                }
                total += calls;
                by_command.push(format!("{name} {calls}"));
            }
        }
        println!(
            "| {n} | {} s | {} s | {total} | {:.2} | {} |",
            HEARTBEAT.as_secs(),
            WINDOW.as_secs(),
            total as f64 / WINDOW.as_secs_f64(),
            by_command.join(", ")
        );
        let _ = child.stdin.take().unwrap().write_all(b"stop\n");
        let _ = child.wait();
        let deadline = Instant::now() + Duration::from_secs(60);
        while gw.connections() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    gw.stop();
    gw.join();
}

/// Child process: N connections, Hello each, then a Ping per connection
/// every heartbeat interval until stdin says stop.
fn clients(args: &[String]) {
    let n: usize = args[0].parse().unwrap();
    let opts = ConnectOptions::new(args[1].parse().unwrap(), std::fs::read(&args[2]).unwrap());
    let secret = hex::decode(&args[3]).unwrap();
    let mut clients = Vec::with_capacity(n);
    let mut nonce = 0;
    let mut last_round = Instant::now();
    for i in 0..n {
        let mut c = Client::connect(&opts).expect("connect");
        let token = auth::mint_hs256(&secret, &format!("user{i}"), None, 3600);
        c.hello(&token, "phone", Duration::from_secs(30))
            .expect("welcome");
        clients.push(c);
        // Connecting thousands takes a while: keep the early ones alive.
        if last_round.elapsed() >= HEARTBEAT {
            ping_round(&mut clients, &mut nonce);
            last_round = Instant::now();
        }
    }
    println!("connected {n}");
    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = stop_tx.send(());
    });
    loop {
        let round = Instant::now();
        ping_round(&mut clients, &mut nonce);
        let left = HEARTBEAT.saturating_sub(round.elapsed());
        if stop_rx.recv_timeout(left).is_ok() {
            return;
        }
    }
}

/// One Ping per client, then every Pong.
fn ping_round(clients: &mut [Client], nonce: &mut u64) {
    for c in clients.iter_mut() {
        *nonce += 1;
        c.send(&pb::Frame {
            request_id: 0,
            body: Some(Body::Ping(pb::Ping { nonce: *nonce })),
        })
        .expect("ping");
    }
    for c in clients.iter_mut() {
        c.recv_until(Duration::from_secs(10), "Pong", |f| {
            matches!(f.body, Some(Body::Pong(_)))
        })
        .expect("pong");
    }
}
