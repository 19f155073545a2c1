//! Palaver's routing core: dedup, membership, per-conversation seq, history,
//! fan-out, receipts, presence, typing and offline sync, written once
//! against small bus/store interfaces, sans-io (no threads, no sockets, no
//! Kafka or Redis client), so that every driver runs the same code: the
//! embedded engine (in-memory or on disk) and the Kafka/Redis tier, both in
//! `palaver-router` (`../router/`), the way quinn drives quinn-proto.
//!
//! - [`api`]: the gateway/backend seam (`Backend`, `DeliverySink`, ...).
//! - [`store`]: the state the router keeps, as traits (Redis-shaped).
//! - [`bus`]: requests in, addressed frames and push events out.
//! - [`logic`]: the [`Router`] itself, pure over the store traits.
//! - [`runner`]: the one way every driver runs requests through it, with
//!   one failure policy (a panicking request is answered INTERNAL and never
//!   takes its thread or another request down).
//! - [`memory`]: the in-memory store.
//! - [`presence`]: session changes, watches and the presence fan-out, the
//!   one implementation both backends run.

pub mod api;
pub mod bus;
mod group_id;
pub mod logic;
pub mod memory;
pub mod presence;
pub mod runner;
pub mod store;

pub use api::{
    Backend, BackendError, BackendHost, DeliverySink, Inbound, Outbound, Session, SessionAddr,
    TierLimits,
};
pub use bus::{Addressed, ChannelPost, Outlet, Output, PushEvent};
pub use logic::{Clock, ManualClock, PresenceVisibility, Router, RouterConfig, SystemClock};
pub use memory::MemoryStore;
pub use palaver_protocol::direct_conversation_id;
pub use store::Store;
