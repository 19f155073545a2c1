//! Helpers shared by the integration tests (test code: unwrap allowed).
#![allow(clippy::unwrap_used, dead_code)]

use std::time::Duration;

use palaver_push::apns::{ApnsClient, ApnsConfig};
use palaver_push::testing::{ApnsServerConfig, ApnsTestServer, TestKeyPair};
use palaver_push::{
    ApnsEnvironment, Content, Notification, Platform, Priority, Sender, SenderConfig,
};

pub const TEAM: &str = "TEAM123456";
pub const KEY_ID: &str = "KEY1234567";
pub const TOPIC: &str = "com.example.chat";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("palaver_push=debug")
        .with_test_writer()
        .try_init();
}

/// A 64-hex-digit device token, distinct per `n`.
pub fn apns_token(n: u32) -> String {
    format!("{n:08x}").repeat(8)
}

pub fn apns_note(token: &str) -> Notification {
    Notification {
        platform: Platform::Apns,
        device_token: token.into(),
        apns_topic: Some(TOPIC.into()),
        apns_environment: ApnsEnvironment::Production,
        conversation_id: "conv-1".into(),
        seq: 7,
        collapse_id: Some("conv-1".into()),
        badge: Some(4),
        content: Content::IdOnly,
        ttl: Duration::from_secs(600),
        priority: Priority::High,
    }
}

pub fn fcm_note(token: &str) -> Notification {
    Notification {
        platform: Platform::Fcm,
        apns_topic: None,
        ..apns_note(token)
    }
}

/// Fast retries, so a test waits on Retry-After and not on backoff.
pub fn fast_retries() -> SenderConfig {
    SenderConfig {
        retry_min: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        ..SenderConfig::default()
    }
}

pub struct Apns {
    pub server: ApnsTestServer,
    pub key: TestKeyPair,
}

impl Apns {
    pub async fn start(tweak: impl FnOnce(&mut ApnsServerConfig)) -> Self {
        let key = TestKeyPair::apns();
        let mut config = ApnsServerConfig::new(TEAM, KEY_ID, &key.public_pem);
        config.topics = vec![TOPIC.into()];
        tweak(&mut config);
        Apns {
            server: ApnsTestServer::start(config).await.unwrap(),
            key,
        }
    }

    pub fn config(&self) -> ApnsConfig {
        self.server
            .client_config(KEY_ID, &self.key.private_pem)
            .unwrap()
    }

    pub fn client(&self) -> ApnsClient {
        ApnsClient::new(self.config()).unwrap()
    }

    pub fn sender(&self, client: ApnsClient, config: SenderConfig) -> Sender {
        Sender::builder(config)
            .apns(ApnsEnvironment::Production, client)
            .start(&tokio::runtime::Handle::current())
    }
}
