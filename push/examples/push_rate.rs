//! Pushes per second on one worker core against the local test servers.
//!
//! The sending side (clients, sender, the submitting loop) runs on ONE
//! thread (a current-thread tokio runtime); the APNs and FCM test servers
//! run on another runtime with one worker thread. Both are real: TLS,
//! HTTP/2, JWTs checked. Reported: wall-clock rate, and the sending
//! thread's own CPU time (from /proc/thread-self/stat), so the figure per
//! core does not depend on what else the machine was doing.
//!
//! cargo run --release -p palaver-push --features test-server --example push_rate -- [N] [apns|fcm|both]
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use palaver_push::apns::ApnsClient;
use palaver_push::fcm::FcmClient;
use palaver_push::testing::{
    ApnsServerConfig, ApnsTestServer, FcmServerConfig, FcmTestServer, TestKeyPair,
};
use palaver_push::{
    ApnsEnvironment, Content, Notification, Platform, Priority, SendResult, Sender, SenderConfig,
    SubmitError,
};

/// Tickets outstanding at once (the sender's own queue is bigger).
const WINDOW: usize = 4000;

fn note(platform: Platform, i: u64) -> Notification {
    Notification {
        platform,
        device_token: match platform {
            Platform::Apns => format!("{:016x}", i).repeat(4),
            Platform::Fcm => format!("fcm-{i}:APA91b{}", "x".repeat(140)),
        },
        apns_topic: Some("com.example.chat".into()),
        apns_environment: ApnsEnvironment::Production,
        conversation_id: format!("conv-{}", i % 1000),
        seq: i,
        collapse_id: Some(format!("conv-{}", i % 1000)),
        badge: Some((i % 50) as u32),
        content: Content::IdOnly,
        ttl: Duration::from_secs(3600),
        priority: Priority::High,
    }
}

/// This thread's user+system CPU seconds.
fn thread_cpu() -> f64 {
    cpu_of("/proc/thread-self/stat")
}

/// The whole process's (servers included).
fn process_cpu() -> f64 {
    cpu_of("/proc/self/stat")
}

fn cpu_of(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line, in clock ticks (100 per second).
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run(sender: &Sender, platform: Platform, from: u64, n: u64) -> (u64, u64) {
    let mut outstanding = VecDeque::with_capacity(WINDOW);
    let (mut delivered, mut other) = (0, 0);
    let mut settle = |r: SendResult| match r {
        SendResult::Delivered { .. } => delivered += 1,
        _ => other += 1,
    };
    for i in from..from + n {
        if outstanding.len() >= WINDOW {
            let t: palaver_push::Ticket = outstanding.pop_front().unwrap();
            settle(t.result().await);
        }
        match sender.submit(note(platform, i)) {
            Ok(t) => outstanding.push_back(t),
            Err(SubmitError::QueueFull(q)) => panic!("{q}: raise the queue or lower WINDOW"),
            Err(e) => panic!("{e}"),
        }
    }
    for t in outstanding {
        settle(t.result().await);
    }
    (delivered, other)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let which = args.get(2).cloned().unwrap_or_else(|| "both".into());

    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let apns_key = TestKeyPair::apns();
    let fcm_key = TestKeyPair::rsa();
    let (apns, fcm) = servers.block_on(async {
        let mut c = ApnsServerConfig::new("TEAM123456", "KEY1234567", &apns_key.public_pem);
        c.max_recorded = 0;
        let mut f = FcmServerConfig::new(
            "bench",
            "sa@bench.iam.gserviceaccount.com",
            &fcm_key.public_pem,
        );
        f.max_recorded = 0;
        // Google's front ends allow far more than 100 streams per connection.
        f.max_concurrent_streams = 1000;
        (
            ApnsTestServer::start(c).await.unwrap(),
            FcmTestServer::start(f).await.unwrap(),
        )
    });
    let apns_config = apns
        .client_config("KEY1234567", &apns_key.private_pem)
        .unwrap();
    let fcm_config = fcm.client_config(&fcm_key.private_pem).unwrap();

    let worker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let config = SenderConfig { queue_capacity: WINDOW * 2, ..SenderConfig::default() };
            let sender = Sender::builder(config)
                .apns(ApnsEnvironment::Production, ApnsClient::new(apns_config).unwrap())
                .fcm(FcmClient::new(fcm_config).unwrap())
                .start(&tokio::runtime::Handle::current());
            let platforms: Vec<(Platform, &str)> = match which.as_str() {
                "apns" => vec![(Platform::Apns, "APNs")],
                "fcm" => vec![(Platform::Fcm, "FCM")],
                _ => vec![(Platform::Apns, "APNs"), (Platform::Fcm, "FCM")],
            };
            for (platform, name) in platforms {
                // Warm-up: connection, TLS, token, allocator.
                run(&sender, platform, 0, 2_000).await;
                let load_before = loadavg();
                let (cpu0, all0, t0) = (thread_cpu(), process_cpu(), Instant::now());
                let (delivered, other) = run(&sender, platform, 1_000_000, n).await;
                let (cpu, wall) = (thread_cpu() - cpu0, t0.elapsed().as_secs_f64());
                let servers_cpu = process_cpu() - all0 - cpu;
                println!(
                    "{name}: {n} pushes in {wall:.2} s = {:.0}/s wall; sending thread CPU {cpu:.2} s = {:.0} pushes per CPU-second; \
                     test servers' CPU {servers_cpu:.2} s; delivered {delivered}, other {other}; loadavg before {load_before}, after {}",
                    n as f64 / wall,
                    n as f64 / cpu.max(0.001),
                    loadavg()
                );
            }
        });
    });
    worker.join().unwrap();
    println!(
        "servers: APNs delivered {}, FCM delivered {}, connections APNs {} FCM {}",
        apns.delivered(),
        fcm.delivered(),
        apns.connections(),
        fcm.connections()
    );
    servers.block_on(async { drop((apns, fcm)) });
}
