//! One core thread: its own `mio::Poll`, its own SO_REUSEPORT listener, a
//! slab of connections indexed by token, a timing wheel, and scratch buffers
//! shared by all its connections. A connection lives here for its whole life;
//! nothing on the per-frame path takes a lock or crosses threads (the backend
//! is called directly; its answers arrive through the mailbox).
//!
//! Memory per idle connection is the [`Conn`] slot plus rustls' unbuffered
//! connection state: buffers exist only while something is pending (a partial
//! TLS record, a partial frame, unsent output) and are freed when drained.
//!
//! Output is bounded per connection, whoever produces it: frames are
//! encrypted together at the end of each read round or delivery run (one TLS
//! record per 16 KiB, not one per frame), written at once, and what the
//! socket refuses stays in `tls_out`. While `tls_out` holds
//! `max_outbound_bytes` or more the connection is not read (the client's own
//! requests wait in the kernel, TCP backpressure), a backend frame that does
//! not fit closes it as a slow consumer, and so does staying full for
//! `slow_consumer_timeout_ms`. A connection therefore holds at most
//! `max_outbound_bytes` + one read round's replies (or one backend frame).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use palaver_protocol::pb::{self, frame::Body};
use palaver_protocol::{encode_frame, error_reply, frame, FrameDecoder};
use palaver_router::api::{Backend, Inbound, Outbound, Session, SessionAddr};
use rustls::server::UnbufferedServerConnection;
use rustls::ServerConfig;
use slab::Slab;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::metrics::CoreMetrics;
use crate::session::{
    BackendStep, ConnLimits, ConnPolicy, DrainStep, Expiry, FrameStep, OutputStep, ReadGate,
};
use crate::sink::{conn_key, split_key, Control, Mailbox, MailboxRx};
use crate::timer::{TimerEntry, TimerWheel};
use crate::tls::TlsStore;
use crate::tls_io::{self, AppSink};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
pub const WAKER_TOKEN: Token = WAKER;

/// Timer resolution.
const TICK_MS: u64 = 100;
/// Socket bytes read per `read` call into the scratch buffer.
const READ_CHUNK: usize = 64 * 1024;
/// Room for a leftover partial TLS record (or joined handshake message)
/// in front of a fresh read.
const MAX_LEFTOVER: usize = 32 * 1024;
/// Reads per readiness event before the connection yields to others.
const READ_ROUNDS: usize = 8;
/// Wheel size: 2048 ticks = 204.8 s horizon (longer deadlines re-park).
const WHEEL_SLOTS: usize = 2048;

/// State every core thread shares (read-only after start, except counters).
pub struct Shared {
    pub gateway_id: String,
    pub config: Config,
    pub backend: Arc<dyn Backend>,
    pub auth: Authenticator,
    pub tls: Arc<TlsStore>,
    /// Connections open in this process (all cores), for `max_connections`.
    pub live_connections: AtomicUsize,
    /// Set once every core is draining; `/healthz` reports it.
    pub draining: AtomicBool,
    /// Origin of the core clock (milliseconds since start).
    pub epoch: Instant,
}

impl Shared {
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One connection. Kept small: everything optional is boxed or an empty Vec.
struct Conn {
    sock: TcpStream,
    tls: Box<UnbufferedServerConnection>,
    /// Phase, deadlines, protocol state, budgets, backpressure: everything
    /// the connection's rules decide (sans-io, see [`crate::session`]).
    policy: ConnPolicy,
    decoder: FrameDecoder,
    /// Ciphertext of an incomplete TLS record; empty (no allocation) otherwise.
    tls_in: Vec<u8>,
    /// Encrypted output the socket has not taken yet; empty otherwise.
    tls_out: Vec<u8>,
    session: Option<Box<Session>>,
    generation: u32,
    /// Tick of this connection's live timer-wheel entry.
    timer_tick: u32,
    /// `tls_out.len()` as last added to the core's buffered-bytes gauge.
    accounted_out: u32,
    /// Already queued for a deferred read/handshake step.
    deferred: bool,
}

/// What a handler wants done with the connection afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Keep,
    Close,
}

