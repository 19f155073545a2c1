//! Real parts on loopback ports, for the tests of every crate and for
//! `palaver cluster`: [`stack`] starts Redis, Redis Cluster, Apache Kafka
//! (single node or 3 brokers), `palaver-router` and `palaver-gateway`
//! processes in a work directory and kills them by PID; [`client`] is a
//! blocking TLS client of the Palaver protocol for tests (apps and `palaver
//! chat` use the SDK in `client/`); [`proc_stat`] reads CPU time for the
//! benchmarks.
//! Never a mock: the tests that use it talk to the real servers.

// The only unsafe code: libc::kill in stack.rs, allowed there.

pub mod channels;
pub mod chat;
pub mod client;
pub mod proc_stat;
pub mod stack;
