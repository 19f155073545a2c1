//! The connection rules against the protocol's client state machine on a
//! virtual clock, in the style of quinn-proto's test `Pair`: both ends
//! exchange frames through in-memory queues, [`Pair::step`] lets each end
//! act at the current time, and [`Pair::run_until`] jumps the clock from
//! one deadline to the next. The server end runs [`ConnPolicy`] the way the
//! core loop does (a read round, then output, then the read gate again) and
//! carries out its [`Effect`]s as `core/effects.rs` does, on in-memory
//! queues instead of TLS and a socket: every decision (what is written, when
//! closing begins, what is counted) is the rules' own, the same code the
//! core runs. "Unsent output" is what the client has not read.
//! No sockets, no sleeps: a 10-minute heartbeat run takes microseconds and
//! every deadline is checked to the millisecond. This file holds the `Pair`;
//! the tests are in `tests/` (lifecycle, budgets, output).

use std::collections::VecDeque;

use palaver_protocol::pb::{self, frame::Body};
use palaver_protocol::state::{ClientConn, ClientPhase};
use palaver_protocol::{encoded_frame_len, error_reply, frame};

use super::*;
use crate::policy::AccountBudget;

/// Frames the server handles per read round (the core reads 64 KiB).
const ROUND_FRAMES: usize = 64;
const GOOD_TOKEN: &str = "good";

fn limits() -> ConnLimits {
    ConnLimits {
        handshake_timeout_ms: 10_000,
        hello_timeout_ms: 10_000,
        heartbeat_interval_ms: 30_000,
        max_outbound_bytes: 4096,
        slow_consumer_timeout_ms: 10_000,
        linger_ms: CLOSE_LINGER_MS,
        requests: PolicyLimits {
            max_body_bytes: 1024,
            max_sends_per_second: 50,
            max_requests_per_second: 100,
            max_requests_in_flight: 64,
            typing_coalesce_ms: 2_000,
            max_account_sends_per_second: 100,
            max_account_requests_per_second: 200,
        },
    }
}

/// Why the server dropped the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dropped {
    /// A deadline with nothing to send (handshake, linger).
    Expired(Expiry),
    /// The client closed (EOF while discarding input).
    PeerClosed,
    /// Drain closed it at once.
    Drained,
}

/// The server end: a [`ConnPolicy`] and its effects carried out.
struct Server {
    policy: ConnPolicy,
    limits: ConnLimits,
    /// When the TLS handshake completes (None: never).
    tls_done_at: Option<u64>,
    /// Frames written that the client has not read, and their size.
    to_client: VecDeque<pb::Frame>,
    unsent: usize,
    /// The account's budget (this connection alone in it).
    account: AccountBudget,
    /// Frames the client wrote that the server has not read.
    from_client: VecDeque<pb::Frame>,
    /// What the rules decided in the call just made.
    effects: Effects,
    /// Requests handed to the backend.
    forwarded: Vec<(u32, Body)>,
    expired: Vec<(u64, Expiry)>,
    stalls: usize,
    rate_limited: usize,
    typing_dropped: usize,
    fin_sent: bool,
    dropped: Option<(u64, Dropped)>,
}

impl Server {
    fn queue(&mut self, f: pb::Frame) {
        self.unsent += encoded_frame_len(&f);
        self.to_client.push_back(f);
    }