/// Buffers shared by all connections of the core (reused, never per-connection).
struct Scratch {
    /// Ciphertext being processed: a leftover partial record, then fresh reads.
    tls_in: Box<[u8]>,
    /// Frames of the connection being handled, encoded, not yet encrypted
    /// (sealed together by `finish_output`).
    plain: Vec<u8>,
    /// Encrypted output of the connection being handled.
    out: Vec<u8>,
    frames: Vec<pb::Frame>,
    fired: Vec<TimerEntry>,
}

/// Everything of a core except its connection slab (so handlers can borrow
/// a connection and the rest at once).
struct Ctx {
    index: usize,
    shared: Arc<Shared>,
    metrics: Arc<CoreMetrics>,
    wheel: TimerWheel,
    scratch: Scratch,
    now_ms: u64,
    rng: u64,
    limits: ConnLimits,
}

pub struct Core {
    ctx: Ctx,
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Slab<Conn>,
    next_generation: u32,
    tls_config: (u64, Arc<ServerConfig>),
    mailbox: Arc<Mailbox>,
    rx: MailboxRx,
    /// Connections with a handshake step or read postponed to a later turn.
    deferred: VecDeque<(usize, u32)>,
    accept_pending: bool,
    /// accept() failed (e.g. out of file descriptors): retry on the next tick
    /// rather than spin, and rather than wait for a new connection's edge.
    accept_retry: bool,
    last_tick: u64,
    /// Set by Drain: when to force-close what is left (core clock, ms).
    drain_deadline_ms: Option<u64>,
}

fn ticks(ms: u64) -> u32 {
    ms.div_ceil(TICK_MS) as u32
}

impl Core {
    pub fn new(
        index: usize,
        shared: Arc<Shared>,
        metrics: Arc<CoreMetrics>,
        poll: Poll,
        listener: std::net::TcpListener,
        mailbox: Arc<Mailbox>,
        rx: MailboxRx,
    ) -> io::Result<Core> {
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let now_ms = shared.now_ms();
        let cfg = &shared.config;
        let per_core = (cfg.limits.max_connections as usize).div_ceil(cfg.core_count());
        let tls_config = shared.tls.current();
        let seed = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ rand::random::<u64>();
        let ctx = Ctx {
            index,
            limits: ConnLimits::from_config(&cfg.limits),
            shared: shared.clone(),
            metrics,
            wheel: TimerWheel::new(WHEEL_SLOTS, ticks(now_ms)),
            scratch: Scratch {
                tls_in: vec![0u8; MAX_LEFTOVER + READ_CHUNK].into_boxed_slice(),
                plain: Vec::with_capacity(READ_CHUNK),
                out: Vec::with_capacity(READ_CHUNK),
                frames: Vec::new(),
                fired: Vec::new(),
            },
            now_ms,
            rng: seed | 1,
        };
        Ok(Core {
            ctx,
            poll,
            listener: Some(listener),
            // Reserve the table up front: untouched pages cost no RSS, and the
            // table never reallocates (no 2x copies at 100k connections).
            conns: Slab::with_capacity(per_core.min(1 << 20)),
            next_generation: 1,
            tls_config,
            mailbox,
            rx,
            deferred: VecDeque::new(),
            accept_pending: true,
            accept_retry: false,
            last_tick: 0,
            drain_deadline_ms: None,
        })
    }

