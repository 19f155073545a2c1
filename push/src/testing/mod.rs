//! Test servers that implement Apple's and Google's documented contracts
//! (feature `test-server`): HTTP/2 over TLS on a free loopback port, with a
//! certificate from a fresh test CA, verifying what the real services
//! verify (JWT signatures and claims, headers and their limits, payload
//! size), answering per device token as scripted, and recording every
//! request for assertions. Real sockets, real TLS, the real clients.
//!
//! ```text
//! let key = TestKeyPair::apns();
//! let apns = ApnsTestServer::start(ApnsServerConfig::new("TEAM", "KEY", &key.public_pem)).await?;
//! apns.script(&token, [ApnsReply::unregistered(1_700_000_000_000)]);
//! let config = apns.client_config("KEY", &key.private_pem)?; // endpoint and CA filled in
//! ```

mod apns_server;
mod fcm_server;
mod server;

pub use apns_server::{ApnsReceived, ApnsReply, ApnsServerConfig, ApnsTestServer};
pub use fcm_server::{FcmReceived, FcmReply, FcmServerConfig, FcmTestServer};
pub use server::TestCa;

/// A key pair in PEM (private: PKCS#8; public: SPKI).
#[derive(Clone, Debug)]
pub struct TestKeyPair {
    pub private_pem: String,
    pub public_pem: String,
}

impl TestKeyPair {
    /// A fresh P-256 key, like the `.p8` keys Apple issues.
    pub fn apns() -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .expect("generating a P-256 key");
        Self {
            private_pem: key.serialize_pem(),
            public_pem: key.public_key_pem(),
        }
    }

    /// A 2048-bit RSA key like a service account's. Fixed test-only keys
    /// (generated once with openssl, trusted nowhere): ring cannot generate
    /// RSA keys and generating one in a debug build takes seconds.
    pub fn rsa() -> Self {
        Self {
            private_pem: include_str!("keys/test-rsa-a.pem").into(),
            public_pem: include_str!("keys/test-rsa-a.pub.pem").into(),
        }
    }

    /// A second RSA key, for "signed with the wrong key".
    pub fn rsa_other() -> Self {
        Self {
            private_pem: include_str!("keys/test-rsa-b.pem").into(),
            public_pem: include_str!("keys/test-rsa-b.pub.pem").into(),
        }
    }
}
