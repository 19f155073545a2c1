//! Protocol limits: the defaults a server starts from, and what it announces
//! to clients in `Welcome.limits`. Every limit is configurable; every one is
//! enforced with an `Error` frame naming it.

use crate::pb;

/// Server-side protocol limits. The subset that clients must respect is sent
/// to them in `Welcome` (see [`Limits::to_pb`] and `heartbeat_interval_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded `Frame` accepted, excluding its length prefix.
    pub max_frame_bytes: u32,
    /// Largest `Send.body` accepted.
    pub max_body_bytes: u32,
    /// Sustained per-connection `Send` rate (token bucket, burst = this value).
    pub max_sends_per_second: u32,
    /// Sustained per-connection budget for requests other than `Send`, in
    /// cost units (SPEC §13; token bucket, burst = this value).
    pub max_requests_per_second: u32,
    /// Requests with a response (Send, Sync, History, presence, group ops)
    /// one connection may have awaiting it at once.
    pub max_requests_in_flight: u32,
    /// Connections one user may hold at once, over all devices and gateway
    /// nodes; one more is refused with `TOO_MANY_CONNECTIONS`.
    pub max_connections_per_account: u32,
    /// Sustained `Send` rate shared by all of one user's connections on a
    /// node (token bucket, burst = this value): more connections buy no more.
    pub max_account_sends_per_second: u32,
    /// Request budget (cost units) shared by all of one user's connections
    /// on a node (token bucket, burst = this value).
    pub max_account_requests_per_second: u32,
    /// Most members a group may have, creator included.
    pub max_group_members: u32,
    /// Most members a channel may have (SPEC §21); 0: channels not served.
    pub max_channel_members: u32,
    /// Largest `limit` honoured by Sync / History.
    pub max_batch: u32,
    /// Page size used when Sync / History say `limit = 0`.
    pub default_batch: u32,
    /// How often clients send Ping.
    pub heartbeat_interval_ms: u32,
    /// Time from connection accept to a Hello being received.
    pub hello_timeout_ms: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 * 1024,
            max_body_bytes: 60 * 1024,
            max_sends_per_second: 50,
            max_requests_per_second: 100,
            max_requests_in_flight: 64,
            max_connections_per_account: 16,
            max_account_sends_per_second: 100,
            max_account_requests_per_second: 200,
            max_group_members: 1000,
            max_channel_members: 100_000,
            max_batch: 500,
            default_batch: 100,
            heartbeat_interval_ms: 30_000,
            hello_timeout_ms: 10_000,
        }
    }
}

impl Limits {
    /// Silence after which the server closes with HEARTBEAT_TIMEOUT: 2.5× the
    /// heartbeat interval, so one lost or late Ping is tolerated.
    pub fn heartbeat_timeout_ms(&self) -> u64 {
        heartbeat_timeout_ms(self.heartbeat_interval_ms)
    }

    /// The client-visible part, for `Welcome.limits`.
    pub fn to_pb(&self) -> pb::Limits {
        pb::Limits {
            max_frame_bytes: self.max_frame_bytes,
            max_body_bytes: self.max_body_bytes,
            max_sends_per_second: self.max_sends_per_second,
            max_group_members: self.max_group_members,
            max_batch: self.max_batch,
            max_requests_per_second: self.max_requests_per_second,
            max_requests_in_flight: self.max_requests_in_flight,
            max_connections_per_account: self.max_connections_per_account,
            max_account_sends_per_second: self.max_account_sends_per_second,
            max_account_requests_per_second: self.max_account_requests_per_second,
            // Announces the push requests (SPEC §20); the bound is fixed.
            max_push_token_bytes: crate::push::MAX_PUSH_TOKEN_BYTES as u32,
            max_channel_members: self.max_channel_members,
        }
    }
}

impl From<&Limits> for pb::Limits {
    fn from(limits: &Limits) -> Self {
        limits.to_pb()
    }
}

/// 2.5 × `interval_ms`.
pub fn heartbeat_timeout_ms(interval_ms: u32) -> u64 {
    u64::from(interval_ms) * 5 / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_conversion() {
        let l = Limits::default();
        assert_eq!(l.max_frame_bytes, 65536);
        assert_eq!(l.heartbeat_timeout_ms(), 75_000);
        let p = pb::Limits::from(&l);
        assert_eq!(p.max_body_bytes, 61440);
        assert_eq!(p.max_group_members, 1000);
        assert_eq!(p.max_batch, 500);
        assert_eq!(p.max_sends_per_second, 50);
        assert_eq!(p.max_frame_bytes, 65536);
        assert_eq!(p.max_requests_per_second, 100);
        assert_eq!(p.max_requests_in_flight, 64);
        assert_eq!(p.max_push_token_bytes, 1024);
        assert_eq!(p.max_channel_members, 100_000);
        assert_eq!(heartbeat_timeout_ms(15_000), 37_500);
    }
}