    /// Runs until drained or stopped.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let budget = self.ctx.shared.config.limits.handshakes_per_turn as usize;
        loop {
            let busy = self.accept_pending && self.listener.is_some() || !self.deferred.is_empty();
            let timeout = if busy {
                Duration::ZERO
            } else {
                let now = self.ctx.shared.now_ms();
                Duration::from_millis(TICK_MS - now % TICK_MS)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(core = self.ctx.index, "poll failed: {e}");
                    break;
                }
            }
            self.ctx.now_ms = self.ctx.shared.now_ms();
            let mut handshakes = budget;
            let mut woken = false;
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_pending = true,
                    WAKER => woken = true,
                    Token(slot) => {
                        let generation = self.conns.get(slot).map(|c| c.generation);
                        let (readable, writable) = (event.is_readable(), event.is_writable());
                        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            self.on_event(slot, readable, writable, &mut handshakes)
                        }));
                        if caught.is_err() {
                            self.recover(slot, generation);
                        }
                    }
                }
            }
            if woken && self.on_wake() {
                break;
            }
            self.run_deferred(&mut handshakes);
            if self.accept_pending && self.listener.is_some() {
                self.accept_some(budget);
            }
            self.on_tick();
            if self.drain_deadline_ms.is_some() && self.conns.is_empty() {
                break;
            }
        }
        self.close_all();
    }

    fn on_event(&mut self, slot: usize, readable: bool, writable: bool, handshakes: &mut usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let mut fate = Fate::Keep;
        let mut resumed = false;
        if writable && !conn.tls_out.is_empty() {
            (fate, resumed) = self.ctx.flush(conn);
        }
        // Reading resumed: what arrived meanwhile raised no new edge.
        let readable = readable || resumed;
        if fate == Fate::Keep && readable {
            if conn.policy.is_handshaking() && *handshakes == 0 {
                // Reconnect storm: finish this handshake step in a later turn
                // so established connections on this core are not starved.
                if !conn.deferred {
                    conn.deferred = true;
                    self.deferred.push_back((slot, conn.generation));
                }
                return;
            }
            if conn.policy.is_handshaking() {
                *handshakes -= 1;
            }
            let (f, more) = self.ctx.on_readable(slot, conn);
            fate = f;
            if fate == Fate::Keep && more && !conn.deferred {
                conn.deferred = true;
                self.deferred.push_back((slot, conn.generation));
            }
        }
        if fate == Fate::Close {
            self.close(slot);
        }
    }

    fn run_deferred(&mut self, handshakes: &mut usize) {
        for _ in 0..self.deferred.len() {
            let Some((slot, generation)) = self.deferred.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.generation != generation {
                continue;
            }
            if conn.policy.is_handshaking() {
                if *handshakes == 0 {
                    self.deferred.push_back((slot, generation));
                    continue;
                }
                *handshakes -= 1;
            }
            conn.deferred = false;
            let (fate, more) = self.ctx.on_readable(slot, conn);
            if fate == Fate::Close {
                self.close(slot);
            } else if more {
                conn.deferred = true;
                self.deferred.push_back((slot, generation));
            }
        }
    }

    fn accept_some(&mut self, budget: usize) {
        for _ in 0..budget {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((sock, _)) => self.admit(sock),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_pending = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: retry on the next event or tick
                    // instead of spinning.
                    tracing::warn!(core = self.ctx.index, "accept failed: {e}");
                    self.accept_pending = false;
                    self.accept_retry = true;
                    return;
                }
            }
        }
        // Budget used up; more may be waiting.
        self.accept_pending = true;
    }

    fn admit(&mut self, mut sock: TcpStream) {
        let ctx = &mut self.ctx;
        let limits = &ctx.shared.config.limits;
        let live = ctx.shared.live_connections.fetch_add(1, Relaxed);
        if live >= limits.max_connections as usize {
            // Refuse cheaply: a TLS handshake just to send SERVER_FULL would
            // cost the full handshake price during exactly the storm that filled us.
            ctx.shared.live_connections.fetch_sub(1, Relaxed);
            CoreMetrics::inc(&ctx.metrics.refused_full);
            return;
        }
        CoreMetrics::inc(&ctx.metrics.accepted);
        // TCP_NODELAY is set on the listener; Linux accepted sockets inherit it.
        #[cfg(not(target_os = "linux"))]
        let _ = sock.set_nodelay(true);
        let generation = ctx.shared.tls.generation();
        if generation != self.tls_config.0 {
            self.tls_config = ctx.shared.tls.current();
        }
        let tls = match UnbufferedServerConnection::new(self.tls_config.1.clone()) {
            Ok(t) => Box::new(t),
            Err(e) => {
                tracing::error!("cannot create TLS connection: {e}");
                ctx.shared.live_connections.fetch_sub(1, Relaxed);
                return;
            }
        };
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        if slot > 0xff_ffff {
            ctx.shared.live_connections.fetch_sub(1, Relaxed);
            return;
        }
        if self
            .poll
            .registry()
            .register(
                &mut sock,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            ctx.shared.live_connections.fetch_sub(1, Relaxed);
            return;
        }
        let now = ctx.now_ms;
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let conn = entry.insert(Conn {
            sock,
            tls,
            policy: ConnPolicy::new(&ctx.limits, now),
            decoder: FrameDecoder::new(limits.max_frame_bytes as usize),
            tls_in: Vec::new(),
            tls_out: Vec::new(),
            session: None,
            generation,
            timer_tick: u32::MAX,
            accounted_out: 0,
            deferred: false,
        });
        ctx.metrics.connections.fetch_add(1, Relaxed);
        ctx.arm(slot, conn);
    }

    /// Drains control messages and deliveries. Returns true to stop now.
    fn on_wake(&mut self) -> bool {
        self.mailbox.clear_wake();
        while let Ok(control) = self.rx.control.try_recv() {
            match control {
                Control::Stop => return true,
                Control::Drain {
                    reconnect_delay_ms,
                    reconnect_jitter_ms,
                    deadline_ms,
                } => self.begin_drain(reconnect_delay_ms, reconnect_jitter_ms, deadline_ms),
            }
        }
        while let Ok(batch) = self.rx.deliveries.try_recv() {
            self.deliver(batch);
        }
        false
    }

    fn deliver(&mut self, batch: Vec<Outbound>) {
        let mut batch = batch.into_iter().peekable();
        while let Some(o) = batch.next() {
            let key = o.conn;
            let (_, slot, generation) = split_key(key);
            let live = self
                .conns
                .get(slot)
                .is_some_and(|c| c.generation == generation);
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                match self.conns.get_mut(slot) {
                    Some(conn) if live => {
                        let closes = o.closes_connection();
                        self.ctx.deliver_one(slot, conn, o.frame, closes);
                    }
                    _ => CoreMetrics::inc(&self.ctx.metrics.stale_deliveries),
                }
                // Write once per run of frames for the same connection.
                if batch.peek().is_some_and(|next| next.conn == key) {
                    return;
                }
                match self.conns.get_mut(slot) {
                    Some(conn) if live => {
                        if self.ctx.finish_output(conn) == Fate::Close {
                            self.close(slot);
                        }
                    }
                    _ => {
                        self.ctx.scratch.plain.clear();
                        self.ctx.scratch.out.clear();
                    }
                }
            }));
            if caught.is_err() {
                self.recover(slot, live.then_some(generation));
            }
        }
    }

    /// After a panic while handling one connection: drop it and whatever
    /// half-built output the scratch buffers hold; the core keeps running.
    fn recover(&mut self, slot: usize, generation: Option<u32>) {
        tracing::error!(
            core = self.ctx.index,
            slot,
            "panic while handling a connection; closing it"
        );
        self.ctx.scratch.plain.clear();
        self.ctx.scratch.out.clear();
        self.ctx.scratch.frames.clear();
        let same = self
            .conns
            .get(slot)
            .is_some_and(|c| generation.is_none_or(|g| c.generation == g));
        if same {
            self.close(slot);
        }
    }

    fn begin_drain(&mut self, delay_ms: u32, jitter_ms: u32, deadline_ms: u32) {
        if self.drain_deadline_ms.is_some() {
            return;
        }
        let now = self.ctx.now_ms;
        self.drain_deadline_ms = Some(now + u64::from(deadline_ms));
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let slots: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for slot in slots {
            let conn = &mut self.conns[slot];
            let step = conn.policy.begin_drain(|| {
                let jitter = if jitter_ms == 0 {
                    0
                } else {
                    (self.ctx.next_random() % u64::from(jitter_ms)) as u32
                };
                delay_ms.saturating_add(jitter)
            });
            let fate = match step {
                DrainStep::CloseNow => Fate::Close,
                DrainStep::Keep => Fate::Keep,
                DrainStep::GoAway(goaway) => {
                    self.ctx.begin_close(slot, conn, Some(goaway), deadline_ms);
                    self.ctx.finish_output(conn)
                }
            };
            if fate == Fate::Close {
                self.close(slot);
            }
        }
    }

    fn on_tick(&mut self) {
        let now = self.ctx.now_ms;
        if self.accept_retry && now / TICK_MS != self.last_tick {
            self.accept_retry = false;
            self.accept_pending = true;
        }
        self.last_tick = now / TICK_MS;
        if let Some(deadline) = self.drain_deadline_ms {
            if now >= deadline {
                self.close_all();
                return;
            }
        }
        let mut fired = std::mem::take(&mut self.ctx.scratch.fired);
        self.ctx.wheel.advance((now / TICK_MS) as u32, &mut fired);
        for entry in fired.drain(..) {
            let slot = entry.slot as usize;
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.generation != entry.generation || conn.timer_tick != entry.tick {
                continue; // stale entry: the connection has a newer one
            }
            conn.timer_tick = u32::MAX;
            let Some(expiry) = conn.policy.poll_timeout(now) else {
                self.ctx.arm(slot, conn); // activity moved the deadline: re-park
                continue;
            };
            let generation = conn.generation;
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let conn = &mut self.conns[slot];
                if self.ctx.expire(slot, conn, expiry) == Fate::Close {
                    self.close(slot);
                }
            }));
            if caught.is_err() {
                self.recover(slot, Some(generation));
            }
        }
        self.ctx.scratch.fired = fired;
    }

    /// Removes a connection: ends its session, closes the socket.
    fn close(&mut self, slot: usize) {
        let mut conn = self.conns.remove(slot);
        let ctx = &self.ctx;
        ctx.end_session(&mut conn);
        if conn.policy.is_handshaking() {
            CoreMetrics::inc(&ctx.metrics.handshakes_failed);
        }
        ctx.metrics
            .outbound_buffered_bytes
            .fetch_sub(i64::from(conn.accounted_out), Relaxed);
        let _ = self.poll.registry().deregister(&mut conn.sock);
        ctx.metrics.connections.fetch_sub(1, Relaxed);
        ctx.shared.live_connections.fetch_sub(1, Relaxed);
    }

    fn close_all(&mut self) {
        let slots: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for slot in slots {
            self.close(slot);
        }
    }
}

