//! One core thread: its own `mio::Poll`, its own SO_REUSEPORT listener, a
//! slab of connections indexed by token, a timing wheel, and scratch buffers
//! shared by all its connections. A connection lives here for its whole life;
//! nothing on the per-frame path takes a lock or crosses threads (the backend
//! is called directly; its answers arrive through the mailbox).
//!
//! One core (core 0) may also host the backend's work loop
//! ([`Backend::take_host`], the embedded engine): it runs a bounded turn of
//! it at the end of each loop turn, after handing over its own requests, so
//! a request between two connections of that core crosses no thread, and
//! other cores' requests wake it through its mailbox's waker. The host core
//! exits last, so the backend serves the other cores until they are done.
//!
//! What happens to a connection (phase, deadlines, budgets, backpressure,
//! drain) is decided by its [`ConnPolicy`], a
//! sans-io unit fed events and the core clock that acts through the effects
//! it is handed; this module and its children move bytes and carry the
//! effects out (`effects.rs`): the loop here, reading in `input.rs`, writing
//! in `output.rs`, the timing wheel in `timers.rs`.
//!
//! Memory per idle connection is the `Conn` slot, its session's ids (one
//! small allocation, [`ids`]) and rustls' unbuffered connection state:
//! buffers exist only while something is pending (a partial TLS record, a
//! partial frame, unsent output: [`pending`]) and are freed when drained.
//!
//! Output is bounded per connection, whoever produces it: frames are
//! encrypted together at the end of each read round or delivery run (one TLS
//! record per 16 KiB, not one per frame), written at once, and what the
//! socket refuses stays pending (`tls_out`). While that holds
//! `max_outbound_bytes` or more the connection is not read (the client's own
//! requests wait in the kernel, TCP backpressure), a backend frame that does
//! not fit closes it as a slow consumer, and so does staying full for
//! `slow_consumer_timeout_ms`. A connection therefore holds at most
//! `max_outbound_bytes` + one read round's replies (or one backend frame).

mod channels;
mod effects;
mod ids;
mod input;
mod output;
mod pending;
mod timers;

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use palaver_protocol::{pb, FrameDecoder};
use palaver_router::api::{Backend, BackendHost, Inbound, Outbound};
use rustls::server::UnbufferedServerConnection;
use rustls::ServerConfig;
use slab::Slab;

use crate::accounts::Accounts;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::metrics::CoreMetrics;
use crate::session::{ConnLimits, ConnPolicy, Effects};
use crate::sink::{conn_key, split_key, Control, Mailbox, MailboxRx};
use crate::timer::{TimerEntry, TimerWheel};
use crate::tls::TlsStore;

use ids::SessionIds;
use pending::PendingIo;

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
/// Requests a core hands to the backend at once, at most (more in one turn
/// go in several batches).
const REQUEST_BATCH: usize = 256;
/// Wheel size: 2048 ticks = 204.8 s horizon (longer deadlines re-park).
const WHEEL_SLOTS: usize = 2048;

/// State every core thread shares (read-only after start, except counters).
pub struct Shared {
    /// Shared with every `Session` the core builds (one per request).
    pub gateway_id: Arc<str>,
    pub config: Config,
    pub backend: Arc<dyn Backend>,
    pub auth: Authenticator,
    pub tls: Arc<TlsStore>,
    /// Connections open in this process (all cores), for `max_connections`.
    pub live_connections: AtomicUsize,
    /// Each user's devices connected here and the budget they share.
    pub accounts: Accounts,
    /// Set once every core is draining; `/healthz` reports it.
    pub draining: AtomicBool,
    /// Core threads that have not exited yet (the core hosting the backend
    /// waits for the others).
    pub cores_running: AtomicUsize,
    /// The core clock every deadline is on.
    pub clock: CoreClock,
}

impl Shared {
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }
}

/// The core clock: milliseconds since the gateway started, plus whatever
/// was skipped ([`CoreClock::skip`]). Tests skip it ahead so that deadlines
/// of seconds or minutes (handshake, Hello, heartbeat, slow consumer) pass
/// at once with the gateway's real configuration, instead of shortening
/// them to real waits; the cores read it at least every tick (100 ms).
pub struct CoreClock {
    epoch: Instant,
    skipped_ms: AtomicU64,
}

