//! One connection's rules, sans-io: fed events and `now`, they act through
//! the [`Effects`] they are handed (frames to write, requests to forward,
//! close, FIN, timers, counters). No socket, no clock, no TLS: the core loop
//! ([`crate::core`], `core/effects.rs`) carries each effect out, and so does
//! the tests' virtual-clock `Pair` (against a protocol
//! [`ClientConn`](palaver_protocol::state::ClientConn)), with the same
//! decisions in both: which frame goes last, when closing begins, what is
//! counted.
//!
//! What it decides:
//! - the transport phase ([`Phase`]): TLS handshake (and its timeout), open,
//!   behind (output waiting for the client, slow-consumer deadline),
//!   stalled (output full, not read, same deadline), closing (last frames
//!   leaving, FIN, linger deadline);
//! - frame legality, Hello and heartbeat timeouts, through the protocol's
//!   [`ServerConn`] (`on_frame`, `check_timeout`);
//! - request budgets, through [`RequestPolicy`] (send rate, request budget,
//!   in-flight cap, Typing coalescing; the account's budget handed in);
//! - backpressure: when reading stops and resumes, when an event from the
//!   backend does not fit (answers to requests always do), when a client
//!   that falls behind becomes a slow consumer;
//! - drain: which connections get `GoAway(SHUTDOWN)` and which just close.
//!
//! It is 64 bytes and allocates nothing per event except the frames it
//! returns (the same replies the gateway always built).

use palaver_protocol::pb::{self, frame::Body};
use palaver_protocol::state::{ServerConn, ServerPhase, Timeout, Verdict};
use palaver_protocol::{error_reply, error_reply_to, frame};

use crate::config::LimitsConfig;
use crate::policy::{AccountAccess, Admit, PolicyLimits, RequestPolicy};

/// How long a closing connection may take to flush its last frames.
pub const CLOSE_LINGER_MS: u32 = 2_000;

/// The limits one connection's rules enforce (a copy lives in each core).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    pub handshake_timeout_ms: u32,
    pub hello_timeout_ms: u32,
    pub heartbeat_interval_ms: u32,
    /// Unread output above which the connection is not read, and which an
    /// event (a frame answering no request) must fit in.
    pub max_outbound_bytes: u32,
    /// How long a connection with output waiting may go without reading
    /// half of `max_outbound_bytes` before it is a slow consumer.
    pub slow_consumer_timeout_ms: u32,
    /// How long closing waits for the last frames and the peer's FIN.
    pub linger_ms: u32,
    pub requests: PolicyLimits,
}

impl ConnLimits {
    pub fn from_config(limits: &LimitsConfig) -> Self {
        ConnLimits {
            handshake_timeout_ms: limits.handshake_timeout_ms,
            hello_timeout_ms: limits.hello_timeout_ms,
            heartbeat_interval_ms: limits.heartbeat_interval_ms,
            max_outbound_bytes: limits.max_outbound_bytes,
            slow_consumer_timeout_ms: limits.slow_consumer_timeout_ms,
            linger_ms: CLOSE_LINGER_MS,
            requests: limits.policy(),
        }
    }

    fn max_outbound(&self) -> usize {
        self.max_outbound_bytes as usize
    }

    /// What a client with output waiting must read per slow-consumer
    /// timeout to stay: half the limit (the stall's resume point).
    fn progress_quantum(&self) -> u32 {
        (self.max_outbound_bytes / 2).max(1)
    }
}

