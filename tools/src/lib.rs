//! Library half of the `palaver` CLI: what tests and the CLI share.
//! `stack` starts real Redis / Redis Cluster / Tansu processes.

pub mod stack;
