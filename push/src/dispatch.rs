//! What a push worker does with push events, whichever drives it: the one
//! implementation of merge → decide → notify → submit → settle, shared by
//! the Kafka worker ([`crate::worker`], contexts read from Redis, offsets
//! committed per batch) and the embedded engine's in-process driver
//! ([`crate::embedded`], contexts read on the engine's store thread and
//! handed over with the events). The drivers differ only in where an
//! event's [`PushContext`] comes from, where a dead token is removed
//! ([`TokenInvalidator`]) and what a failed batch becomes (a Kafka replay;
//! a retry in-process).
//!
//! One batch at a time:
//! 1. [`coalesce`]: the batch's events merged per (user, conversation), the
//!    highest seq wins (with its context, so its badge);
//! 2. [`Dispatcher::submit`] per merged event: nothing when the
//!    conversation is muted, the message was read on another device, or the
//!    device was online ([`PushContext::targets`]); otherwise one
//!    [`Notification`] per target device to the [`Sender`] (content by
//!    [`ContentPolicy`], collapse id per conversation, badge = the unread
//!    count);
//! 3. [`Dispatcher::settle`]: every ticket waited for; `Delivered` is
//!    remembered (a retry of the batch in this process does not send it
//!    again), `TokenInvalid` goes to the driver's [`TokenInvalidator`],
//!    `Failed { permanent }` becomes a dead letter, a transient failure
//!    fails the batch.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use palaver_router::bus::PushEvent;
use palaver_router::store::{self as rstore, PushContext};
use sha2::Digest as _;

use crate::coalesce::{Coalescer, Sequenced};
use crate::notification::APNS_MAX_COLLAPSE_ID;
use crate::sender::Route;
use crate::{
    ApnsEnvironment, Content, Notification, Platform, Priority, SendResult, Sender, SubmitError,
    Ticket,
};

/// Settled pushes remembered against replays, at most (then forgotten all
/// at once: a replay after that may resend, which collapse ids absorb).
const MAX_REMEMBERED: usize = 50_000;

/// What a push shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ContentPolicy {
    /// Conversation id and seq, no body (the default: bodies are opaque to
    /// the server; the app's service extension fetches the message).
    #[default]
    IdOnly,
    /// A preview the deployment allows: the sender's id as the title and
    /// the content kind ("New message", "Photo", …) as the text. The event
    /// carries no body, so neither does the preview.
    Preview,
}

impl FromStr for ContentPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "id-only" => Ok(Self::IdOnly),
            "preview" => Ok(Self::Preview),
            other => Err(format!(
                "unknown content policy {other:?}: give id-only or preview"
            )),
        }
    }
}

/// Counters of a push driver (the Kafka worker's or the embedded one's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Events read (a replayed one counts again).
    pub events: u64,
    /// Events merged into another of the same (user, conversation) in the
    /// same batch.
    pub coalesced: u64,
    /// Notifications the provider accepted.
    pub pushed: u64,
    /// Registrations not pushed because their device was online.
    pub skipped_online: u64,
    /// Events not pushed: the conversation is muted.
    pub skipped_muted: u64,
    /// Events not pushed: read on another device meanwhile.
    pub skipped_read: u64,
    /// Tokens removed from the store after the provider said they are dead
    /// (embedded: removals handed to the engine, which removes the token
    /// unless it was registered again since).
    pub invalidated: u64,
    /// Kafka: records sent to `palaver.dlq` (not a PushRecord, or a push
    /// that can never succeed). Embedded: pushes that can never succeed,
    /// logged and dropped.
    pub dead_lettered: u64,
    /// Batches failed (provider or store down, sender queue full) to run
    /// again.
    pub replays: u64,
    /// Pushes already accepted in this process, not sent again on a replay.
    pub replay_skipped: u64,
    /// Notifications not sent for want of credentials for their platform:
    /// what would have been sent.
    pub no_provider: u64,
    /// Embedded only: events the engine could not hand to the push thread
    /// because its bounded queue was full (dropped; never blocks the engine).
    pub queue_full: u64,
    /// Embedded only: events given up on after the batch's retries ran out
    /// (the provider stayed down past the retry window).
    pub abandoned: u64,
}

/// A push settled once: (user, conversation, seq, device, token).
pub type PushKey = (String, String, u64, String, String);

/// A submitted push waiting for its result; `origin` is the driver's index
/// of where the event came from (the Kafka record, for its dead letter).
pub struct InFlight {
    pub origin: usize,
    pub key: PushKey,
    ticket: Ticket,
}

/// An event with what the decision needs and where it came from.
pub struct Decidable {
    pub origin: usize,
    pub event: PushEvent,
    /// `None`: read when decided (the Kafka worker reads Redis then);
    /// `Some`: read where the store lives and handed over (embedded).
    pub context: Option<PushContext>,
}

impl Sequenced for Decidable {
    fn seq(&self) -> u64 {
        self.event.seq
    }
}

