//! `palaver-push`: the provider side of push notifications.
//!
//! - [`apns::ApnsClient`]: Apple Push Notification service over HTTP/2 with
//!   token-based auth (ES256 provider tokens, reused and renewed on a timer);
//! - [`fcm::FcmClient`]: Firebase Cloud Messaging HTTP v1 with an OAuth2
//!   service-account access token (RS256 assertion exchanged and cached);
//! - [`sender::Sender`]: what the push worker calls — a bounded queue per
//!   provider endpoint, concurrency over the one HTTP/2 connection, retries
//!   with backoff and jitter that honour `Retry-After`, and a
//!   [`sender::SendResult`] per [`Notification`];
//! - [`coalesce::Coalescer`]: the sans-io burst window per (user,
//!   conversation);
//! - `testing` (feature `test-server`): APNs and FCM test servers that check
//!   what Apple and Google check, for this crate's tests and other crates'.
//!
//! - [`dispatch::Dispatcher`]: what a push worker does with push events
//!   (merge per conversation → decide → send → handle the result), the one
//!   implementation both drivers share:
//! - [`worker::PushWorker`]: the push worker on the router's consumer loop
//!   (`palaver.push` → decide → send), and the `palaver-push` binary;
//! - [`embedded::EmbeddedPush`]: the same, in-process, for the embedded
//!   engine (the gateway's `[push]` section).
//!
//! Kafka, the token store and the decision to push are the worker's
//! ([`worker`]); the provider modules know none of them.

pub mod apns;
pub mod backoff;
pub mod coalesce;
pub mod config;
pub mod conn;
pub mod dispatch;
pub mod embedded;
pub mod fcm;
pub mod notification;
pub mod sender;
#[cfg(feature = "test-server")]
pub mod testing;
pub mod tls;
pub mod worker;

use std::time::Duration;

pub use config::ProvidersConfig;
pub use notification::{ApnsEnvironment, Content, Notification, Platform, Priority};
pub use sender::{QueueFull, SendResult, Sender, SenderConfig, SubmitError, Ticket};
pub use tls::TrustRoots;

/// A configuration that cannot work: said with what to fix.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PushError {
    #[error("push configuration: {0}")]
    Config(String),
}

/// What one attempt at a provider came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Accepted by the provider (its id for the message, when it gave one).
    Delivered { id: Option<String> },
    /// The device token is dead since `since_ms` (Unix ms): the store drops
    /// it unless it was registered again after that.
    TokenInvalid { since_ms: i64, reason: String },
    /// Worth trying again, not before `after` if the provider said so.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// Will never succeed as sent (bad request, bad credentials).
    Failed { reason: String },
}

pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `Retry-After` in its delta-seconds form (what APNs and Google send).
pub(crate) fn retry_after(value: Option<&str>) -> Option<Duration> {
    value?.trim().parse::<u64>().ok().map(Duration::from_secs)
}
