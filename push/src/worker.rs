//! The push worker: a [`Handler`] on the router's shared at-least-once
//! consumer loop ([`palaver_router::kafka::consumer_loop`]), consumer group
//! [`PUSH_GROUP`] on `palaver.push` (the routers' [`records::PushRecord`]s,
//! keyed by user id). Several workers share the topic's partitions.
//!
//! Steps 1–4 below are [`crate::dispatch`]'s (shared with the embedded
//! engine's in-process driver, [`crate::embedded`]); this module adds the
//! Kafka records, the contexts from Redis, the dead letters and the
//! replays. One poll batch at a time:
//! 1. each record is decoded (one that is not a `PushRecord` is
//!    dead-lettered) and its events merged per (user, conversation)
//!    ([`crate::dispatch::coalesce`], the crate's `Coalescer`: the highest
//!    seq wins);
//! 2. per event, [`PushStore::push_context`] at the worker's clock, then
//!    [`palaver_router::store::PushContext::targets`] with the event's `online_device_ids`:
//!    nothing when the conversation is muted, the message was read on
//!    another device meanwhile, or the device was online;
//! 3. one [`crate::Notification`] per target device, submitted to the [`Sender`]:
//!    content `id-only` by default (conversation id and seq, no body — the
//!    server never sees bodies), a preview (the sender's id and the
//!    content kind, still no body) only with [`ContentPolicy::Preview`];
//!    the collapse id is per conversation (a device shows one notification
//!    per conversation); the badge is the context's unread count;
//! 4. every ticket of the batch is waited for, then:
//!    - `TokenInvalid { since_ms }` → [`PushStore::invalidate_push_token`]
//!      (removed only if the device still holds that token and registered
//!      it before `since_ms`: a re-registration wins);
//!    - `Failed { permanent: true }` → the record goes to `palaver.dlq`
//!      with the reason ([`Batch::dead_letter`]);
//!    - `Failed { permanent: false }` (the sender's own retries, with
//!      backoff honouring `Retry-After`, ran out), `SubmitError::QueueFull`
//!      or Redis down → [`Batch::fail`]: nothing of the batch is committed
//!      and it runs again after the loop's backoff;
//!    - `SubmitError::NoProvider` (no credentials for that platform) →
//!      counted ([`PushWorkerStats::no_provider`]: what would have been
//!      sent) and logged once per provider endpoint.
//!
//! **At least once.** A replayed batch decides its events again. Pushes the
//! provider already accepted in this process are remembered per (user,
//! conversation, seq, device, token) and not sent again, so a provider
//! outage that ends leaves exactly one push per event; but after a crash, a
//! rebalance to another worker or a failed produce of the batch's dead
//! letters, a replay may resend a push that was already delivered. That is
//! harmless on the device: the APNs `apns-collapse-id` and the FCM
//! `collapse_key` / `tag` are per conversation, so the second push replaces
//! the first instead of showing twice. A dead letter may likewise be
//! written twice.
//!
//! **Coalescing.** The router already writes at most one event per (user,
//! conversation) until the user connects again or sends a Receipt there
//! (its push-pending mark), so a burst of messages to a sleeping phone is
//! one event and one push. The worker merges only what one poll batch
//! holds (the same conversation in two records of a batch: a router replay,
//! or a mark cleared and set again); it does not hold events across
//! batches in a time window, because the loop commits a batch's offsets
//! once the handler returns — an event held back would be committed before
//! its push was sent, and lost with the worker.

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use palaver_router::bus::{BusError, PushEvent};
use palaver_router::kafka::consumer_loop::{Batch, ConsumerLoop, Handler, LoopConfig, LoopStats};
use palaver_router::kafka::{self, records, DLQ_TOPIC, PUSH_TOPIC};
use palaver_router::redis_store::{RedisConfig, RedisStore};
use palaver_router::store::PushStore;
use prost::Message as _;
use rdkafka::message::{Message as _, OwnedMessage};

use crate::dispatch::{coalesce, Decidable, Dispatcher, InFlight, PushStats, TokenInvalidator};
pub use crate::dispatch::{collapse_id, ContentPolicy};
use crate::Sender;

/// The push workers' consumer group.
pub const PUSH_GROUP: &str = "palaver-push";

/// Counters of one push worker (the same as the embedded driver's).
pub type PushWorkerStats = PushStats;

/// Settings of one push worker.
#[derive(Clone, Debug)]
pub struct PushWorkerConfig {
    /// The consumer loop: brokers, the group ([`PUSH_GROUP`]), this
    /// worker's name, batch size, timeouts.
    pub consumer: LoopConfig,
    pub redis: RedisConfig,
    pub content: ContentPolicy,
    /// How long a provider keeps trying to reach the device (also bounds
    /// the sender's retries, within its retry window).
    pub ttl: Duration,
    /// Partitions of `palaver.push` if this worker creates it.
    pub partitions: i32,
}

impl PushWorkerConfig {
    pub fn new(brokers: impl Into<String>, redis: RedisConfig) -> Self {
        Self {
            consumer: LoopConfig::new(
                brokers,
                PUSH_GROUP,
                format!("push-{}", std::process::id()),
                &[PUSH_TOPIC],
            ),
            redis,
            content: ContentPolicy::IdOnly,
            ttl: Duration::from_secs(24 * 3600),
            partitions: kafka::DEFAULT_INBOUND_PARTITIONS,
        }
    }
}

/// The push worker: the consumer loop with the push handler.
pub struct PushWorker {
    consumer_loop: ConsumerLoop,
    handler: PushHandler,
}

