//! Offline send → push received, through the cluster's push path: a Send
//! record produced to `palaver.inbound` (what a gateway's bridge produces),
//! a router worker (Kafka consumer, Redis store, fan-out: the recipient has
//! a token and no session, so a push event goes to `palaver.push`), the
//! real `palaver-push` binary (its own process: consumer loop, push context
//! from Redis, APNs client), and the APNs test server (HTTP/2 over TLS, JWT
//! checked), which stamps each request when it arrives.
//!
//! Each message goes to a different sleeping user, so each one is a push
//! event and a push (no coalescing hides any). Latency is from the message's
//! SCHEDULED send time (a fixed rate, so a stall is not hidden by sending
//! later) to the APNs test server's arrival stamp, both on this process's
//! monotonic clock.
//!
//! Also measured, as the floor of the last hop: the APNs leg alone (the
//! same test server, `Sender::submit` → result, one at a time, from this
//! process).
//!
//! ```sh
//! cargo build --release -p palaver-push --features test-server --example push_latency --bin palaver-push
//! flock -o /tmp/palaver-bench.lock target/release/examples/push_latency [RATE per s] [SECONDS]
//! ```
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palaver_protocol::pb::{self, frame::Body};
use palaver_push::apns::ApnsClient;
use palaver_push::testing::{ApnsServerConfig, ApnsTestServer, TestKeyPair};
use palaver_push::{
    ApnsEnvironment, Content, Notification, Platform, Priority, SendResult, Sender, SenderConfig,
};
use palaver_router::api::{Inbound, Session, SessionAddr};
use palaver_router::kafka::worker::{RouterWorker, WorkerConfig};
use palaver_router::kafka::{self, INBOUND_TOPIC};
use palaver_router::redis_store::{RedisConfig, RedisStore};
use palaver_router::store::PushStore;
use palaver_testkit::stack::{Kafka, Redis};
use prost::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const TOPIC: &str = "com.example.palaver";
const TEAM: &str = "TEAM123456";
const KEY_ID: &str = "KEY1234567";
const PARTITIONS: i32 = 4;

fn token(i: usize) -> String {
    format!("{:064x}", 0xb000_0000usize + i)
}

