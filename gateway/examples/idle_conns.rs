//! Measures gateway memory per idle TLS connection and the gateway's CPU
//! cost per full handshake.
//!
//! Runs a gateway in a child process (`--serve`, its own fd budget) with the
//! embedded engine or, with `--backend none`, a backend that keeps nothing
//! (the gateway's own memory, as with a remote backend). Opens `--n` TLS
//! connections from this process (each completes Hello/Welcome as a distinct
//! user, then stays idle) and reads the gateway's VmRSS and CPU time from
//! /proc before and after.
//!
//! ```text
//! cargo build --release -p palaver-gateway --examples
//! target/release/examples/idle_conns --n 10000 [--backend none] [--cores 2] [--threads 2]
//! target/release/examples/idle_conns --n 10000 --hold 300 [--heartbeat-ms 30000]
//! ```
//!
//! `--hold S` keeps the connections open for S seconds with real heartbeats
//! (every connection Pings at the announced pace) and reads the gateway's
//! RSS at +10 s and at +S after the ramp: idle memory must not creep.
//!
//! Where the bytes go, by call site (heaptrack from Debian):
//!
//! ```text
//! IDLE_CONNS_WRAP="heaptrack -o /tmp/idle" target/release/examples/idle_conns \
//!     --n 2000 --hold 12 --exit-hot [--backend none]
//! heaptrack_print -f /tmp/idle.zst --print-leaks 1            # backtraces
//! heaptrack_print -f /tmp/idle.zst --flamegraph-cost-type leaked -F stacks.txt  # exact bytes
//! ```
//!
//! `--exit-hot` makes the gateway exit while the sessions are open, so what
//! heaptrack reports as leaked is exactly the live idle state.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palaver_gateway::{auth, devcerts};
use palaver_testkit::client::{Client, ConnectOptions};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn status_kb(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    palaver_testkit::proc_stat::cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// Opens `n` connections over `threads` threads; returns their TCP sockets
/// (the client-side TLS state is dropped: the server cannot tell).
fn open(
    n: usize,
    threads: usize,
    opts: &ConnectOptions,
    secret: &[u8],
    tag: &str,
    resume: bool,
) -> Vec<std::net::TcpStream> {
    let per = n.div_ceil(threads);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let opts = opts.clone();
            let secret = secret.to_vec();
            let tag = tag.to_string();
            std::thread::spawn(move || {
                let config = opts.tls_config().unwrap();
                let mut socks = Vec::with_capacity(per);
                for i in 0..per {
                    if t * per + i >= n {
                        break;
                    }
                    // A fresh config per connection = no ticket = full handshake.
                    let cfg = if resume {
                        config.clone()
                    } else {
                        Arc::new((*config).clone())
                    };
                    let mut c = Client::connect_with(&opts, cfg).expect("connect");
                    // Distinct users, as phones are.
                    let token = auth::mint_hs256(&secret, &format!("{tag}{t}x{i}"), None, 3600);
                    c.hello(&token, "phone", Duration::from_secs(30))
                        .expect("hello");
                    socks.push(c.into_tcp());
                }
                socks
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

/// Starts the gateway child; returns it, its pid, its address and data dir.
fn spawn_gateway(
    cores: &str,
    backend: &str,
    heartbeat_ms: &str,
) -> (std::process::Child, u32, SocketAddr, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("palaver-idle-{}", std::process::id()));
    // IDLE_CONNS_WRAP="heaptrack -o FILE" runs the gateway under a profiler.
    let wrap = std::env::var("IDLE_CONNS_WRAP").unwrap_or_default();
    let mut wrap = wrap.split_whitespace();
    let mut cmd = match wrap.next() {
        Some(tool) => {
            let mut c = Command::new(tool);
            c.args(wrap).arg(std::env::current_exe().unwrap());
            c
        }
        None => Command::new(std::env::current_exe().unwrap()),
    };
    if std::env::args().any(|a| a == "--exit-hot") {
        cmd.arg("--exit-hot");
    }
    let mut child = cmd
        .args(["--serve", "--cores", cores, "--backend", backend])
        .args(["--heartbeat-ms", heartbeat_ms])
        .arg("--data-dir")
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut banner = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    // A wrapping profiler may print lines of its own first.
    while !banner.contains(" listening on ") {
        banner.clear();
        assert!(stdout.read_line(&mut banner).unwrap() > 0, "gateway exited");
    }
    // Keep draining the gateway's stdout so it never blocks or hits EPIPE.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let addr: SocketAddr = banner
        .split(" listening on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    (child, pid, addr, dir)
}

/// Opens `n` sessions that keep their client TLS state, so they can Ping.
fn open_clients(
    n: usize,
    threads: usize,
    opts: &ConnectOptions,
    secret: &[u8],
    tag: &str,
) -> Vec<Vec<Client>> {
    let per = n.div_ceil(threads);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let opts = opts.clone();
            let secret = secret.to_vec();
            let tag = tag.to_string();
            std::thread::spawn(move || {
                let config = opts.tls_config().unwrap();
                (0..per)
                    .take_while(|i| t * per + i < n)
                    .map(|i| {
                        let mut c = Client::connect_with(&opts, Arc::new((*config).clone()))
                            .expect("connect");
                        let token = auth::mint_hs256(&secret, &format!("{tag}{t}x{i}"), None, 3600);
                        c.hello(&token, "phone", Duration::from_secs(30))
                            .expect("hello");
                        c
                    })
                    .collect()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// `--hold S`: N sessions that heartbeat at the announced pace for S seconds;
/// gateway RSS read at +10 s and +S after the ramp.
fn hold_with_heartbeats(n: usize, threads: usize, cores: &str, backend: &str, hold: u64) {
    let heartbeat_ms: u64 = arg("--heartbeat-ms", "30000").parse().unwrap();
    let (mut child, pid, addr, dir) = spawn_gateway(cores, backend, &heartbeat_ms.to_string());
    let ca = std::fs::read(dir.join(devcerts::CA_CERT_FILE)).unwrap();
    let secret = devcerts::read_secret(&dir.join(devcerts::JWT_SECRET_FILE)).unwrap();
    let opts = ConnectOptions::new(addr, ca);
    let warm = open_clients(200, threads, &opts, &secret, "w");
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = status_kb(pid, "VmRSS:");
    let groups = open_clients(n, threads, &opts, &secret, "u");
    let ramped = Instant::now();
    let per_conn = |kb: u64| kb.saturating_sub(rss_before) as f64 * 1024.0 / n as f64;
    println!("connections     {n} (+200 warm-up), heartbeat {heartbeat_ms} ms, gateway cores {cores}, backend {backend}");
    println!("gateway VmRSS   {rss_before} KiB before the ramp");

    // One pinger thread per group: each session Pings every heartbeat_ms / 2
    // (well inside the 2.5x timeout) and reads its Pong, until `hold` ends.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pingers: Vec<_> = groups
        .into_iter()
        .chain(warm)
        .map(|mut group| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut pings = 0u64;
                let mut nonce = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let round = Instant::now();
                    for c in group.iter_mut() {
                        nonce += 1;
                        c.ping(nonce, Duration::from_secs(30)).expect("pong");
                        pings += 1;
                    }
                    let pace = Duration::from_millis(heartbeat_ms / 2);
                    while round.elapsed() < pace && !stop.load(std::sync::atomic::Ordering::Relaxed)
                    {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                (group, pings)
            })
        })
        .collect();
    let mut samples = vec![];
    for at in [10, 60, 120, 180, 240, hold]
        .into_iter()
        .filter(|&s| s <= hold)
    {
        while ramped.elapsed() < Duration::from_secs(at) {
            std::thread::sleep(Duration::from_millis(200));
        }
        let kb = status_kb(pid, "VmRSS:");
        println!(
            "+{at:>4} s         VmRSS {kb} KiB = {:.0} bytes per connection",
            per_conn(kb)
        );
        samples.push(kb);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut open, mut pings) = (0, 0);
    let mut sessions = vec![];
    for p in pingers {
        let (group, k) = p.join().unwrap();
        open += group.len();
        pings += k;
        sessions.push(group);
    }
    println!("heartbeats      {pings} Ping/Pong round trips over {hold} s, all {open} sessions alive to the end");
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        println!(
            "drift           {:+.0} bytes per connection from +10 s to +{hold} s",
            per_conn(*last) - per_conn(*first)
        );
    }
    // The gateway stops while the sessions are still open: with
    // `--exit-hot` it exits at once, so a heap profiler sees every idle
    // connection's memory as still allocated at exit.
    drop(child.stdin.take());
    let _ = child.wait();
    drop(sessions);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A backend that accepts sessions and answers nothing: isolates the
/// gateway's own memory from the engine's (as with a remote backend).
struct NullBackend;

impl palaver_router::api::Backend for NullBackend {
    fn start(
        &self,
        _: &str,
        _: Arc<dyn palaver_router::api::DeliverySink>,
    ) -> Result<(), palaver_router::api::BackendError> {
        Ok(())
    }
    fn session_opened(&self, _: &palaver_router::api::Session) {}
    fn session_closed(&self, _: &palaver_router::api::Session, _: i64) {}
    fn submit(&self, _: palaver_router::api::Inbound) {}
    fn shutdown(&self) {}
}

/// `--serve`: run a gateway in this process (the driver's child).
fn serve() {
    let mut config = palaver_gateway::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cores: arg("--cores", "2").parse().unwrap(),
        data_dir: arg("--data-dir", ".palaver").into(),
        ..Default::default()
    };
    config.limits.heartbeat_interval_ms = arg("--heartbeat-ms", "3600000").parse().unwrap();
    config.limits.max_connections = 19_500;
    let backend: Arc<dyn palaver_router::api::Backend> = match arg("--backend", "embedded").as_str()
    {
        "none" => Arc::new(NullBackend),
        _ => palaver_gateway::build_backend(&config),
    };
    let gw = palaver_gateway::GatewayHandle::start(config, backend).unwrap();
    println!("gateway listening on {}", gw.local_addr);
    // Until the driver closes our stdin.
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    if std::env::args().any(|a| a == "--exit-hot") {
        // For heap profiles: what is allocated now is the idle connections.
        std::process::exit(0);
    }
    gw.stop();
    gw.join();
}

fn main() {
    if std::env::args().any(|a| a == "--serve") {
        return serve();
    }
    let n: usize = arg("--n", "10000").parse().unwrap();
    let threads: usize = arg("--threads", "2").parse().unwrap();
    let cores = arg("--cores", "2");
    let backend = arg("--backend", "embedded");
    let hold: u64 = arg("--hold", "0").parse().unwrap();
    if hold > 0 {
        return hold_with_heartbeats(n, threads, &cores, &backend, hold);
    }
    // Heartbeats off: this run measures connections that stay silent.
    let (mut child, pid, addr, dir) = spawn_gateway(&cores, &backend, "3600000");
    let ca = std::fs::read(dir.join(devcerts::CA_CERT_FILE)).unwrap();
    let secret = devcerts::read_secret(&dir.join(devcerts::JWT_SECRET_FILE)).unwrap();
    let opts = ConnectOptions::new(addr, ca);

    // Warm up: scratch buffers, allocator arenas, engine structures.
    let warm = open(200, threads, &opts, &secret, "w", false);
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = status_kb(pid, "VmRSS:");
    let cpu_before = cpu_seconds(pid);

    let started = Instant::now();
    let socks = open(n, threads, &opts, &secret, "u", false);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_connect = cpu_seconds(pid) - cpu_before;
    // Let the engine settle, then read RSS.
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = status_kb(pid, "VmRSS:");
    let cpu_idle_before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(5));
    let cpu_idle = cpu_seconds(pid) - cpu_idle_before;

    println!("connections           {n} (+{} warm-up), {threads} client threads, gateway cores {cores}, backend {backend}", warm.len());
    println!("gateway VmRSS         {rss_before} KiB -> {rss_after} KiB");
    println!(
        "memory per connection {:.0} bytes (RSS delta / N{})",
        (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / n as f64,
        if backend == "none" {
            ""
        } else {
            "; includes each session's state in the embedded engine"
        }
    );
    println!(
        "connect rate          {:.0} connections/s (full TLS 1.3 handshake + Hello/Welcome; client side shares the machine)",
        n as f64 / elapsed
    );
    println!(
        "gateway CPU           {:.1} us per connection (accept + full handshake + JWT + Welcome + engine)",
        cpu_connect * 1e6 / n as f64
    );
    println!(
        "gateway idle CPU      {:.2} s over 5 s with {n} idle connections",
        cpu_idle
    );

    // Resumed handshakes for comparison.
    let started = Instant::now();
    let m = n.min(2000);
    let resumed = open(m, threads, &opts, &secret, "r", true);
    println!(
        "resumed connect rate  {:.0} connections/s ({m} connections, one ticket cache per client thread)",
        m as f64 / started.elapsed().as_secs_f64()
    );
    // Heartbeat cost: 500 sessions ping as fast as they get Pongs back.
    let mut pingers: Vec<Client> = (0..500)
        .map(|i| {
            let mut c = Client::connect(&opts).expect("connect");
            let token = auth::mint_hs256(&secret, &format!("p{i}"), None, 3600);
            c.hello(&token, "phone", Duration::from_secs(30))
                .expect("hello");
            c
        })
        .collect();
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let mut pings = 0u64;
    while started.elapsed() < Duration::from_secs(5) {
        for c in pingers.iter_mut() {
            c.request(palaver_protocol::pb::frame::Body::Ping(
                palaver_protocol::pb::Ping { nonce: pings },
            ))
            .unwrap();
        }
        for c in pingers.iter_mut() {
            c.recv_until(Duration::from_secs(10), "Pong", |f| {
                matches!(f.body, Some(palaver_protocol::pb::frame::Body::Pong(_)))
            })
            .unwrap();
        }
        pings += pingers.len() as u64;
    }
    let per_ping = (cpu_seconds(pid) - cpu_before) * 1e6 / pings as f64;
    println!(
        "heartbeat             {per_ping:.1} us gateway CPU per Ping/Pong ({pings} pings); 500k clients at 15 s = {:.1}% of one core",
        per_ping * (500_000.0 / 15.0) / 1e6 * 100.0
    );
    drop((warm, socks, resumed, pingers));
    drop(child.stdin.take());
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