impl Ctx {
    fn next_random(&mut self) -> u64 {
        // xorshift64: only for drain jitter.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// Makes sure the wheel holds an entry no later than the connection's
    /// deadline (later deadlines are handled lazily when the entry fires).
    fn arm(&mut self, slot: usize, conn: &mut Conn) {
        let due = ticks(conn.policy.deadline());
        if conn.timer_tick == u32::MAX || due < conn.timer_tick {
            conn.timer_tick = self.wheel.schedule(slot as u32, conn.generation, due);
        }
    }

    fn expire(&mut self, slot: usize, conn: &mut Conn, expiry: Expiry) -> Fate {
        let counter = match expiry {
            Expiry::Handshake => &self.metrics.handshake_timeouts,
            Expiry::Linger => return Fate::Close,
            Expiry::SlowConsumer => &self.metrics.slow_consumer_disconnects,
            Expiry::Hello => &self.metrics.hello_timeouts,
            Expiry::Heartbeat => &self.metrics.heartbeat_timeouts,
        };
        CoreMetrics::inc(counter);
        match expiry.last_frame(&self.limits) {
            None => Fate::Close,
            Some(last) => {
                let linger = self.limits.linger_ms;
                self.begin_close(slot, conn, Some(last), linger);
                self.finish_output(conn)
            }
        }
    }

    /// Reads and processes what the socket has, a round (one read) at a
    /// time: each round's frames are handled and their replies written before
    /// the next read, and reading stops when the output is full. Returns the
    /// fate and whether the socket may have more (the read budget ran out).
    fn on_readable(&mut self, slot: usize, conn: &mut Conn) -> (Fate, bool) {
        match conn
            .policy
            .read_gate(&self.limits, conn.tls_out.len(), self.now_ms)
        {
            ReadGate::Read => {}
            ReadGate::Discard => return (self.discard_input(conn), false),
            ReadGate::Wait => return (Fate::Keep, false),
            ReadGate::Stall => {
                self.reading_stalled(slot, conn);
                return (Fate::Keep, false);
            }
        }
        let mut used = conn.tls_in.len();
        self.scratch.tls_in[..used].copy_from_slice(&conn.tls_in);
        conn.tls_in = Vec::new();
        let mut frames = std::mem::take(&mut self.scratch.frames);
        let mut decode_error = None;
        let mut peer_gone = false;
        let mut more = false;
        let mut tls_failed = false;
        let mut rounds = 0;
        loop {
            let space = self.scratch.tls_in.len() - used;
            let n = match conn.sock.read(&mut self.scratch.tls_in[used..]) {
                Ok(0) => {
                    peer_gone = true;
                    0
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    peer_gone = true;
                    0
                }
            };
            if n == 0 {
                break;
            }
            self.metrics.bytes_in.fetch_add(n as u64, Relaxed);
            used += n;
            let mut sink = AppSink {
                decoder: &mut conn.decoder,
                frames: &mut frames,
                error: &mut decode_error,
            };
            let driven = tls_io::drive(
                &mut conn.tls,
                &mut self.scratch.tls_in[..used],
                &mut self.scratch.out,
                Some(&mut sink),
                &[],
            );
            self.scratch.tls_in.copy_within(driven.consumed..used, 0);
            used -= driven.consumed;
            if driven.error.is_some() {
                tls_failed = true;
                break;
            }
            if conn.policy.is_handshaking() && !conn.tls.is_handshaking() {
                // No ALPN at all is served as palaver/1 (SPEC §1); rustls already
                // refuses a client offering only other protocols.
                if conn
                    .tls
                    .alpn_protocol()
                    .is_some_and(|p| p != palaver_protocol::ALPN)
                {
                    self.scratch.out.clear();
                    frames.clear();
                    self.scratch.frames = frames;
                    return (Fate::Close, false);
                }
                CoreMetrics::inc(&self.metrics.handshakes_ok);
                conn.policy.on_handshake_done();
                self.arm(slot, conn);
            }
            for f in frames.drain(..) {
                if !conn.policy.is_open() {
                    break;
                }
                self.on_frame(slot, conn, f);
            }
            frames.clear();
            if let Some(e) = decode_error.take() {
                if conn.policy.is_open() {
                    CoreMetrics::inc(&self.metrics.frames_in[0]);
                    let err = error_reply(0, e.error_code(), e.to_string());
                    let linger = self.limits.linger_ms;
                    self.begin_close(slot, conn, Some(err), linger);
                }
                break;
            }
            if driven.peer_closed || driven.closed || conn.policy.is_closing() {
                break;
            }
            if used > MAX_LEFTOVER {
                // A handshake message or record larger than anything legal.
                tls_failed = true;
                break;
            }
            // This round's replies leave before more requests are read.
            if self.finish_output(conn) == Fate::Close {
                self.scratch.frames = frames;
                return (Fate::Close, false);
            }
            if conn
                .policy
                .read_gate(&self.limits, conn.tls_out.len(), self.now_ms)
                == ReadGate::Stall
            {
                self.reading_stalled(slot, conn);
                break;
            }
            if n < space {
                // A short read drained the socket; anything arriving later
                // raises a new edge. Saves the WouldBlock read per event.
                break;
            }
            rounds += 1;
            if rounds == READ_ROUNDS {
                more = true;
                break;
            }
        }
        self.scratch.frames = frames;
        if tls_failed {
            // Any alert rustls produced is in scratch.out; send it and go.
            self.scratch.plain.clear();
            let _ = self.finish_output(conn);
            return (Fate::Close, false);
        }
        if used > 0 && !conn.policy.is_closing() {
            conn.tls_in = self.scratch.tls_in[..used].to_vec();
        }
        if peer_gone {
            // Peer is gone (EOF or reset): nothing more will be read.
            self.scratch.plain.clear();
            self.scratch.out.clear();
            return (Fate::Close, false);
        }
        (self.finish_output(conn), more)
    }

    /// Reading just stopped because the output is full; the connection is
    /// closed as a slow consumer if it stays full (its deadline moved).
    fn reading_stalled(&mut self, slot: usize, conn: &mut Conn) {
        CoreMetrics::inc(&self.metrics.reads_paused);
        self.arm(slot, conn);
    }

    /// GoAway(SLOW_CONSUMER) behind what the client has not read, then close.
    fn close_slow_consumer(&mut self, slot: usize, conn: &mut Conn) {
        CoreMetrics::inc(&self.metrics.slow_consumer_disconnects);
        let goaway = ConnPolicy::slow_consumer_goaway(&self.limits);
        let linger = self.limits.linger_ms;
        self.begin_close(slot, conn, Some(goaway), linger);
    }

    /// Closing connections only wait for the peer's FIN; input is dropped.
    fn discard_input(&mut self, conn: &mut Conn) -> Fate {
        loop {
            match conn.sock.read(&mut self.scratch.tls_in[..READ_CHUNK]) {
                Ok(0) => return Fate::Close,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Fate::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Fate::Close,
            }
        }
    }

    fn on_frame(&mut self, slot: usize, conn: &mut Conn, f: pb::Frame) {
        self.metrics.frame_in(f.body.as_ref());
        match conn.policy.on_frame(&self.limits, f, self.now_ms) {
            FrameStep::Ignore => {}
            FrameStep::Reply(reply) => self.queue(&reply),
            FrameStep::RateLimited(reply) => {
                CoreMetrics::inc(&self.metrics.rate_limited);
                self.queue(&reply);
            }
            FrameStep::TypingDropped => CoreMetrics::inc(&self.metrics.typing_dropped),
            FrameStep::Hello { request_id, hello } => self.on_hello(slot, conn, request_id, hello),
            FrameStep::Forward { request_id, body } => {
                if let Some(session) = &conn.session {
                    self.shared.backend.submit(Inbound {
                        from: Session::clone(session),
                        request_id,
                        body,
                        received_ms: unix_ms(),
                    });
                }
            }
            FrameStep::Close(err) => {
                let linger = self.limits.linger_ms;
                self.begin_close(slot, conn, Some(err), linger);
            }
        }
    }

    fn on_hello(&mut self, slot: usize, conn: &mut Conn, request_id: u32, hello: pb::Hello) {
        let user_id = match self.shared.auth.verify(&hello.token, &hello.device_id) {
            Ok(user) => user,
            Err(e) => {
                let err = error_reply(request_id, e.error_code(), e.to_string());
                let linger = self.limits.linger_ms;
                self.begin_close(slot, conn, Some(err), linger);
                return;
            }
        };
        let key = conn_key(self.index, slot, conn.generation);
        let session = Box::new(Session {
            user_id: user_id.clone(),
            device_id: hello.device_id,
            addr: SessionAddr {
                gateway_id: self.shared.gateway_id.clone(),
                conn: key,
            },
        });
        conn.policy.accept_hello(&self.limits, self.now_ms);
        let limits = self.shared.config.limits.protocol();
        let welcome = frame(
            request_id,
            Body::Welcome(pb::Welcome {
                protocol_version: palaver_protocol::PROTOCOL_VERSION,
                session_id: format!("{}/{key:016x}", self.shared.gateway_id),
                user_id,
                heartbeat_interval_ms: self.limits.heartbeat_interval_ms,
                limits: Some(limits.to_pb()),
                server_time_ms: unix_ms(),
            }),
        );
        // Welcome is queued before the backend hears of the session, so it
        // precedes anything the backend sends.
        self.queue(&welcome);
        self.shared.backend.session_opened(&session);
        self.metrics.sessions.fetch_add(1, Relaxed);
        conn.session = Some(session);
        self.arm(slot, conn);
        if !hello.resume.is_empty() {
            conn.policy.forwarded_untracked();
            self.shared.backend.submit(Inbound {
                from: Session::clone(conn.session.as_deref().expect("session just set")),
                request_id,
                body: Body::Sync(pb::Sync {
                    cursors: hello.resume,
                    limit: 0,
                }),
                received_ms: unix_ms(),
            });
        }
    }

    fn deliver_one(&mut self, slot: usize, conn: &mut Conn, f: pb::Frame, closes: bool) {
        let len = palaver_protocol::encoded_frame_len(&f);
        let pending = conn.tls_out.len() + self.scratch.out.len() + self.scratch.plain.len();
        let step =
            conn.policy
                .on_backend_frame(&self.limits, &f, len, pending, closes, self.now_ms);
        match step {
            BackendStep::Stale => CoreMetrics::inc(&self.metrics.stale_deliveries),
            BackendStep::Queue => self.queue(&f),
            BackendStep::QueueAndClose => {
                let linger = self.limits.linger_ms;
                self.begin_close(slot, conn, Some(f), linger);
            }
            // Stop adding; tell it why behind what it has not read.
            BackendStep::SlowConsumer => self.close_slow_consumer(slot, conn),
        }
    }

    /// Adds one frame to the connection's pending plaintext (encrypted with
    /// the rest of this turn's frames by [`seal`](Self::seal)).
    fn queue(&mut self, f: &pb::Frame) {
        encode_frame(f, &mut self.scratch.plain);
        self.metrics.frame_out(f.body.as_ref());
    }

    /// Encrypts the pending plaintext into the output buffer: one TLS record
    /// per 16 KiB instead of one per frame.
    fn seal(&mut self, conn: &mut Conn) {
        if self.scratch.plain.is_empty() {
            return;
        }
        let driven = tls_io::drive(
            &mut conn.tls,
            &mut conn.tls_in,
            &mut self.scratch.out,
            None,
            &self.scratch.plain,
        );
        // A partial record in tls_in is never complete here, so nothing was consumed.
        debug_assert_eq!(driven.consumed, 0);
        self.scratch.plain.clear();
    }

    /// Queues `last` (if any) and close_notify, ends the session, and waits
    /// at most `linger_ms` for the output to leave.
    fn begin_close(
        &mut self,
        slot: usize,
        conn: &mut Conn,
        last: Option<pb::Frame>,
        linger_ms: u32,
    ) {
        if !conn.policy.begin_close(self.now_ms, linger_ms) {
            return;
        }
        if let Some(f) = last {
            self.queue(&f);
        }
        self.seal(conn);
        tls_io::close_notify(&mut conn.tls, &mut conn.tls_in, &mut self.scratch.out);
        conn.tls_in = Vec::new();
        conn.decoder = FrameDecoder::new(0);
        self.end_session(conn);
        self.arm(slot, conn);
    }

    fn end_session(&self, conn: &mut Conn) {
        if let Some(session) = conn.session.take() {
            self.shared.backend.session_closed(&session, unix_ms());
            self.metrics.sessions.fetch_sub(1, Relaxed);
        }
    }

    /// Sends what the handler produced (in `scratch.out`): straight from the
    /// scratch buffer when nothing is queued, keeping only what the socket
    /// refused.
    fn finish_output(&mut self, conn: &mut Conn) -> Fate {
        self.seal(conn);
        if !self.scratch.out.is_empty() {
            if conn.tls_out.is_empty() {
                let written = write_some(&mut conn.sock, &self.scratch.out);
                match written {
                    Ok(n) => {
                        self.metrics.bytes_out.fetch_add(n as u64, Relaxed);
                        if n < self.scratch.out.len() {
                            conn.tls_out = self.scratch.out[n..].to_vec();
                        }
                    }
                    Err(_) => {
                        self.scratch.out.clear();
                        return Fate::Close;
                    }
                }
            } else {
                // Already waiting for a writable event: just queue.
                conn.tls_out.extend_from_slice(&self.scratch.out);
            }
            self.scratch.out.clear();
        }
        self.after_output(conn).0
    }

    /// Writable again: push queued output. Also says whether reading resumed.
    fn flush(&mut self, conn: &mut Conn) -> (Fate, bool) {
        match write_some(&mut conn.sock, &conn.tls_out) {
            Ok(n) => {
                self.metrics.bytes_out.fetch_add(n as u64, Relaxed);
                if n == conn.tls_out.len() {
                    conn.tls_out = Vec::new();
                } else if n > 0 {
                    conn.tls_out.drain(..n);
                }
            }
            Err(_) => return (Fate::Close, false),
        }
        self.after_output(conn)
    }

    /// The unsent output changed: account for it and let the rules say
    /// whether reading resumes or the write side shuts.
    fn after_output(&mut self, conn: &mut Conn) -> (Fate, bool) {
        let level = conn.tls_out.len() as u32;
        if level != conn.accounted_out {
            self.metrics
                .max_conn_outbound_bytes
                .fetch_max(i64::from(level), Relaxed);
            self.metrics
                .outbound_buffered_bytes
                .fetch_add(i64::from(level) - i64::from(conn.accounted_out), Relaxed);
            conn.accounted_out = level;
        }
        match conn
            .policy
            .on_output_level(&self.limits, conn.tls_out.len())
        {
            OutputStep::Keep => (Fate::Keep, false),
            OutputStep::Resume => (Fate::Keep, true),
            OutputStep::SendFin => {
                // Everything is out: send FIN, then wait (bounded by the
                // linger deadline) for the peer's FIN so unread input does
                // not turn the close into a reset that could destroy our
                // last frame.
                if conn.sock.shutdown(Shutdown::Write).is_err() {
                    return (Fate::Close, false);
                }
                (self.discard_input(conn), false)
            }
        }
    }
}

/// Writes as much as the socket takes without blocking.
fn write_some(sock: &mut TcpStream, mut buf: &[u8]) -> io::Result<usize> {
    let mut total = 0;
    while !buf.is_empty() {
        match sock.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                total += n;
                buf = &buf[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slot_stays_small() {
        // The per-connection struct, excluding rustls' boxed state (the
        // request budgets are 28 of it).
        let size = std::mem::size_of::<Conn>();
        assert!(size <= 192, "Conn is {size} bytes");
    }
}
