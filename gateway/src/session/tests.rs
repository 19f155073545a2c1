//! The connection rules against the protocol's client state machine on a
//! virtual clock, in the style of quinn-proto's test `Pair`: both ends
//! exchange frames through in-memory queues, [`Pair::step`] lets each end
//! act at the current time, and [`Pair::run_until`] jumps the clock from
//! one deadline to the next. The server end applies [`ConnPolicy`]'s
//! verdicts the way the core loop does (a read round, then output, then
//! the read gate again); "unsent output" is what the client has not read.
//! No sockets, no sleeps: a 10-minute heartbeat run takes microseconds and
//! every deadline is checked to the millisecond.

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

/// The server end: a [`ConnPolicy`] and what the core does with its verdicts.
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

    fn begin_close(&mut self, now: u64, last: Option<pb::Frame>, linger_ms: u32) {
        if self.policy.begin_close(now, linger_ms) {
            if let Some(f) = last {
                self.queue(f);
            }
        }
    }

    fn on_frame(&mut self, f: pb::Frame, now: u64) {
        let limits = self.limits;
        match self.policy.on_frame(&limits, f, now, &mut self.account) {
            FrameStep::Ignore => {}
            FrameStep::Reply(reply) => self.queue(reply),
            FrameStep::RateLimited(reply) => {
                self.rate_limited += 1;
                self.queue(reply);
            }
            FrameStep::TypingDropped => self.typing_dropped += 1,
            FrameStep::Hello { request_id, hello } if hello.token == GOOD_TOKEN => {
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
            FrameStep::Hello { request_id, .. } => {
                let err = error_reply(request_id, pb::ErrorCode::Unauthenticated, "bad token");
                self.begin_close(now, Some(err), limits.linger_ms);
            }
            FrameStep::Forward { request_id, body } => self.forwarded.push((request_id, body)),
            FrameStep::Close(err) => self.begin_close(now, Some(err), limits.linger_ms),
        }
    }

    /// A frame from the backend, as the core's delivery path handles it.
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
        let step = self
            .policy
            .on_backend_frame(&limits, len, unread, closes, answers, now);
        match step {
            BackendStep::Stale => {}
            BackendStep::Queue => self.queue(f),
            BackendStep::QueueAndClose => self.begin_close(now, Some(f), limits.linger_ms),
            BackendStep::SlowConsumer => {
                let goaway = ConnPolicy::slow_consumer_goaway(&limits);
                self.begin_close(now, Some(goaway), limits.linger_ms);
            }
        }
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
            self.expired.push((now, expiry));
            match expiry.last_frame(&limits) {
                None => {
                    self.dropped = Some((now, Dropped::Expired(expiry)));
                    return true;
                }
                Some(last) => self.begin_close(now, Some(last), limits.linger_ms),
            }
            progress = true;
        }
        match self.policy.read_gate(&limits, self.unsent, now) {
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
                if self.policy.read_gate(&limits, self.unsent, now) == ReadGate::Stall {
                    self.stalls += 1;
                }
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
            ReadGate::Stall => {
                self.stalls += 1;
                progress = true;
            }
        }
        progress | self.output_changed(now)
    }

    /// The core's `after_output`: report the level (all of it unread, as
    /// if the kernel held none); FIN when closing and empty.
    fn output_changed(&mut self, now: u64) -> bool {
        let limits = self.limits;
        match self
            .policy
            .on_output_level(&limits, self.unsent, self.unsent, now)
        {
            OutputStep::Keep => false,
            OutputStep::Resume | OutputStep::Rearm => true,
            OutputStep::SendFin => {
                self.fin_sent = true;
                true
            }
        }
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

#[test]
fn handshake_not_done_in_time_is_dropped_silently() {
    let mut l = limits();
    l.handshake_timeout_ms = 5_000;
    let mut p = Pair::new(l);
    p.server.tls_done_at = None;
    p.run_until(4_999);
    assert!(p.server.policy.is_handshaking());
    assert_eq!(p.server.dropped, None);
    p.run_until(60_000);
    assert_eq!(
        p.server.dropped,
        Some((5_000, Dropped::Expired(Expiry::Handshake)))
    );
    assert!(p.client.received.is_empty(), "nothing to tell before TLS");
}

#[test]
fn hello_timeout_counts_from_accept_and_sends_hello_timeout() {
    let mut p = Pair::new(limits());
    // A slow handshake does not move the Hello deadline.
    p.server.tls_done_at = Some(4_000);
    p.run_until(9_999);
    assert_eq!(p.server.policy.phase(), Phase::Open);
    assert!(p.client.received.is_empty());
    p.run_until(60_000);
    assert_eq!(p.server.expired, vec![(10_000, Expiry::Hello)]);
    assert_eq!(
        p.client.error_codes(),
        vec![pb::ErrorCode::HelloTimeout as u32]
    );
    assert_eq!(p.client.conn.phase(), ClientPhase::Closed);
    // The client read the Error, FIN followed, the client closed: no linger.
    assert!(p.server.fin_sent);
    assert_eq!(p.server.dropped, Some((10_000, Dropped::PeerClosed)));
}

#[test]
fn a_pinging_client_stays_and_a_silent_one_gets_heartbeat_timeout() {
    let mut p = Pair::established(limits());
    p.run_until(600_000);
    assert_eq!(p.server.dropped, None);
    assert_eq!(p.pongs(), 20, "one Ping per 30 s interval for 10 minutes");
    assert!(p.server.expired.is_empty());

    p.client.pinging = false;
    let last_activity = p.client.last_sent;
    p.run_until(1_000_000);
    // Silence for 2.5 intervals after the last frame received.
    assert_eq!(
        p.server.expired,
        vec![(last_activity + 75_000, Expiry::Heartbeat)]
    );
    assert_eq!(
        p.client.error_codes(),
        vec![pb::ErrorCode::HeartbeatTimeout as u32]
    );
    assert_eq!(
        p.server.dropped,
        Some((last_activity + 75_000, Dropped::PeerClosed))
    );
}

#[test]
fn sends_over_the_rate_are_refused_with_rate_limited_and_the_budget_refills() {
    let mut p = Pair::established(limits());
    let ids: Vec<u32> = (0..60).map(|n| p.send_text(n)).collect();
    p.settle();
    let forwarded: Vec<u32> = p.server.forwarded.iter().map(|(id, _)| *id).collect();
    assert_eq!(forwarded, ids[..50], "a burst of one second's worth");
    assert_eq!(p.server.rate_limited, 10);
    let refused: Vec<u32> = p
        .client
        .received
        .iter()
        .filter(|f| matches!(&f.body, Some(Body::Error(e)) if e.code == pb::ErrorCode::RateLimited as u32))
        .map(|f| f.request_id)
        .collect();
    assert_eq!(refused, ids[50..], "each refusal answers its request");
    assert_eq!(
        p.client.conn.phase(),
        ClientPhase::Established,
        "2xxx keeps the connection"
    );

    // The backend answers; a second later the bucket is full again.
    for (id, _) in std::mem::take(&mut p.server.forwarded) {
        let ack = frame(id, Body::SendAck(pb::SendAck::default()));
        assert_eq!(
            p.server.on_backend_frame(ack, false, p.now),
            BackendStep::Queue
        );
    }
    assert_eq!(p.server.policy.requests_in_flight(), 0);
    p.run_for(1_000);
    (60..110).for_each(|n| {
        p.send_text(n);
    });
    p.send_text(110);
    p.settle();
    assert_eq!(p.server.forwarded.len(), 50);
    assert_eq!(p.server.rate_limited, 11);
}

#[test]
fn identical_typing_within_the_window_is_dropped_unanswered() {
    let mut p = Pair::established(limits());
    let typing = || {
        Body::Typing(pb::Typing {
            conversation_id: "dm:alice:bob".into(),
            active: true,
            user_id: String::new(),
        })
    };
    p.send(typing());
    p.send(typing());
    p.settle();
    assert_eq!((p.server.forwarded.len(), p.server.typing_dropped), (1, 1));
    p.run_for(2_000);
    p.send(typing());
    p.settle();
    assert_eq!(p.server.forwarded.len(), 2);
    assert_eq!(p.client.error_codes(), Vec::<u32>::new());
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

#[test]
fn output_full_for_the_slow_consumer_timeout_is_goaway_slow_consumer() {
    let mut p = Pair::established(limits());
    let start = p.now;
    flood_pings_without_reading(&mut p, 2_000);
    assert!(
        p.server.policy.is_stalled(),
        "{:?}",
        p.server.policy.phase()
    );
    assert_eq!(p.server.stalls, 1);
    assert!(p.server.unsent >= 4096);
    assert!(
        !p.server.from_client.is_empty(),
        "the rest waits unread (TCP backpressure)"
    );
    p.run_until(start + 9_999);
    assert!(p.server.policy.is_stalled());
    p.run_until(start + 10_000);
    assert_eq!(
        p.server.expired,
        vec![(start + 10_000, Expiry::SlowConsumer)]
    );
    assert!(p.server.policy.is_closing());
    // It reads at last: the GoAway comes after everything it had not read.
    p.client.reading = true;
    p.settle();
    let last = p.client.received.last().expect("frames");
    assert!(matches!(&last.body, Some(Body::GoAway(g))
        if g.reason == pb::GoAwayReason::SlowConsumer as i32));
    assert_eq!(
        p.server.dropped,
        Some((start + 10_000, Dropped::PeerClosed))
    );
    assert!(
        p.pongs() < 2_000,
        "pings behind the stall were never answered"
    );
}

#[test]
fn a_stalled_reader_that_catches_up_resumes_and_stays() {
    let mut p = Pair::established(limits());
    let start = p.now;
    flood_pings_without_reading(&mut p, 2_000);
    assert!(p.server.policy.is_stalled());
    p.run_until(start + 5_000);
    p.client.reading = true;
    p.client.pinging = true;
    p.run_until(start + 30_000);
    assert_eq!(
        p.pongs(),
        2_000 + 1,
        "every flood Ping answered, plus one heartbeat"
    );
    assert_eq!(p.server.policy.phase(), Phase::Open);
    assert!(p.server.expired.is_empty());
    assert_eq!(p.server.dropped, None);
}

#[test]
fn a_backend_frame_that_does_not_fit_closes_a_slow_consumer_but_one_big_frame_may_go_alone() {
    let deliver = |size: usize| {
        frame(
            0,
            Body::Deliver(pb::Deliver {
                message: Some(pb::Message {
                    body: vec![b'x'; size],
                    ..Default::default()
                }),
            }),
        )
    };
    let mut p = Pair::established(limits());
    p.client.reading = false;
    // Larger than the whole limit, but nothing else waits: it goes.
    assert_eq!(
        p.server.on_backend_frame(deliver(10_000), false, p.now),
        BackendStep::Queue
    );
    p.client.reading = true;
    p.settle();

    p.client.reading = false;
    let mut steps = Vec::new();
    for _ in 0..5 {
        steps.push(p.server.on_backend_frame(deliver(1_000), false, p.now));
    }
    assert_eq!(
        steps,
        [
            BackendStep::Queue,
            BackendStep::Queue,
            BackendStep::Queue,
            BackendStep::Queue,
            BackendStep::SlowConsumer
        ]
    );
    assert!(p.server.policy.is_closing());
    // Closing: further frames are stale.
    assert_eq!(
        p.server.on_backend_frame(deliver(10), false, p.now),
        BackendStep::Stale
    );
    p.client.reading = true;
    p.settle();
    assert_eq!(
        p.client.last_go_away().map(|g| g.reason),
        Some(pb::GoAwayReason::SlowConsumer as i32)
    );
}

#[test]
fn closing_lingers_for_unread_output_then_drops_and_discards_input_meanwhile() {
    let mut p = Pair::established(limits());
    p.client.reading = false;
    p.client.pinging = false;
    p.run_for(1_000);
    let closed_at = p.now;
    // A second Hello is a protocol violation: Error, then close.
    p.hello(GOOD_TOKEN);
    p.send_text(1);
    p.settle();
    assert!(p.server.policy.is_closing());
    assert!(
        p.server.forwarded.is_empty(),
        "input after the violation is dropped"
    );
    assert!(!p.server.fin_sent, "the Error has not left yet");
    p.run_until(closed_at + 1_999);
    assert_eq!(p.server.dropped, None);
    p.run_until(closed_at + 10_000);
    assert_eq!(
        p.server.dropped,
        Some((closed_at + 2_000, Dropped::Expired(Expiry::Linger)))
    );
    assert!(p.server.to_client.iter().any(|f| matches!(&f.body,
        Some(Body::Error(e)) if e.code == pb::ErrorCode::ProtocolViolation as u32)));
}

#[test]
fn a_frame_before_hello_is_a_protocol_violation_and_a_bad_token_unauthenticated() {
    let mut p = Pair::new(limits());
    p.send(Body::Ping(pb::Ping { nonce: 1 }));
    p.settle();
    assert_eq!(
        p.client.error_codes(),
        vec![pb::ErrorCode::ProtocolViolation as u32]
    );
    assert_eq!(p.server.dropped, Some((0, Dropped::PeerClosed)));

    let mut p = Pair::new(limits());
    p.hello("forged");
    p.settle();
    assert_eq!(
        p.client.error_codes(),
        vec![pb::ErrorCode::Unauthenticated as u32]
    );
    assert_eq!(p.client.conn.phase(), ClientPhase::Closed);
}

/// What the core's drain does with one connection: GoAway(SHUTDOWN) with
/// the delay, close within `deadline_ms`.
fn drain(p: &mut Pair, reconnect_delay_ms: u32, deadline_ms: u32) -> bool {
    match p.server.policy.begin_drain(|| reconnect_delay_ms) {
        DrainStep::CloseNow => {
            p.server.dropped = Some((p.now, Dropped::Drained));
            false
        }
        DrainStep::Keep => false,
        DrainStep::GoAway(goaway) => {
            p.server.begin_close(p.now, Some(goaway), deadline_ms);
            true
        }
    }
}

#[test]
fn drain_sends_goaway_with_the_delay_and_closes_at_the_deadline() {
    // A client that reads: GoAway, FIN, it closes; nothing more is forwarded.
    let mut p = Pair::established(limits());
    p.run_for(5_000);
    assert!(drain(&mut p, 1_500, 10_000));
    p.send_text(1);
    p.settle();
    let g = p.client.last_go_away().expect("GoAway");
    assert_eq!(
        (g.reason, g.reconnect_delay_ms),
        (pb::GoAwayReason::Shutdown as i32, 1_500)
    );
    assert!(p.server.forwarded.is_empty());
    assert_eq!(p.server.dropped, Some((5_000, Dropped::PeerClosed)));

    // A client that does not read: dropped at the drain deadline.
    let mut p = Pair::established(limits());
    p.client.reading = false;
    p.client.pinging = false;
    assert!(drain(&mut p, 1_000, 10_000));
    assert!(
        !drain(&mut p, 1_000, 10_000),
        "draining twice changes nothing"
    );
    p.run_until(100_000);
    assert_eq!(
        p.server.dropped,
        Some((10_000, Dropped::Expired(Expiry::Linger)))
    );

    // Not authenticated or still in TLS: nothing to tell, closed at once.
    let mut p = Pair::new(limits());
    assert!(!drain(&mut p, 1_000, 10_000));
    assert_eq!(p.server.dropped, Some((0, Dropped::Drained)));
    let mut p = Pair::new(limits());
    p.server.tls_done_at = None;
    p.settle();
    assert!(!drain(&mut p, 1_000, 10_000));
    assert!(p.client.received.is_empty());
}

#[test]
fn the_rules_stay_small() {
    assert_eq!(std::mem::size_of::<ConnPolicy>(), 64);
}

#[test]
fn after_goaway_slow_consumer_an_unread_connection_lingers_then_drops() {
    let mut p = Pair::established(limits());
    let start = p.now;
    flood_pings_without_reading(&mut p, 2_000);
    p.run_until(start + 10_000 + CLOSE_LINGER_MS as u64 - 1);
    assert!(p.server.policy.is_closing());
    assert_eq!(
        p.server.dropped, None,
        "still waiting for the GoAway to leave"
    );
    p.run_until(start + 60_000);
    assert_eq!(
        p.server.dropped,
        Some((
            start + 10_000 + CLOSE_LINGER_MS as u64,
            Dropped::Expired(Expiry::Linger)
        ))
    );
    let last = p.server.to_client.back().expect("unread output");
    assert!(matches!(&last.body, Some(Body::GoAway(g))
        if g.reason == pb::GoAwayReason::SlowConsumer as i32));
}

#[test]
fn a_closing_backend_frame_goes_last_and_the_connection_closes() {
    let mut p = Pair::established(limits());
    let replaced = frame(
        0,
        Body::GoAway(pb::GoAway {
            reason: pb::GoAwayReason::Replaced as i32,
            reconnect_delay_ms: 0,
            message: String::new(),
        }),
    );
    assert_eq!(
        p.server.on_backend_frame(replaced, true, p.now),
        BackendStep::QueueAndClose
    );
    p.send_text(1);
    p.settle();
    assert!(
        p.server.forwarded.is_empty(),
        "nothing read after the close"
    );
    assert_eq!(
        p.client.last_go_away().map(|g| g.reason),
        Some(pb::GoAwayReason::Replaced as i32)
    );
    assert_eq!(p.client.conn.phase(), ClientPhase::Draining);
    assert_eq!(p.server.dropped, Some((0, Dropped::PeerClosed)));
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

#[test]
fn answers_to_pipelined_requests_are_queued_beyond_the_limit_and_events_fit_beside_them() {
    // The honest client of issue 18: reads continuously, pipelines two
    // History requests; each page is most of the limit (4096 here, 256 KiB
    // by default, while a page may be ~1 MiB).
    let mut p = Pair::established(limits());
    let first = p.send(Body::History(pb::History {
        conversation_id: "dm:alice:bob".into(),
        before_seq: 0,
        limit: 50,
    }));
    let second = p.send(Body::History(pb::History {
        conversation_id: "dm:alice:bob".into(),
        before_seq: 50,
        limit: 50,
    }));
    p.settle();
    assert_eq!(p.server.forwarded.len(), 2);
    // Both answers arrive before the client's next read.
    let now = p.now;
    assert_eq!(
        p.server
            .on_backend_frame(history_page(first, 3_000), false, now),
        BackendStep::Queue
    );
    assert_eq!(
        p.server
            .on_backend_frame(history_page(second, 3_000), false, now),
        BackendStep::Queue,
        "an answer never makes a client a slow consumer"
    );
    // Events fit beside them: the answers do not count against the events'
    // share of the limit.
    assert_eq!(
        p.server.on_backend_frame(deliver(3_000), false, now),
        BackendStep::Queue
    );
    assert_eq!(
        p.server.on_backend_frame(deliver(1_500), false, now),
        BackendStep::SlowConsumer,
        "events beyond the limit still close"
    );

    // The same client again, without the flood of events: it reads on and
    // is never closed.
    let mut p = Pair::established(limits());
    for i in 0..8u32 {
        let id = p.send(Body::History(pb::History {
            conversation_id: "dm:alice:bob".into(),
            before_seq: u64::from(i) * 50,
            limit: 50,
        }));
        p.settle();
        let now = p.now;
        assert_eq!(
            p.server
                .on_backend_frame(history_page(id, 3_000), false, now),
            BackendStep::Queue
        );
    }
    p.run_for(60_000);
    assert_eq!(p.server.dropped, None);
    assert!(p.server.expired.is_empty(), "{:?}", p.server.expired);
    assert_eq!(p.client.count(|b| matches!(b, Body::HistoryPage(_))), 8);
}

#[test]
fn a_client_that_stops_reading_is_closed_after_the_timeout_however_little_waits() {
    // Far below the limit: before, only the heartbeat (75 s) would end it,
    // and the kernel meanwhile held whatever its autotuned buffers took.
    let mut p = Pair::established(limits());
    p.client.reading = false;
    let start = p.now;
    assert_eq!(
        p.server.on_backend_frame(deliver(100), false, start),
        BackendStep::Queue
    );
    p.server.output_changed(start);
    assert!(matches!(p.server.policy.phase(), Phase::Behind { .. }));
    p.run_until(start + 9_999);
    assert!(p.server.expired.is_empty());
    p.run_until(start + 10_000);
    assert_eq!(
        p.server.expired,
        vec![(start + 10_000, Expiry::SlowConsumer)]
    );
    // A client that reads what waits is no longer behind.
    let mut p = Pair::established(limits());
    p.client.reading = false;
    let start = p.now;
    p.server.on_backend_frame(deliver(100), false, start);
    p.server.output_changed(start);
    p.run_until(start + 5_000);
    p.client.reading = true;
    p.run_until(start + 60_000);
    assert_eq!(p.server.policy.phase(), Phase::Open);
    assert!(p.server.expired.is_empty());
}

#[test]
fn a_slow_reader_that_keeps_reading_half_the_limit_per_timeout_stays() {
    let mut p = Pair::established(limits());
    p.client.reading = false;
    p.client.pinging = false;
    // 30 pipelined History answers of ~1.5 KB: 45 KB for a 4 KiB limit.
    let mut ids = Vec::new();
    for i in 0..30u32 {
        ids.push(p.send(Body::History(pb::History {
            conversation_id: "dm:alice:bob".into(),
            before_seq: u64::from(i) * 10,
            limit: 10,
        })));
    }
    p.settle();
    let start = p.now;
    for id in ids {
        assert_eq!(
            p.server
                .on_backend_frame(history_page(id, 1_500), false, start),
            BackendStep::Queue
        );
    }
    p.server.output_changed(start);
    p.settle();
    assert!(
        p.server.policy.is_stalled(),
        "{:?}",
        p.server.policy.phase()
    );
    // It reads 3 KB every 5 s: far slower than the server could send, but
    // more than half the limit (2 KiB) per timeout. Above the limit for
    // over a minute, and not closed.
    for step in 1..=12 {
        p.run_until(start + step * 5_000);
        client_reads(&mut p, 3_000);
    }
    assert!(p.server.expired.is_empty(), "{:?}", p.server.expired);
    assert!(p.server.policy.is_open());
    // It stops reading: closed one timeout after its last read.
    let last_read = p.now;
    assert!(p.server.unsent > 0);
    p.run_until(last_read + 60_000);
    assert_eq!(
        p.server.expired.first(),
        Some(&(last_read + 10_000, Expiry::SlowConsumer))
    );
}