/// Step 1: the batch's events merged per (user, conversation), the highest
/// seq winning; with how many were merged into others. One window for the
/// whole batch, closed at once: nothing is held past the batch.
pub fn coalesce(items: Vec<Decidable>) -> (Vec<Decidable>, u64) {
    let now = Instant::now();
    let mut coalescer = Coalescer::new(Duration::ZERO, items.len());
    for item in items {
        let key = (
            item.event.user_id.clone(),
            item.event.conversation_id.clone(),
        );
        // Capacity is the batch's event count: nothing closes early.
        let _ = coalescer.offer(now, key, item);
    }
    let mut merged = 0;
    let latest = coalescer
        .drain()
        .into_iter()
        .map(|b| {
            merged += u64::from(b.events - 1);
            b.latest
        })
        .collect();
    (latest, merged)
}

/// Where a dead token is removed: the Redis store (Kafka worker) or the
/// embedded engine's store, through its thread.
pub trait TokenInvalidator {
    /// Removes the device's registration if it still holds `token` and was
    /// registered before `since_ms`; Ok(whether it was removed, or handed
    /// to whoever removes it). Err: the store cannot be reached now.
    fn invalidate(
        &mut self,
        user_id: &str,
        device_id: &str,
        token: &str,
        since_ms: i64,
    ) -> Result<bool, String>;
}

/// The outcome of [`Dispatcher::settle`] the driver acts on.
#[derive(Debug, Default)]
pub struct Settled {
    /// Pushes that can never succeed: (origin, reason).
    pub dead: Vec<(usize, String)>,
    /// The first transient failure (the batch must run again).
    pub failure: Option<String>,
    /// The origins of the pushes that failed transiently (the store could
    /// not be reached, or the sender's retries ran out).
    pub transient: Vec<usize>,
}

/// The decide-and-send half of a push driver.
pub struct Dispatcher {
    sender: Sender,
    content: ContentPolicy,
    ttl: Duration,
    /// The driver's name in logs.
    name: String,
    pub stats: PushStats,
    no_provider_reported: HashSet<Route>,
    /// Pushes a provider accepted (see the worker's "At least once").
    settled: HashSet<PushKey>,
}

impl Dispatcher {
    pub fn new(sender: Sender, content: ContentPolicy, ttl: Duration, name: String) -> Self {
        Self {
            sender,
            content,
            ttl,
            name,
            stats: PushStats::default(),
            no_provider_reported: HashSet::new(),
            settled: HashSet::new(),
        }
    }

