//! Runs `bench/scenarios/smoke.toml` through the real coordinator and worker
//! processes against a real `palaver-gateway` process (embedded engine, dev
//! certificate and JWT secret in a temporary data dir, free loopback ports),
//! and checks the report: every connection established, every message acked
//! and delivered exactly once and in order.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bench_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_palaver-bench"))
}

/// The gateway binary next to ours, built first if it is not there yet.
fn gateway_bin() -> PathBuf {
    let path = bench_bin().with_file_name("palaver-gateway");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "palaver-gateway"]);
        if path.parent().is_some_and(|d| d.ends_with("release")) {
            build.arg("--release");
        }
        let status = build
            .status()
            .expect("running cargo build -p palaver-gateway");
        assert!(status.success(), "cargo build -p palaver-gateway failed");
    }
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Kills the gateway when the test ends, however it ends.
struct Gateway {
    child: Child,
    port: u16,
    admin_port: u16,
    data_dir: PathBuf,
}

impl Gateway {
    /// Starts a gateway on free ports. A port found free can be taken by
    /// another test's process before the gateway binds it (the tests run in
    /// parallel): a gateway that exits at start is started again on other
    /// ports.
    /// `extra`: more gateway flags.
    fn start(data_dir: &Path, extra: &[&str]) -> Gateway {
        for _attempt in 0..5 {
            let (port, admin_port) = (free_port(), free_port());
            if port == admin_port {
                continue;
            }
            let child = Command::new(gateway_bin())
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--admin", &format!("127.0.0.1:{admin_port}")])
                .args(["--data-dir", data_dir.to_str().expect("utf-8 temp path")])
                .args(["--cores", "1", "--heartbeat-interval-ms", "1000"])
                .args(extra)
                .stdout(Stdio::null())
                .spawn()
                .expect("starting palaver-gateway");
            let mut gateway = Gateway {
                child,
                port,
                admin_port,
                data_dir: data_dir.to_path_buf(),
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && data_dir.join("jwt-hs256.secret").exists()
                {
                    return gateway;
                }
                if let Ok(Some(status)) = gateway.child.try_wait() {
                    eprintln!("palaver-gateway exited at start ({status}); trying other ports");
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "gateway did not listen within 60s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("palaver-gateway did not start in 5 attempts (see its errors above)");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("palaver-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a temp dir");
    dir
}

/// The run's `report.json`.
fn read_report(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("report.json")).expect("report.json");
    serde_json::from_str(&text).expect("report is JSON")
}

/// A count in the report.
fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn smoke_scenario_against_a_real_gateway() {
    let dir = temp_dir("smoke");
    let gateway = Gateway::start(&dir.join("gateway"), &[]);
    let out = dir.join("out");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/smoke.toml");
    let output = Command::new(bench_bin())
        .arg("run")
        .arg(&scenario)
        .args(["--target", &format!("127.0.0.1:{}", gateway.port)])
        .arg("--data-dir")
        .arg(&gateway.data_dir)
        .args(["--gateway-pid", &gateway.child.id().to_string()])
        .args([
            "--admin-url",
            &format!("http://127.0.0.1:{}", gateway.admin_port),
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("running palaver-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed\n{stdout}\n{stderr}");

    let r = read_report(&out);
    let c = &r["counters"];
    assert_eq!(n(&r["connections"]["target"]), 200);
    assert_eq!(n(&r["connections"]["established"]), 200, "{stdout}");
    assert_eq!(n(&c["failed"]), 0, "{stdout}");
    assert_eq!(n(&c["disconnected"]), 0, "{stdout}");
    assert_eq!(n(&c["groups_created"]), 6, "{stdout}");
    // 100 msg/s for 3 s, every send answered and acked.
    assert_eq!(n(&c["sent"]), 300, "{stdout}");
    assert_eq!(n(&c["acked"]), 300, "{stdout}");
    assert_eq!(n(&c["send_errors"]), 0, "{stdout}");
    assert_eq!(n(&c["unacked"]), 0, "{stdout}");
    assert!(n(&c["expected_deliveries"]) > 300, "{stdout}");
    assert_eq!(n(&c["delivered"]), n(&c["expected_deliveries"]), "{stdout}");
    assert_eq!(n(&c["losses"]), 0, "{stdout}");
    assert_eq!(n(&c["duplicates"]), 0, "{stdout}");
    assert_eq!(n(&c["order_violations"]), 0, "{stdout}");
    assert_eq!(n(&c["unexpected"]), 0, "{stdout}");
    assert_eq!(n(&r["latency"]["e2e"]["count"]), n(&c["delivered"]));
    assert_eq!(n(&r["latency"]["connect"]["count"]), 200);
    assert!(r["problems"].as_array().is_some_and(Vec::is_empty));
    // The bench's own CPU is reported (it shares the gateway's machine).
    assert!(
        r["chat"]["bench_cpu_us_per_sent"]
            .as_f64()
            .is_some_and(|us| us >= 0.0),
        "{stdout}"
    );
    // The gateway was observed: RSS from /proc and its /metrics page.
    assert!(r["gateway"]["rss_connected_bytes"].as_u64().is_some());
    assert!(r["gateway"]["metrics_connected"]
        .as_object()
        .is_some_and(|m| !m.is_empty()));
    for file in [
        "command.txt",
        "machine.json",
        "summary.txt",
        "timeline.svg",
        "latency-e2e.svg",
    ] {
        let len = std::fs::metadata(out.join(file)).map_or(0, |m| m.len());
        assert!(len > 0, "{file} missing or empty");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_gateway_credentials_are_a_clear_error() {
    let dir = temp_dir("nocreds");
    let output = Command::new(bench_bin())
        .args(["run", "--scenario", "connect", "--target", "127.0.0.1:9"])
        .arg("--data-dir")
        .arg(dir.join("absent"))
        .output()
        .expect("running palaver-bench");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("start the gateway once"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `one-hop`: one message in flight per pair, so the pace caps the sends,
/// and every send is acked and delivered exactly once, in order.
#[test]
fn one_hop_keeps_one_message_in_flight_per_pair() {
    let dir = temp_dir("one-hop");
    // The in-memory engine: this checks the bench's pacing, which needs a
    // round trip well under 20 ms; the durable default waits for a commit's
    // fsync before each ack, 10-30 ms on a loaded VM disk
    // (bench/results/2026-12-07-durable-embedded).
    let gateway = Gateway::start(&dir.join("gateway"), &["--ephemeral"]);
    let out = dir.join("out");
    let output = Command::new(bench_bin())
        .args(["run", "--scenario", "one-hop", "--connections", "4"])
        .args(["--workers", "1", "--rate", "100", "--duration", "2s"])
        .args(["--settle", "200ms", "--grace", "5s"])
        .args(["--target", &format!("127.0.0.1:{}", gateway.port)])
        .arg("--data-dir")
        .arg(&gateway.data_dir)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("running palaver-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed\n{stdout}\n{stderr}");
    let r = read_report(&out);
    let c = &r["counters"];
    let sent = n(&c["sent"]);
    // 2 pairs at 50 msg/s each for 2 s: the pace allows 200 (one more per
    // pair at the edge); a loopback gateway keeps up with it.
    assert!((180..=202).contains(&sent), "sent {sent}\n{stdout}");
    assert_eq!(n(&c["acked"]), sent, "{stdout}");
    assert_eq!(n(&c["delivered"]), sent, "{stdout}");
    assert_eq!(n(&c["losses"]), 0, "{stdout}");
    assert_eq!(n(&c["duplicates"]), 0, "{stdout}");
    assert_eq!(n(&c["order_violations"]), 0, "{stdout}");
    assert_eq!(n(&c["unexpected"]), 0, "{stdout}");
    assert_eq!(n(&r["latency"]["e2e"]["count"]), sent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `channel`: one channel shared by two workers (worker 0 creates it and
/// adds the members, the coordinator passes its id on), 50 members of whom
/// 10 connect, 2 of those in COUNTS mode; 2 senders (one per worker) at
/// 20 msg/s for 3 s. Every message reaches every LIVE receiver but its
/// sender exactly once, in order; COUNTS receivers are shown the last seq.
#[test]
fn channel_delivers_every_message_to_every_live_receiver() {
    let dir = temp_dir("channel");
    let gateway = Gateway::start(&dir.join("gateway"), &["--ephemeral"]);
    let out = dir.join("out");
    let output = Command::new(bench_bin())
        .args(["run", "--scenario", "channel", "--channel-members", "50"])
        .args(["--connections", "10", "--workers", "2", "--senders", "2"])
        .args(["--channel-counts-share", "0.2"])
        .args(["--rate", "20", "--duration", "3s", "--grace", "5s"])
        .args(["--settle", "200ms", "--phase-timeout", "60s"])
        .args(["--target", &format!("127.0.0.1:{}", gateway.port)])
        .arg("--data-dir")
        .arg(&gateway.data_dir)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("running palaver-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed\n{stdout}\n{stderr}");
    let r = read_report(&out);
    let c = &r["counters"];
    let ch = &r["channel"];
    assert_eq!(n(&r["connections"]["established"]), 10, "{stdout}");
    assert_eq!(n(&c["groups_created"]), 1, "{stdout}");
    assert_eq!(n(&ch["members"]), 50, "{stdout}");
    assert_eq!(n(&ch["live_receivers"]), 8, "{stdout}");
    assert_eq!(n(&ch["counts_receivers"]), 2, "{stdout}");
    assert_eq!(n(&c["sent"]), 60, "{stdout}");
    assert_eq!(n(&c["acked"]), 60, "{stdout}");
    assert_eq!(n(&c["unacked"]), 0, "{stdout}");
    assert_eq!(n(&ch["last_seq"]), 60, "{stdout}");
    // Both senders are LIVE receivers: 7 of the 8 get each message.
    assert_eq!(n(&c["expected_deliveries"]), 60 * 7, "{stdout}");
    assert_eq!(n(&c["delivered"]), 60 * 7, "{stdout}");
    assert_eq!(n(&c["losses"]), 0, "{stdout}");
    assert_eq!(n(&c["duplicates"]), 0, "{stdout}");
    assert_eq!(n(&c["order_violations"]), 0, "{stdout}");
    assert_eq!(n(&c["unexpected"]), 0, "{stdout}");
    assert_eq!(n(&r["latency"]["e2e"]["count"]), 60 * 7);
    assert_eq!(n(&ch["counts_reached_last_seq"]), 2, "{stdout}");
    assert!(n(&ch["activity_frames"]) >= 2, "{stdout}");
    assert!(r["problems"].as_array().is_some_and(Vec::is_empty));
    let _ = std::fs::remove_dir_all(&dir);
}
