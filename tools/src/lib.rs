//! Library part of the `palaver` CLI: the frame decoder behind `palaver
//! decode` and the `palaver cluster` supervisor (its tests call it
//! directly). The processes it supervises are started by `palaver-stack`,
//! the crate the other crates' tests start them with; dev certificates and
//! tokens come from `palaver_credentials`, the crate the gateway verifies
//! with.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod decode;