impl PushWorker {
    /// Connects to Redis, creates the topics if absent and joins the group.
    /// `sender` may serve no provider at all: then every push is counted as
    /// [`PushWorkerStats::no_provider`] and the topic is still consumed.
    pub fn new(config: PushWorkerConfig, sender: Sender) -> Result<Self, String> {
        kafka::ensure_topics(
            &config.consumer.brokers,
            &[(PUSH_TOPIC, config.partitions), (DLQ_TOPIC, 1)],
            Duration::from_secs(10),
        )?;
        let store = RedisStore::connect(config.redis.clone())
            .map_err(|e| format!("Redis {:?}: {e}", config.redis.urls))?;
        let consumer_loop = ConsumerLoop::new(LoopConfig {
            topics: vec![PUSH_TOPIC.to_string()],
            ..config.consumer.clone()
        })?;
        Ok(Self {
            consumer_loop,
            handler: PushHandler {
                store,
                dispatcher: Dispatcher::new(
                    sender,
                    config.content,
                    config.ttl,
                    config.consumer.client_id,
                ),
            },
        })
    }

    pub fn stats(&self) -> PushWorkerStats {
        self.handler.dispatcher.stats
    }

    pub fn loop_stats(&self) -> LoopStats {
        self.consumer_loop.stats()
    }

    /// Records behind the end of this worker's partitions (librdkafka's
    /// last report).
    pub fn lag(&self) -> Option<u64> {
        self.consumer_loop.lag()
    }

    pub fn sender(&self) -> &Sender {
        self.handler.dispatcher.sender()
    }

    /// Runs batches until `stop` is set.
    pub fn run(&mut self, stop: &AtomicBool) {
        self.consumer_loop.run(&mut self.handler, stop);
        tracing::info!(
            worker = %self.handler.dispatcher.name(),
            stats = ?self.handler.dispatcher.stats,
            "push worker stopped"
        );
    }

    /// One batch (see [`ConsumerLoop::run_batch`]).
    pub fn run_batch(&mut self, wait: Duration) -> Result<usize, String> {
        self.consumer_loop.run_batch(&mut self.handler, wait)
    }
}

/// The Redis store as the dispatcher's way to remove dead tokens.
struct RedisTokens<'a>(&'a mut RedisStore);

impl TokenInvalidator for RedisTokens<'_> {
    fn invalidate(
        &mut self,
        user_id: &str,
        device_id: &str,
        token: &str,
        since_ms: i64,
    ) -> Result<bool, String> {
        self.0
            .invalidate_push_token(user_id, device_id, token, since_ms)
            .map_err(|e| format!("redis: {e}"))
    }
}

struct PushHandler {
    store: RedisStore,
    dispatcher: Dispatcher,
}

impl PushHandler {
    /// Steps 2–3 for one event: its context from Redis, then the
    /// dispatcher decides and submits. Err: Redis down or the sender cannot
    /// take it now (the batch fails).
    fn submit_event(
        &mut self,
        item: &Decidable,
        now_ms: i64,
        in_flight: &mut Vec<InFlight>,
    ) -> Result<(), BusError> {
        let event = &item.event;
        let context = self
            .store
            .push_context(&event.user_id, &event.conversation_id, event.seq, now_ms)
            .map_err(|e| BusError::Unavailable(format!("redis: {e}")))?;
        self.dispatcher
            .submit(item.origin, event, &context, in_flight)
            .map_err(|e| BusError::Unavailable(format!("push sender: {e}")))
    }
}

impl Handler for PushHandler {
    fn handle(&mut self, records: &[OwnedMessage], out: &mut Batch<'_>) {
        let mut events = Vec::new();
        for (index, record) in records.iter().enumerate() {
            match records::PushRecord::decode(record.payload().unwrap_or_default()) {
                Ok(r) => events.extend(r.events.into_iter().map(|e| Decidable {
                    origin: index,
                    event: PushEvent::from(e),
                    context: None,
                })),
                Err(e) => {
                    self.dispatcher.stats.dead_lettered += 1;
                    out.dead_letter(record, format!("not a PushRecord: {e}"), 0);
                }
            }
        }
        self.dispatcher.stats.events += events.len() as u64;
        // Nothing is held past the batch (module doc, "Coalescing").
        let (latest, merged) = coalesce(events);
        self.dispatcher.stats.coalesced += merged;
        let now_ms = crate::unix_ms();
        let mut in_flight = Vec::new();
        let mut failure = None;
        for item in &latest {
            if let Err(e) = self.submit_event(item, now_ms, &mut in_flight) {
                failure = Some(e);
                break;
            }
        }
        // Wait for what was submitted even when the batch fails: what was
        // delivered is remembered and not sent again by the replay.
        let settled = self
            .dispatcher
            .settle(in_flight, &mut RedisTokens(&mut self.store));
        if let Some(e) = settled.failure {
            failure.get_or_insert(BusError::Unavailable(e));
        }
        // One dead letter per record (its first reason; the others logged).
        let mut lettered = HashSet::new();
        for (record, reason) in settled.dead {
            if lettered.insert(record) {
                self.dispatcher.stats.dead_lettered += 1;
                tracing::warn!(worker = %self.dispatcher.name(), "dead-lettered: {reason}");
                out.dead_letter(&records[record], reason, 1);
            } else {
                tracing::warn!(worker = %self.dispatcher.name(), "also failed for good: {reason}");
            }
        }
        if let Some(e) = failure {
            self.dispatcher.stats.replays += 1;
            tracing::warn!(worker = %self.dispatcher.name(), "push batch failed, will run again: {e}");
            out.fail(e);
        }
    }

    fn after_panic(&mut self) {
        self.store.reset_connection();
    }
}
