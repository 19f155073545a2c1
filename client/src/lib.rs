//! `palaver-client`: the Palaver client SDK for apps. One I/O thread owns
//! the TLS socket; a sans-io `engine` decides everything else: Hello with
//! a token from the app's provider, heartbeats, reconnect with jittered
//! backoff (honouring GoAway), an outbox resent with the same client_msg_id
//! until SendAck, Sync after every connect and on seq gaps, receipts,
//! throttled typing, presence restored after reconnects, history and group
//! requests. The same API reaches Kotlin and Swift through UniFFI.
//! States and guarantees: `SDK-SPEC.md`.

// UniFFI's generated scaffolding is `extern "C"` code with unsafe blocks;
// everything written by hand in this crate is safe.

uniffi::setup_scaffolding!();

pub mod config;
mod cursors;
mod engine;
pub mod error;
mod ffi;
mod io;
pub mod log;
mod outbox;
pub mod types;

pub use config::ClientConfig;
pub use error::{ClientError, ErrorCode, ServerError};
pub use ffi::{
    direct_conversation_id, memory_store, ClientStore, EventListener, ListenerError, PalaverClient,
    TokenError, TokenProvider,
};
pub use log::{clear_log_sink, set_log_sink, LogLevel, LogSink};

/// The README's Rust snippet, compiled as a doc test so it cannot go stale.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeSnippets;
pub use types::*;
