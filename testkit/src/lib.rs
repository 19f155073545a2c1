//! Real parts on loopback ports, for the tests of every crate: [`stack`]
//! (the `palaver-stack` crate, which `palaver cluster` uses too) starts
//! Redis, Redis Cluster, Apache Kafka (single node or 3 brokers), Apache
//! Cassandra and `palaver-gateway` processes in a work directory and kills
//! them by PID; [`chat`] and [`channels`] are the scenario suites both
//! backends run;
//! [`client`] is a blocking TLS client of the Palaver protocol for tests
//! (apps and `palaver chat` use the SDK in `client/`); [`proc_stat`] reads
//! CPU time for the benchmarks.
//! Never a mock: the tests that use it talk to the real servers.

pub mod channels;
pub mod chat;
pub mod client;
pub mod proc_stat;
pub use palaver_stack as stack;