    /// Carries out the effects the rules pushed (and those they lead to),
    /// as the core's `Ctx::apply` does; true if there were any.
    fn apply(&mut self, now: u64) -> bool {
        let limits = self.limits;
        let mut any = false;
        let mut expired_now = None;
        while !self.effects.is_empty() {
            any = true;
            for effect in std::mem::take(&mut self.effects) {
                match effect {
                    Effect::Write { frame, .. } => self.queue(frame),
                    Effect::Forward { request_id, body } => self.forwarded.push((request_id, body)),
                    // The core's Authenticator, reduced to one good token.
                    Effect::Authenticate { request_id, hello } if hello.token == GOOD_TOKEN => {
                        self.policy.accept_hello(&limits, now);
                        self.queue(frame(
                            request_id,
                            Body::Welcome(pb::Welcome {
                                protocol_version: palaver_protocol::PROTOCOL_VERSION,
                                heartbeat_interval_ms: limits.heartbeat_interval_ms,
                                ..Default::default()
                            }),
                        ));
                    }
                    Effect::Authenticate { request_id, .. } => {
                        let err =
                            error_reply(request_id, pb::ErrorCode::Unauthenticated, "bad token");
                        self.policy
                            .close(now, Some(err), limits.linger_ms, &mut self.effects);
                    }
                    // No TLS here: close_notify and the session's end are
                    // the core's; the frames before it are queued.
                    Effect::Closing => {}
                    Effect::SendFin => self.fin_sent = true,
                    Effect::Drop => {
                        // For the deadline counted just before, else by drain.
                        let why = expired_now.map_or(Dropped::Drained, Dropped::Expired);
                        self.dropped = Some((now, why));
                    }
                    Effect::Rearm | Effect::ResumeReading => {}
                    Effect::Count(Counted::RateLimited) => self.rate_limited += 1,
                    Effect::Count(Counted::TypingDropped) => self.typing_dropped += 1,
                    Effect::Count(Counted::ReadsPaused) => self.stalls += 1,
                    Effect::Count(Counted::Expired(expiry)) => {
                        expired_now = Some(expiry);
                        self.expired.push((now, expiry));
                    }
                    Effect::Count(Counted::StaleDelivery | Counted::SlowConsumer) => {}
                }
            }
        }
        any
    }

    fn on_frame(&mut self, f: pb::Frame, now: u64) {
        let limits = self.limits;
        self.policy
            .on_frame(&limits, f, now, &mut self.account, &mut self.effects);
        self.apply(now);
    }

    /// A frame from the backend, as the core's delivery path hands it over.
    fn on_backend_frame(&mut self, f: pb::Frame, closes: bool, now: u64) -> BackendStep {
        let limits = self.limits;
        let len = encoded_frame_len(&f);
        let answer_bytes = self
            .to_client
            .iter()
            .filter(|f| palaver_protocol::bodies::answers_request(f))
            .map(encoded_frame_len)
            .sum();
        let unread = Unread {
            bytes: self.unsent,
            answers: answer_bytes,
        };
        // What the router would say: these frames carry their request's id.
        let answers = palaver_protocol::bodies::answers_request(&f);
        let step = self.policy.on_backend_frame(
            &limits,
            f,
            len,
            unread,
            closes,
            answers,
            now,
            &mut self.effects,
        );
        self.apply(now);
        step
    }

    /// Everything the server does at `now`; true if anything happened.
    fn step(&mut self, now: u64, peer_closed: bool) -> bool {
        if self.dropped.is_some() {
            return false;
        }
        let limits = self.limits;
        let mut progress = false;
        if self.policy.is_handshaking() && self.tls_done_at.is_some_and(|t| t <= now) {
            self.policy.on_handshake_done();
            progress = true;
        }
        if let Some(expiry) = self.policy.poll_timeout(now) {
            self.policy.expire(&limits, expiry, now, &mut self.effects);
            self.apply(now);
            if self.dropped.is_some() {
                return true;
            }
            progress = true;
        }
        let gate = self
            .policy
            .read_gate(&limits, self.unsent, now, &mut self.effects);
        self.apply(now);
        match gate {
            ReadGate::Read if !self.policy.is_handshaking() && !self.from_client.is_empty() => {
                for _ in 0..ROUND_FRAMES {
                    if !self.policy.is_open() {
                        break;
                    }
                    let Some(f) = self.from_client.pop_front() else {
                        break;
                    };
                    self.on_frame(f, now);
                }
                // This round's replies are out; full now?
                self.output_changed(now);
                self.policy
                    .read_gate(&limits, self.unsent, now, &mut self.effects);
                self.apply(now);
                progress = true;
            }
            ReadGate::Read | ReadGate::Wait => {}
            ReadGate::Discard => {
                progress |= !self.from_client.is_empty();
                self.from_client.clear();
                if peer_closed {
                    self.dropped = Some((now, Dropped::PeerClosed));
                    return true;
                }
            }
            ReadGate::Stall => progress = true,
        }
        progress | self.output_changed(now)
    }

