//! The router worker: a handler on the at-least-once consumer loop
//! ([`super::consumer_loop`]) of the `palaver.inbound` group, running the
//! routing logic over [`RedisStore`] and producing its output.
//!
//! One poll batch at a time, as ONE unit:
//! 1. the batch goes through the one runner ([`crate::runner::run`]): each
//!    run of consecutive Sends costs one pipeline of append scripts (one
//!    round trip, one AOF fsync), one group read and one session lookup, not
//!    a few round trips per record; any other request is handled on its own
//!    in input order. If the store fails or handling panics, the records
//!    from the failed one on are handled one at a time: a store error is
//!    retried with backoff, and after `max_attempts` the record goes to
//!    `palaver.dlq` with the reason and the client gets `Error(UNAVAILABLE)`;
//!    a record whose handling panics goes to `palaver.dlq` at once (reason
//!    `panicked: …`), the client gets `Error(INTERNAL)`;
//! 2. the whole batch's output is produced — ONE `DeliveryBatch` record per
//!    destination gateway (split only past 512 KiB), a `PushRecord` per
//!    offline user — and the loop waits once for all of it, then commits.
//!
//! If producing fails, the loop rewinds and the batch runs again:
//! at-least-once. Replays are safe because the append script dedups by
//! (conversation, sender, client_msg_id) and returns the original ack, and
//! receipts only ever move forward. A rebalance in the middle of a batch can
//! let two routers briefly work on one partition; the atomic append keeps
//! every seq unique and gap-free even then.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use prost::Message as _;
use rdkafka::message::{Message, OwnedMessage};

use super::consumer_loop::{Batch, ConsumerLoop, Handler, LoopConfig};
use super::records;
use crate::api::Outbound;
use crate::bus::{BusError, ChannelPost, Outlet, Output, PushEvent};
use crate::logic::{Clock, Router, RouterConfig, SystemClock};
use crate::redis_store::{ArchiveLink, RedisConfig, RedisStore};
use crate::runner::{self, Failure};
use crate::store::StoreError;

/// Settings of one router worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The consumer loop: brokers, the routers' group (`palaver-router`),
    /// this router's name as its client id (logs, dead letters), batch size,
    /// timeouts; `retry_backoff` also paces a record's store retries.
    pub consumer: LoopConfig,
    pub redis: RedisConfig,
    pub router: RouterConfig,
    /// Attempts per record when the store fails, before the dead-letter queue.
    pub max_attempts: u32,
    /// Partitions of `palaver.inbound` if the worker has to create it.
    pub inbound_partitions: i32,
    /// The history archive behind the Redis window (SPEC §7), if any: the
    /// worker then reads below the window from it and streams what it
    /// stores to `palaver.stored` for the archiver.
    pub archive: Option<ArchiveSettings>,
}

/// The router's side of the archive.
#[derive(Clone, Debug)]
pub struct ArchiveSettings {
    pub cassandra: palaver_archive::ArchiveConfig,
    /// See [`crate::redis_store::ArchiveLink::max_unarchived`].
    pub max_unarchived: u64,
}

impl WorkerConfig {
    pub fn new(brokers: impl Into<String>, redis: RedisConfig) -> Self {
        Self {
            consumer: LoopConfig::new(
                brokers,
                "palaver-router",
                format!("router-{}", std::process::id()),
                &[super::INBOUND_TOPIC],
            ),
            redis,
            router: RouterConfig::default(),
            max_attempts: 5,
            inbound_partitions: super::DEFAULT_INBOUND_PARTITIONS,
            archive: None,
        }
    }
}

/// Counters of one worker (for logs and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    pub records: u64,
    pub batches: u64,
    pub dead_letters: u64,
    pub replays: u64,
    /// Records whose handling panicked (dead-lettered; a replayed batch counts again).
    pub panics: u64,
    /// Producers replaced after a fatal error ([`super::fatal_error`]).
    pub producers_replaced: u64,
}

/// The router worker: the consumer loop with the router as its handler.
pub struct RouterWorker {
    consumer_loop: ConsumerLoop,
    handler: RouterHandler,
}

/// Runs a poll batch of `palaver.inbound` through the router.
struct RouterHandler {
    router: Router<RedisStore>,
    router_id: String,
    retry_backoff: Duration,
    max_attempts: u32,
    /// Records whose handling panicked, caught by the runner.
    panics: u64,
}

