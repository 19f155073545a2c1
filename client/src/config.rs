//! Client configuration: where the gateway is, whom to trust, who this
//! device is, and the timing knobs (defaults follow SPEC §5 and §15).

/// How to reach and trust a gateway, and how patient to be.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ClientConfig {
    /// `host:port` of the gateway (e.g. `chat.example.com:7443`).
    pub address: String,
    /// Name checked against the server certificate; empty = the host of
    /// `address`.
    #[uniffi(default = "")]
    pub server_name: String,
    /// Trusted CA certificates in PEM. The SDK trusts exactly these (no
    /// system store: apps pin their deployment's CA).
    pub trusted_ca_pem: String,
    /// Stable per app installation, 1–64 bytes of `[A-Za-z0-9_.@-]`.
    pub device_id: String,
    #[uniffi(default = "palaver-sdk")]
    pub client_name: String,
    #[uniffi(default = "")]
    pub client_version: String,
    /// Give up on a connection attempt (TCP + TLS + Welcome) after this.
    #[uniffi(default = 10000)]
    pub connect_timeout_ms: u32,
    /// Reconnect backoff: full jitter over `base × 2^attempt`, capped.
    #[uniffi(default = 500)]
    pub backoff_base_ms: u32,
    #[uniffi(default = 60000)]
    pub backoff_max_ms: u32,
    /// Send DELIVERED receipts on its own for messages handed to the app.
    #[uniffi(default = true)]
    pub auto_delivered_receipts: bool,
    /// Largest Sync batch to ask for (0 = server default).
    #[uniffi(default = 0)]
    pub sync_batch: u32,
}

impl ClientConfig {
    /// A config with the defaults above.
    pub fn new(address: &str, trusted_ca_pem: &str, device_id: &str) -> ClientConfig {
        ClientConfig {
            address: address.to_string(),
            server_name: String::new(),
            trusted_ca_pem: trusted_ca_pem.to_string(),
            device_id: device_id.to_string(),
            client_name: "palaver-sdk".into(),
            client_version: String::new(),
            connect_timeout_ms: 10_000,
            backoff_base_ms: 500,
            backoff_max_ms: 60_000,
            auto_delivered_receipts: true,
            sync_batch: 0,
        }
    }

    /// The name to verify the certificate against.
    pub(crate) fn effective_server_name(&self) -> String {
        if !self.server_name.is_empty() {
            return self.server_name.clone();
        }
        let host = match self.address.rsplit_once(':') {
            Some((host, _)) => host,
            None => self.address.as_str(),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host == "0.0.0.0" {
            "localhost".into()
        } else {
            host.to_string()
        }
    }
}

/// Full-jitter exponential backoff (SPEC §15): `floor + random(0,
/// min(max, base × 2^attempt))`. `random` comes from the caller (sans-io).
pub(crate) fn backoff_ms(
    attempt: u32,
    floor_ms: u32,
    base_ms: u32,
    max_ms: u32,
    random: u64,
) -> u64 {
    let ceiling = u64::from(base_ms)
        .saturating_mul(1u64 << attempt.min(20))
        .min(u64::from(max_ms));
    u64::from(floor_ms) + random % (ceiling + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_defaults_to_the_host() {
        let mut c = ClientConfig::new("chat.example.com:7443", "", "d");
        assert_eq!(c.effective_server_name(), "chat.example.com");
        c.address = "[::1]:7443".into();
        assert_eq!(c.effective_server_name(), "::1");
        c.server_name = "localhost".into();
        assert_eq!(c.effective_server_name(), "localhost");
    }

    #[test]
    fn backoff_matches_spec_defaults() {
        // Same bounds as palaver_protocol::state::reconnect_delay_ms.
        for (attempt, floor, r) in [(0, 0, 0), (0, 0, 500), (3, 1000, 4000), (40, 250, u64::MAX)] {
            assert_eq!(
                backoff_ms(attempt, floor, 500, 60_000, r),
                palaver_protocol::state::reconnect_delay_ms(attempt, floor, r)
            );
        }
    }
}
