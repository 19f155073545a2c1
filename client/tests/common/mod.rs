//! Test harness: real gateways (in-process, embedded engine; two of them can
//! share one engine and one SO_REUSEPORT port, so a drained or stopped
//! gateway's clients reconnect to the other and find their history), a
//! loopback TCP proxy that cuts connections on demand, and an event
//! recorder to await SDK events with deadlines. No mocks of the gateway.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use palaver_client::{
    ChatMessage, ClientConfig, ClientEvent, ConnectionState, EventListener, PalaverClient,
    TokenError, TokenProvider,
};
use palaver_gateway::{auth, build_backend, devcerts, Config, GatewayHandle};

pub const T: Duration = Duration::from_secs(20);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// One or more gateways on one port sharing one embedded engine.
pub struct Stack {
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub secret: Vec<u8>,
    config: Config,
    backend: Arc<dyn palaver_router::Backend>,
    /// Kept until the end: dropping a handle shuts the shared engine down.
    pub gateways: Vec<GatewayHandle>,
}

impl Stack {
    pub fn start(tune: impl FnOnce(&mut Config)) -> Stack {
        let dir = std::env::temp_dir().join(format!(
            "palaver-sdk-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            cores: 1,
            data_dir: dir.clone(),
            gateway_id: "gw-0".into(),
            ..Default::default()
        };
        // Tests send bursts: keep the server's per-connection and
        // per-account pace out of the way unless a test sets its own.
        config.limits.max_sends_per_second = 2_000;
        config.limits.max_account_sends_per_second = 2_000;
        tune(&mut config);
        let backend = build_backend(&config);
        let gw = GatewayHandle::start(config.clone(), backend.clone()).expect("gateway starts");
        let ca_pem = std::fs::read_to_string(dir.join(devcerts::CA_CERT_FILE)).unwrap();
        let secret = devcerts::read_secret(&dir.join(devcerts::JWT_SECRET_FILE)).unwrap();
        config.listen = gw.local_addr;
        Stack {
            addr: gw.local_addr,
            dir,
            ca_pem,
            secret,
            config,
            backend,
            gateways: vec![gw],
        }
    }

    /// Another gateway on the same port and engine.
    pub fn add_gateway(&mut self) -> usize {
        let mut config = self.config.clone();
        config.gateway_id = format!("gw-{}", self.gateways.len());
        let gw = GatewayHandle::start(config, self.backend.clone()).expect("second gateway");
        self.gateways.push(gw);
        self.gateways.len() - 1
    }

    /// Stops every gateway and the engine they share (`start_again`
    /// starts a new one on the same address).
    pub fn stop_all(&mut self) {
        for gw in self.gateways.drain(..) {
            gw.stop();
            gw.join();
        }
    }

    /// After `stop_all`: one gateway on the same address with a new engine
    /// from the same config — what a restart of `palaver-gateway` is (with
    /// `--ephemeral`, a server that forgot everything).
    pub fn start_again(&mut self) {
        self.backend = build_backend(&self.config);
        let gw = GatewayHandle::start(self.config.clone(), self.backend.clone())
            .expect("gateway restarts on the same address");
        self.gateways.push(gw);
    }

    pub fn token(&self, user: &str, ttl_s: i64) -> String {
        auth::mint_hs256(&self.secret, user, None, ttl_s)
    }

    pub fn config(&self, device: &str) -> ClientConfig {
        self.config_at(self.addr, device)
    }

    pub fn config_at(&self, addr: SocketAddr, device: &str) -> ClientConfig {
        let mut c = ClientConfig::new(&addr.to_string(), &self.ca_pem, device);
        c.server_name = "localhost".into();
        c.backoff_base_ms = 50;
        c.backoff_max_ms = 1_000;
        c
    }

    pub fn tokens(&self, user: &str) -> Arc<Tokens> {
        Arc::new(Tokens {
            secret: self.secret.clone(),
            user: user.into(),
            first_ttl_s: 3600,
            cached: Mutex::new(None),
            calls: AtomicU32::new(0),
            refreshes: AtomicU32::new(0),
        })
    }

    /// A client for `user` on `device` with a recorder, connected and
    /// welcomed.
    pub fn login(&self, user: &str, device: &str) -> (Arc<PalaverClient>, Arc<Recorder>) {
        let (c, r) = self.client(self.config(device), user);
        c.connect().unwrap();
        r.wait_connected(1);
        (c, r)
    }

    pub fn client(&self, config: ClientConfig, user: &str) -> (Arc<PalaverClient>, Arc<Recorder>) {
        let r = Recorder::new();
        let c = PalaverClient::new(config, self.tokens(user), r.clone(), None).unwrap();
        (c, r)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for gw in self.gateways.drain(..) {
            gw.stop();
            gw.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Mints HS256 tokens; the first (and every non-forced) one lives
/// `first_ttl_s`, a forced refresh gets an hour.
/// Like an app: the token is cached and reused until the SDK asks for a
/// fresh one.
pub struct Tokens {
    pub secret: Vec<u8>,
    pub user: String,
    pub first_ttl_s: i64,
    pub cached: Mutex<Option<String>>,
    pub calls: AtomicU32,
    pub refreshes: AtomicU32,
}

impl TokenProvider for Tokens {
    fn fetch_token(&self, force_refresh: bool) -> Result<String, TokenError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut cached = self.cached.lock().unwrap();
        if force_refresh {
            self.refreshes.fetch_add(1, Ordering::Relaxed);
            *cached = Some(auth::mint_hs256(&self.secret, &self.user, None, 3600));
        }
        let token = cached.get_or_insert_with(|| {
            auth::mint_hs256(&self.secret, &self.user, None, self.first_ttl_s)
        });
        Ok(token.clone())
    }
}

/// Records every event with its arrival time; tests await conditions.
pub struct Recorder {
    events: Mutex<Vec<(Instant, ClientEvent)>>,
    cv: Condvar,
}

impl EventListener for Recorder {
    fn on_event(&self, event: ClientEvent) -> Result<(), palaver_client::ListenerError> {
        self.events.lock().unwrap().push((Instant::now(), event));
        self.cv.notify_all();
        Ok(())
    }
}

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            events: Mutex::new(Vec::new()),
            cv: Condvar::new(),
        })
    }

    pub fn snapshot(&self) -> Vec<(Instant, ClientEvent)> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until `pred` holds over all events so far, or panics naming
    /// `what` after `timeout`.
    pub fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&[ClientEvent]) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut ev = self.events.lock().unwrap();
        loop {
            let plain: Vec<ClientEvent> = ev.iter().map(|(_, e)| e.clone()).collect();
            if pred(&plain) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; events: {:#?}",
                last(&plain)
            );
            ev = self.cv.wait_timeout(ev, left).unwrap().0;
        }
    }

    pub fn wait_connected(&self, times: usize) {
        self.wait(&format!("{times} connections"), T, |e| {
            connected_count(e) >= times
        });
    }

    pub fn messages(&self) -> Vec<ChatMessage> {
        self.snapshot()
            .into_iter()
            .filter_map(|(_, e)| match e {
                ClientEvent::Message { message } => Some(message),
                _ => None,
            })
            .collect()
    }

    pub fn wait_messages(&self, conversation: &str, n: usize) -> Vec<ChatMessage> {
        self.wait(&format!("{n} messages in {conversation}"), T * 3, |e| {
            messages_in(e, conversation) >= n
        });
        self.messages()
            .into_iter()
            .filter(|m| m.conversation_id == conversation)
            .collect()
    }

    /// Waits until `n` of this client's messages were acknowledged.
    pub fn wait_acked(&self, n: usize) {
        self.wait(&format!("{n} acks"), T, |e| sent_in(e) >= n);
    }

    pub fn sent_count(&self) -> usize {
        self.snapshot()
            .iter()
            .filter(|(_, e)| matches!(e, ClientEvent::MessageSent { .. }))
            .count()
    }
}

