//! The seam between a gateway and the chat backend.
//!
//! A gateway authenticates connections and handles heartbeats itself; every
//! other request goes to a [`Backend`]: the embedded engine (in-process bus and
//! store) or the Kafka/Redis bridge. Whatever the backend has to say to a
//! connection (responses, deliveries, events) comes back through the gateway's
//! [`DeliverySink`], addressed by the gateway-local connection key.

use std::sync::Arc;

use palaver_protocol::bodies;
use palaver_protocol::pb;

/// Where one session's connection lives: which gateway, and that gateway's
/// opaque key for the connection (the gateway encodes core, slot and
/// generation in it; nobody else interprets it).
///
/// The gateway id is shared (`Arc<str>`): every frame the router addresses
/// carries one, and a gateway's connections all have the same, so copying
/// an address must not copy the string.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionAddr {
    pub gateway_id: Arc<str>,
    pub conn: u64,
}

/// An authenticated device connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Session {
    pub user_id: String,
    pub device_id: String,
    pub addr: SessionAddr,
}

/// A client request, with the identity the gateway authenticated. The sender
/// of anything is `from.user_id`, never a field the client wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct Inbound {
    pub from: Session,
    pub request_id: u32,
    pub body: pb::frame::Body,
    /// Gateway receive time, Unix epoch milliseconds.
    pub received_ms: i64,
}

impl Inbound {
    /// The key that orders this request on a partitioned bus: the
    /// conversation id for requests about one conversation (Send, Receipt,
    /// Typing, History, ChangeMembers: [`bodies::conversation_of`]),
    /// otherwise the user id of the session. Requests with equal keys must be
    /// processed in bus order.
    pub fn partition_key(&self) -> &str {
        bodies::conversation_of(&self.body).unwrap_or(&self.from.user_id)
    }
}

/// One frame for one connection of the gateway that receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct Outbound {
    pub conn: u64,
    pub frame: pb::Frame,
    /// The frame answers a request of this connection (its response or its
    /// Error), so the gateway frees one in-flight slot. Said by the router,
    /// which knows: a response to a request sent with request_id 0 looks
    /// like an event (SPEC §3), so the frame alone cannot tell.
    pub answers_request: bool,
}

impl Outbound {
    /// True when the gateway must close the connection after writing this
    /// frame (a `GoAway`, or an `Error` with a 1xxx code).
    pub fn closes_connection(&self) -> bool {
        match &self.frame.body {
            Some(pb::frame::Body::GoAway(_)) => true,
            Some(pb::frame::Body::Error(e)) => (1000..2000).contains(&e.code),
            _ => false,
        }
    }
}

/// Implemented by the gateway: hand frames to the core threads that own the
/// connections. Called from backend threads; must not block for long.
pub trait DeliverySink: Send + Sync + 'static {
    fn deliver(&self, batch: Vec<Outbound>);

    /// Channel posts for this gateway's connections that have the channel
    /// open (every gateway gets every post, SPEC §21); shared, so a gateway
    /// hands one copy to all its core threads.
    fn deliver_channel(&self, posts: Vec<Arc<crate::bus::ChannelPost>>);

    /// The backend lost this gateway's sessions: the gateway was taken for
    /// dead (its lease ran out while it stalled) and another gateway reaped
    /// it. The gateway calls [`Backend::session_reopened`] for every session
    /// it has open, so they are delivered to again.
    fn reopen_sessions(&self);
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("backend configuration: {0}")]
    Config(String),
}

/// The limits the router tier enforces that clients are told in
/// `Welcome.limits`: a gateway announces these, whatever its own file says
/// ([`Backend::enforced_limits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierLimits {
    pub max_group_members: u32,
    pub max_body_bytes: u32,
    pub max_batch: u32,
    /// 0 when the routers predate channels (SPEC §21): then no gateway
    /// announces channels.
    pub max_channel_members: u32,
}