impl CoreClock {
    pub fn new() -> Self {
        CoreClock {
            epoch: Instant::now(),
            skipped_ms: AtomicU64::new(0),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + self.skipped_ms.load(Relaxed)
    }

    /// Moves the clock `by` ahead at once. It never goes back, so deadlines
    /// only ever pass earlier than they would have.
    pub fn skip(&self, by: Duration) {
        self.skipped_ms
            .fetch_add(u64::try_from(by.as_millis()).unwrap_or(u64::MAX), Relaxed);
    }
}

impl Default for CoreClock {
    fn default() -> Self {
        Self::new()
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
    /// Ciphertext of an incomplete TLS record and encrypted output the
    /// socket has not taken yet; no allocation while neither is pending.
    pending: PendingIo,
    /// The open session's user and device ids (after Hello, until the
    /// session ends); the backend's `Session` is built from them on demand.
    ids: Option<SessionIds>,
    generation: u32,
    /// Tick of this connection's live timer-wheel entry.
    timer_tick: u32,
    /// Unsent output bytes as last added to the core's buffered-bytes gauge.
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
    /// Requests read this turn, not yet handed to the backend: one
    /// `Backend::submit_batch` per turn (and before any session change, so
    /// the backend sees a core's requests and session events in order).
    requests: Vec<Inbound>,
    /// The run of frames being queued for one connection (reset when the
    /// run is written or dropped).
    run: Run,
    /// What the connection's rules decided in the call just made, carried
    /// out at once (`effects.rs`); the spare takes those that lead to more.
    effects: Effects,
    effects_spare: Effects,
    /// The channels this core's connections have open (`channels.rs`).
    channels: channels::ChannelTable,
}

/// What [`Ctx::deliver_one`] keeps across one run of frames for a
/// connection, so each frame costs no syscall.
#[derive(Default)]
struct Run {
    /// Bytes of answers to requests among the frames queued in
    /// `scratch.plain`.
    answers: usize,
    /// What the client had not read when the run began (the queue plus the
    /// kernel's share, one `TIOCOUTQ`): nothing is written during a run, so
    /// it holds for the whole run.
    unread_before: Option<usize>,
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
    /// The backend's work loop, when this core hosts it.
    host: Option<Box<dyn BackendHost>>,
    /// The hosted backend has work left: poll without waiting.
    host_busy: bool,
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
            requests: Vec::new(),
            run: Run::default(),
            effects: Vec::new(),
            effects_spare: Vec::new(),
            channels: channels::ChannelTable::default(),
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
            host: None,
            host_busy: false,
        })
    }

    /// This core runs the backend's work loop too (see the module doc).
    pub fn with_host(mut self, host: Option<Box<dyn BackendHost>>) -> Core {
        self.host = host;
        self
    }

    /// Runs until drained or stopped.
    pub fn run(mut self) {
        self.mailbox.enter();
        let mut events = Events::with_capacity(1024);
        let budget = self.ctx.shared.config.limits.handshakes_per_turn as usize;
        loop {
            let busy = self.accept_pending && self.listener.is_some()
                || !self.deferred.is_empty()
                || self.host_busy;
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
                        let hup = event.is_read_closed();
                        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            self.on_event(slot, readable || hup, writable, hup, &mut handshakes)
                        }));
                        if caught.is_err() {
                            self.recover(slot, generation);
                        }
                    }
                }
            }
            // This turn's requests leave (and, hosted, are answered)
            // before the deliveries are written.
            self.pump();
            if woken && self.on_wake() {
                break;
            }
            self.run_deferred(&mut handshakes);
            if self.accept_pending && self.listener.is_some() {
                self.accept_some(budget);
            }
            self.on_tick();
            // What the deferred reads and timers handed over or closed.
            self.pump();
            if self.drain_deadline_ms.is_some() && self.conns.is_empty() && self.may_exit() {
                break;
            }
        }
        self.close_all();
        if self.host.is_some() {
            // The closed sessions reach the backend before it stops.
            self.ctx.flush_requests();
            while self.host.as_mut().is_some_and(|h| h.run_turn()) {}
            self.host = None;
        }
        self.ctx.shared.cores_running.fetch_sub(1, Relaxed);
    }

    /// The host core outlives the others (their requests and session
    /// closes need the backend); it sees them gone at its next tick.
    fn may_exit(&self) -> bool {
        self.host.is_none() || self.ctx.shared.cores_running.load(Relaxed) <= 1
    }

    /// Hands this turn's requests to the backend, runs a turn of the hosted
    /// backend, and writes what either delivered to this core's own
    /// connections (pushed on this thread without a wake, see `sink.rs`).
    fn pump(&mut self) {
        self.ctx.flush_requests();
        if let Some(host) = &mut self.host {
            self.host_busy = host.run_turn();
        }
        self.drain_deliveries();
    }

    fn on_event(
        &mut self,
        slot: usize,
        readable: bool,
        writable: bool,
        hup: bool,
        handshakes: &mut usize,
    ) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let mut fate = Fate::Keep;
        let mut resumed = false;
        if writable && conn.pending.out_len() > 0 {
            (fate, resumed) = self.ctx.flush(slot, conn);
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
            let (f, more) = self.ctx.on_readable(slot, conn, hup);
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
            // The event that deferred this read is gone: look for a FIN.
            let (fate, more) = self.ctx.on_readable(slot, conn, true);
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
        // TCP_NODELAY and SO_SNDBUF are set on the listener; Linux accepted
        // sockets inherit them.
        #[cfg(not(target_os = "linux"))]
        {
            let _ = sock.set_nodelay(true);
            if limits.socket_send_buffer_bytes > 0 {
                let _ = socket2::SockRef::from(&sock)
                    .set_send_buffer_size(limits.socket_send_buffer_bytes as usize);
            }
        }
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
            pending: PendingIo::default(),
            ids: None,
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
                Control::ReopenSessions => self.reopen_sessions(),
            }
        }
        self.drain_deliveries();
        false
    }

    fn drain_deliveries(&mut self) {
        while let Ok(batch) = self.rx.deliveries.try_recv() {
            self.deliver(batch);
        }
        while let Ok(posts) = self.rx.channel_posts.try_recv() {
            self.deliver_channel_posts(posts);
        }
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
                        let frame = self.ctx.channel_answer(slot, conn, o.frame);
                        self.ctx
                            .deliver_one(slot, conn, frame, closes, o.answers_request);
                    }
                    _ => CoreMetrics::inc(&self.ctx.metrics.stale_deliveries),
                }
                // Write once per run of frames for the same connection.
                if batch.peek().is_some_and(|next| next.conn == key) {
                    return;
                }
                match self.conns.get_mut(slot) {
                    Some(conn) if live => {
                        if self.ctx.finish_output(slot, conn) == Fate::Close {
                            self.close(slot);
                        }
                    }
                    _ => {
                        self.ctx.scratch.plain.clear();
                        self.ctx.scratch.out.clear();
                        self.ctx.run = Run::default();
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
        self.ctx.run = Run::default();
        let same = self
            .conns
            .get(slot)
            .is_some_and(|c| generation.is_none_or(|g| c.generation == g));
        if same {
            self.close(slot);
        }
    }

    /// The backend lost this gateway's sessions (it was taken for dead while
    /// it stalled): tells it about every open session again. Requests read
    /// so far go first, as before any session change.
    fn reopen_sessions(&mut self) {
        self.ctx.flush_requests();
        let ctx = &self.ctx;
        let mut reopened = 0;
        for (slot, conn) in self.conns.iter() {
            if let Some(ids) = &conn.ids {
                let session = ids.session(&ctx.shared.gateway_id, ctx.conn_key(slot, conn));
                ctx.shared.backend.session_reopened(&session);
                reopened += 1;
            }
        }
        tracing::info!(
            core = ctx.index,
            sessions = reopened,
            "sessions opened again"
        );
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
            let ctx = &mut self.ctx;
            let mut effects = std::mem::take(&mut ctx.effects);
            conn.policy.begin_drain(
                || {
                    let jitter = if jitter_ms == 0 {
                        0
                    } else {
                        (ctx.next_random() % u64::from(jitter_ms)) as u32
                    };
                    delay_ms.saturating_add(jitter)
                },
                deadline_ms,
                now,
                &mut effects,
            );
            // A GoAway was queued (or the connection is dropped): it leaves now.
            let goaway = !effects.is_empty();
            ctx.effects = effects;
            let mut fate = ctx.apply(slot, conn).fate;
            if fate == Fate::Keep && goaway {
                fate = ctx.finish_output(slot, conn);
            }
            if fate == Fate::Close {
                self.close(slot);
            }
        }
    }

    /// Removes a connection: ends its session, closes the socket.
    fn close(&mut self, slot: usize) {
        let mut conn = self.conns.remove(slot);
        let ctx = &mut self.ctx;
        ctx.close_channels(slot);
        ctx.end_session(slot, &mut conn);
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
    /// The connection key the backend knows the connection at `slot` by.
    fn conn_key(&self, slot: usize, conn: &Conn) -> u64 {
        conn_key(self.index, slot, conn.generation)
    }

    /// Hands the requests read so far to the backend in one batch.
    fn flush_requests(&mut self) {
        if self.requests.is_empty() {
            return;
        }
        let next = Vec::with_capacity(self.requests.len().clamp(4, REQUEST_BATCH));
        let batch = std::mem::replace(&mut self.requests, next);
        self.shared.backend.submit_batch(batch);
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64: only for drain jitter.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slot_stays_small() {
        // The per-connection struct, excluding rustls' boxed state (the
        // request budgets are 28 of it). Every byte is paid by every
        // connection: the slab is one array of these. mio's TcpStream is a
        // 4-byte fd in release builds, 16 bytes with the selector id it
        // keeps under debug assertions.
        let size = std::mem::size_of::<Conn>();
        let limit = if cfg!(debug_assertions) { 160 } else { 152 };
        assert!(size <= limit, "Conn is {size} bytes");
    }
}