impl RouterWorker {
    /// Creates the topics it needs, connects to Redis and joins the group.
    pub fn new(config: WorkerConfig) -> Result<Self, String> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    pub fn with_clock(mut config: WorkerConfig, clock: Arc<dyn Clock>) -> Result<Self, String> {
        super::ensure_topics(
            &config.consumer.brokers,
            &[
                (super::INBOUND_TOPIC, config.inbound_partitions),
                (super::PUSH_TOPIC, config.inbound_partitions),
                (super::STORED_TOPIC, config.inbound_partitions),
                (super::CHANNELS_TOPIC, config.inbound_partitions),
                (super::DLQ_TOPIC, 1),
            ],
            Duration::from_secs(10),
        )?;
        let mut store = RedisStore::connect(config.redis.clone())
            .map_err(|e| format!("Redis {:?}: {e}", config.redis.urls))?;
        if let Some(settings) = &config.archive {
            let archive = palaver_archive::CassandraArchive::connect(&settings.cassandra)
                .map_err(|e| format!("Cassandra {}: {e}", settings.cassandra.nodes.join(",")))?;
            store = store.with_archive(ArchiveLink {
                archive: Arc::new(archive),
                max_unarchived: settings.max_unarchived.max(1),
            });
            config.router.archive_stream = true;
        }
        // The limits gateways announce in Welcome are the ones enforced here.
        let limits = crate::api::TierLimits::of(&config.router);
        match store.publish_tier_limits(&limits) {
            Ok(Some(other)) => tracing::warn!(
                router = %config.consumer.client_id,
                "another router published other limits ({other:?}); gateways now announce this one's ({limits:?}): give every router the same"
            ),
            Ok(None) => {}
            Err(e) => return Err(format!("publishing the router's limits to Redis: {e}")),
        }
        let consumer_loop = ConsumerLoop::new(LoopConfig {
            topics: vec![super::INBOUND_TOPIC.to_string()],
            ..config.consumer.clone()
        })?;
        Ok(Self {
            consumer_loop,
            handler: RouterHandler {
                router: Router::new(store, config.router.clone(), clock),
                router_id: config.consumer.client_id,
                retry_backoff: config.consumer.retry_backoff,
                max_attempts: config.max_attempts,
                panics: 0,
            },
        })
    }

    /// Raises a fatal error on the worker's producer, as librdkafka does when
    /// a broker answers out of sequence (see [`super::raise_fatal_error`]):
    /// for fault tests.
    pub fn raise_fatal_producer_error(&self, reason: &str) {
        self.consumer_loop.raise_fatal_producer_error(reason);
    }

    pub fn stats(&self) -> WorkerStats {
        let s = self.consumer_loop.stats();
        WorkerStats {
            records: s.records,
            batches: s.batches,
            dead_letters: s.dead_letters,
            replays: s.replays,
            panics: s.panics + self.handler.panics,
            producers_replaced: s.producers_replaced,
        }
    }

    /// Runs batches until `stop` is set; a failed batch is retried after a pause.
    pub fn run(&mut self, stop: &AtomicBool) {
        self.consumer_loop.run(&mut self.handler, stop);
    }

    /// Polls one batch (waiting up to `wait` for its first record), processes,
    /// produces and commits it. Returns the number of records.
    pub fn run_batch(&mut self, wait: Duration) -> Result<usize, String> {
        self.consumer_loop.run_batch(&mut self.handler, wait)
    }
}

impl Handler for RouterHandler {
    fn handle(&mut self, batch: &[OwnedMessage], out: &mut Batch<'_>) {
        let mut requests = Vec::with_capacity(batch.len());
        let mut sources = Vec::with_capacity(batch.len());
        for record in batch {
            match super::decode_inbound(record.payload().unwrap_or_default()) {
                Ok(request) => {
                    requests.push(request);
                    sources.push(record);
                }
                Err(reason) => out.dead_letter(record, reason, 0),
            }
        }
        let mut output = Output::default();
        let mut retry = WorkerRetry {
            router_id: &self.router_id,
            backoff: self.retry_backoff,
            max_attempts: self.max_attempts,
        };
        let gave_up = runner::run(&mut self.router, &requests, &mut output, &mut retry);
        for g in gave_up {
            let record = sources[g.index];
            tracing::error!(
                router = %self.router_id,
                partition = record.partition(),
                offset = record.offset(),
                attempts = g.attempts,
                "record given up on, dead-lettered: {}",
                g.failure
            );
            if matches!(g.failure, Failure::Panicked(_)) {
                self.panics += 1;
            }
            out.dead_letter(record, g.failure.to_string(), g.attempts);
        }
        // A failure stays in `out`: the loop rewinds and the batch runs again.
        let _ = output.flush(&mut RouterOutlet { batch: out });
    }

