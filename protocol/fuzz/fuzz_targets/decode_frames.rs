//! Feeds arbitrary bytes, in arbitrary chunk sizes, to `FrameDecoder`; the
//! property is in `../check.rs` (also replayed by `cargo test`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../check.rs"]
mod check;

fuzz_target!(|data: &[u8]| check::check_decode(data));
