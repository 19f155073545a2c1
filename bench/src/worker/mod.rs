//! A bench worker: one process, one thread, one mio `Poll` driving all of its
//! client connections (nonblocking sockets, rustls `ClientConnection`s), as
//! told by a [`WorkerPlan`] from the coordinator. It reports progress and a
//! final report as JSON lines on stdout (see [`crate::ipc`]).
//!
//! Each user has one slot, which is also its mio token; a reconnect reuses the
//! slot under a new generation so that stale timers are ignored.

pub mod chat;
pub mod one_hop;
pub mod scenario;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use palaver_protocol::pb::frame::Body;
use palaver_protocol::state::ClientPhase;
use palaver_protocol::{encode_frame, pb, ClientConn, FrameDecoder, Timeout, Verdict};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, HandshakeKind};
use socket2::{Domain, Protocol, Socket, Type};

use crate::hist::{self, names};
use crate::ipc::{self, Command, Counters, Phase, WorkerFinal, WorkerMsg, WorkerPlan};
use crate::settings::WORKER_FD_RESERVE;
use palaver_credentials::TokenMinter;
use scenario::{Outbox, Scenario};

const WAKER: Token = Token(usize::MAX);
const HELLO_REQUEST_ID: u32 = 1;
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Wait before retrying a failed reconnect during a storm.
const STORM_RETRY_DELAY: Duration = Duration::from_millis(500);
/// Plaintext read buffer; frames larger than this arrive over several reads.
const READ_CHUNK: usize = 16 * 1024;
/// Largest frame the bench accepts from the server.
const MAX_FRAME_BYTES: usize = 1 << 20;

/// Entry point of `palaver-bench worker`: plan on stdin, reports on stdout.
pub fn main() -> Result<()> {
    let stdin = io::stdin();
    let mut first = String::new();
    stdin
        .lock()
        .read_line(&mut first)
        .context("reading the worker plan from stdin")?;
    let plan: WorkerPlan =
        serde_json::from_str(&first).context("the worker plan on stdin is not valid JSON")?;
    let mut out = io::stdout().lock();
    match Worker::new(plan).and_then(|w| w.run(&mut out)) {
        Ok(()) => Ok(()),
        Err(e) => {
            emit(
                &mut out,
                &WorkerMsg::Fatal {
                    message: format!("{e:#}"),
                },
            )?;
            Err(e)
        }
    }
}

fn emit(out: &mut impl Write, msg: &WorkerMsg) -> Result<()> {
    serde_json::to_writer(&mut *out, msg)?;
    out.write_all(b"\n")?;
    out.flush().context("writing to the coordinator")
}

/// Reads commands from stdin on a thread and wakes the poll loop. End of
/// input (the coordinator went away) means Finish.
fn spawn_command_reader(waker: Arc<Waker>) -> mpsc::Receiver<Command> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Command>(&line) {
                Ok(cmd) => {
                    if tx.send(cmd).is_err() {
                        return;
                    }
                }
                Err(e) => eprintln!("worker: ignoring bad command `{line}`: {e}"),
            }
            let _ = waker.wake();
        }
        let _ = tx.send(Command::Finish);
        let _ = waker.wake();
    });
    rx
}

struct User {
    id: String,
    token: Option<String>,
    /// Generation of the slot's current (or last) connection.
    gen: u32,
    /// Dropped by a storm at this time and not back yet.
    dropped_at: Option<Instant>,
}

enum State {
    Connecting,
    Handshaking,
    /// Hello sent: the protocol's client state machine decides what is legal
    /// and when to ping.
    Session(ClientConn),
}

struct Conn {
    sock: TcpStream,
    tls: ClientConnection,
    state: State,
    /// Welcome received (counted in `open` until the connection ends).
    welcomed: bool,
    started: Instant,
    hello_at: Instant,
    decoder: FrameDecoder,
    /// WRITABLE interest is registered (TLS output waiting for the socket).
    writable_interest: bool,
    /// Outstanding Ping: nonce and when it was sent.
    ping: Option<(u64, Instant)>,
}

