//! What an open session's connection keeps of its identity.
//!
//! The backend takes a [`Session`]: three `String`s (user, device, gateway
//! id) and the connection key. Kept boxed per connection that was ~190 bytes
//! of heap (a 96-byte chunk and three 32-byte ones), one of the strings the
//! gateway id that is the same for every connection, and the key derivable
//! from the slot. An idle connection now keeps one allocation holding the
//! two ids that differ; the `Session` is built when the backend is told
//! something (Hello, each request, close): two strings, the gateway id
//! being the core's shared `Arc<str>`.

use std::sync::Arc;

use palaver_router::api::{Session, SessionAddr};

/// A session's user id and device id in one allocation:
/// `[user id length, u32 LE][user id][device id]`.
#[derive(Debug)]
pub(crate) struct SessionIds(Box<[u8]>);

const LEN: usize = 4;

impl SessionIds {
    pub(crate) fn new(user_id: &str, device_id: &str) -> SessionIds {
        let user_len = u32::try_from(user_id.len()).expect("a user id under 4 GiB");
        let mut bytes = Vec::with_capacity(LEN + user_id.len() + device_id.len());
        bytes.extend_from_slice(&user_len.to_le_bytes());
        bytes.extend_from_slice(user_id.as_bytes());
        bytes.extend_from_slice(device_id.as_bytes());
        // Exact capacity: into_boxed_slice does not reallocate.
        SessionIds(bytes.into_boxed_slice())
    }

    fn user_len(&self) -> usize {
        let mut len = [0u8; LEN];
        len.copy_from_slice(&self.0[..LEN]);
        u32::from_le_bytes(len) as usize
    }

    pub(crate) fn user_id(&self) -> &str {
        let end = LEN + self.user_len();
        // Both halves were copied from `&str`s whole, so this cannot fail.
        std::str::from_utf8(&self.0[LEN..end]).expect("user id is UTF-8")
    }

    pub(crate) fn device_id(&self) -> &str {
        let start = LEN + self.user_len();
        std::str::from_utf8(&self.0[start..]).expect("device id is UTF-8")
    }

    /// Heap bytes held (requested from the allocator).
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        self.0.len()
    }

    /// The session as the backend knows it, at `conn` on `gateway_id`.
    pub(crate) fn session(&self, gateway_id: &Arc<str>, conn: u64) -> Session {
        Session {
            user_id: self.user_id().to_owned(),
            device_id: self.device_id().to_owned(),
            addr: SessionAddr {
                gateway_id: gateway_id.clone(),
                conn,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_into_the_session_the_backend_sees() {
        for (user, device) in [
            ("alice", "phone"),
            ("", ""),
            ("ünïcødé-user", "dévice-✓"),
            (
                "0f8fad5b-d9cb-469f-a165-70867728950e",
                "a-tablet-with-a-long-id",
            ),
        ] {
            let ids = SessionIds::new(user, device);
            assert_eq!(ids.user_id(), user);
            assert_eq!(ids.device_id(), device);
            let session = ids.session(&"gw-1".into(), 0x0100_0002_0000_0007);
            assert_eq!(
                session,
                Session {
                    user_id: user.into(),
                    device_id: device.into(),
                    addr: SessionAddr {
                        gateway_id: "gw-1".into(),
                        conn: 0x0100_0002_0000_0007,
                    },
                }
            );
        }
    }

    #[test]
    fn an_idle_session_holds_only_its_two_ids() {
        // One allocation: the ids and a 4-byte length, no gateway id, no
        // per-field String headers (the boxed Session this replaces held
        // 80 bytes + three strings).
        let ids = SessionIds::new("u123", "phone");
        assert_eq!(ids.heap_bytes(), 4 + "u123".len() + "phone".len());
        assert_eq!(std::mem::size_of::<Option<SessionIds>>(), 16);
    }
}
