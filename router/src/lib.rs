//! Palaver routing logic: dedup, membership, per-conversation seq, history,
//! fan-out, receipts, presence, typing and offline sync, written once against
//! small bus/store interfaces so that the embedded engine (in-memory) and the
//! Kafka/Redis router tier run the same code.

pub mod api;
pub mod bus;
pub mod store;

pub use api::{Backend, BackendError, DeliverySink, Inbound, Outbound, Session, SessionAddr};
