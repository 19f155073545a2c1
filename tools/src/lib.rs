//! Library part of the `palaver` CLI: the frame decoder behind `palaver
//! decode`. The blocking client and the process stack (`palaver chat`,
//! `palaver cluster`) live in `palaver-testkit`, re-exported here under
//! their old paths; dev certificates and tokens come from
//! `palaver_credentials`, the crate the gateway verifies with.

#![forbid(unsafe_code)]

pub mod decode;
pub use palaver_testkit::{client, stack};