/// The transport phase. Protocol phases (awaiting Hello, established,
/// draining) live in the [`ServerConn`]; its deadline is the Hello,
/// heartbeat or linger deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// TLS handshake in progress; closed if not done by `deadline`.
    Handshaking { deadline: u64 },
    /// TLS up, input read as it comes, no output waiting.
    Open,
    /// TLS up, input read as it comes, but output waits for the client
    /// (the socket's send buffer is full). Each time the client has read
    /// half of `max_outbound_bytes` since `mark` (the unread level then,
    /// plus what was queued since) the deadline moves on; still behind at
    /// `slow_consumer_at` → slow consumer. A client that stops reading is
    /// therefore closed after the timeout however little waits for it.
    Behind { slow_consumer_at: u64, mark: u32 },
    /// TLS up, unread output at `max_outbound_bytes` or more: input is not
    /// read until the client has read down to half of it. Same deadline
    /// and progress rule as `Behind`.
    Stalled { slow_consumer_at: u64, mark: u32 },
    /// Last frames and close_notify queued; input is discarded. Once the
    /// output has left, FIN goes out (`fin_sent`) and the peer's FIN is
    /// awaited, until the protocol's linger deadline.
    Closing { fin_sent: bool },
}

/// What the core does with the socket's input now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadGate {
    /// Read and process it.
    Read,
    /// Closing: read and drop it, watching for the peer's FIN.
    Discard,
    /// Stalled: leave it in the kernel (TCP backpressure).
    Wait,
    /// Output just became full: reading stops now (counted, and the timer
    /// re-armed for the slow-consumer deadline, through the effects).
    Stall,
}

/// What a connection's rules make happen, in order: whoever runs the rules
/// carries out each effect as it comes and decides nothing about it (the
/// one question back is [`Effect::Authenticate`], answered with
/// [`ConnPolicy::accept_hello`] or [`ConnPolicy::close`]).
#[derive(Debug)]
pub enum Effect {
    /// Queue this frame for the client; `answer`: it answers one of the
    /// connection's requests (what the client has not read is split so).
    Write { frame: pb::Frame, answer: bool },
    /// Hand this request to the backend.
    Forward { request_id: u32, body: Body },
    /// Check this Hello's token, then accept or close.
    Authenticate { request_id: u32, hello: pb::Hello },
    /// Closing began, its last frame (if any) already written: close_notify
    /// behind it, end the session, arm the linger deadline.
    Closing,
    /// Closing and everything is out: shut the write side (FIN), then
    /// discard input until the peer's FIN.
    SendFin,
    /// Drop the socket now (a deadline with nothing to tell, a drain of a
    /// connection with no session).
    Drop,
    /// A deadline moved: re-arm the connection's timer.
    Rearm,
    /// Output fell to half the limit: read again (what arrived meanwhile
    /// raised no new edge), and re-arm.
    ResumeReading,
    /// Something the metrics count.
    Count(Counted),
}

/// The effects of one call, in order (a reused buffer: the core keeps one).
pub type Effects = Vec<Effect>;

/// What [`Effect::Count`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    /// A request over its budget refused with RATE_LIMITED.
    RateLimited,
    /// A Typing coalesced or over budget, dropped without an answer.
    TypingDropped,
    /// A backend frame for a connection not open (handshaking or closing).
    StaleDelivery,
    /// An event that did not fit: closed as a slow consumer.
    SlowConsumer,
    /// Output became full: reading stopped.
    ReadsPaused,
    /// A deadline passed.
    Expired(Expiry),
}

/// What became of one frame the backend sent this connection (a report:
/// the effects carry it out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendStep {
    /// The connection is not open (handshaking or closing): dropped, counted.
    Stale,
    /// Queue it: an answer to a request (always; bounded by the in-flight
    /// cap and the backend's page size, and no more requests are read
    /// while the output is full), or an event that fits.
    Queue,
    /// Queue it as the last frame and close (GoAway(REPLACED), 1xxx Error).
    QueueAndClose,
    /// An event that does not fit beside the other events the client has
    /// not read: dropped, and the connection closes as a slow consumer
    /// ([`ConnPolicy::slow_consumer_goaway`]).
    SlowConsumer,
}

/// What waits for the client to read when a backend frame arrives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unread {
    /// All of it: the gateway's queue and, where the core can see it, the
    /// kernel's.
    pub bytes: usize,
    /// How much of it answers requests (an estimate that errs low, so the
    /// events' share errs high).
    pub answers: usize,
}

