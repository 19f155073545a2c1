//! Library part of the `palaver` CLI: the blocking client ([`client`]) used
//! by `palaver chat` and by the gateway's integration tests, and the frame
//! decoder behind `palaver decode`. Dev certificates and tokens come from
//! `palaver_gateway::{devcerts, auth}`, so the CLI and the gateway agree.

pub mod client;
pub mod decode;
