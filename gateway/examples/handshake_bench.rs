//! rustls' own server-side full-handshake cost, in memory (no sockets), with
//! the gateway's exact server configuration (TLS 1.3, ring, dev ECDSA P-256
//! certificate, one session ticket): the reference the gateway's measured
//! per-connection CPU is compared with. Runs rustls' buffered
//! `ServerConnection` and the gateway's own unbuffered path
//! (`tls_io::drive`), and reports the heap each idle connection keeps.
//!
//! ```text
//! cargo build --release -p palaver-gateway --examples
//! target/release/examples/handshake_bench [--n 5000]
//! ```
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palaver_gateway::{devcerts, tls, tls_io};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::UnbufferedServerConnection;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// Counts live heap bytes (requested sizes, not allocator overhead).
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

#[allow(unsafe_code)] // a counting allocator wraps the system's
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn new_client(base: &ClientConfig) -> ClientConnection {
    // Fresh client config: no ticket, so every handshake is full.
    let mut cc = base.clone();
    cc.alpn_protocols = vec![palaver_protocol::ALPN.to_vec()];
    ClientConnection::new(Arc::new(cc), ServerName::try_from("localhost").unwrap()).unwrap()
}

fn client_flight(client: &mut ClientConnection) -> Vec<u8> {
    let mut buf = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut buf).unwrap();
    }
    buf
}

fn client_read(client: &mut ClientConnection, mut data: &[u8]) {
    while !data.is_empty() {
        client.read_tls(&mut data).unwrap();
        client.process_new_packets().unwrap();
    }
}

/// rustls' buffered server connection; returns server-side time.
fn buffered(config: &Arc<ServerConfig>, base: &ClientConfig) -> Duration {
    let mut client = new_client(base);
    let t = Instant::now();
    let mut server = ServerConnection::new(config.clone()).unwrap();
    let mut spent = t.elapsed();
    while client.is_handshaking() || client.wants_write() {
        let flight = client_flight(&mut client);
        let t = Instant::now();
        let mut rd = &flight[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
            server.process_new_packets().unwrap();
        }
        let mut out = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut out).unwrap();
        }
        spent += t.elapsed();
        client_read(&mut client, &out);
    }
    assert!(!server.is_handshaking());
    spent
}

/// The gateway's path: unbuffered server driven by `tls_io::drive`.
fn unbuffered(
    config: &Arc<ServerConfig>,
    base: &ClientConfig,
) -> (Duration, Box<UnbufferedServerConnection>) {
    let mut client = new_client(base);
    let t = Instant::now();
    let mut server = Box::new(UnbufferedServerConnection::new(config.clone()).unwrap());
    let mut spent = t.elapsed();
    let mut out = Vec::new();
    while client.is_handshaking() || client.wants_write() {
        let mut flight = client_flight(&mut client);
        let t = Instant::now();
        out.clear();
        let driven = tls_io::drive(&mut server, &mut flight, &mut out, None, &[]);
        assert!(driven.error.is_none(), "{:?}", driven.error);
        assert_eq!(driven.consumed, flight.len());
        spent += t.elapsed();
        client_read(&mut client, &out);
    }
    assert!(!server.is_handshaking());
    (spent, server)
}

fn main() {
    let n: usize = std::env::args()
        .skip_while(|a| a != "--n")
        .nth(1)
        .map_or(3000, |v| v.parse().unwrap());
    let dir = std::env::temp_dir().join(format!("palaver-hsbench-{}", std::process::id()));
    let certs = devcerts::ensure_dev_certs(&dir, &[]).unwrap();
    let config = tls::build_server_config(
        &tls::TlsFiles {
            cert: certs.server_cert.clone(),
            key: certs.server_key.clone(),
            client_ca: None,
        },
        rustls::crypto::ring::Ticketer::new().unwrap(),
    )
    .unwrap();
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&certs.ca_cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let base = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();

    let mut t_buffered = Duration::ZERO;
    let mut t_unbuffered = Duration::ZERO;
    let mut kept = Vec::with_capacity(n);
    let mut kept_bytes: isize = 0;
    for _ in 0..n {
        t_buffered += buffered(&config, &base);
        let before = LIVE.load(Ordering::Relaxed);
        let (spent, server) = unbuffered(&config, &base);
        t_unbuffered += spent;
        kept_bytes += LIVE.load(Ordering::Relaxed) - before;
        kept.push(server);
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let suite = kept[0].negotiated_cipher_suite().map(|s| s.suite());
    println!("handshakes            {n} full TLS 1.3 each way (in memory), suite {suite:?}");
    println!(
        "rustls ServerConnection      {:.1} us server side = {:.0} handshakes/s per core",
        per(t_buffered),
        1e6 / per(t_buffered)
    );
    println!(
        "gateway unbuffered path      {:.1} us server side = {:.0} handshakes/s per core",
        per(t_unbuffered),
        1e6 / per(t_unbuffered)
    );
    println!(
        "heap kept per idle unbuffered connection: {} bytes (requested sizes)",
        kept_bytes / n as isize
    );
    let _ = std::fs::remove_dir_all(&dir);
}