    pub fn sender(&self) -> &Sender {
        &self.sender
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The notification of `event` for one target device.
    pub fn notification(
        &self,
        event: &PushEvent,
        target: &rstore::DeviceToken,
        badge: u32,
    ) -> Notification {
        let token = &target.token;
        let (platform, apns_topic) = match token.platform {
            rstore::PushPlatform::Apns => (
                Platform::Apns,
                Some(token.apns_topic.clone()).filter(|t| !t.is_empty()),
            ),
            rstore::PushPlatform::Fcm => (Platform::Fcm, None),
        };
        let apns_environment = match token.apns_environment {
            Some(rstore::ApnsEnvironment::Sandbox) => ApnsEnvironment::Sandbox,
            _ => ApnsEnvironment::Production,
        };
        let content = match self.content {
            ContentPolicy::IdOnly => Content::IdOnly,
            ContentPolicy::Preview => Content::Preview {
                title: Some(event.sender_user_id.clone()),
                body: kind_text(event.kind).to_owned(),
            },
        };
        Notification {
            platform,
            device_token: token.token.clone(),
            apns_topic,
            apns_environment,
            conversation_id: event.conversation_id.clone(),
            seq: event.seq,
            collapse_id: Some(collapse_id(&event.conversation_id)),
            badge: Some(badge),
            content,
            ttl: self.ttl,
            priority: Priority::High,
        }
    }

    /// Step 2 for one event and its context: decides and submits, adding
    /// the tickets to `in_flight`. Err: the sender cannot take it now (its
    /// queue is full, or it shut down): the batch fails.
    pub fn submit(
        &mut self,
        origin: usize,
        event: &PushEvent,
        context: &PushContext,
        in_flight: &mut Vec<InFlight>,
    ) -> Result<(), SubmitError> {
        if context.muted {
            self.stats.skipped_muted += 1;
            return Ok(());
        }
        if context.already_read {
            self.stats.skipped_read += 1;
            return Ok(());
        }
        let targets = context.targets(&event.online_device_ids);
        self.stats.skipped_online += (context.tokens.len() - targets.len()) as u64;
        for target in targets {
            let key: PushKey = (
                event.user_id.clone(),
                event.conversation_id.clone(),
                event.seq,
                target.device_id.clone(),
                target.token.token.clone(),
            );
            if self.settled.contains(&key) {
                self.stats.replay_skipped += 1;
                continue;
            }
            let notification = self.notification(event, target, context.badge);
            match self.sender.submit(notification) {
                Ok(ticket) => in_flight.push(InFlight {
                    origin,
                    key,
                    ticket,
                }),
                Err(SubmitError::NoProvider(route)) => {
                    self.stats.no_provider += 1;
                    if self.no_provider_reported.insert(route) {
                        tracing::warn!(
                            worker = %self.name,
                            "no {route} credentials configured: its pushes are counted, not sent"
                        );
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Step 3: waits for every ticket, removes dead tokens through
    /// `tokens`, and says what the driver must do (dead letters, retry).
    pub fn settle(
        &mut self,
        in_flight: Vec<InFlight>,
        tokens: &mut dyn TokenInvalidator,
    ) -> Settled {
        let mut out = Settled::default();
        for f in in_flight {
            match f.ticket.wait() {
                SendResult::Delivered { .. } => {
                    self.stats.pushed += 1;
                    if self.settled.len() >= MAX_REMEMBERED {
                        self.settled.clear();
                    }
                    self.settled.insert(f.key);
                }
                SendResult::TokenInvalid { since_ms, reason } => {
                    let (user, _, _, device, token) = &f.key;
                    match tokens.invalidate(user, device, token, since_ms) {
                        Ok(removed) => {
                            if removed {
                                self.stats.invalidated += 1;
                            }
                            tracing::info!(
                                worker = %self.name, user = %user, device = %device,
                                removed, "push token dead since {since_ms}: {reason}"
                            );
                        }
                        Err(e) => {
                            out.failure.get_or_insert(e);
                            out.transient.push(f.origin);
                        }
                    }
                }
                SendResult::Failed {
                    reason,
                    permanent: true,
                } => {
                    let (user, conversation, seq, device, _) = &f.key;
                    out.dead.push((
                        f.origin,
                        format!("push to {user}/{device} for {conversation}@{seq}: {reason}"),
                    ));
                }
                SendResult::Failed {
                    reason,
                    permanent: false,
                } => {
                    out.failure
                        .get_or_insert(format!("push not sent: {reason}"));
                    out.transient.push(f.origin);
                }
            }
        }
        out
    }
}

/// The collapse id of a conversation's pushes: its id when it fits APNs'
/// 64 bytes, else a hash of it (stable across workers and restarts).
pub fn collapse_id(conversation_id: &str) -> String {
    if conversation_id.len() <= APNS_MAX_COLLAPSE_ID {
        return conversation_id.to_owned();
    }
    let digest = sha2::Sha256::digest(conversation_id.as_bytes());
    format!(
        "h:{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..30])
    )
}

/// The preview text for a content kind (the body is never known).
fn kind_text(kind: i32) -> &'static str {
    use palaver_protocol::pb::ContentKind;
    match ContentKind::try_from(kind) {
        Ok(ContentKind::Image) => "Photo",
        Ok(ContentKind::Video) => "Video",
        Ok(ContentKind::Audio) => "Voice message",
        Ok(ContentKind::File) => "File",
        _ => "New message",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_ids_fit_apns_and_are_stable() {
        assert_eq!(collapse_id("d:alice:bob"), "d:alice:bob");
        let long = "g:".to_string() + &"x".repeat(100);
        let id = collapse_id(&long);
        assert!(id.len() <= APNS_MAX_COLLAPSE_ID, "{id}");
        assert_eq!(id, collapse_id(&long));
        assert_ne!(id, collapse_id(&(long + "y")));
    }

    #[test]
    fn content_policy_parses_and_names_the_choices() {
        assert_eq!("id-only".parse(), Ok(ContentPolicy::IdOnly));
        assert_eq!("preview".parse(), Ok(ContentPolicy::Preview));
        let e = "full".parse::<ContentPolicy>().unwrap_err();
        assert!(e.contains("id-only or preview"), "{e}");
    }

    fn event(user: &str, conversation: &str, seq: u64) -> Decidable {
        Decidable {
            origin: seq as usize,
            event: PushEvent {
                user_id: user.into(),
                conversation_id: conversation.into(),
                seq,
                message_id: String::new(),
                sender_user_id: String::new(),
                kind: 0,
                server_time_ms: 0,
                online_device_ids: Vec::new(),
            },
            context: None,
        }
    }

    #[test]
    fn a_batch_merges_per_user_and_conversation_keeping_the_highest_seq() {
        let (latest, merged) = coalesce(vec![
            event("bob", "c1", 3),
            event("bob", "c1", 5),
            event("bob", "c1", 4),
            event("bob", "c2", 1),
            event("eve", "c1", 2),
        ]);
        assert_eq!(merged, 2);
        let mut got: Vec<_> = latest
            .iter()
            .map(|d| {
                (
                    d.event.user_id.as_str(),
                    d.event.conversation_id.as_str(),
                    d.event.seq,
                )
            })
            .collect();
        got.sort();
        assert_eq!(got, [("bob", "c1", 5), ("bob", "c2", 1), ("eve", "c1", 2)]);
    }
}