impl Conn {
    /// Holds a session that may send requests.
    fn is_ready(&self) -> bool {
        self.welcomed
            && matches!(&self.state, State::Session(p) if p.phase() == ClientPhase::Established)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum TimerKind {
    /// The session's next Ping or heartbeat deadline (see `ClientConn::next_wakeup`).
    Wake,
    /// The attempt must have its Welcome by now.
    Deadline,
    /// Put the slot back in the reconnect queue.
    Retry,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct Timer {
    at: Instant,
    slot: u32,
    gen: u32,
    kind: TimerKind,
}

/// How a connection ended.
enum End {
    /// The bench closed it on purpose (storm, finish).
    ByUs,
    /// Something else did; the reason is reported.
    Failed(String),
}

struct Storm {
    started: Instant,
    remaining: u64,
    done_at: Option<Instant>,
}

struct Worker {
    plan: WorkerPlan,
    poll: Poll,
    /// Kept here as well as in the command thread: if that thread's copy were
    /// the last, its exit would close the eventfd and drop a pending wake-up.
    _waker: Arc<Waker>,
    commands: mpsc::Receiver<Command>,
    tls: crate::tls::ClientConfigs,
    server_name: ServerName<'static>,
    minter: TokenMinter,
    started: Instant,
    phase: Phase,
    users: Vec<User>,
    conns: Vec<Option<Conn>>,
    timers: BinaryHeap<Reverse<Timer>>,
    /// First connects: the next user to connect, paced by `connect_rate`.
    next_first_connect: usize,
    connect_rate: f64,
    /// Slots to (re)connect as soon as the in-flight cap allows.
    reconnect_queue: VecDeque<u32>,
    inflight: u64,
    /// The heartbeat interval the gateway announced.
    heartbeat_ms: Option<u32>,
    next_nonce: u64,
    counters: Counters,
    failures: BTreeMap<String, u64>,
    disconnects: BTreeMap<String, u64>,
    histograms: BTreeMap<&'static str, Histogram<u64>>,
    /// What the sessions are used for; `None` when connections are the
    /// whole workload (connect, reconnect-storm).
    scenario: Option<Box<dyn Scenario>>,
    storm: Option<Storm>,
    peak_open: u64,
    peak_rss: u64,
    scratch: Vec<u8>,
    read_buf: Vec<u8>,
    frames: Vec<pb::Frame>,
    outbox: Outbox,
}

impl Worker {
    fn new(plan: WorkerPlan) -> Result<Worker> {
        let fd_limit = crate::sys::raise_open_file_limit();
        if plan.users() + WORKER_FD_RESERVE > fd_limit {
            bail!(
                "worker {} must hold {} connections but may open only {fd_limit} files",
                plan.index,
                plan.users()
            );
        }
        let poll = Poll::new().context("creating the poll")?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let commands = spawn_command_reader(waker.clone());
        let tickets = if plan.config.resumption {
            2 * plan.users() as usize + 16
        } else {
            0
        };
        let tls = crate::tls::client_configs(&plan.ca_pem, tickets)?;
        let server_name = crate::tls::server_name(&plan.config.server_name)?;
        let minter = TokenMinter::from_key_file_contents(&plan.jwt_key)?;
        let started = Instant::now();
        let users: Vec<User> = (plan.user_start..plan.user_end)
            .map(|i| User {
                id: ipc::user_id(&plan.run_id, i),
                token: None,
                gen: 0,
                dropped_at: None,
            })
            .collect();
        let ids: Vec<String> = users.iter().map(|u| u.id.clone()).collect();
        let scenario = scenario::build(&plan, started, &ids);
        let histograms = names::ALL.iter().map(|&n| (n, hist::new())).collect();
        let conns = (0..users.len()).map(|_| None).collect();
        Ok(Worker {
            connect_rate: plan.share_of(plan.config.connect_rate),
            heartbeat_ms: None,
            plan,
            poll,
            _waker: waker,
            commands,
            tls,
            server_name,
            minter,
            started,
            phase: Phase::Connecting,
            users,
            conns,
            timers: BinaryHeap::new(),
            next_first_connect: 0,
            reconnect_queue: VecDeque::new(),
            inflight: 0,
            next_nonce: 1,
            counters: Counters::default(),
            failures: BTreeMap::new(),
            disconnects: BTreeMap::new(),
            histograms,
            scenario,
            storm: None,
            peak_open: 0,
            peak_rss: 0,
            scratch: Vec::new(),
            read_buf: vec![0; READ_CHUNK],
            frames: Vec::new(),
            outbox: Vec::new(),
        })
    }

    fn run(mut self, out: &mut impl Write) -> Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut next_progress = Instant::now() + PROGRESS_INTERVAL;
        loop {
            let now = Instant::now();
            self.fire_timers(now);
            self.start_connects(now);
            self.scenario_tick(now);
            self.advance_phase(now);
            if now >= next_progress {
                self.emit_progress(out)?;
                next_progress = now + PROGRESS_INTERVAL;
            }
            if self.phase == Phase::Finished {
                break;
            }
            let wake_at = [
                Some(next_progress),
                self.timers.peek().map(|t| t.0.at),
                self.next_connect_due(),
                self.scenario.as_ref().and_then(|s| s.next_due()),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_progress);
            let timeout = wake_at.saturating_duration_since(Instant::now());
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("polling"),
            }
            for event in events.iter() {
                if event.token() == WAKER {
                    while let Ok(cmd) = self.commands.try_recv() {
                        self.on_command(cmd)?;
                    }
                } else {
                    self.on_io(event.token().0);
                }
            }
        }
        self.emit_progress(out)?;
        let report = self.final_report()?;
        emit(out, &WorkerMsg::Final(Box::new(report)))
    }

    // ---- phases and commands ------------------------------------------

    fn on_command(&mut self, cmd: Command) -> Result<()> {
        let now = Instant::now();
        match cmd {
            Command::Setup => {
                let scenario = self
                    .scenario
                    .as_mut()
                    .context("setup command in a scenario that sends nothing")?;
                let users = &self.users;
                self.outbox = scenario.setup(&|slot| users[slot as usize].id.clone());
                self.phase = Phase::SettingUp;
                self.send_outbox();
            }
            Command::Chat => {
                let scenario = self
                    .scenario
                    .as_mut()
                    .context("chat command in a scenario that sends nothing")?;
                scenario.start(now);
                self.phase = Phase::Chatting;
            }
            Command::Storm => self.start_storm(now),
            Command::Finish => self.finish(),
        }
        Ok(())
    }

    fn advance_phase(&mut self, now: Instant) {
        match self.phase {
            Phase::Connecting
                if self.next_first_connect == self.users.len()
                    && self.inflight == 0
                    && self.reconnect_queue.is_empty() =>
            {
                self.phase = Phase::Connected;
            }
            Phase::SettingUp
                if self
                    .scenario
                    .as_ref()
                    .is_some_and(|s| s.pending_setup() == 0) =>
            {
                self.phase = Phase::Ready;
            }
            Phase::Chatting
                if self
                    .scenario
                    .as_ref()
                    .is_some_and(|s| s.next_due().is_none()) =>
            {
                self.phase = Phase::Draining;
            }
            Phase::Draining => {
                let scenario = self.scenario.as_ref().expect("draining implies a scenario");
                if scenario.drained(&self.counters, now, self.plan.config.grace.0) {
                    self.phase = Phase::ChatDone;
                }
            }
            Phase::Storming if self.storm.as_ref().is_some_and(|s| s.remaining == 0) => {
                self.phase = Phase::StormDone;
            }
            _ => {}
        }
    }

    fn start_storm(&mut self, now: Instant) {
        let mut ready: Vec<u32> = (0..self.conns.len() as u32)
            .filter(|&s| self.is_ready(s))
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.plan.config.seed ^ 0x5707);
        ready.shuffle(&mut rng);
        let drop = ((ready.len() as f64) * self.plan.config.drop_percent / 100.0).ceil() as usize;
        for &slot in &ready[..drop] {
            self.close(slot, End::ByUs);
            self.users[slot as usize].dropped_at = Some(now);
            self.reconnect_queue.push_back(slot);
        }
        self.counters.storm_dropped += drop as u64;
        self.storm = Some(Storm {
            started: now,
            remaining: drop as u64,
            done_at: None,
        });
        self.phase = Phase::Storming;
    }

