//! Connection state machines for both ends of a Palaver connection.
//!
//! ```text
//! server:  AwaitingHello ─Hello─► Authenticating ─accept_hello─► Established ─begin_drain─► Draining ─close─► Closed
//! client:  AwaitingWelcome ─Welcome─► Established ─GoAway─► Draining ─close─► Closed
//! ```
//!
//! They decide whether a decoded frame is legal in the current state (and
//! which error code to send when it is not), track transitions and compute
//! timer deadlines. Times are milliseconds on any monotonic clock the caller
//! chooses, passed in; nothing here reads a clock or does I/O. The server side
//! is 16 bytes, so a gateway can keep one per connection.

use crate::pb::{self, frame::Body};
use crate::{
    body_name, closes_connection, error_reply, is_valid_id, limits, unsupported_version_frame,
    BodyKind, SUPPORTED_VERSIONS,
};

/// What to do with a frame that is legal in the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Handle it.
    Process,
    /// Drop it silently: the connection is draining/closed (server), or the
    /// body is unknown to this version (client, forward compatibility).
    Ignore,
    /// Server only: a request pipelined behind a Hello whose token is still
    /// being checked (SPEC §4.2 allows it). Keep it, in order with whatever
    /// follows, and feed it again after [`ServerConn::accept_hello`]; drop it
    /// if the Hello is refused. A caller that decides the Hello before
    /// feeding the next frame (as the gateway does) never sees this.
    Hold,
}