    /// The core's `after_output`: report the level (all of it unread, as
    /// if the kernel held none); FIN when closing and empty.
    fn output_changed(&mut self, now: u64) -> bool {
        let limits = self.limits;
        self.policy
            .on_output_level(&limits, self.unsent, self.unsent, now, &mut self.effects);
        self.apply(now)
    }
}

/// The client end: the protocol's [`ClientConn`] and an app that reads (or
/// not) and pings when due (or not).
struct Client {
    conn: ClientConn,
    reading: bool,
    pinging: bool,
    received: Vec<pb::Frame>,
    next_request_id: u32,
    last_sent: u64,
    /// Closed its socket (after the server's FIN, or when it was dropped).
    closed: bool,
}

impl Client {
    fn step(&mut self, now: u64, server: &mut Server) -> bool {
        if self.closed {
            return false;
        }
        let mut progress = false;
        if self.reading {
            while let Some(f) = server.to_client.pop_front() {
                server.unsent -= encoded_frame_len(&f);
                let _ = self.conn.on_frame(&f, now);
                self.received.push(f);
                progress = true;
            }
        }
        let fin_read = server.fin_sent && server.to_client.is_empty() && self.reading;
        if fin_read || server.dropped.is_some() {
            self.closed = true;
            return true;
        }
        if self.pinging && self.conn.ping_due(now) {
            let nonce = u64::from(self.next_request_id);
            self.send(server, Body::Ping(pb::Ping { nonce }), now);
            progress = true;
        }
        progress
    }

    fn send(&mut self, server: &mut Server, body: Body, now: u64) -> u32 {
        self.next_request_id += 1;
        let id = self.next_request_id;
        self.conn.on_sent(now);
        self.last_sent = now;
        server.from_client.push_back(frame(id, body));
        id
    }

    fn error_codes(&self) -> Vec<u32> {
        self.received
            .iter()
            .filter_map(|f| match &f.body {
                Some(Body::Error(e)) => Some(e.code),
                _ => None,
            })
            .collect()
    }

    fn last_go_away(&self) -> Option<&pb::GoAway> {
        self.received.iter().rev().find_map(|f| match &f.body {
            Some(Body::GoAway(g)) => Some(g),
            _ => None,
        })
    }

    fn count(&self, is: impl Fn(&Body) -> bool) -> usize {
        self.received
            .iter()
            .filter(|f| f.body.as_ref().is_some_and(&is))
            .count()
    }
}

struct Pair {
    now: u64,
    server: Server,
    client: Client,
}

impl Pair {
    /// A connection accepted at 0 whose TLS handshake completes at once;
    /// the client has sent nothing yet.
    fn new(limits: ConnLimits) -> Pair {
        Pair {
            now: 0,
            server: Server {
                policy: ConnPolicy::new(&limits, 0),
                limits,
                tls_done_at: Some(0),
                to_client: VecDeque::new(),
                unsent: 0,
                account: AccountBudget::new(&limits.requests, 0),
                from_client: VecDeque::new(),
                effects: Vec::new(),
                forwarded: Vec::new(),
                expired: Vec::new(),
                stalls: 0,
                rate_limited: 0,
                typing_dropped: 0,
                fin_sent: false,
                dropped: None,
            },
            client: Client {
                conn: ClientConn::new(0, 10_000),
                reading: true,
                pinging: false,
                received: Vec::new(),
                next_request_id: 0,
                last_sent: 0,
                closed: false,
            },
        }
    }

    /// Connected and welcomed at 0, the client reading and pinging.
    fn established(limits: ConnLimits) -> Pair {
        let mut p = Pair::new(limits);
        p.hello(GOOD_TOKEN);
        p.settle();
        assert_eq!(p.client.conn.phase(), ClientPhase::Established);
        assert_eq!(p.server.policy.protocol_phase(), ServerPhase::Established);
        p.client.pinging = true;
        p
    }

    fn hello(&mut self, token: &str) -> u32 {
        let hello = Body::Hello(pb::Hello {
            protocol_version: palaver_protocol::PROTOCOL_VERSION,
            token: token.into(),
            device_id: "phone".into(),
            ..Default::default()
        });
        self.send(hello)
    }

