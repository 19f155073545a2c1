//! Palaver routing logic: dedup, membership, per-conversation seq, history,
//! fan-out, receipts, presence, typing and offline sync, written once against
//! small bus/store interfaces so that the embedded engine (in-memory) and the
//! Kafka/Redis tier run the same code — presence included: sessions, gateway
//! leases, watches and the presence fan-out are [`presence`] over the
//! [`store`] traits in both.
//!
//! - [`api`]: the gateway/backend seam (`Backend`, `DeliverySink`, ...).
//! - [`store`]: the state the router keeps, as traits (Redis-shaped).
//! - [`bus`]: requests in, addressed frames and push events out.
//! - [`logic`]: the [`Router`] itself, pure over the store traits.
//! - [`runner`]: the one way every driver runs requests through it, with
//!   one failure policy (a panicking request is answered INTERNAL and never
//!   takes its thread or another request down).
//! - [`memory`]: the in-memory store.
//! - [`disk`]: the durable store of the embedded engine (redb in the data
//!   dir; sessions and presence stay in memory).
//! - [`presence`]: session changes, watches and the presence fan-out, the
//!   one implementation both backends run.
//! - [`embedded`]: [`EmbeddedEngine`], the router behind an in-process
//!   channel, implementing `Backend`: on a worker thread of its own, or
//!   hosted on a gateway core thread's loop (`Backend::take_host`).
//! - [`bridge`]: [`bridge::KafkaRedisBridge`], the other `Backend`: writes
//!   through Kafka to `palaver-router` workers ([`kafka`]), reads and presence
//!   from Redis ([`redis_store`]), deliveries back from this gateway's topic.

// The only unsafe code (denied by the workspace's lint floor): one
// librdkafka call that raises a fatal error for fault tests
// (`kafka::raise_fatal_error`), allowed there.

pub mod api;
pub mod bridge;
pub mod bus;
pub mod disk;
pub mod embedded;
mod group_id;
pub mod kafka;
pub mod logging;
pub mod logic;
pub mod memory;
pub mod presence;
pub mod redis_store;
pub mod runner;
pub mod store;

pub use api::{
    Backend, BackendError, BackendHost, DeliverySink, Inbound, Outbound, Session, SessionAddr,
    TierLimits,
};
pub use bus::{Addressed, Outlet, Output, PushEvent};
pub use embedded::{EmbeddedConfig, EmbeddedEngine, LoggingPushSink, PushFeedback, PushSink};
pub use logic::{Clock, ManualClock, PresenceVisibility, Router, RouterConfig, SystemClock};
pub use memory::MemoryStore;
pub use palaver_protocol::direct_conversation_id;
pub use store::Store;