/// A frame that is not legal in the current state. The connection must be
/// closed after sending an `Error` with [`StateError::error_code`].
/// Non-exhaustive: later protocol versions may add reasons.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("frame has no body (or one this server does not know)")]
    EmptyFrame,
    #[error("expected hello as the first frame, got {0}")]
    ExpectedHello(&'static str),
    #[error("hello was already received")]
    DuplicateHello,
    #[error("{0} is sent by servers only")]
    ServerOnly(&'static str),
    #[error("{0} is sent by clients only")]
    ClientOnly(&'static str),
    #[error("expected welcome, got {0}")]
    ExpectedWelcome(&'static str),
    #[error("welcome was already received")]
    DuplicateWelcome,
    #[error("protocol version {0} is not supported")]
    UnsupportedVersion(u32),
    #[error("hello.device_id must be 1..=64 bytes of [A-Za-z0-9_.@-]")]
    InvalidDeviceId,
}

impl StateError {
    /// The protocol error code to send for this failure (`Error.code` is
    /// its `u32`: `u32::from(code)`).
    pub fn error_code(&self) -> pb::ErrorCode {
        match self {
            StateError::EmptyFrame => pb::ErrorCode::MalformedFrame,
            StateError::UnsupportedVersion(_) => pb::ErrorCode::UnsupportedVersion,
            _ => pb::ErrorCode::ProtocolViolation,
        }
    }

    /// The `Error` frame a server sends for this failure, answering the
    /// offending frame's `request_id`. UNSUPPORTED_VERSION names the
    /// supported versions (SPEC §4.1, §16).
    pub fn error_reply(&self, request_id: u32) -> pb::Frame {
        match self {
            StateError::UnsupportedVersion(requested) => {
                unsupported_version_frame(request_id, *requested)
            }
            _ => error_reply(request_id, self.error_code(), self.to_string()),
        }
    }
}

/// A deadline that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// Server: no accepted Hello within the hello timeout.
    Hello,
    /// Client: no Welcome within the welcome timeout.
    Welcome,
    /// Silence from the peer for 2.5× the heartbeat interval.
    Heartbeat,
    /// Server: the drain grace period after GoAway ended.
    Drain,
}

impl Timeout {
    /// The error code to send before closing, if any (a client never sends
    /// Error frames; a drained connection is simply closed).
    pub fn error_code(&self) -> Option<pb::ErrorCode> {
        match self {
            Timeout::Hello => Some(pb::ErrorCode::HelloTimeout),
            Timeout::Heartbeat => Some(pb::ErrorCode::HeartbeatTimeout),
            Timeout::Welcome | Timeout::Drain => None,
        }
    }
}

/// True for bodies a client may send (see [`BodyKind`]).
pub fn sent_by_client(body: &Body) -> bool {
    BodyKind::of(body).sent_by_client()
}

/// True for bodies a server may send (Ping, Pong and Typing go both ways).
pub fn sent_by_server(body: &Body) -> bool {
    BodyKind::of(body).sent_by_server()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerPhase {
    /// Connection accepted; the first frame must be Hello.
    AwaitingHello,
    /// Hello received and valid so far; the caller is checking the token.
    /// Requests the client pipelined behind the Hello get [`Verdict::Hold`]:
    /// they are handled after Welcome, or dropped if the Hello is refused.
    Authenticating,
    /// Welcome sent; requests flow.
    Established,
    /// GoAway sent; inbound frames are ignored while the output drains.
    Draining,
    Closed,
}

/// Server side of one connection.
#[derive(Debug, Clone)]
pub struct ServerConn {
    /// Hello deadline, heartbeat deadline or drain deadline, by phase.
    deadline: u64,
    heartbeat_timeout_ms: u32,
    phase: ServerPhase,
}

impl ServerConn {
    /// A freshly accepted connection at `now`; Hello must arrive (and be
    /// accepted) within `hello_timeout_ms`.
    pub fn new(now: u64, hello_timeout_ms: u32) -> Self {
        ServerConn {
            deadline: now.saturating_add(u64::from(hello_timeout_ms)),
            heartbeat_timeout_ms: 0,
            phase: ServerPhase::AwaitingHello,
        }
    }

    pub fn phase(&self) -> ServerPhase {
        self.phase
    }

    /// Checks a frame received at `now` and records it as activity. A Hello
    /// moves AwaitingHello to Authenticating after checking its version and
    /// device id (the token is the caller's to check). Frames fed while
    /// Authenticating were pipelined behind the Hello (SPEC §4.2) and get
    /// [`Verdict::Hold`]; they are judged (a second Hello is still a
    /// violation) when fed again after `accept_hello`.
    pub fn on_frame(&mut self, frame: &pb::Frame, now: u64) -> Result<Verdict, StateError> {
        match self.phase {
            ServerPhase::Draining | ServerPhase::Closed => return Ok(Verdict::Ignore),
            // Whatever follows a Hello is judged after it, in order.
            ServerPhase::Authenticating => return Ok(Verdict::Hold),
            ServerPhase::AwaitingHello | ServerPhase::Established => {}
        }
        let body = frame.body.as_ref().ok_or(StateError::EmptyFrame)?;
        if !sent_by_client(body) {
            return Err(StateError::ServerOnly(body_name(body)));
        }
        // Only AwaitingHello and Established are left.
        let awaiting_hello = self.phase == ServerPhase::AwaitingHello;
        match body {
            Body::Hello(hello) if awaiting_hello => {
                if !SUPPORTED_VERSIONS.contains(&hello.protocol_version) {
                    return Err(StateError::UnsupportedVersion(hello.protocol_version));
                }
                if !is_valid_id(&hello.device_id) {
                    return Err(StateError::InvalidDeviceId);
                }
                self.phase = ServerPhase::Authenticating;
            }
            other if awaiting_hello => return Err(StateError::ExpectedHello(body_name(other))),
            Body::Hello(_) => return Err(StateError::DuplicateHello),
            _ => self.on_activity(now),
        }
        Ok(Verdict::Process)
    }

    /// The Hello was authenticated and Welcome sent at `now`, announcing
    /// `heartbeat_interval_ms`. Returns false (and changes nothing) unless a
    /// Hello was pending.
    pub fn accept_hello(&mut self, now: u64, heartbeat_interval_ms: u32) -> bool {
        if self.phase != ServerPhase::Authenticating {
            return false;
        }
        let timeout = limits::heartbeat_timeout_ms(heartbeat_interval_ms);
        self.heartbeat_timeout_ms = u32::try_from(timeout).unwrap_or(u32::MAX);
        self.phase = ServerPhase::Established;
        self.on_activity(now);
        true
    }

    /// GoAway was sent at `now`: stop processing input and close once the
    /// output is flushed or `grace_ms` has passed.
    pub fn begin_drain(&mut self, now: u64, grace_ms: u32) {
        if self.phase != ServerPhase::Closed {
            self.phase = ServerPhase::Draining;
            self.deadline = now.saturating_add(u64::from(grace_ms));
        }
    }

    pub fn close(&mut self) {
        self.phase = ServerPhase::Closed;
    }

    /// Any frame from the client at `now` proves it alive. Only moves the
    /// deadline when established (the hello deadline is absolute).
    pub fn on_activity(&mut self, now: u64) {
        if self.phase == ServerPhase::Established {
            self.deadline = now.saturating_add(u64::from(self.heartbeat_timeout_ms));
        }
    }

    /// When the current timer fires (None once closed).
    pub fn deadline(&self) -> Option<u64> {
        (self.phase != ServerPhase::Closed).then_some(self.deadline)
    }

    pub fn is_expired(&self, now: u64) -> bool {
        self.check_timeout(now).is_some()
    }

    /// Which timeout has passed at `now`, if any.
    pub fn check_timeout(&self, now: u64) -> Option<Timeout> {
        if now < self.deadline {
            return None;
        }
        match self.phase {
            ServerPhase::AwaitingHello | ServerPhase::Authenticating => Some(Timeout::Hello),
            ServerPhase::Established => Some(Timeout::Heartbeat),
            ServerPhase::Draining => Some(Timeout::Drain),
            ServerPhase::Closed => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientPhase {
    /// Hello sent; waiting for Welcome.
    AwaitingWelcome,
    Established,
    /// GoAway received; the server will close. Responses still in flight are
    /// processed, no new requests are sent.
    Draining,
    Closed,
}

/// Client side of one connection.
#[derive(Debug, Clone)]
pub struct ClientConn {
    phase: ClientPhase,
    heartbeat_interval_ms: u32,
    /// Welcome deadline, then the time by which the server must have said
    /// something (2.5× interval after the last frame received).
    deadline: u64,
    /// Interval after the last frame sent, when established.
    next_ping_at: u64,
    go_away: Option<pb::GoAway>,
}

impl ClientConn {
    /// Hello was sent at `now`; Welcome must arrive within `welcome_timeout_ms`.
    pub fn new(now: u64, welcome_timeout_ms: u32) -> Self {
        ClientConn {
            phase: ClientPhase::AwaitingWelcome,
            heartbeat_interval_ms: 0,
            deadline: now.saturating_add(u64::from(welcome_timeout_ms)),
            next_ping_at: u64::MAX,
            go_away: None,
        }
    }

    pub fn phase(&self) -> ClientPhase {
        self.phase
    }

    /// The interval from Welcome (0 before).
    pub fn heartbeat_interval_ms(&self) -> u32 {
        self.heartbeat_interval_ms
    }

    /// The GoAway received, if any (reason and reconnect delay).
    pub fn go_away(&self) -> Option<&pb::GoAway> {
        self.go_away.as_ref()
    }

    /// Checks a frame received from the server at `now`.
    ///
    /// Welcome establishes; GoAway starts draining; an Error with a 1xxx code
    /// closes (the frame itself is still `Process` so the app sees the code).
    /// Frames with no known body are ignored: newer servers may send bodies
    /// this version does not know.
    pub fn on_frame(&mut self, frame: &pb::Frame, now: u64) -> Result<Verdict, StateError> {
        if self.phase == ClientPhase::Closed {
            return Ok(Verdict::Ignore);
        }
        let Some(body) = frame.body.as_ref() else {
            self.on_received(now);
            return Ok(Verdict::Ignore);
        };
        if !sent_by_server(body) {
            return Err(StateError::ClientOnly(body_name(body)));
        }
        match (self.phase, body) {
            (_, Body::Error(e)) if closes_connection(e.code) => self.phase = ClientPhase::Closed,
            (_, Body::GoAway(g)) => {
                self.go_away = Some(g.clone());
                self.phase = ClientPhase::Draining;
            }
            (ClientPhase::AwaitingWelcome, Body::Welcome(w)) => {
                self.heartbeat_interval_ms = w.heartbeat_interval_ms;
                self.phase = ClientPhase::Established;
                self.on_sent(now);
                self.on_received(now);
            }
            (ClientPhase::AwaitingWelcome, Body::Error(_)) => {}
            (ClientPhase::AwaitingWelcome, other) => {
                return Err(StateError::ExpectedWelcome(body_name(other)))
            }
            (_, Body::Welcome(_)) => return Err(StateError::DuplicateWelcome),
            _ => self.on_received(now),
        }
        Ok(Verdict::Process)
    }

    /// Whether the client may send `body` now: only client bodies, no second
    /// Hello, nothing but Pong while draining. Requests may be pipelined
    /// behind the Hello before Welcome arrives (SPEC §4.2): the server handles
    /// them after Welcome, or drops them unanswered if the Hello fails.
    pub fn may_send(&self, body: &Body) -> bool {
        if !sent_by_client(body) || matches!(body, Body::Hello(_)) {
            return false;
        }
        match self.phase {
            ClientPhase::AwaitingWelcome | ClientPhase::Established => true,
            ClientPhase::Draining => matches!(body, Body::Pong(_)),
            ClientPhase::Closed => false,
        }
    }

    /// A frame was written at `now`: the next Ping is due one interval later
    /// (any frame counts as activity for the server).
    pub fn on_sent(&mut self, now: u64) {
        if self.phase == ClientPhase::Established {
            self.next_ping_at = now.saturating_add(u64::from(self.heartbeat_interval_ms));
        }
    }

    /// When the next Ping is due (None unless established).
    pub fn next_ping_at(&self) -> Option<u64> {
        (self.phase == ClientPhase::Established).then_some(self.next_ping_at)
    }

    pub fn ping_due(&self, now: u64) -> bool {
        self.next_ping_at().is_some_and(|t| now >= t)
    }

    /// When the server is considered gone (Welcome deadline before Welcome).
    pub fn deadline(&self) -> Option<u64> {
        (self.phase != ClientPhase::Closed).then_some(self.deadline)
    }

    /// The earliest time the caller must wake up: next Ping or deadline.
    pub fn next_wakeup(&self) -> Option<u64> {
        match (self.next_ping_at(), self.deadline()) {
            (Some(p), Some(d)) => Some(p.min(d)),
            (p, d) => p.or(d),
        }
    }

    pub fn is_expired(&self, now: u64) -> bool {
        self.check_timeout(now).is_some()
    }

    pub fn check_timeout(&self, now: u64) -> Option<Timeout> {
        if now < self.deadline {
            return None;
        }
        match self.phase {
            ClientPhase::AwaitingWelcome => Some(Timeout::Welcome),
            ClientPhase::Established | ClientPhase::Draining => Some(Timeout::Heartbeat),
            ClientPhase::Closed => None,
        }
    }

    pub fn close(&mut self) {
        self.phase = ClientPhase::Closed;
    }

    fn on_received(&mut self, now: u64) {
        if matches!(self.phase, ClientPhase::Established | ClientPhase::Draining) {
            let silence = limits::heartbeat_timeout_ms(self.heartbeat_interval_ms);
            self.deadline = now.saturating_add(silence);
        }
    }
}

/// Delay before reconnect attempt `attempt` (0-based): exponential backoff
/// from 500 ms capped at 60 s with full jitter, and never less than
/// `floor_ms` (a GoAway's `reconnect_delay_ms`). `random` is any uniformly
/// random number the caller supplies (sans-io: no RNG here).
pub fn reconnect_delay_ms(attempt: u32, floor_ms: u32, random: u64) -> u64 {
    const BASE_MS: u64 = 500;
    const CAP_MS: u64 = 60_000;
    let ceiling = BASE_MS.saturating_mul(1u64 << attempt.min(16)).min(CAP_MS);
    u64::from(floor_ms) + random % (ceiling + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{error_reply, frame};

    fn hello(version: u32, device: &str) -> pb::Frame {
        frame(
            1,
            Body::Hello(pb::Hello {
                protocol_version: version,
                token: "t".into(),
                device_id: device.into(),
                ..Default::default()
            }),
        )
    }

    fn welcome(interval: u32) -> pb::Frame {
        frame(
            1,
            Body::Welcome(pb::Welcome {
                protocol_version: 1,
                heartbeat_interval_ms: interval,
                ..Default::default()
            }),
        )
    }

    fn ping() -> pb::Frame {
        frame(2, Body::Ping(pb::Ping { nonce: 1 }))
    }

    fn send() -> pb::Frame {
        frame(
            3,
            Body::Send(pb::Send {
                conversation_id: "dm:a:b".into(),
                client_msg_id: vec![0; 16],
                ..Default::default()
            }),
        )
    }

    fn established_server(now: u64) -> ServerConn {
        let mut s = ServerConn::new(now, 10_000);
        assert_eq!(s.on_frame(&hello(1, "phone"), now), Ok(Verdict::Process));
        assert!(s.accept_hello(now, 30_000));
        s
    }

    #[test]
    fn server_handshake_happy_path() {
        let mut s = ServerConn::new(1000, 10_000);
        assert_eq!(s.phase(), ServerPhase::AwaitingHello);
        assert_eq!(s.deadline(), Some(11_000));
        assert_eq!(s.on_frame(&hello(1, "phone-1"), 2000), Ok(Verdict::Process));
        assert_eq!(s.phase(), ServerPhase::Authenticating);
        assert!(s.accept_hello(2500, 30_000));
        assert_eq!(s.phase(), ServerPhase::Established);
        assert_eq!(s.deadline(), Some(2500 + 75_000));
        assert_eq!(s.on_frame(&send(), 3000), Ok(Verdict::Process));
        assert!(!s.accept_hello(3000, 1), "accept only once");
    }

    #[test]
    fn server_rejects_frames_before_hello() {
        let mut s = ServerConn::new(0, 10_000);
        let err = s.on_frame(&send(), 1).unwrap_err();
        assert_eq!(err, StateError::ExpectedHello("send"));
        assert_eq!(u32::from(err.error_code()), 1005);
        assert_eq!(
            s.on_frame(&ping(), 1),
            Err(StateError::ExpectedHello("ping"))
        );
    }

    #[test]
    fn server_rejects_second_hello_and_holds_requests_pipelined_behind_hello() {
        let mut s = ServerConn::new(0, 10_000);
        s.on_frame(&hello(1, "d"), 1).unwrap();
        // SPEC §4.2: frames may follow Hello before Welcome; they wait for
        // the Hello's outcome and are then judged in order.
        assert_eq!(s.on_frame(&send(), 2), Ok(Verdict::Hold));
        assert_eq!(s.on_frame(&ping(), 2), Ok(Verdict::Hold));
        assert_eq!(s.on_frame(&hello(1, "d"), 2), Ok(Verdict::Hold));
        assert_eq!(s.phase(), ServerPhase::Authenticating);
        assert!(s.accept_hello(3, 30_000));
        assert_eq!(s.on_frame(&send(), 3), Ok(Verdict::Process));
        assert_eq!(s.on_frame(&ping(), 3), Ok(Verdict::Process));
        assert_eq!(
            s.on_frame(&hello(1, "d"), 3),
            Err(StateError::DuplicateHello)
        );
        let mut s = established_server(0);
        let err = s.on_frame(&hello(1, "d"), 5).unwrap_err();
        assert_eq!(u32::from(err.error_code()), 1005);
    }

    #[test]
    fn server_rejects_server_only_frames_and_empty_frames() {
        let mut s = established_server(0);
        let err = s.on_frame(&welcome(1), 1).unwrap_err();
        assert_eq!(err, StateError::ServerOnly("welcome"));
        assert_eq!(u32::from(err.error_code()), 1005);
        let err = s
            .on_frame(&error_reply(0, pb::ErrorCode::Internal, "x"), 1)
            .unwrap_err();
        assert_eq!(err, StateError::ServerOnly("error"));
        let err = s.on_frame(&pb::Frame::default(), 1).unwrap_err();
        assert_eq!(err, StateError::EmptyFrame);
        assert_eq!(u32::from(err.error_code()), 1000);
        // Also before Hello.
        let mut s = ServerConn::new(0, 10);
        assert_eq!(
            s.on_frame(&pb::Frame::default(), 1),
            Err(StateError::EmptyFrame)
        );
    }

    #[test]
    fn server_checks_hello_version_and_device() {
        let mut s = ServerConn::new(0, 10_000);
        let err = s.on_frame(&hello(2, "d"), 1).unwrap_err();
        assert_eq!(err, StateError::UnsupportedVersion(2));
        assert_eq!(u32::from(err.error_code()), 1002);
        // The Error names the supported versions (SPEC §4.1, §16).
        let f = err.error_reply(1);
        assert_eq!(f.request_id, 1);
        match f.body {
            Some(Body::Error(e)) => {
                assert_eq!(e.code, 1002);
                assert_eq!(
                    e.message,
                    "protocol version 2 is not supported; supported: 1"
                );
            }
            other => panic!("{other:?}"),
        }
        let mut s = ServerConn::new(0, 10_000);
        assert_eq!(
            s.on_frame(&hello(1, "bad device"), 1),
            Err(StateError::InvalidDeviceId)
        );
        assert_eq!(s.phase(), ServerPhase::AwaitingHello);
    }

    #[test]
    fn server_hello_timeout_is_absolute() {
        let mut s = ServerConn::new(0, 10_000);
        assert_eq!(s.check_timeout(9_999), None);
        s.on_frame(&hello(1, "d"), 5_000).unwrap();
        // Authenticating does not extend the deadline.
        assert_eq!(s.check_timeout(10_000), Some(Timeout::Hello));
        assert_eq!(Timeout::Hello.error_code().map(u32::from), Some(1006));
    }

    #[test]
    fn server_heartbeat_timeout_is_two_and_a_half_intervals_of_silence() {
        let mut s = established_server(0);
        assert!(!s.is_expired(74_999));
        assert_eq!(s.check_timeout(75_000), Some(Timeout::Heartbeat));
        // Any frame counts as activity.
        s.on_frame(&send(), 50_000).unwrap();
        assert!(!s.is_expired(124_999));
        assert!(s.is_expired(125_000));
        s.on_activity(120_000);
        assert_eq!(s.deadline(), Some(195_000));
        assert_eq!(Timeout::Heartbeat.error_code().map(u32::from), Some(1007));
    }

    #[test]
    fn server_drain_ignores_input_and_has_a_grace_deadline() {
        let mut s = established_server(0);
        s.begin_drain(1_000, 5_000);
        assert_eq!(s.phase(), ServerPhase::Draining);
        assert_eq!(s.on_frame(&send(), 2_000), Ok(Verdict::Ignore));
        assert_eq!(
            s.on_frame(&pb::Frame::default(), 2_000),
            Ok(Verdict::Ignore)
        );
        assert_eq!(s.check_timeout(5_999), None);
        assert_eq!(s.check_timeout(6_000), Some(Timeout::Drain));
        assert_eq!(Timeout::Drain.error_code(), None);
        s.close();
        assert_eq!(s.phase(), ServerPhase::Closed);
        assert_eq!(s.deadline(), None);
        assert!(!s.is_expired(u64::MAX));
        assert_eq!(s.on_frame(&send(), 7_000), Ok(Verdict::Ignore));
        s.begin_drain(8_000, 1);
        assert_eq!(s.phase(), ServerPhase::Closed, "closed is final");
    }

    #[test]
    fn server_state_is_small() {
        assert!(std::mem::size_of::<ServerConn>() <= 16);
    }

    #[test]
    fn directions() {
        assert!(sent_by_client(&Body::Send(Default::default())));
        assert!(!sent_by_server(&Body::Send(Default::default())));
        assert!(sent_by_server(&Body::Deliver(Default::default())));
        assert!(!sent_by_client(&Body::Deliver(Default::default())));
        for both in [
            Body::Ping(Default::default()),
            Body::Pong(Default::default()),
            Body::Typing(Default::default()),
        ] {
            assert!(sent_by_client(&both) && sent_by_server(&both));
        }
    }

    #[test]
    fn client_handshake_and_ping_schedule() {
        let mut c = ClientConn::new(0, 10_000);
        assert_eq!(c.phase(), ClientPhase::AwaitingWelcome);
        // Requests may be pipelined behind Hello (SPEC §4.2); Hello may not.
        assert!(c.may_send(&send().body.unwrap()));
        assert!(!c.may_send(&hello(1, "d").body.unwrap()));
        assert_eq!(c.next_ping_at(), None);
        assert_eq!(c.on_frame(&welcome(30_000), 100), Ok(Verdict::Process));
        assert_eq!(c.phase(), ClientPhase::Established);
        assert_eq!(c.heartbeat_interval_ms(), 30_000);
        assert_eq!(c.next_ping_at(), Some(30_100));
        assert!(!c.ping_due(30_099));
        assert!(c.ping_due(30_100));
        // Sending anything pushes the Ping back.
        c.on_sent(20_000);
        assert_eq!(c.next_ping_at(), Some(50_000));
        assert!(c.may_send(&send().body.unwrap()));
        assert!(!c.may_send(&hello(1, "d").body.unwrap()));
        assert!(!c.may_send(&welcome(1).body.unwrap()));
        // Server silence deadline: 2.5× interval after the last frame received.
        assert_eq!(c.deadline(), Some(100 + 75_000));
        assert_eq!(c.next_wakeup(), Some(50_000));
        c.on_frame(&frame(2, Body::Pong(pb::Pong { nonce: 1 })), 60_000)
            .unwrap();
        assert_eq!(c.deadline(), Some(135_000));
        assert_eq!(c.check_timeout(135_000), Some(Timeout::Heartbeat));
    }

    #[test]
    fn client_welcome_timeout() {
        let c = ClientConn::new(0, 10_000);
        assert_eq!(c.check_timeout(9_999), None);
        assert_eq!(c.check_timeout(10_000), Some(Timeout::Welcome));
        assert_eq!(Timeout::Welcome.error_code(), None);
    }

    #[test]
    fn client_rejects_out_of_state_and_client_only_frames() {
        let mut c = ClientConn::new(0, 10_000);
        let err = c
            .on_frame(&frame(0, Body::Deliver(pb::Deliver::default())), 1)
            .unwrap_err();
        assert_eq!(err, StateError::ExpectedWelcome("deliver"));
        let mut c = ClientConn::new(0, 10_000);
        c.on_frame(&welcome(1000), 1).unwrap();
        assert_eq!(
            c.on_frame(&welcome(1000), 2),
            Err(StateError::DuplicateWelcome)
        );
        assert_eq!(c.on_frame(&send(), 2), Err(StateError::ClientOnly("send")));
    }

    #[test]
    fn client_ignores_unknown_bodies() {
        let mut c = ClientConn::new(0, 10_000);
        c.on_frame(&welcome(1000), 0).unwrap();
        assert_eq!(c.on_frame(&pb::Frame::default(), 5), Ok(Verdict::Ignore));
        assert_eq!(c.phase(), ClientPhase::Established);
        // Still counts as the server being alive.
        assert_eq!(c.deadline(), Some(5 + 2_500));
    }

    #[test]
    fn client_closing_error_and_go_away() {
        let mut c = ClientConn::new(0, 10_000);
        let auth = error_reply(1, pb::ErrorCode::Unauthenticated, "bad token");
        assert_eq!(c.on_frame(&auth, 1), Ok(Verdict::Process));
        assert_eq!(c.phase(), ClientPhase::Closed);
        assert_eq!(c.deadline(), None);

        let mut c = ClientConn::new(0, 10_000);
        c.on_frame(&welcome(1000), 0).unwrap();
        let rate = error_reply(3, pb::ErrorCode::RateLimited, "slow");
        c.on_frame(&rate, 1).unwrap();
        assert_eq!(c.phase(), ClientPhase::Established, "2xxx does not close");
        let go = frame(
            0,
            Body::GoAway(pb::GoAway {
                reason: pb::GoAwayReason::Replaced.into(),
                reconnect_delay_ms: 250,
                message: String::new(),
            }),
        );
        assert_eq!(c.on_frame(&go, 2), Ok(Verdict::Process));
        assert_eq!(c.phase(), ClientPhase::Draining);
        assert_eq!(c.go_away().unwrap().reconnect_delay_ms, 250);
        assert_eq!(c.next_ping_at(), None);
        assert!(!c.may_send(&send().body.unwrap()));
        assert!(c.may_send(&Body::Pong(pb::Pong { nonce: 1 })));
        // In-flight responses are still processed while draining.
        let ack = frame(3, Body::SendAck(Default::default()));
        assert_eq!(c.on_frame(&ack, 3), Ok(Verdict::Process));
        c.close();
        assert_eq!(c.on_frame(&ack, 4), Ok(Verdict::Ignore));
    }

    #[test]
    fn reconnect_delay_bounds() {
        assert_eq!(reconnect_delay_ms(0, 0, 0), 0);
        assert_eq!(reconnect_delay_ms(0, 0, 500), 500);
        assert_eq!(reconnect_delay_ms(0, 0, 501), 0);
        assert_eq!(reconnect_delay_ms(3, 1000, 4000), 5000);
        assert!(reconnect_delay_ms(40, 0, u64::MAX) <= 60_000);
        assert!(reconnect_delay_ms(40, 250, u64::MAX) >= 250);
    }
}
