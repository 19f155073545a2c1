//! The kernel's floor under the embedded message path on this machine: the
//! socket work of a 1:1 chat message through the gateway, with nothing else.
//!
//! Per message, as through `palaver-gateway` with the embedded engine and
//! both users on one core thread: the sender's `write`, the server's
//! `read` (edge-triggered epoll), the server's two `write`s (the Deliver to
//! the recipient, then the ack to the sender), and the client's two
//! `read`s — over plain loopback TCP, with no TLS, no protocol, no store,
//! 32-byte messages. Clients pace sends from their scheduled times like
//! palaver-bench and measure Deliver latency from the scheduled time.
//!
//! It answers "what rate could this machine carry if TLS, the protocol and
//! the router cost nothing?": the CPU per message it reports is what the
//! kernel (TCP, epoll, wake-ups) alone takes, server side and client side,
//! on the same CPUs.
//!
//! ```text
//! cargo build --release -p palaver-gateway --examples
//! target/release/examples/loopback_floor [--connections 8000] [--rate 35000]
//!     [--seconds 10] [--server-threads 2] [--client-threads 2]
//! ```
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

const FRAME: usize = 32;
const DELIVER: u8 = 1;
const ACK: u8 = 2;
const WARMUP: Duration = Duration::from_secs(2);

struct Args {
    connections: usize,
    rate: f64,
    seconds: u64,
    server_threads: usize,
    client_threads: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        connections: 8000,
        rate: 35_000.0,
        seconds: 10,
        server_threads: 2,
        client_threads: 2,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = pair.get(1).map(String::as_str).unwrap_or("");
        let bad = |what: &str| -> ! {
            eprintln!("{what} needs a positive number, got {value:?}");
            std::process::exit(2)
        };
        match pair[0].as_str() {
            "--connections" => {
                a.connections = value.parse().unwrap_or_else(|_| bad("--connections"))
            }
            "--rate" => a.rate = value.parse().unwrap_or_else(|_| bad("--rate")),
            "--seconds" => a.seconds = value.parse().unwrap_or_else(|_| bad("--seconds")),
            "--server-threads" => {
                a.server_threads = value.parse().unwrap_or_else(|_| bad("--server-threads"))
            }
            "--client-threads" => {
                a.client_threads = value.parse().unwrap_or_else(|_| bad("--client-threads"))
            }
            other => {
                eprintln!(
                    "unknown option {other:?}; options: --connections --rate --seconds \
                     --server-threads --client-threads"
                );
                std::process::exit(2)
            }
        }
    }
    if a.connections < 2
        || !a.connections.is_multiple_of(2)
        || a.server_threads == 0
        || a.client_threads == 0
    {
        eprintln!("--connections must be even and >= 2; thread counts >= 1");
        std::process::exit(2);
    }
    a
}

/// This thread's CPU time (user + system) so far.
fn thread_cpu() -> Duration {
    Duration::from_secs_f64(palaver_testkit::proc_stat::cpu_seconds(
        "/proc/thread-self/stat",
    ))
}

/// What a thread reports at the end: CPU over the measured window, and
/// (clients) messages sent and the Deliver latency from the scheduled time.
struct Report {
    cpu: Duration,
    sent: u64,
    delivered: u64,
    acked: u64,
    latency: Histogram<u64>,
    would_block: u64,
}