    fn send(&mut self, body: Body) -> u32 {
        self.client.send(&mut self.server, body, self.now)
    }

    fn send_text(&mut self, n: u32) -> u32 {
        self.send(Body::Send(pb::Send {
            conversation_id: "dm:alice:bob".into(),
            client_msg_id: n.to_be_bytes().repeat(4),
            body: b"hi".to_vec(),
            ..Default::default()
        }))
    }

    /// Both ends act once at the current time.
    fn step(&mut self) -> bool {
        let server = self.server.step(self.now, self.client.closed);
        let client = self.client.step(self.now, &mut self.server);
        server | client
    }

    /// Steps until neither end has anything left to do at this time.
    fn settle(&mut self) {
        for _ in 0..100_000 {
            if !self.step() {
                return;
            }
        }
        panic!("the pair never settles at {}", self.now);
    }

    /// The earliest time either end must act again.
    fn next_wakeup(&self) -> Option<u64> {
        let server = self.server.dropped.is_none().then(|| {
            let tls = match self.server.tls_done_at {
                Some(t) if self.server.policy.is_handshaking() => t,
                _ => u64::MAX,
            };
            self.server.policy.deadline().min(tls)
        });
        let client = match self.client.pinging && !self.client.closed {
            true => self.client.conn.next_ping_at(),
            false => None,
        };
        match (server, client) {
            (Some(s), Some(c)) => Some(s.min(c)),
            (s, c) => s.or(c),
        }
    }

    /// Jumps the clock from one deadline to the next, acting at each,
    /// up to and including `until`.
    fn run_until(&mut self, until: u64) {
        loop {
            self.settle();
            match self.next_wakeup() {
                Some(t) if t <= until => {
                    assert!(t > self.now, "wakeup {t} is not after now {}", self.now);
                    self.now = t;
                }
                _ => {
                    self.now = self.now.max(until);
                    self.settle();
                    return;
                }
            }
        }
    }

    fn run_for(&mut self, ms: u64) {
        self.run_until(self.now + ms);
    }

    fn pongs(&self) -> usize {
        self.client.count(|b| matches!(b, Body::Pong(_)))
    }
}

/// A client that sends Pings but reads nothing: rounds of Pongs fill its
/// output until reading stops.
fn flood_pings_without_reading(p: &mut Pair, n: usize) {
    p.client.reading = false;
    p.client.pinging = false;
    for i in 0..n {
        p.send(Body::Ping(pb::Ping { nonce: i as u64 }));
    }
    p.settle();
}

/// What the core's drain does with one connection: GoAway(SHUTDOWN) with
/// the delay, close within `deadline_ms`.
/// True if a GoAway was queued.
fn drain(p: &mut Pair, reconnect_delay_ms: u32, deadline_ms: u32) -> bool {
    p.server.policy.begin_drain(
        || reconnect_delay_ms,
        deadline_ms,
        p.now,
        &mut p.server.effects,
    );
    let goaway = matches!(p.server.effects.first(), Some(Effect::Write { .. }));
    p.server.apply(p.now);
    goaway
}

fn history_page(request_id: u32, size: usize) -> pb::Frame {
    frame(
        request_id,
        Body::HistoryPage(pb::HistoryPage {
            conversation_id: "dm:alice:bob".into(),
            messages: vec![pb::Message {
                body: vec![b'h'; size],
                ..Default::default()
            }],
            has_more: true,
            history_epoch: 0,
        }),
    )
}

fn deliver(size: usize) -> pb::Frame {
    frame(
        0,
        Body::Deliver(pb::Deliver {
            message: Some(pb::Message {
                body: vec![b'x'; size],
                ..Default::default()
            }),
        }),
    )
}

/// The client reads frames (whole) until it has read at least `bytes`.
fn client_reads(p: &mut Pair, bytes: usize) {
    let mut read = 0;
    while read < bytes {
        let Some(f) = p.server.to_client.pop_front() else {
            break;
        };
        let len = encoded_frame_len(&f);
        p.server.unsent -= len;
        read += len;
        let _ = p.client.conn.on_frame(&f, p.now);
        p.client.received.push(f);
    }
    p.server.output_changed(p.now);
}

mod budgets;
mod lifecycle;
mod output;
