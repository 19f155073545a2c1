//! Palaver gateway: the process phones connect to.
//!
//! Owns the sockets and everything that must not leave the core thread
//! holding them: TLS (rustls, unbuffered API, caller-owned buffers), the frame
//! codec from `palaver_protocol`, authentication of `Hello`, heartbeats,
//! timeouts, limits and backpressure, graceful drain, metrics. Everything else
//! goes to a [`palaver_router::api::Backend`] (which one, it does not know).
//!
//! Threading: N core threads, each with its own `mio::Poll` and SO_REUSEPORT
//! listener ([`core`]); backend answers come back through [`sink`]; an admin
//! HTTP thread ([`admin`]); the binary's main thread waits for signals.
//!
//! Each connection's rules (phase, timeouts, budgets, backpressure, drain)
//! are a sans-io unit fed events and the time ([`session`]) that acts
//! through the effects it is handed; the core loop moves bytes and carries
//! them out. What one user's connections share
//! across cores (their count and budget) is in [`accounts`].

// The only unsafe code: raising RLIMIT_NOFILE (config.rs) and reading a
// socket's unsent bytes (TIOCOUTQ, core/output.rs), allowed there.

pub mod accounts;
pub mod admin;
pub mod config;
pub mod core;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod session;
pub mod sink;
pub mod timer;
pub mod tls;
pub mod tls_io;

/// Credentials live in `palaver-credentials`; re-exported under their old
/// paths (`palaver_gateway::auth`, `palaver_gateway::devcerts`) so code that
/// names them there keeps compiling.
pub use palaver_credentials::{auth, devcerts};

pub use config::Config;
pub use server::{build_backend, build_backend_with_push, try_build_backend, GatewayHandle};