/// A deadline that passed, and what it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// TLS handshake not done in time (or the Hello deadline passed during
    /// it): close, nothing to tell.
    Handshake,
    /// No Hello accepted within the Hello timeout: Error(HELLO_TIMEOUT), close.
    Hello,
    /// Silence for 2.5 heartbeat intervals: Error(HEARTBEAT_TIMEOUT), close.
    Heartbeat,
    /// Behind or stalled for the slow-consumer timeout without reading
    /// half of `max_outbound_bytes`: GoAway(SLOW_CONSUMER), close.
    SlowConsumer,
    /// Closing took longer than its linger time: drop the socket.
    Linger,
}

/// One connection's rules and state (64 bytes).
#[derive(Clone, Debug)]
pub struct ConnPolicy {
    phase: Phase,
    proto: ServerConn,
    requests: RequestPolicy,
}

impl ConnPolicy {
    /// A connection accepted at `now`: the TLS handshake must finish within
    /// the handshake timeout, and a Hello be accepted within the Hello
    /// timeout, both counted from now.
    pub fn new(limits: &ConnLimits, now: u64) -> Self {
        ConnPolicy {
            phase: Phase::Handshaking {
                deadline: now + u64::from(limits.handshake_timeout_ms),
            },
            proto: ServerConn::new(now, limits.hello_timeout_ms),
            requests: RequestPolicy::new(&limits.requests, now),
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn protocol_phase(&self) -> ServerPhase {
        self.proto.phase()
    }

    pub fn is_handshaking(&self) -> bool {
        matches!(self.phase, Phase::Handshaking { .. })
    }

    /// TLS is up and the connection is not closing (read or stalled).
    pub fn is_open(&self) -> bool {
        matches!(
            self.phase,
            Phase::Open | Phase::Behind { .. } | Phase::Stalled { .. }
        )
    }

    pub fn is_stalled(&self) -> bool {
        matches!(self.phase, Phase::Stalled { .. })
    }

    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. })
    }

    pub fn requests_in_flight(&self) -> u32 {
        self.requests.in_flight()
    }

    /// When the next deadline passes (core clock ms): handshake, Hello,
    /// heartbeat, slow consumer or linger, whichever applies first. While
    /// stalled the heartbeat does not run: the client's frames wait unread
    /// in the kernel, and the slow-consumer rule judges whether it reads.
    pub fn deadline(&self) -> u64 {
        let proto = self.proto.deadline().unwrap_or(0);
        match self.phase {
            Phase::Handshaking { deadline } => deadline.min(proto),
            Phase::Behind {
                slow_consumer_at, ..
            } => slow_consumer_at.min(proto),
            Phase::Stalled {
                slow_consumer_at, ..
            } => slow_consumer_at,
            Phase::Open | Phase::Closing { .. } => proto,
        }
    }

    /// Which deadline has passed at `now`, if any. The connection's state
    /// does not change: the caller closes it (or begins closing).
    pub fn poll_timeout(&self, now: u64) -> Option<Expiry> {
        if self.deadline() > now {
            return None;
        }
        match self.phase {
            Phase::Handshaking { .. } => Some(Expiry::Handshake),
            Phase::Closing { .. } => Some(Expiry::Linger),
            Phase::Stalled { .. } => Some(Expiry::SlowConsumer),
            Phase::Behind {
                slow_consumer_at, ..
            } if slow_consumer_at <= now => Some(Expiry::SlowConsumer),
            Phase::Open | Phase::Behind { .. } => match self.proto.check_timeout(now)? {
                Timeout::Heartbeat => Some(Expiry::Heartbeat),
                Timeout::Hello => Some(Expiry::Hello),
                // Draining is always Closing here; Welcome is client-side.
                Timeout::Drain | Timeout::Welcome => Some(Expiry::Linger),
            },
        }
    }

    /// The TLS handshake finished (ALPN already checked): the Hello deadline,
    /// counted from accept, is what remains.
    pub fn on_handshake_done(&mut self) {
        if self.is_handshaking() {
            self.phase = Phase::Open;
        }
    }

    /// Whether to read the socket now, with `unread` bytes of output
    /// waiting for the client (the gateway's queue and, where the core can
    /// see it, the kernel's). Called before reading and after each read
    /// round's replies went out.
    pub fn read_gate(
        &mut self,
        limits: &ConnLimits,
        unread: usize,
        now: u64,
        out: &mut Effects,
    ) -> ReadGate {
        match self.phase {
            Phase::Closing { .. } => ReadGate::Discard,
            Phase::Stalled { .. } => ReadGate::Wait,
            Phase::Open | Phase::Behind { .. } if unread >= limits.max_outbound() => {
                self.phase = match self.phase {
                    // The deadline and progress so far carry over.
                    Phase::Behind {
                        slow_consumer_at,
                        mark,
                    } => Phase::Stalled {
                        slow_consumer_at,
                        mark: mark.max(level(unread)),
                    },
                    _ => Phase::Stalled {
                        slow_consumer_at: now + u64::from(limits.slow_consumer_timeout_ms),
                        mark: level(unread),
                    },
                };
                out.push(Effect::Count(Counted::ReadsPaused));
                out.push(Effect::Rearm);
                ReadGate::Stall
            }
            Phase::Open | Phase::Behind { .. } | Phase::Handshaking { .. } => ReadGate::Read,
        }
    }

    /// `len` more bytes were queued for the client: they count in the
    /// progress mark (what the level would be had the client read nothing).
    fn queued(&mut self, len: usize) {
        if let Phase::Behind { mark, .. } | Phase::Stalled { mark, .. } = &mut self.phase {
            *mark = mark.saturating_add(level(len));
        }
    }

    /// One frame decoded from the client at `now`; a request is charged to
    /// the connection's budgets and to its account's (`account`).
    pub fn on_frame(
        &mut self,
        limits: &ConnLimits,
        f: pb::Frame,
        now: u64,
        account: &mut impl AccountAccess,
        out: &mut Effects,
    ) {
        match self.proto.on_frame(&f, now) {
            Err(e) => {
                let err = e.error_reply(f.request_id);
                return self.close(now, Some(err), limits.linger_ms, out);
            }
            // Hold: never here, a Hello is decided before the next frame.
            Ok(Verdict::Ignore | Verdict::Hold) => return,
            Ok(Verdict::Process) => {}
        }
        let request_id = f.request_id;
        let Some(body) = f.body else {
            return;
        };
        let reply = match body {
            Body::Hello(hello) => return out.push(Effect::Authenticate { request_id, hello }),
            Body::Ping(ping) => frame(request_id, Body::Pong(pb::Pong { nonce: ping.nonce })),
            Body::Pong(_) => return,
            body => match self.requests.admit(&limits.requests, &body, now, account) {
                Admit::Forward => return out.push(Effect::Forward { request_id, body }),
                Admit::Drop => return out.push(Effect::Count(Counted::TypingDropped)),
                Admit::Refuse(code, message) => {
                    if code == pb::ErrorCode::RateLimited {
                        out.push(Effect::Count(Counted::RateLimited));
                    }
                    error_reply_to(request_id, &body, code, message)
                }
            },
        };
        if !matches!(self.phase, Phase::Open) {
            self.queued(palaver_protocol::encoded_frame_len(&reply));
        }
        // A Pong or a refusal is not counted as an answer: the answers'
        // share of what waits errs low (see `Unread`).
        out.push(Effect::Write {
            frame: reply,
            answer: false,
        });
    }

    /// The Hello's token was accepted and Welcome queued at `now`: the
    /// heartbeat deadline starts, and the budgets start full.
    pub fn accept_hello(&mut self, limits: &ConnLimits, now: u64) {
        self.proto.accept_hello(now, limits.heartbeat_interval_ms);
        self.requests = RequestPolicy::new(&limits.requests, now);
    }

    /// A request went to the backend outside [`Self::on_frame`] (the Sync a
    /// Hello's resume cursors start): it counts as in flight.
    pub fn forwarded_untracked(&mut self) {
        self.requests.forwarded_untracked();
    }

    /// Starts closing at `now` with `last` as the last frame: input is
    /// dropped from here on, and the socket is dropped once the output has
    /// left and the peer's FIN came, or after `linger_ms`. Nothing happens
    /// if it is already closing (nothing more is queued).
    pub fn close(&mut self, now: u64, last: Option<pb::Frame>, linger_ms: u32, out: &mut Effects) {
        if self.is_closing() {
            return;
        }
        self.phase = Phase::Closing { fin_sent: false };
        self.proto.begin_drain(now, linger_ms);
        if let Some(frame) = last {
            out.push(Effect::Write {
                frame,
                answer: false,
            });
        }
        out.push(Effect::Closing);
    }

    /// A deadline of [`poll_timeout`](Self::poll_timeout) passed at `now`:
    /// counted, then the socket is dropped, or closing begins with the
    /// frame that says why.
    pub fn expire(&mut self, limits: &ConnLimits, expiry: Expiry, now: u64, out: &mut Effects) {
        out.push(Effect::Count(Counted::Expired(expiry)));
        match expiry.last_frame(limits) {
            None => out.push(Effect::Drop),
            Some(last) => self.close(now, Some(last), limits.linger_ms, out),
        }
    }

    /// The output changed (a write, or new frames) at `now`: `queued`
    /// bytes wait in the gateway (the socket refused them), `unread` bytes
    /// wait for the client in all (those and, where the core can see it,
    /// what the kernel still holds; 0 when nothing is queued).
    pub fn on_output_level(
        &mut self,
        limits: &ConnLimits,
        queued: usize,
        unread: usize,
        now: u64,
        out: &mut Effects,
    ) {
        let timeout = u64::from(limits.slow_consumer_timeout_ms);
        let unread_level = level(unread);
        match self.phase {
            Phase::Open if queued > 0 => {
                // Fell behind: the client must read to stay.
                self.phase = Phase::Behind {
                    slow_consumer_at: now + timeout,
                    mark: unread_level,
                };
                out.push(Effect::Rearm);
            }
            Phase::Behind { .. } if queued == 0 => self.phase = Phase::Open,
            // Hysteresis: resume at half, so reading does not flap per write.
            Phase::Stalled {
                slow_consumer_at,
                mark,
            } if unread <= limits.max_outbound() / 2 => {
                self.phase = if queued == 0 {
                    Phase::Open
                } else {
                    Phase::Behind {
                        slow_consumer_at,
                        mark,
                    }
                };
                // Behind again: progress is judged below, at the next change.
                out.push(Effect::ResumeReading);
            }
            Phase::Behind {
                ref mut slow_consumer_at,
                ref mut mark,
            }
            | Phase::Stalled {
                ref mut slow_consumer_at,
                ref mut mark,
            } => {
                if mark.saturating_sub(unread_level) >= limits.progress_quantum() {
                    // It read half the limit since the mark: it is reading.
                    *slow_consumer_at = now + timeout;
                    *mark = unread_level;
                    out.push(Effect::Rearm);
                } else {
                    // More unread than the mark knew of (bytes it was not
                    // told about): count progress from here.
                    *mark = (*mark).max(unread_level);
                }
            }
            Phase::Closing { fin_sent: false } if queued == 0 => {
                self.phase = Phase::Closing { fin_sent: true };
                out.push(Effect::SendFin);
            }
            _ => {}
        }
    }

    /// A frame from the backend at `now`, `len` bytes encoded, with
    /// `unread` already waiting to reach the client; `answers`: it answers
    /// one of this connection's requests (the backend says so: an answer to
    /// a request sent with request_id 0 looks like an event).
    ///
    /// An answer to a request is always queued: the answers a connection
    /// can have coming are bounded by its in-flight cap and the backend's
    /// page size (about 1 MiB), and while the output is full the gateway
    /// reads no more requests. Closing a client that reads because it
    /// asked for two pages at once would punish the honest. An event (a
    /// frame that answers no request: Deliver, receipts, presence, Typing)
    /// must fit in `max_outbound_bytes` beside the other events the client
    /// has not read; one that does not closes it as a slow consumer,
    /// because events keep coming whether or not it reads. A single event
    /// larger than the limit may go out when nothing else is waiting.
    #[allow(clippy::too_many_arguments)] // the frame and what it is, all needed
    pub fn on_backend_frame(
        &mut self,
        limits: &ConnLimits,
        frame: pb::Frame,
        len: usize,
        unread: Unread,
        closes: bool,
        answers: bool,
        now: u64,
        out: &mut Effects,
    ) -> BackendStep {
        if !self.is_open() {
            out.push(Effect::Count(Counted::StaleDelivery));
            return BackendStep::Stale;
        }
        self.requests.on_delivery(answers, now);
        let events = unread.bytes.saturating_sub(unread.answers);
        if !answers && unread.bytes > 0 && events + len > limits.max_outbound() {
            // Tell it why behind what it has not read.
            out.push(Effect::Count(Counted::SlowConsumer));
            let goaway = Self::slow_consumer_goaway(limits);
            self.close(now, Some(goaway), limits.linger_ms, out);
            return BackendStep::SlowConsumer;
        }
        self.queued(len);
        if closes {
            self.close(now, Some(frame), limits.linger_ms, out);
            BackendStep::QueueAndClose
        } else {
            out.push(Effect::Write {
                frame,
                answer: answers,
            });
            BackendStep::Queue
        }
    }

    /// The gateway begins draining at `now`: an established connection is
    /// told GoAway(SHUTDOWN) and closes within `deadline_ms`, one still
    /// handshaking or without a session is dropped, one already closing
    /// goes on. `reconnect_delay_ms` (delay plus jitter) is only asked for
    /// when a GoAway is sent.
    pub fn begin_drain(
        &mut self,
        reconnect_delay_ms: impl FnOnce() -> u32,
        deadline_ms: u32,
        now: u64,
        out: &mut Effects,
    ) {
        match self.phase {
            Phase::Closing { .. } => {}
            Phase::Open | Phase::Behind { .. } | Phase::Stalled { .. }
                if self.proto.phase() == ServerPhase::Established =>
            {
                let goaway = frame(
                    0,
                    Body::GoAway(pb::GoAway {
                        reason: pb::GoAwayReason::Shutdown as i32,
                        reconnect_delay_ms: reconnect_delay_ms(),
                        message: "server is shutting down".into(),
                    }),
                );
                self.close(now, Some(goaway), deadline_ms, out);
            }
            Phase::Handshaking { .. }
            | Phase::Open
            | Phase::Behind { .. }
            | Phase::Stalled { .. } => out.push(Effect::Drop),
        }
    }

    /// The GoAway(SLOW_CONSUMER) queued behind what the client has not read.
    pub fn slow_consumer_goaway(limits: &ConnLimits) -> pb::Frame {
        frame(
            0,
            Body::GoAway(pb::GoAway {
                reason: pb::GoAwayReason::SlowConsumer as i32,
                reconnect_delay_ms: 0,
                message: format!("more than {} bytes unread", limits.max_outbound_bytes),
            }),
        )
    }
}

/// A byte count as the phase keeps it (saturating at 4 GiB).
fn level(bytes: usize) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

impl Expiry {
    /// The last frame to send before closing, if any.
    pub fn last_frame(self, limits: &ConnLimits) -> Option<pb::Frame> {
        match self {
            Expiry::Handshake | Expiry::Linger => None,
            Expiry::Hello => Some(error_reply(
                0,
                pb::ErrorCode::HelloTimeout,
                "no Hello received in time",
            )),
            Expiry::Heartbeat => Some(error_reply(
                0,
                pb::ErrorCode::HeartbeatTimeout,
                "no frame received within 2.5 heartbeat intervals",
            )),
            Expiry::SlowConsumer => Some(ConnPolicy::slow_consumer_goaway(limits)),
        }
    }
}

#[cfg(test)]
mod tests;
