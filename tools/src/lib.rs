//! Library part of the `palaver` CLI: the blocking client ([`client`]) used
//! by `palaver chat` and by the gateway's integration tests, the frame
//! decoder behind `palaver decode`, and [`stack`], which starts real Redis /
//! Redis Cluster / Apache Kafka processes for tests and `palaver cluster`. Dev
//! certificates and tokens come from `palaver_credentials`, the crate the
//! gateway verifies with, so the CLI and the gateway agree.

// The only unsafe code: libc::kill in stack.rs, allowed there.
#![deny(unsafe_code)]

pub mod client;
pub mod decode;
pub mod stack;