    fn finish(&mut self) {
        for slot in 0..self.conns.len() as u32 {
            if self.conns[slot as usize].is_some() {
                let open = self.is_ready(slot);
                self.close(slot, End::ByUs);
                if !open {
                    *self
                        .failures
                        .entry("still connecting at the end".into())
                        .or_default() += 1;
                    self.counters.failed += 1;
                }
            }
        }
        self.reconnect_queue.clear();
        self.next_first_connect = self.users.len();
        if let Some(scenario) = &self.scenario {
            scenario.finish(&mut self.counters);
        }
        self.phase = Phase::Finished;
    }

    fn emit_progress(&mut self, out: &mut impl Write) -> Result<()> {
        let rss = crate::sys::rss_bytes(std::process::id()).unwrap_or(0);
        if self.counters.open >= self.peak_open {
            self.peak_open = self.counters.open;
            self.peak_rss = rss;
        }
        let interval_e2e_p99_us = self
            .scenario
            .as_mut()
            .map_or(0, |s| s.take_interval_p99_us());
        emit(
            out,
            &WorkerMsg::Progress {
                phase: self.phase,
                counters: self.counters.clone(),
                interval_e2e_p99_us,
            },
        )
    }

    fn final_report(mut self) -> Result<WorkerFinal> {
        let mut send_errors = BTreeMap::new();
        if let Some(scenario) = self.scenario.take() {
            let report = scenario.report();
            send_errors = report.send_errors;
            for (reason, n) in report.setup_failures {
                *self.failures.entry(format!("setup: {reason}")).or_default() += n;
            }
            self.histograms.extend(report.histograms);
        }
        let mut histograms = BTreeMap::new();
        for (name, h) in &self.histograms {
            histograms.insert(name.to_string(), hist::encode(h)?);
        }
        Ok(WorkerFinal {
            counters: self.counters,
            failures: self.failures,
            disconnects: self.disconnects,
            send_errors,
            histograms,
            storm_recovery_ms: self
                .storm
                .as_ref()
                .and_then(|s| s.done_at.map(|d| (d - s.started).as_secs_f64() * 1000.0)),
            heartbeat_ms: self.heartbeat_ms,
            peak_rss_bytes: self.peak_rss,
            peak_open: self.peak_open,
        })
    }