fn last(e: &[ClientEvent]) -> Vec<ClientEvent> {
    e.iter().rev().take(8).rev().cloned().collect()
}

pub fn is_connected(e: &ClientEvent) -> bool {
    matches!(
        e,
        ClientEvent::StateChanged {
            state: ConnectionState::Connected { .. }
        }
    )
}

pub fn is_connecting(e: &ClientEvent) -> bool {
    matches!(
        e,
        ClientEvent::StateChanged {
            state: ConnectionState::Connecting { .. }
        }
    )
}

pub fn connected_count(e: &[ClientEvent]) -> usize {
    e.iter().filter(|e| is_connected(e)).count()
}

/// The first lost connection in `ev`: the indices of the `Connecting` after
/// the first `Connected`, and of the `Connected` that follows it.
pub fn first_reconnect(ev: &[(Instant, ClientEvent)]) -> (usize, usize) {
    let first = ev
        .iter()
        .position(|(_, e)| is_connected(e))
        .expect("connected");
    let lost = first
        + ev[first..]
            .iter()
            .position(|(_, e)| is_connecting(e))
            .expect("reconnecting");
    let back = lost
        + ev[lost..]
            .iter()
            .position(|(_, e)| is_connected(e))
            .expect("reconnected");
    (lost, back)
}

