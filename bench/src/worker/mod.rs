//! A bench worker: one process, one thread, one mio `Poll` driving all of its
//! client connections (nonblocking sockets, rustls `ClientConnection`s), as
//! told by a [`WorkerPlan`] from the coordinator. It reports progress and a
//! final report as JSON lines on stdout (see [`crate::ipc`]).
//!
//! Each user has one slot, which is also its mio token; a reconnect reuses the
//! slot under a new generation so that stale timers are ignored.

pub mod channel;
pub mod chat;
pub mod one_hop;
pub mod scenario;

mod connect;
mod traffic;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::io::{self, BufRead, ErrorKind, Write};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Poll, Token, Waker};
use palaver_protocol::state::ClientPhase;
use palaver_protocol::{pb, ClientConn, FrameDecoder};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rustls::pki_types::ServerName;
use rustls::ClientConnection;

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
    /// When the scenario's setup next has something due (paced requests, retries).
    setup_wake: Option<Instant>,
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
            setup_wake: None,
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
            if let Some(id) = self.scenario.as_mut().and_then(|s| s.take_channel_id()) {
                emit(
                    out,
                    &WorkerMsg::ChannelCreated {
                        conversation_id: id,
                    },
                )?;
            }
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
                self.setup_wake,
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
            Command::OpenChannel { conversation_id } => {
                let scenario = self
                    .scenario
                    .as_mut()
                    .context("open-channel command in a scenario that sends nothing")?;
                let conns = &self.conns;
                self.outbox = scenario.open_channel(&conversation_id, &|slot| {
                    conns[slot as usize].as_ref().is_some_and(Conn::is_ready)
                });
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
        let mut channel = None;
        if let Some(scenario) = self.scenario.take() {
            let report = scenario.report();
            send_errors = report.send_errors;
            channel = report.channel;
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
            channel,
        })
    }
}