    fn after_panic(&mut self) {
        self.router.store_mut().reset_connection();
    }
}

/// Produces router output: delivery topics, `palaver.push`,
/// `palaver.stored` and `palaver.channels`.
struct RouterOutlet<'a, 'b> {
    batch: &'a mut Batch<'b>,
}

impl Outlet for RouterOutlet<'_, '_> {
    fn deliver(&mut self, gateway_id: &str, frames: Vec<Outbound>) -> Result<(), BusError> {
        let topic = super::delivery_topic(gateway_id);
        if !self.batch.topic_exists(&topic) {
            tracing::warn!(
                gateway = gateway_id,
                frames = frames.len(),
                "no delivery topic; frames dropped"
            );
            return Ok(());
        }
        for value in super::encode_delivery_batches(frames) {
            self.batch.produce(&topic, gateway_id.as_bytes(), &value)?;
        }
        Ok(())
    }

    fn push(&mut self, events: Vec<PushEvent>) -> Result<(), BusError> {
        let mut by_user: HashMap<String, Vec<records::PushEvent>> = HashMap::new();
        for e in events {
            by_user
                .entry(e.user_id.clone())
                .or_default()
                .push(records::PushEvent::from(e));
        }
        for (user_id, events) in by_user {
            let value = records::PushRecord {
                user_id: user_id.clone(),
                events,
            }
            .encode_to_vec();
            self.batch
                .produce(super::PUSH_TOPIC, user_id.as_bytes(), &value)?;
        }
        Ok(())
    }

    fn broadcast(&mut self, posts: Vec<ChannelPost>) -> Result<(), BusError> {
        // One record per post, keyed by the channel: every gateway reads it
        // once, whatever the member count (SPEC §21).
        for post in posts {
            let key = post.conversation_id.clone();
            let value = super::encode_channel_post(post);
            self.batch
                .produce(super::CHANNELS_TOPIC, key.as_bytes(), &value)?;
        }
        Ok(())
    }

    fn archive(&mut self, stored: Vec<palaver_protocol::pb::Message>) -> Result<(), BusError> {
        for record in Self::archive_records(stored) {
            self.batch.produce(
                super::STORED_TOPIC,
                record.conversation_id.as_bytes(),
                &record.encode_to_vec(),
            )?;
        }
        Ok(())
    }
}

impl RouterOutlet<'_, '_> {
    /// One `palaver.stored` record per conversation, its messages in seq
    /// order (the router stores them in that order).
    fn archive_records(stored: Vec<palaver_protocol::pb::Message>) -> Vec<records::StoredRecord> {
        let mut records: Vec<records::StoredRecord> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for message in stored {
            match index.get(&message.conversation_id) {
                Some(&i) => records[i].messages.push(message),
                None => {
                    index.insert(message.conversation_id.clone(), records.len());
                    records.push(records::StoredRecord {
                        conversation_id: message.conversation_id.clone(),
                        messages: vec![message],
                    });
                }
            }
        }
        records
    }
}

/// The worker's retries: a store error is retried with exponential backoff
/// up to `max_attempts`; after a panic the Redis connection is dropped (it
/// may have been left mid-reply).
struct WorkerRetry<'a> {
    router_id: &'a str,
    backoff: Duration,
    max_attempts: u32,
}

impl runner::Retry<RedisStore> for WorkerRetry<'_> {
    fn again(&mut self, error: &StoreError, attempt: u32) -> bool {
        if attempt >= self.max_attempts {
            return false;
        }
        tracing::warn!(router = %self.router_id, attempt, "store error, retrying: {error}");
        thread::sleep(self.backoff * 2u32.saturating_pow(attempt - 1));
        true
    }

    fn after_panic(&mut self, store: &mut RedisStore) {
        store.reset_connection();
    }
}