    // ---- connecting ---------------------------------------------------

    fn next_connect_due(&self) -> Option<Instant> {
        if self.inflight >= self.plan.config.max_inflight {
            return None; // an I/O event will free a place
        }
        if !self.reconnect_queue.is_empty() {
            return Some(Instant::now());
        }
        (self.next_first_connect < self.users.len())
            .then(|| self.first_connect_due(self.next_first_connect))
    }

    fn first_connect_due(&self, k: usize) -> Instant {
        if self.connect_rate > 0.0 {
            self.started + Duration::from_secs_f64(k as f64 / self.connect_rate)
        } else {
            self.started
        }
    }

    fn start_connects(&mut self, now: Instant) {
        if self.phase == Phase::Finished {
            return;
        }
        while self.inflight < self.plan.config.max_inflight {
            if let Some(slot) = self.reconnect_queue.pop_front() {
                self.open(slot, now);
            } else if self.next_first_connect < self.users.len()
                && self.first_connect_due(self.next_first_connect) <= now
            {
                let slot = self.next_first_connect as u32;
                self.next_first_connect += 1;
                self.open(slot, now);
            } else {
                break;
            }
        }
    }

    fn open(&mut self, slot: u32, now: Instant) {
        let user = &mut self.users[slot as usize];
        user.gen = user.gen.wrapping_add(1);
        let gen = user.gen;
        self.counters.attempts += 1;
        self.inflight += 1;
        let sources = &self.plan.source_ips;
        let source = (!sources.is_empty()).then(|| sources[slot as usize % sources.len()]);
        let sock = match connect_socket(self.plan.config.target, source) {
            Ok(s) => s,
            Err(e) => {
                self.inflight -= 1;
                self.record_failure(slot, io_reason("connect", &e), now);
                return;
            }
        };
        let mut sock = TcpStream::from_std(sock);
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            Token(slot as usize),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.inflight -= 1;
            self.record_failure(slot, io_reason("register", &e), now);
            return;
        }
        // Only a reconnect of a slot that had a session may resume.
        let config = if gen > 1 {
            self.tls.reconnect.clone()
        } else {
            self.tls.first.clone()
        };
        let tls = match ClientConnection::new(config, self.server_name.clone()) {
            Ok(t) => t,
            Err(e) => {
                self.inflight -= 1;
                self.record_failure(slot, format!("tls: {e}"), now);
                return;
            }
        };
        self.conns[slot as usize] = Some(Conn {
            sock,
            tls,
            state: State::Connecting,
            welcomed: false,
            started: now,
            hello_at: now,
            decoder: FrameDecoder::new(MAX_FRAME_BYTES),
            writable_interest: true,
            ping: None,
        });
        self.timers.push(Reverse(Timer {
            at: now + self.plan.config.connect_timeout.0,
            slot,
            gen,
            kind: TimerKind::Deadline,
        }));
    }

    /// An attempt failed before it held a session.
    fn record_failure(&mut self, slot: u32, reason: String, now: Instant) {
        self.counters.failed += 1;
        *self.failures.entry(reason).or_default() += 1;
        if self.users[slot as usize].dropped_at.is_some() && self.phase == Phase::Storming {
            self.timers.push(Reverse(Timer {
                at: now + STORM_RETRY_DELAY,
                slot,
                gen: self.users[slot as usize].gen,
                kind: TimerKind::Retry,
            }));
        }
    }

    fn is_ready(&self, slot: u32) -> bool {
        self.conns[slot as usize]
            .as_ref()
            .is_some_and(Conn::is_ready)
    }

    /// Milliseconds since the worker started: the clock of the protocol's
    /// client state machines.
    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.started).as_millis() as u64
    }

    /// Arms the session's next wake-up (Ping due or heartbeat deadline).
    fn schedule_wake(&mut self, slot: u32) {
        let Some(Conn {
            state: State::Session(proto),
            ..
        }) = &self.conns[slot as usize]
        else {
            return;
        };
        if let Some(at_ms) = proto.next_wakeup() {
            self.timers.push(Reverse(Timer {
                at: self.started + Duration::from_millis(at_ms),
                slot,
                gen: self.users[slot as usize].gen,
                kind: TimerKind::Wake,
            }));
        }
    }

    fn close(&mut self, slot: u32, end: End) {
        let Some(mut conn) = self.conns[slot as usize].take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.sock);
        let now = Instant::now();
        if conn.welcomed {
            self.counters.open -= 1;
            if let End::Failed(reason) = end {
                self.counters.disconnected += 1;
                *self.disconnects.entry(reason).or_default() += 1;
            }
        } else {
            self.inflight -= 1;
            if let End::Failed(reason) = end {
                self.record_failure(slot, reason, now);
            }
        }
    }

    // ---- timers -------------------------------------------------------

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse(t)) = self.timers.peek().copied() {
            if t.at > now {
                break;
            }
            self.timers.pop();
            if t.gen != self.users[t.slot as usize].gen {
                continue;
            }
            match t.kind {
                TimerKind::Retry => {
                    if self.phase == Phase::Storming && self.conns[t.slot as usize].is_none() {
                        self.reconnect_queue.push_back(t.slot);
                    }
                }
                TimerKind::Deadline => {
                    let Some(conn) = &self.conns[t.slot as usize] else {
                        continue;
                    };
                    let what = match conn.state {
                        _ if conn.welcomed => continue,
                        State::Connecting => "timeout: tcp connect",
                        State::Handshaking => "timeout: tls handshake",
                        State::Session(_) => "timeout: no Welcome",
                    };
                    self.close(t.slot, End::Failed(what.into()));
                }
                TimerKind::Wake => self.on_wake(t.slot, now),
            }
        }
    }

    /// A session's wake-up: give up on a silent server, or ping when the
    /// connection has been idle for an interval.
    fn on_wake(&mut self, slot: u32, now: Instant) {
        let now_ms = self.ms(now);
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let State::Session(proto) = &conn.state else {
            return;
        };
        if let Some(timeout) = proto.check_timeout(now_ms) {
            let what = match timeout {
                Timeout::Heartbeat => "timeout: server silent for 2.5 heartbeat intervals",
                Timeout::Welcome => "timeout: no Welcome",
                Timeout::Hello | Timeout::Drain => "timeout",
            };
            return self.close(slot, End::Failed(what.into()));
        }
        if proto.ping_due(now_ms) {
            if conn.ping.is_some() {
                self.counters.pongs_missed += 1;
            }
            let nonce = self.next_nonce;
            self.next_nonce += 1;
            conn.ping = Some((nonce, now));
            self.counters.pings += 1;
            self.send(
                slot,
                &palaver_protocol::frame(0, Body::Ping(pb::Ping { nonce })),
            );
        }
        self.schedule_wake(slot);
    }

    // ---- the scenario's traffic ----------------------------------------

    fn scenario_tick(&mut self, now: Instant) {
        if self.phase != Phase::Chatting {
            return;
        }
        let Some(scenario) = self.scenario.as_mut() else {
            return;
        };
        let conns = &self.conns;
        let mut outbox = std::mem::take(&mut self.outbox);
        scenario.due(
            now,
            &|slot| conns[slot as usize].as_ref().is_some_and(Conn::is_ready),
            &mut self.counters,
            &mut outbox,
        );
        self.outbox = outbox;
        self.send_outbox();
    }

    fn send_outbox(&mut self) {
        let mut outbox = std::mem::take(&mut self.outbox);
        for (slot, frame) in outbox.drain(..) {
            if !self.is_ready(slot) {
                if let Some(scenario) = self.scenario.as_mut() {
                    scenario.setup_failed(slot, frame.request_id, "sender not connected".into());
                }
                continue;
            }
            self.send(slot, &frame);
        }
        self.outbox = outbox;
    }

    // ---- I/O ----------------------------------------------------------

    /// Writes one frame to a connection's TLS stream and flushes.
    fn send(&mut self, slot: u32, frame: &pb::Frame) {
        let now_ms = self.ms(Instant::now());
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        self.scratch.clear();
        encode_frame(frame, &mut self.scratch);
        if conn.tls.writer().write_all(&self.scratch).is_err() {
            self.close(slot, End::Failed("send buffer full".into()));
            return;
        }
        if let State::Session(proto) = &mut conn.state {
            proto.on_sent(now_ms);
        }
        if let Err(e) = flush(conn, self.poll.registry(), slot) {
            self.close(slot, End::Failed(io_reason("write", &e)));
        }
    }

    fn on_io(&mut self, slot: usize) {
        let now = Instant::now();
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let slot = slot as u32;
        if matches!(conn.state, State::Connecting) {
            match conn.sock.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    return self.close(slot, End::Failed(io_reason("connect", &e)))
                }
            }
            match conn.sock.peer_addr() {
                Ok(_) => conn.state = State::Handshaking,
                Err(e) if e.kind() == ErrorKind::NotConnected => return,
                Err(e) => return self.close(slot, End::Failed(io_reason("connect", &e))),
            }
        }
        let mut frames = std::mem::take(&mut self.frames);
        let mut end: Option<String> = None;
        'read: loop {
            match conn.tls.read_tls(&mut conn.sock) {
                Ok(0) => {
                    end = Some("closed by server".into());
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    end = Some(io_reason("read", &e));
                    break;
                }
            }
            if let Err(e) = conn.tls.process_new_packets() {
                // Tell the server why (best effort), then give up.
                let _ = conn.tls.write_tls(&mut conn.sock);
                end = Some(format!("tls: {e}"));
                break;
            }
            loop {
                match conn.tls.reader().read(&mut self.read_buf) {
                    Ok(0) => {
                        end = Some("closed by server (close_notify)".into());
                        break 'read;
                    }
                    Ok(n) => {
                        if let Err(e) = conn.decoder.decode(&self.read_buf[..n], |f| frames.push(f))
                        {
                            end = Some(format!("bad frame from server: {e}"));
                            break 'read;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        end = Some(io_reason("tls read", &e));
                        break 'read;
                    }
                }
            }
        }
        if matches!(conn.state, State::Handshaking) && !conn.tls.is_handshaking() && end.is_none() {
            self.handshake_done(slot, now);
        }
        let gen = self.users[slot as usize].gen;
        for frame in frames.drain(..) {
            if self.users[slot as usize].gen != gen || self.conns[slot as usize].is_none() {
                break; // a frame closed the connection
            }
            self.on_frame(slot, frame, now);
        }
        self.frames = frames;
        if self.users[slot as usize].gen != gen {
            return;
        }
        if let Some(conn) = self.conns[slot as usize].as_mut() {
            if let Some(reason) = end {
                return self.close(slot, End::Failed(reason));
            }
            if let Err(e) = flush(conn, self.poll.registry(), slot) {
                self.close(slot, End::Failed(io_reason("write", &e)));
            }
        }
    }

    fn handshake_done(&mut self, slot: u32, now: Instant) {
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        hist::record(
            self.histograms.get_mut(names::CONNECT).expect("histogram"),
            now - conn.started,
        );
        if conn.tls.handshake_kind() == Some(HandshakeKind::Resumed) {
            self.counters.handshakes_resumed += 1;
        } else {
            self.counters.handshakes_full += 1;
        }
        if conn.tls.alpn_protocol() != Some(palaver_protocol::ALPN) {
            return self.close(
                slot,
                End::Failed("tls: server did not select ALPN palaver/1".into()),
            );
        }
        let welcome_timeout_ms = self.plan.config.connect_timeout.0.as_millis() as u32;
        conn.state = State::Session(ClientConn::new(
            now.saturating_duration_since(self.started).as_millis() as u64,
            welcome_timeout_ms,
        ));
        conn.hello_at = now;
        let user = &mut self.users[slot as usize];
        let token = match &user.token {
            Some(t) => t.clone(),
            None => match self.minter.mint(&user.id) {
                Ok(t) => {
                    user.token = Some(t.clone());
                    t
                }
                Err(e) => return self.close(slot, End::Failed(format!("token: {e}"))),
            },
        };
        let hello = pb::Hello {
            protocol_version: palaver_protocol::PROTOCOL_VERSION,
            token,
            device_id: "bench".into(),
            client_name: "palaver-bench".into(),
            client_version: env!("CARGO_PKG_VERSION").into(),
            resume: Vec::new(),
        };
        self.send(
            slot,
            &palaver_protocol::frame(HELLO_REQUEST_ID, Body::Hello(hello)),
        );
    }

    fn on_frame(&mut self, slot: u32, frame: pb::Frame, now: Instant) {
        let now_ms = self.ms(now);
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let State::Session(proto) = &mut conn.state else {
            return;
        };
        match proto.on_frame(&frame, now_ms) {
            Err(e) => return self.close(slot, End::Failed(format!("protocol: {e}"))),
            // Hold is a server verdict; a client never gets it.
            Ok(Verdict::Ignore | Verdict::Hold) => return,
            Ok(Verdict::Process) => {}
        }
        let welcomed = conn.welcomed;
        match &frame.body {
            Some(Body::Welcome(w)) => self.on_welcome(slot, w, now),
            Some(Body::Error(e)) => self.on_error(slot, frame.request_id, e, welcomed),
            Some(Body::GoAway(g)) => {
                let reason = pb::GoAwayReason::try_from(g.reason)
                    .map_or_else(|_| g.reason.to_string(), |r| r.as_str_name().to_string());
                self.close(slot, End::Failed(format!("GoAway {reason}")));
            }
            Some(Body::Pong(p)) => {
                if let Some((nonce, sent)) = conn.ping {
                    if nonce == p.nonce {
                        conn.ping = None;
                        self.counters.pongs += 1;
                        hist::record(
                            self.histograms.get_mut(names::PING).expect("histogram"),
                            now - sent,
                        );
                    }
                }
            }
            Some(Body::Ping(p)) => self.send(
                slot,
                &palaver_protocol::frame(0, Body::Pong(pb::Pong { nonce: p.nonce })),
            ),
            _ => {
                if let Some(scenario) = self.scenario.as_mut() {
                    let me = &self.users[slot as usize].id;
                    scenario.on_frame(slot, me, &frame, now, &mut self.counters);
                }
            }
        }
    }

    fn on_welcome(&mut self, slot: u32, welcome: &pb::Welcome, now: Instant) {
        let conn = self.conns[slot as usize].as_mut().expect("caller checked");
        conn.welcomed = true;
        hist::record(
            self.histograms.get_mut(names::HELLO).expect("histogram"),
            now - conn.hello_at,
        );
        let resumed = conn.tls.handshake_kind() == Some(HandshakeKind::Resumed);
        self.inflight -= 1;
        self.counters.welcomed += 1;
        self.counters.open += 1;
        self.heartbeat_ms
            .get_or_insert(welcome.heartbeat_interval_ms);
        self.schedule_wake(slot);
        if let Some(dropped) = self.users[slot as usize].dropped_at.take() {
            hist::record(
                self.histograms
                    .get_mut(names::RECONNECT)
                    .expect("histogram"),
                now - dropped,
            );
            self.counters.storm_reconnected += 1;
            if resumed {
                self.counters.storm_resumed += 1;
            }
            if let Some(storm) = self.storm.as_mut() {
                storm.remaining -= 1;
                if storm.remaining == 0 {
                    storm.done_at = Some(now);
                }
            }
        }
    }

    fn on_error(&mut self, slot: u32, request_id: u32, error: &pb::Error, welcomed: bool) {
        let name = chat::error_name(error.code);
        if palaver_protocol::closes_connection(error.code) || !welcomed {
            return self.close(slot, End::Failed(format!("Error {name}")));
        }
        let Some(scenario) = self.scenario.as_mut() else {
            *self
                .disconnects
                .entry(format!("Error {name} (request failed)"))
                .or_default() += 1;
            return;
        };
        if !scenario.on_error(slot, request_id, error, &mut self.counters) {
            self.counters.unexpected += 1;
        }
    }
}

