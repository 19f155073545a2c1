//! Palaver wire protocol (sans-io): the protobuf schema, the length-delimited
//! frame codec, protocol limits and the connection state machines for both
//! ends. No sockets, no threads, no clock reads: callers pass bytes and times in.

/// Generated protobuf types for `palaver.v1`.
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/palaver.v1.rs"));
}

/// Protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u32 = 1;
/// TLS ALPN identifier for protocol version 1.
pub const ALPN: &[u8] = b"palaver/1";