/// Reads whole frames from `sock` into `buf` (keeping a partial one) until
/// the socket is drained; calls `each` per frame. Returns false on EOF/error.
fn read_frames(
    sock: &mut TcpStream,
    partial: &mut Vec<u8>,
    scratch: &mut [u8],
    mut each: impl FnMut(&[u8; FRAME]),
) -> bool {
    loop {
        let have = partial.len();
        scratch[..have].copy_from_slice(partial);
        match sock.read(&mut scratch[have..]) {
            Ok(0) => return false,
            Ok(n) => {
                let total = have + n;
                let whole = total / FRAME * FRAME;
                for f in scratch[..whole].chunks_exact(FRAME) {
                    each(f.try_into().expect("FRAME bytes"));
                }
                partial.clear();
                partial.extend_from_slice(&scratch[whole..total]);
                if n < scratch.len() - have {
                    // A short read drained the socket (as the gateway does).
                    return true;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Server thread: for every frame from connection `from` (bytes 8..12 name
/// the recipient), write the Deliver to the recipient, then the ack back.
fn serve(
    socks: Vec<(u32, TcpStream)>,
    start: Arc<Barrier>,
    window: (Instant, Instant),
    stop: Arc<AtomicBool>,
) -> Report {
    let mut poll = Poll::new().expect("epoll");
    let mut conns: Vec<(TcpStream, Vec<u8>)> = Vec::with_capacity(socks.len());
    let mut index: HashMap<u32, usize> = HashMap::new();
    for (id, mut sock) in socks {
        poll.registry()
            .register(&mut sock, Token(conns.len()), Interest::READABLE)
            .expect("register");
        index.insert(id, conns.len());
        conns.push((sock, Vec::new()));
    }
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; 64 * 1024];
    let mut frames: Vec<[u8; FRAME]> = Vec::new();
    let mut would_block = 0;
    let (mut cpu_start, mut cpu_end, mut measuring, mut done) = (None, None, false, false);
    start.wait();
    while !stop.load(Ordering::Relaxed) {
        let _ = poll.poll(&mut events, Some(Duration::from_millis(10)));
        let now = Instant::now();
        if !measuring && now >= window.0 {
            measuring = true;
            cpu_start = Some(thread_cpu());
        }
        if measuring && !done && now >= window.1 {
            done = true;
            cpu_end = Some(thread_cpu());
        }
        for event in events.iter() {
            let slot = event.token().0;
            frames.clear();
            let (sock, partial) = &mut conns[slot];
            let open = read_frames(sock, partial, &mut scratch, |f| frames.push(*f));
            for f in &frames {
                let to = u32::from_le_bytes(f[8..12].try_into().expect("4 bytes"));
                let mut out = *f;
                for (kind, dest) in [(DELIVER, index.get(&to).copied()), (ACK, Some(slot))] {
                    let Some(dest) = dest else { continue };
                    out[12] = kind;
                    match conns[dest].0.write(&out) {
                        Ok(FRAME) => {}
                        _ => would_block += 1,
                    }
                }
            }
            if !open {
                let _ = poll.registry().deregister(&mut conns[slot].0);
            }
        }
    }
    let cpu = cpu_end.unwrap_or_else(thread_cpu) - cpu_start.unwrap_or_default();
    Report {
        cpu,
        sent: 0,
        delivered: 0,
        acked: 0,
        latency: Histogram::new(3).expect("histogram"),
        would_block,
    }
}

/// Client thread: sends its share of the rate from evenly spaced scheduled
/// times, round-robin over its connections, each to the pair's other user.
fn client(
    socks: Vec<(u32, TcpStream)>,
    rate: f64,
    start: Arc<Barrier>,
    window: (Instant, Instant),
    stop_sending: Instant,
) -> Report {
    let mut poll = Poll::new().expect("epoll");
    let mut conns: Vec<(u32, TcpStream, Vec<u8>)> = Vec::with_capacity(socks.len());
    for (id, mut sock) in socks {
        poll.registry()
            .register(&mut sock, Token(conns.len()), Interest::READABLE)
            .expect("register");
        conns.push((id, sock, Vec::new()));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; 64 * 1024];
    let (mut sent, mut delivered, mut acked, mut would_block) = (0u64, 0u64, 0u64, 0u64);
    let (mut cpu_start, mut cpu_end) = (None, None);
    let interval = Duration::from_secs_f64(1.0 / rate);
    start.wait();
    let epoch = Instant::now();
    let mut k: u64 = 0;
    let mut next = 0usize;
    loop {
        let now = Instant::now();
        if cpu_start.is_none() && now >= window.0 {
            cpu_start = Some(thread_cpu());
        }
        if cpu_end.is_none() && now >= window.1 {
            cpu_end = Some(thread_cpu());
        }
        // Everything due by now (scheduled times are exact; lateness shows
        // as latency).
        loop {
            let due = epoch + interval.mul_f64(k as f64);
            if due > now || now >= stop_sending {
                break;
            }
            let (id, sock, _) = &mut conns[next];
            let mut f = [0u8; FRAME];
            f[..8].copy_from_slice(&((due - epoch).as_nanos() as u64).to_le_bytes());
            f[8..12].copy_from_slice(&(*id ^ 1).to_le_bytes());
            match sock.write(&f) {
                Ok(FRAME) => {
                    if due >= window.0 && due < window.1 {
                        sent += 1;
                    }
                }
                _ => would_block += 1,
            }
            k += 1;
            next = (next + 1) % conns.len();
        }
        if now >= stop_sending + Duration::from_secs(1) {
            break;
        }
        let wait = (epoch + interval.mul_f64(k as f64)).saturating_duration_since(Instant::now());
        let _ = poll.poll(&mut events, Some(wait.min(Duration::from_millis(100))));
        let now_ns = (Instant::now() - epoch).as_nanos() as u64;
        for event in events.iter() {
            let (_, sock, partial) = &mut conns[event.token().0];
            read_frames(sock, partial, &mut scratch, |f| {
                let scheduled = u64::from_le_bytes(f[..8].try_into().expect("8 bytes"));
                let in_window = epoch + Duration::from_nanos(scheduled) >= window.0
                    && epoch + Duration::from_nanos(scheduled) < window.1;
                match f[12] {
                    DELIVER if in_window => {
                        delivered += 1;
                        let us = now_ns.saturating_sub(scheduled) / 1000;
                        let _ = latency.record(us.max(1));
                    }
                    ACK if in_window => acked += 1,
                    _ => {}
                }
            });
        }
    }
    Report {
        cpu: cpu_end.unwrap_or_else(thread_cpu) - cpu_start.unwrap_or_default(),
        sent,
        delivered,
        acked,
        latency,
        would_block,
    }
}

fn main() {
    let args = parse_args();
    let nofile = palaver_gateway::config::raise_nofile_limit();
    if (args.connections as u64) * 2 + 64 > nofile {
        eprintln!(
            "{} connections need {} descriptors in this process; the file limit is {nofile}: \
             use fewer --connections",
            args.connections,
            args.connections * 2 + 64
        );
        std::process::exit(2);
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let mut server_socks: Vec<Vec<(u32, TcpStream)>> =
        (0..args.server_threads).map(|_| Vec::new()).collect();
    let mut client_socks: Vec<Vec<(u32, TcpStream)>> =
        (0..args.client_threads).map(|_| Vec::new()).collect();
    for id in 0..args.connections as u32 {
        let c = std::net::TcpStream::connect(addr).expect("connect");
        let (s, _) = listener.accept().expect("accept");
        for sock in [&c, &s] {
            sock.set_nodelay(true).expect("nodelay");
            sock.set_nonblocking(true).expect("nonblocking");
        }
        // Both users of a pair on one server thread: no cross-thread hop,
        // the best case of the gateway (both on the engine's core).
        let pair = (id / 2) as usize;
        server_socks[pair % args.server_threads].push((id, TcpStream::from_std(s)));
        client_socks[pair % args.client_threads].push((id, TcpStream::from_std(c)));
    }
    let threads = args.server_threads + args.client_threads;
    let start = Arc::new(Barrier::new(threads + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let begin = Instant::now() + Duration::from_millis(100);
    let window = (
        begin + WARMUP,
        begin + WARMUP + Duration::from_secs(args.seconds),
    );
    let servers: Vec<_> = server_socks
        .into_iter()
        .map(|socks| {
            let (start, stop) = (start.clone(), stop.clone());
            std::thread::spawn(move || serve(socks, start, window, stop))
        })
        .collect();
    let per_client = args.rate / args.client_threads as f64;
    let clients: Vec<_> = client_socks
        .into_iter()
        .map(|socks| {
            let start = start.clone();
            std::thread::spawn(move || client(socks, per_client, start, window, window.1))
        })
        .collect();
    start.wait();
    let clients: Vec<Report> = clients
        .into_iter()
        .map(|t| t.join().expect("client"))
        .collect();
    stop.store(true, Ordering::Relaxed);
    let servers: Vec<Report> = servers
        .into_iter()
        .map(|t| t.join().expect("server"))
        .collect();

    let secs = args.seconds as f64;
    let sent: u64 = clients.iter().map(|r| r.sent).sum();
    let delivered: u64 = clients.iter().map(|r| r.delivered).sum();
    let acked: u64 = clients.iter().map(|r| r.acked).sum();
    let would_block: u64 = clients.iter().chain(&servers).map(|r| r.would_block).sum();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    for r in &clients {
        latency.add(&r.latency).expect("same bounds");
    }
    let cpu = |rs: &[Report]| rs.iter().map(|r| r.cpu.as_secs_f64()).sum::<f64>();
    let (server_cpu, client_cpu) = (cpu(&servers), cpu(&clients));
    let per_msg = |c: f64| c * 1e6 / sent.max(1) as f64;
    println!(
        "loopback floor: {} connections, {} server + {} client threads, offered {:.0}/s for {secs} s (after {} s warm-up)",
        args.connections,
        args.server_threads,
        args.client_threads,
        args.rate,
        WARMUP.as_secs()
    );
    println!(
        "sent {sent} ({:.0}/s)  delivered {delivered}  acked {acked}  lost {}  writes refused {would_block}",
        sent as f64 / secs,
        sent.saturating_sub(delivered)
    );
    println!(
        "CPU per message: server {:.1} us  clients {:.1} us  total {:.1} us  ({:.2} + {:.2} cores)",
        per_msg(server_cpu),
        per_msg(client_cpu),
        per_msg(server_cpu + client_cpu),
        server_cpu / secs,
        client_cpu / secs
    );
    println!(
        "deliver latency from the scheduled time (us): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        latency.value_at_quantile(0.5),
        latency.value_at_quantile(0.9),
        latency.value_at_quantile(0.99),
        latency.value_at_quantile(0.999),
        latency.max()
    );
}