impl TierLimits {
    /// The limits a router with `config` enforces.
    pub fn of(config: &crate::logic::RouterConfig) -> Self {
        let clamp = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        TierLimits {
            max_group_members: clamp(config.max_group_members),
            max_body_bytes: clamp(config.max_body_bytes),
            max_batch: clamp(config.max_batch),
            max_channel_members: clamp(config.max_channel_members),
        }
    }
}

/// What a gateway needs from the chat backend.
pub trait Backend: Send + Sync + 'static {
    /// Attach this gateway; frames for its connections go to `sink` from now on.
    fn start(&self, gateway_id: &str, sink: Arc<dyn DeliverySink>) -> Result<(), BackendError>;
    /// A connection completed Hello. The backend registers the session for
    /// delivery and presence, and sends `GoAway(REPLACED)` to an older
    /// connection of the same user and device, wherever it is.
    fn session_opened(&self, session: &Session);
    /// A session opened again after [`DeliverySink::reopen_sessions`]: as
    /// `session_opened`, except that if its (user, device) is registered at
    /// another address meanwhile, that newer connection stays and this one
    /// gets `GoAway(REPLACED)`. A backend that never asks for it need not
    /// tell the two apart.
    fn session_reopened(&self, session: &Session) {
        self.session_opened(session)
    }
    /// A registered connection closed (for any reason) at `at_ms`.
    fn session_closed(&self, session: &Session, at_ms: i64);
    /// A request from a connection. Never blocks on I/O: the answer (or an
    /// `Error` frame echoing `request_id`) arrives through the sink.
    fn submit(&self, request: Inbound);
    /// Several requests at once, in the order given (a gateway core thread
    /// hands over what one loop turn read). The same contract as
    /// [`Backend::submit`] for each; a backend may hand them on in one step
    /// (the embedded engine: one channel send and one wake-up per batch).
    fn submit_batch(&self, requests: Vec<Inbound>) {
        for request in requests {
            self.submit(request);
        }
    }
    /// Flush what is pending and stop; called once at gateway shutdown.
    fn shutdown(&self);
    /// Hands the backend's work loop to a gateway core thread, for a backend
    /// that can run on the gateway's event loop instead of a thread of its
    /// own (the embedded engine built with `EmbeddedEngine::hosted`): then a
    /// request and its answers cross no thread when sender and recipients
    /// live on the hosting core. Returns the loop once, to the first
    /// gateway that asks (`None` after that, and by default: the backend
    /// runs itself). `wake` must make the host call
    /// [`BackendHost::run_turn`] soon; the backend calls it, from any
    /// thread, when work arrives that the host has not seen.
    fn take_host(&self, wake: Arc<dyn Fn() + Send + Sync>) -> Option<Box<dyn BackendHost>> {
        let _ = wake;
        None
    }
    /// The limits the routing tier enforces, when they are another's than
    /// the gateway's own (the Kafka/Redis tier publishes them in Redis):
    /// the gateway announces these in Welcome. `None`: the gateway's own
    /// limits are the ones enforced (the embedded engine is built from
    /// them), or the tier has not published any yet.
    fn enforced_limits(&self) -> Option<TierLimits> {
        None
    }
}

/// A backend's work loop, run by the gateway core thread that took it
/// ([`Backend::take_host`]). The host calls `run_turn` once per loop turn,
/// after handing over the turn's requests, and whenever `wake` was called;
/// the backend's answers go out through the sinks as usual (a sink called on
/// the hosting core's own thread hands frames to that core without a wake).
/// Dropping the host (its core thread exits) hands the work back: the
/// embedded engine goes on on a thread of its own, for the other gateways
/// attached to it, until `Backend::shutdown`.
pub trait BackendHost: Send {
    /// Handles queued work, a bounded amount (so the host's connections are
    /// not starved), and hands its output to the sinks. Returns true when
    /// work is left: call again without waiting for I/O.
    fn run_turn(&mut self) -> bool;
}