fn user(i: usize) -> String {
    format!("u{i}")
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

struct Feed {
    producer: BaseProducer,
    request_id: u32,
}

impl Feed {
    fn request(&mut self, user: &str, device: &str, key: &str, body: Body) {
        self.request_id += 1;
        let record = kafka::inbound_record(&Inbound {
            from: Session {
                user_id: user.into(),
                device_id: device.into(),
                addr: SessionAddr {
                    gateway_id: "bench".into(),
                    conn: 1,
                },
            },
            request_id: self.request_id,
            body,
            received_ms: 1,
        })
        .encode_to_vec();
        loop {
            match self
                .producer
                .send(BaseRecord::to(INBOUND_TOPIC).key(key).payload(&record))
            {
                Ok(()) => break,
                Err((e, _)) => {
                    // Queue full: let librdkafka deliver, then again.
                    eprintln!("produce: {e}");
                    self.producer.poll(Duration::from_millis(10));
                }
            }
        }
        self.producer.poll(Duration::ZERO);
    }

    fn send_to(&mut self, to: usize) {
        let from = format!("s{to}");
        let conversation = palaver_protocol::direct_conversation_id(&from, &user(to));
        let id = self.request_id + 1;
        self.request(
            &from,
            "laptop",
            &conversation,
            Body::Send(pb::Send {
                conversation_id: conversation.clone(),
                client_msg_id: u128::from(id).to_be_bytes().to_vec(),
                kind: pb::ContentKind::Text as i32,
                body: b"hello, sleeping phone".to_vec(),
                ..Default::default()
            }),
        );
    }
}

/// utime + stime of `/proc/<pid>/stat` (or `self`), seconds.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based).
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "n={} p50={:.1} ms p90={:.1} ms p99={:.1} ms max={:.1} ms",
        v.len(),
        ms(at(0.50)),
        ms(at(0.90)),
        ms(at(0.99)),
        ms(*v.last().unwrap())
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rate: f64 = args.get(1).map_or(100.0, |a| a.parse().unwrap());
    let seconds: f64 = args.get(2).map_or(20.0, |a| a.parse().unwrap());
    let n = (rate * seconds) as usize;
    let warmup = 50;
    let push_bin = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("palaver-push");
    assert!(
        push_bin.exists(),
        "{} missing: cargo build --release -p palaver-push --bin palaver-push",
        push_bin.display()
    );
    println!("load average before: {}", load_average());

    let kafka = Kafka::start().unwrap();
    let redis = Redis::start().unwrap();
    let brokers = kafka.bootstrap();
    kafka::ensure_topics(
        &brokers,
        &[(&kafka::delivery_topic("bench"), 1)],
        Duration::from_secs(10),
    )
    .unwrap();
    let redis_config = RedisConfig::standalone(redis.url());
    let stop = Arc::new(AtomicBool::new(false));
    let router = {
        let mut config = WorkerConfig::new(&brokers, redis_config.clone());
        config.inbound_partitions = PARTITIONS;
        let mut worker = RouterWorker::new(config).unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || worker.run(&stop))
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let key = TestKeyPair::apns();
    let mut server = ApnsServerConfig::new(TEAM, KEY_ID, &key.public_pem);
    server.topics = vec![TOPIC.into()];
    server.max_recorded = n + warmup + 10_000;
    let apns = runtime.block_on(ApnsTestServer::start(server)).unwrap();

    // The floor of the last hop: the APNs leg alone, one push at a time.
    let client = ApnsClient::new(apns.client_config(KEY_ID, &key.private_pem).unwrap()).unwrap();
    let direct = Sender::builder(SenderConfig::default())
        .apns(ApnsEnvironment::Production, client)
        .start(runtime.handle());
    let mut leg = Vec::new();
    for i in 0..300 {
        let began = Instant::now();
        let ticket = direct
            .submit(Notification {
                platform: Platform::Apns,
                device_token: format!("{:064x}", 0xf000_0000usize + i),
                apns_topic: Some(TOPIC.into()),
                apns_environment: ApnsEnvironment::Production,
                conversation_id: "floor".into(),
                seq: i as u64,
                collapse_id: Some("floor".into()),
                badge: Some(1),
                content: Content::IdOnly,
                ttl: Duration::from_secs(3600),
                priority: Priority::High,
            })
            .unwrap();
        assert!(matches!(ticket.wait(), SendResult::Delivered { .. }));
        if i >= 100 {
            leg.push(began.elapsed());
        }
    }
    drop(direct);

    let dir = std::env::temp_dir().join(format!("palaver-push-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("AuthKey.p8"), &key.private_pem).unwrap();
    std::fs::write(dir.join("ca.pem"), apns.ca_pem()).unwrap();
    std::fs::write(
        dir.join("push.toml"),
        format!(
            "[apns]\nkey_file = {:?}\nkey_id = \"{KEY_ID}\"\nteam_id = \"{TEAM}\"\n\
             environments = [\"production\"]\nproduction_url = \"{}\"\nca_file = {:?}\n",
            dir.join("AuthKey.p8"),
            apns.url(),
            dir.join("ca.pem"),
        ),
    )
    .unwrap();

    let mut producer = Feed {
        producer: kafka::producer_config(&brokers, 1).create().unwrap(),
        request_id: 0,
    };
    let total = warmup + n;
    for i in 0..total {
        producer.request(
            &user(i),
            "phone",
            &user(i),
            Body::RegisterPushToken(pb::RegisterPushToken {
                platform: pb::PushPlatform::Apns.into(),
                token: token(i),
                apns_environment: pb::ApnsEnvironment::Production.into(),
                apns_topic: TOPIC.into(),
                locale: String::new(),
            }),
        );
    }
    producer.producer.flush(Duration::from_secs(30)).unwrap();
    let mut store = RedisStore::connect(redis_config).unwrap();
    let began = Instant::now();
    while (0..total)
        .step_by(97)
        .chain([total - 1])
        .any(|i| store.push_tokens(&user(i)).unwrap().is_empty())
    {
        assert!(began.elapsed() < Duration::from_secs(120), "tokens stored");
        std::thread::sleep(Duration::from_millis(50));
    }

    let log = std::fs::File::create(dir.join("palaver-push.log")).unwrap();
    let mut worker = std::process::Command::new(&push_bin)
        .args(["--brokers", &brokers, "--redis", &redis.url()])
        .arg("--providers")
        .arg(dir.join("push.toml"))
        .env("RUST_LOG", "palaver_push=info,palaver_router=warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();

    let index: HashMap<String, usize> = (0..total).map(|i| (token(i), i)).collect();
    let arrived = |apns: &ApnsTestServer| -> HashMap<usize, Instant> {
        apns.received()
            .into_iter()
            .filter(|r| r.status == Some(200))
            .filter_map(|r| index.get(&r.device_token).map(|&i| (i, r.at)))
            .collect()
    };

    // Warm-up: the worker joins, connects, signs its token.
    for i in 0..warmup {
        producer.send_to(i);
        std::thread::sleep(Duration::from_millis(20));
    }
    let began = Instant::now();
    while arrived(&apns).len() < warmup {
        assert!(began.elapsed() < Duration::from_secs(120), "warm-up pushes");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The measured run at a fixed rate.
    let load_before = load_average();
    let worker_pid = worker.id().to_string();
    let cpu_before = (cpu_seconds(&worker_pid), cpu_seconds("self"));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let mut scheduled = vec![start; total];
    for (k, i) in (warmup..total).enumerate() {
        let at = start + interval * k as u32;
        scheduled[i] = at;
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        producer.send_to(i);
    }
    producer.producer.flush(Duration::from_secs(30)).unwrap();
    let began = Instant::now();
    let got = loop {
        let got = arrived(&apns);
        if got.len() >= total || began.elapsed() > Duration::from_secs(60) {
            break got;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let load_after = load_average();
    let cpu_after = (cpu_seconds(&worker_pid), cpu_seconds("self"));
    let latencies: Vec<Duration> = (warmup..total)
        .filter_map(|i| {
            got.get(&i)
                .map(|at| at.saturating_duration_since(scheduled[i]))
        })
        .collect();
    let missing = n - latencies.len();
    println!(
        "offline send -> push received: {n} events at {rate}/s over {seconds} s, {PARTITIONS} partitions, one palaver-push"
    );
    println!("  {}", percentiles(latencies));
    println!("  missing after 60 s: {missing}");
    println!("APNs leg alone (Sender::submit -> Delivered, one at a time, 200 pushes):");
    println!("  {}", percentiles(leg));
    println!("load average at start of the measured run: {load_before}; after: {load_after}");
    println!(
        "CPU over the measured run: palaver-push {:.2} s, this process (router worker, APNs server, producer) {:.2} s",
        cpu_after.0 - cpu_before.0,
        cpu_after.1 - cpu_before.1
    );

    let _ = worker.kill();
    let _ = worker.wait();
    stop.store(true, Ordering::Relaxed);
    router.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
