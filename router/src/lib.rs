//! Palaver's drivers of the routing core (`palaver-router-core`,
//! `../router-core/`, re-exported here so that users name one crate): the
//! two `Backend`s a gateway runs and the router tier's workers.
//!
//! - [`embedded`]: [`EmbeddedEngine`], the router behind an in-process
//!   channel, implementing `Backend`: on a worker thread of its own, or
//!   hosted on a gateway core thread's loop (`Backend::take_host`).
//! - [`disk`]: the durable store of the embedded engine (redb in the data
//!   dir; sessions and presence stay in memory).
//! - [`bridge`]: [`bridge::KafkaRedisBridge`], the other `Backend`: writes
//!   through Kafka to `palaver-router` workers ([`kafka`]), reads and presence
//!   from Redis ([`redis_store`]), deliveries back from this gateway's topic.
//! - [`kafka`]: the at-least-once consumer loop and its workers (the router
//!   worker, the archiver), topics and record encodings.
//! - [`redis_store`]: the store traits on Redis or Redis Cluster.

// The only unsafe code (denied by the workspace's lint floor): one
// librdkafka call that raises a fatal error for fault tests
// (`kafka::raise_fatal_error`), allowed there.

pub mod bridge;
pub mod disk;
pub mod embedded;
pub mod kafka;
pub mod logging;
pub mod redis_store;

// The core's modules under their old paths: `palaver_router::store`,
// `crate::logic` and so on name the one implementation in the core.
pub use palaver_router_core::{api, bus, logic, memory, presence, runner, store};
pub use palaver_router_core::{
    direct_conversation_id, Addressed, Backend, BackendError, BackendHost, ChannelPost, Clock,
    DeliverySink, Inbound, ManualClock, MemoryStore, Outbound, Outlet, Output, PresenceVisibility,
    PushEvent, Router, RouterConfig, Session, SessionAddr, Store, SystemClock, TierLimits,
};

pub use embedded::{EmbeddedConfig, EmbeddedEngine, LoggingPushSink, PushFeedback, PushSink};
