//! The id of the group a `CreateConversation` request makes.
//!
//! It is a digest of the request's identity (connection, request id, gateway
//! receive time, user), so that a replay of the same request after a router
//! crash names the same group instead of creating a second one. Ids are
//! persisted and a replay may be handled by a different build, so the digest
//! is specified here rather than left to `std`'s hasher (whose algorithm std
//! does not promise to keep across releases):
//!
//! ```text
//! id    = "grp:" || hex(SHA-256(input)[0..16])          (32 lowercase hex digits)
//! input = str("palaver group id v1")
//!      || str(user_id) || str(device_id) || str(gateway_id)
//!      || u64(conn) || u32(request_id) || i64(received_ms)
//! str(s) = u64(byte length of s) || bytes of s;   integers big-endian
//! ```

use sha2::{Digest, Sha256};

use crate::api::Inbound;

/// Derives a group id from the request that creates it (see the module doc).
pub(crate) fn group_id_for(req: &Inbound) -> String {
    conversation_id_for(req, palaver_protocol::GROUP_PREFIX, "palaver group id v1")
}

/// Derives a channel id (SPEC §21) the same way, with `chn:` and the label
/// `palaver channel id v1`.
pub(crate) fn channel_id_for(req: &Inbound) -> String {
    conversation_id_for(
        req,
        palaver_protocol::CHANNEL_PREFIX,
        "palaver channel id v1",
    )
}

fn conversation_id_for(req: &Inbound, prefix: &str, label: &str) -> String {
    fn put_str(h: &mut Sha256, s: &str) {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    }
    let mut h = Sha256::new();
    put_str(&mut h, label);
    put_str(&mut h, &req.from.user_id);
    put_str(&mut h, &req.from.device_id);
    put_str(&mut h, &req.from.addr.gateway_id);
    h.update(req.from.addr.conn.to_be_bytes());
    h.update(req.request_id.to_be_bytes());
    h.update(req.received_ms.to_be_bytes());
    let digest = h.finalize();
    let mut id = String::with_capacity(prefix.len() + 32);
    id.push_str(prefix);
    for byte in &digest[..16] {
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Session, SessionAddr};
    use palaver_protocol::pb;

    fn create_request(
        user: &str,
        device: &str,
        gateway: &str,
        conn: u64,
        request_id: u32,
    ) -> Inbound {
        Inbound {
            from: Session {
                user_id: user.into(),
                device_id: device.into(),
                addr: SessionAddr {
                    gateway_id: gateway.into(),
                    conn,
                },
            },
            request_id,
            body: pb::frame::Body::CreateConversation(Default::default()),
            received_ms: 1_764_000_000_000,
        }
    }

    /// Pins the derivation: a change to it would give a replayed request a
    /// new id (a second group). The expected value was computed outside
    /// Rust (Python's hashlib over the byte string documented above).
    #[test]
    fn known_vector() {
        let req = create_request("alice", "phone", "gw1", 7, 42);
        assert_eq!(group_id_for(&req), "grp:cd71d6b1ceeb6222cb008ab762e85b18");
    }

    #[test]
    fn every_field_counts_and_fields_do_not_run_together() {
        let base = group_id_for(&create_request("alice", "phone", "gw1", 7, 42));
        assert!(palaver_protocol::is_group_id(&base), "{base}");
        for other in [
            create_request("alicf", "phone", "gw1", 7, 42),
            create_request("alice", "phonf", "gw1", 7, 42),
            create_request("alice", "phone", "gw2", 7, 42),
            create_request("alice", "phone", "gw1", 8, 42),
            create_request("alice", "phone", "gw1", 7, 43),
            // Same concatenated bytes, different split between fields.
            create_request("alicep", "hone", "gw1", 7, 42),
        ] {
            assert_ne!(group_id_for(&other), base, "{other:?}");
        }
        let mut later = create_request("alice", "phone", "gw1", 7, 42);
        later.received_ms += 1;
        assert_ne!(group_id_for(&later), base);
    }
}
