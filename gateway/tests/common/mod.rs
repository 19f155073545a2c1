//! Test harness: an in-process gateway on a loopback port 0 with the embedded
//! engine and its own data directory, and helpers to connect real TLS
//! clients (the `palaver-tools` blocking client) to it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palaver_gateway::metrics::CoreMetrics;
use palaver_gateway::{auth, build_backend, devcerts, Config, GatewayHandle};
use palaver_protocol::pb;
use palaver_router::api::Backend;
use palaver_testkit::client::{Client, ConnectOptions};

pub const T: Duration = Duration::from_secs(10);

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "palaver-gw-test-{}-{tag}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub struct TestGateway {
    pub gw: Option<GatewayHandle>,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub ca: Vec<u8>,
    pub secret: Vec<u8>,
}

/// Starts a gateway (2 cores, embedded engine, dev credentials in a fresh
/// directory); `tune` adjusts the config first.
pub fn start(tune: impl FnOnce(&mut Config)) -> TestGateway {
    start_with_backend(tune, build_backend)
}

/// [`start`] with the backend `backend` builds from the tuned config.
pub fn start_with_backend(
    tune: impl FnOnce(&mut Config),
    backend: impl FnOnce(&Config) -> Arc<dyn Backend>,
) -> TestGateway {
    let dir = temp_dir("gw");
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cores: 2,
        data_dir: dir.clone(),
        gateway_id: "gw-test".into(),
        ..Default::default()
    };
    tune(&mut config);
    let backend = backend(&config);
    let gw = GatewayHandle::start(config, backend).expect("gateway starts");
    let ca = std::fs::read(dir.join(devcerts::CA_CERT_FILE)).unwrap();
    // Absent when the config names its own JWT key.
    let secret = devcerts::read_secret(&dir.join(devcerts::JWT_SECRET_FILE))
        .unwrap_or_else(|_| b"no-dev-secret-in-this-test".to_vec());
    TestGateway {
        addr: gw.local_addr,
        gw: Some(gw),
        dir,
        ca,
        secret,
    }
}

impl TestGateway {
    pub fn gw(&self) -> &GatewayHandle {
        self.gw.as_ref().expect("gateway running")
    }

    pub fn opts(&self) -> ConnectOptions {
        ConnectOptions::new(self.addr, self.ca.clone())
    }

    pub fn token(&self, user: &str) -> String {
        auth::mint_hs256(&self.secret, user, None, 3600)
    }

    /// TLS connected, no Hello yet.
    pub fn connect(&self) -> Client {
        Client::connect(&self.opts()).expect("TLS connect")
    }

    /// Connected and welcomed as `user` on `device`.
    pub fn login(&self, user: &str, device: &str) -> Client {
        let mut c = self.connect();
        let w = c.hello(&self.token(user), device, T).expect("welcome");
        assert_eq!(w.user_id, user);
        c
    }

    /// Sum of a counter over all cores.
    pub fn metric(&self, get: impl Fn(&CoreMetrics) -> i64) -> i64 {
        self.gw().core_metrics().iter().map(|m| get(m)).sum()
    }

    /// Skips the gateway's clock `by` ahead (its real timeouts pass at
    /// once, see `GatewayHandle::skip_time`) until `cond` holds: after each
    /// skip it waits up to a second of real time, at most `skips` times.
    /// Skipping again is harmless to what is tested (deadlines only come
    /// sooner); `skips` × `by` must stay below the deadlines of the
    /// connections that must live (heartbeat: 75 s).
    pub fn skip_time_until(
        &self,
        what: &str,
        by: Duration,
        skips: usize,
        mut cond: impl FnMut() -> bool,
    ) {
        for _ in 0..skips {
            self.gw().skip_time(by);
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline {
                if cond() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("{what}: not after {skips} skips of {by:?}");
    }

    pub fn wait_metric(
        &self,
        what: &str,
        get: impl Fn(&CoreMetrics) -> i64,
        pred: impl Fn(i64) -> bool,
    ) -> i64 {
        let mut last = 0;
        wait_until(T, what, || {
            last = self.metric(&get);
            pred(last)
        });
        last
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(gw) = self.gw.take() {
            gw.stop();
            gw.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `cond` until it holds; panics naming `what` at the deadline.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The Error code in a frame, if it is an Error.
pub fn error_code(f: &pb::Frame) -> Option<u32> {
    match &f.body {
        Some(pb::frame::Body::Error(e)) => Some(e.code),
        _ => None,
    }
}

/// Asserts the server closes `c` after sending an Error with `code`.
pub fn expect_error_and_close(c: &mut Client, code: u32) {
    let frames = c.expect_close(T).expect("server closes");
    assert!(
        frames.iter().any(|f| error_code(f) == Some(code)),
        "expected Error {code} before close, got {frames:?}"
    );
}

/// A healthy connection still answers pings.
pub fn assert_healthy(c: &mut Client) {
    c.ping(rand_nonce(), T)
        .expect("healthy connection still answers Ping");
}

pub fn rand_nonce() -> u64 {
    static N: AtomicUsize = AtomicUsize::new(1);
    N.fetch_add(1, Ordering::Relaxed) as u64 * 7919
}

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}