/// Acknowledged sends (`MessageSent`) among `e`.
pub fn sent_in(e: &[ClientEvent]) -> usize {
    e.iter()
        .filter(|e| matches!(e, ClientEvent::MessageSent { .. }))
        .count()
}

pub fn messages_in(e: &[ClientEvent], conversation: &str) -> usize {
    e.iter()
        .filter(|e| matches!(e, ClientEvent::Message { message } if message.conversation_id == conversation))
        .count()
}

/// Texts of messages, with (losses, duplicates, order violations) against
/// `expected` sent in that order.
pub fn audit(got: &[ChatMessage], expected: &[String]) -> (usize, usize, usize) {
    let texts: Vec<String> = got.iter().map(|m| m.text()).collect();
    let mut seen = std::collections::HashSet::new();
    let dups = texts.iter().filter(|t| !seen.insert(t.as_str())).count();
    let losses = expected
        .iter()
        .filter(|t| !seen.contains(t.as_str()))
        .count();
    let index: std::collections::HashMap<&str, usize> = expected
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut order = 0;
    let mut prev: Option<usize> = None;
    let mut prev_seq = 0;
    for m in got {
        if let Some(&i) = index.get(m.text().as_str()) {
            if prev.is_some_and(|p| i <= p) || m.seq <= prev_seq {
                order += 1;
            }
            prev = Some(i);
            prev_seq = m.seq;
        }
    }
    (losses, dups, order)
}

/// Prints the audit of `got` against `expected` under `label` and asserts
/// exactly once, in order.
pub fn assert_exactly_once_in_order(label: &str, got: &[ChatMessage], expected: &[String]) {
    let (loss, dup, order) = audit(got, expected);
    println!(
        "{label}: {} received, {loss} lost, {dup} duplicated, {order} out of order",
        got.len()
    );
    assert_eq!((loss, dup, order), (0, 0, 0), "{label}");
}

/// Shuts both directions of every proxied connection and counts the cut.
fn cut(conns: &Mutex<Vec<TcpStream>>, cuts: &AtomicU32) {
    for s in conns.lock().unwrap().drain(..) {
        let _ = s.shutdown(Shutdown::Both);
    }
    cuts.fetch_add(1, Ordering::Relaxed);
}

/// A loopback TCP proxy to `upstream` that can cut every connection
/// through it at once (a flapping mobile link).
pub struct Proxy {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    pub cuts: Arc<AtomicU32>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (conns2, stop2) = (conns.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut c = conns2.lock().unwrap();
                    c.push(client.try_clone().unwrap());
                    c.push(server.try_clone().unwrap());
                }
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Proxy {
            addr,
            conns,
            stop,
            cuts: Arc::default(),
        }
    }

    /// Cuts every connection through the proxy now (both directions).
    pub fn cut_all(&self) {
        cut(&self.conns, &self.cuts);
    }

    /// Cuts everything every `every` until the returned flag is set.
    pub fn flap(&self, every: Duration) -> Arc<AtomicBool> {
        let done = Arc::new(AtomicBool::new(false));
        let (done2, conns, cuts) = (done.clone(), self.conns.clone(), self.cuts.clone());
        std::thread::spawn(move || {
            // Bounded: at most 10 minutes of flapping whatever happens.
            let end = Instant::now() + Duration::from_secs(600);
            while !done2.load(Ordering::Relaxed) && Instant::now() < end {
                std::thread::sleep(every);
                cut(&conns, &cuts);
            }
        });
        done
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
        self.cut_all();
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// The direct conversation of two users.
pub fn dm(a: &str, b: &str) -> String {
    palaver_client::direct_conversation_id(a.into(), b.into()).unwrap()
}

/// Sends `n` numbered texts (`<prefix>00000`…) and returns them in order.
pub fn send_numbered(sender: &PalaverClient, conv: &str, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let t = format!("{prefix}{i:05}");
            sender.send_text(conv.to_string(), t.clone()).unwrap();
            t
        })
        .collect()
}