/// A nonblocking TCP socket connecting to `target`, bound to `source` first
/// (port chosen at connect time, so one source address serves many targets).
fn connect_socket(target: SocketAddr, source: Option<IpAddr>) -> io::Result<std::net::TcpStream> {
    let sock = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        set_bind_address_no_port(&sock)?;
        sock.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match sock.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(sock.into())
}

/// IP_BIND_ADDRESS_NO_PORT: defer the port choice from bind() to connect(),
/// where the kernel can reuse a port for different destinations.
#[allow(unsafe_code)] // setsockopt: see SAFETY below
fn set_bind_address_no_port(sock: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and a c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes pending TLS output; watches for writability only while some is left.
fn flush(conn: &mut Conn, registry: &Registry, slot: u32) -> io::Result<()> {
    if matches!(conn.state, State::Connecting) {
        return Ok(());
    }
    while conn.tls.wants_write() {
        match conn.tls.write_tls(&mut conn.sock) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if !conn.writable_interest {
                    registry.reregister(
                        &mut conn.sock,
                        Token(slot as usize),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    conn.writable_interest = true;
                }
                return Ok(());
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if conn.writable_interest {
        registry.reregister(&mut conn.sock, Token(slot as usize), Interest::READABLE)?;
        conn.writable_interest = false;
    }
    Ok(())
}

/// A failure reason from an I/O error, worded so that equal causes group.
fn io_reason(what: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        // The same code always gives the same text.
        Some(code) => format!("{what}: {}", io::Error::from_raw_os_error(code)),
        None => format!("{what}: {}", e.kind()),
    }
}
