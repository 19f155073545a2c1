//! The router worker: a member of the `palaver.inbound` consumer group that
//! runs the routing logic over [`RedisStore`] and ships the output to Kafka.
//!
//! One poll batch at a time, on one thread, as ONE unit:
//! 1. poll up to `max_batch` records (every partition's records arrive in
//!    partition order, and are processed in that order);
//! 2. run them through [`Router::handle_batch`]: each run of consecutive
//!    Sends costs one pipeline of append scripts (one round trip, one AOF
//!    fsync), one group read and one session lookup (two round trips), not
//!    a few round trips per record; any other request is handled on its own
//!    in input order. If the store fails or handling panics, the records
//!    from the failed one on are handled one at a time as before batching:
//!    a store error is retried with backoff, and after `max_attempts` the
//!    record goes to `palaver.dlq` with the reason and the client gets
//!    `Error(UNAVAILABLE)`; a record whose handling panics goes to
//!    `palaver.dlq` at once (reason `panicked: …`), the client gets
//!    `Error(INTERNAL)`;
//! 3. produce the whole batch's output — ONE `DeliveryBatch` record per
//!    destination gateway (split only past 512 KiB), a `PushRecord` per
//!    offline user — without waiting record by record, then wait once until
//!    Kafka acknowledged all of it (acks=all);
//! 4. only then mark the batch's offsets for commit (committed at most
//!    every `commit_interval`).
//!
//! If producing fails, the consumer is rewound to the batch's first offsets
//! and the batch runs again: at-least-once (a producer that failed for good,
//! [`super::fatal_error`], is replaced by a new one first). Replays are safe
//! because the append script dedups by (conversation, sender, client_msg_id) and
//! returns the original ack, and receipts only ever move forward. A rebalance in the
//! middle of a batch can let two routers briefly work on one partition; the
//! atomic append keeps every seq unique and gap-free even then.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::records;
use crate::api::Outbound;
use crate::bus::{BusError, Outlet, Output, PushEvent};
use crate::logic::{Clock, Router, RouterConfig, SystemClock};
use crate::redis_store::{RedisConfig, RedisStore};
use crate::store::StoreError;

/// Settings of one router worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Kafka `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group shared by all routers.
    pub group_id: String,
    /// This router's name (logs, dead letters).
    pub router_id: String,
    pub redis: RedisConfig,
    pub router: RouterConfig,
    /// Records per batch (one produce flush + one commit per batch).
    pub max_batch: usize,
    /// Attempts per record when the store fails, before the dead-letter queue.
    pub max_attempts: u32,
    /// Wait before the first retry; doubled each time.
    pub retry_backoff: Duration,
    pub linger_ms: u32,
    /// Partitions of `palaver.inbound` if the worker has to create it.
    pub inbound_partitions: i32,
    /// How long to wait for Kafka to acknowledge a batch's output.
    pub flush_timeout: Duration,
    /// Consumer-group session: a router silent this long loses its
    /// partitions to the others. Shorter moves a dead router's partitions
    /// sooner, but a broker or host stalled that long (GC, CPU starvation)
    /// then costs a whole rebalance of a live router.
    pub session_timeout: Duration,
    /// Processed offsets are committed at most this often (and whenever a
    /// poll comes back empty). Committing after every small batch floods the
    /// group coordinator, whose queue then delays heartbeats past the session
    /// timeout (a live router rebalanced at 1,000 msg/s). Offsets not yet
    /// committed are replayed after a crash or rebalance, and replays are
    /// deduplicated.
    pub commit_interval: Duration,
}

impl WorkerConfig {
    pub fn new(brokers: impl Into<String>, redis: RedisConfig) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: "palaver-router".into(),
            router_id: format!("router-{}", std::process::id()),
            redis,
            router: RouterConfig::default(),
            max_batch: 500,
            max_attempts: 5,
            retry_backoff: Duration::from_millis(100),
            linger_ms: 1,
            inbound_partitions: super::DEFAULT_INBOUND_PARTITIONS,
            flush_timeout: Duration::from_secs(15),
            session_timeout: Duration::from_secs(10),
            commit_interval: Duration::from_millis(200),
        }
    }
}

/// Waits until every produced record is acknowledged (or failed). The
/// producer's own thread serves the delivery reports and wakes us through
/// [`DeliveryTracker`]. Not `Producer::flush` (it sleeps in 100 ms steps) and
/// not `poll(1 ms)` in a loop: rdkafka turns a sub-millisecond remainder into
/// a zero timeout, so that loop spins a whole core while it waits.
fn wait_acknowledged(
    producer: &ThreadedProducer<DeliveryTracker>,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let deadline = Instant::now() + timeout;
    let tracker = producer.context();
    let mut reports = tracker.reports.lock().unwrap_or_else(|e| e.into_inner());
    while producer.in_flight_count() > 0 {
        let now = Instant::now();
        if now >= deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        // in_flight_count drops just after the report callback returns, so
        // the wait is bounded short rather than trusting one notification.
        let wait = (deadline - now).min(Duration::from_millis(1));
        reports = tracker
            .delivered
            .wait_timeout(reports, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    Ok(())
}

/// Records produce failures reported by librdkafka's delivery callbacks, and
/// wakes [`wait_acknowledged`] on every report.
#[derive(Default)]
struct DeliveryTracker {
    failures: Mutex<Vec<(String, KafkaError)>>,
    /// Count of delivery reports; paired with `delivered`.
    reports: Mutex<u64>,
    delivered: std::sync::Condvar,
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, message)) = result {
            if let Ok(mut failures) = self.failures.lock() {
                failures.push((message.topic().to_owned(), error.clone()));
            }
        }
        if let Ok(mut reports) = self.reports.lock() {
            *reports += 1;
        }
        self.delivered.notify_all();
    }
}

/// Logs rebalances (the batch loop sends its commit before the next poll, so nothing
/// processed is left uncommitted when partitions move).
struct RebalanceLog {
    router_id: String,
}

impl ClientContext for RebalanceLog {}

impl ConsumerContext for RebalanceLog {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(router = %self.router_id, partitions = tpl.count(), "partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(router = %self.router_id, partitions = tpl.count(), "partitions revoked")
            }
            Rebalance::Error(e) => tracing::warn!(router = %self.router_id, "rebalance error: {e}"),
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

pub struct RouterWorker {
    config: WorkerConfig,
    consumer: BaseConsumer<RebalanceLog>,
    producer: ThreadedProducer<DeliveryTracker>,
    router: Router<RedisStore>,
    clock: Arc<dyn Clock>,
    known_topics: HashSet<String>,
    stats: WorkerStats,
    /// Next offset to commit per `palaver.inbound` partition (the only topic
    /// the worker consumes): processed, not yet committed.
    pending_commit: HashMap<i32, i64>,
    last_commit: Instant,
}

/// Produces router output to Kafka (delivery topics and `palaver.push`).
struct KafkaOutlet<'a> {
    producer: &'a ThreadedProducer<DeliveryTracker>,
    known_topics: &'a mut HashSet<String>,
    flush_timeout: Duration,
}

impl KafkaOutlet<'_> {
    fn send(&self, topic: &str, key: &[u8], value: &[u8]) -> Result<(), BusError> {
        let deadline = Instant::now() + self.flush_timeout;
        loop {
            match self
                .producer
                .send(BaseRecord::to(topic).key(key).payload(value))
            {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if Instant::now() < deadline =>
                {
                    // The producer's thread drains the queue meanwhile.
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    return Err(BusError::Unavailable(format!("produce to {topic}: {e}")))
                }
            }
        }
    }

    /// True if the topic exists (cached once seen).
    fn topic_exists(&mut self, topic: &str) -> bool {
        if self.known_topics.contains(topic) {
            return true;
        }
        let exists = self
            .producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .map(|m| {
                m.topics()
                    .iter()
                    .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            })
            .unwrap_or(false);
        if exists {
            self.known_topics.insert(topic.to_owned());
        }
        exists
    }
}

impl Outlet for KafkaOutlet<'_> {
    fn deliver(&mut self, gateway_id: &str, frames: Vec<Outbound>) -> Result<(), BusError> {
        let topic = super::delivery_topic(gateway_id);
        if !self.topic_exists(&topic) {
            tracing::warn!(
                gateway = gateway_id,
                frames = frames.len(),
                "no delivery topic; frames dropped"
            );
            return Ok(());
        }
        for value in super::encode_delivery_batches(frames) {
            self.send(&topic, gateway_id.as_bytes(), &value)?;
        }
        Ok(())
    }

    fn push(&mut self, events: Vec<PushEvent>) -> Result<(), BusError> {
        let mut by_user: HashMap<String, Vec<records::PushEvent>> = HashMap::new();
        for e in events {
            by_user
                .entry(e.user_id.clone())
                .or_default()
                .push(records::PushEvent {
                    user_id: e.user_id,
                    conversation_id: e.conversation_id,
                    seq: e.seq,
                    message_id: e.message_id,
                    sender_user_id: e.sender_user_id,
                    kind: e.kind,
                    server_time_ms: e.server_time_ms,
                });
        }
        for (user_id, events) in by_user {
            let value = records::PushRecord {
                user_id: user_id.clone(),
                events,
            }
            .encode_to_vec();
            self.send(super::PUSH_TOPIC, user_id.as_bytes(), &value)?;
        }
        Ok(())
    }
}

impl RouterWorker {
    /// Creates the topics it needs, connects to Redis and joins the group.
    pub fn new(config: WorkerConfig) -> Result<Self, String> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    pub fn with_clock(config: WorkerConfig, clock: Arc<dyn Clock>) -> Result<Self, String> {
        super::ensure_topics(
            &config.brokers,
            &[
                (super::INBOUND_TOPIC, config.inbound_partitions),
                (super::PUSH_TOPIC, config.inbound_partitions),
                (super::DLQ_TOPIC, 1),
            ],
            Duration::from_secs(10),
        )?;
        let store = RedisStore::connect(config.redis.clone())
            .map_err(|e| format!("Redis {:?}: {e}", config.redis.urls))?;
        let mut consumer_config = ClientConfig::new();
        // librdkafka debug contexts (e.g. "cgrp,topic"), logged through `log`.
        if let Ok(debug) = std::env::var("PALAVER_KAFKA_DEBUG") {
            consumer_config.set("debug", debug);
        }
        let consumer: BaseConsumer<RebalanceLog> = consumer_config
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group_id)
            .set("client.id", &config.router_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // A dead router's partitions move after this (at least the
            // broker's group.min.session.timeout.ms, 6 s by default).
            .set(
                "session.timeout.ms",
                config.session_timeout.as_millis().to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (config.session_timeout.as_millis() / 3)
                    .max(500)
                    .to_string(),
            )
            // Long poll: the broker answers a fetch as soon as one byte is
            // there (fetch.min.bytes 1), else after fetch.wait.max.ms. The
            // wait bounds only how often an idle consumer asks, not latency.
            .set("fetch.min.bytes", "1")
            .set("fetch.wait.max.ms", super::FETCH_WAIT_MAX_MS)
            .set("reconnect.backoff.max.ms", super::RECONNECT_BACKOFF_MAX_MS)
            .set("socket.nagle.disable", "true")
            .create_with_context(RebalanceLog {
                router_id: config.router_id.clone(),
            })
            .map_err(|e| format!("Kafka consumer: {e}"))?;
        consumer
            .subscribe(&[super::INBOUND_TOPIC])
            .map_err(|e| format!("subscribe {}: {e}", super::INBOUND_TOPIC))?;
        let producer = Self::create_producer(&config)?;
        let router = Router::new(store, config.router.clone(), clock.clone());
        Ok(Self {
            config,
            consumer,
            producer,
            router,
            clock,
            known_topics: HashSet::new(),
            stats: WorkerStats::default(),
            pending_commit: HashMap::new(),
            last_commit: Instant::now(),
        })
    }

    fn create_producer(config: &WorkerConfig) -> Result<ThreadedProducer<DeliveryTracker>, String> {
        super::producer_config(&config.brokers, config.linger_ms)
            .set("client.id", &config.router_id)
            .create_with_context(DeliveryTracker::default())
            .map_err(|e| format!("Kafka producer: {e}"))
    }

    /// A producer with a fatal error fails every write from then on: the
    /// worker would replay its batch forever. Replaced by a new one (the
    /// old one's unacknowledged records are abandoned; the batch that
    /// needed them is rewound and runs again, and replays are deduplicated).
    fn replace_producer_if_fatal(&mut self) {
        let Some(fatal) = super::fatal_error(self.producer.client()) else {
            return;
        };
        match Self::create_producer(&self.config) {
            Ok(fresh) => {
                tracing::error!(
                    router = %self.config.router_id,
                    "Kafka producer failed for good ({fatal}); replaced by a new one"
                );
                // Dropping the old one purges what it still held.
                self.producer = fresh;
                self.stats.producers_replaced += 1;
            }
            Err(e) => tracing::error!(
                router = %self.config.router_id,
                "Kafka producer failed for good ({fatal}); a new one could not be made ({e}), trying again with the next batch"
            ),
        }
    }

    /// Raises a fatal error on the worker's producer, as librdkafka does when
    /// a broker answers out of sequence (see [`super::raise_fatal_error`]):
    /// for fault tests.
    pub fn raise_fatal_producer_error(&self, reason: &str) {
        super::raise_fatal_error(self.producer.client(), reason);
    }

    pub fn stats(&self) -> WorkerStats {
        self.stats
    }

    /// Runs batches until `stop` is set; a failed batch is retried after a pause.
    pub fn run(&mut self, stop: &AtomicBool) {
        let mut pause = self.config.retry_backoff;
        while !stop.load(Ordering::Relaxed) {
            match self.run_batch(Duration::from_millis(100)) {
                Ok(_) => pause = self.config.retry_backoff,
                Err(e) => {
                    tracing::warn!(router = %self.config.router_id, "batch failed, replaying: {e}");
                    thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
        tracing::info!(router = %self.config.router_id, stats = ?self.stats, "router worker stopping");
    }

    /// Polls one batch (waiting up to `wait` for its first record), processes,
    /// produces and commits it. Returns the number of records.
    pub fn run_batch(&mut self, wait: Duration) -> Result<usize, String> {
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let mut timeout = wait;
        while batch.len() < self.config.max_batch {
            match self.consumer.poll(timeout) {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(router = %self.config.router_id, "consumer: {e}");
                    break;
                }
                Some(Ok(message)) => batch.push(message.detach()),
            }
            timeout = Duration::ZERO;
        }
        if batch.is_empty() {
            self.commit_pending(true);
            return Ok(0);
        }

        let mut out = Output::default();
        let mut dead_letters = Vec::new();
        self.process_batch(&batch, &mut out, &mut dead_letters);

        self.producer
            .context()
            .failures
            .lock()
            .map(|mut f| f.clear())
            .ok();
        let mut outlet = KafkaOutlet {
            producer: &self.producer,
            known_topics: &mut self.known_topics,
            flush_timeout: self.config.flush_timeout,
        };
        let mut produced = out.flush(&mut outlet);
        for letter in &dead_letters {
            if produced.is_ok() {
                produced = outlet.send(super::DLQ_TOPIC, &letter.key, &letter.encode_to_vec());
            }
        }
        let flushed = wait_acknowledged(&self.producer, self.config.flush_timeout);
        let failures: Vec<(String, KafkaError)> = self
            .producer
            .context()
            .failures
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default();
        // A vanished gateway's topic is not worth a replay: its connections are gone.
        let fatal: Vec<&(String, KafkaError)> = failures
            .iter()
            .filter(|(topic, e)| {
                !(topic.starts_with("palaver.deliver.")
                    && e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition))
            })
            .collect();
        let failed = match produced
            .map_err(|e| e.to_string())
            .and(flushed.map_err(|e| format!("flush: {e}")))
        {
            Err(e) => Some(e),
            Ok(()) => fatal.first().map(|(topic, e)| {
                format!("{} produce failures, first on {topic}: {e}", fatal.len())
            }),
        };
        if let Some(e) = failed {
            self.replace_producer_if_fatal();
            self.rewind(&batch)?;
            return Err(e);
        }

        // Everything the batch produced is durable: its offsets may be
        // committed.
        for record in &batch {
            self.pending_commit
                .insert(record.partition(), record.offset() + 1);
        }
        self.commit_pending(false);
        self.stats.records += batch.len() as u64;
        self.stats.batches += 1;
        self.stats.dead_letters += dead_letters.len() as u64;
        Ok(batch.len())
    }

    /// Runs the whole poll batch through the one runner
    /// ([`crate::runner::run`]): one unit first (runs of Sends share one
    /// pipelined append and one session lookup); from a failed unit on, one
    /// record at a time, a store error retried with backoff up to
    /// `max_attempts`, then answered UNAVAILABLE; a panicking record answered
    /// INTERNAL at once. Either way the record goes to `palaver.dlq` with
    /// its reason and the worker moves on.
    fn process_batch(
        &mut self,
        batch: &[OwnedMessage],
        out: &mut Output,
        dead: &mut Vec<records::DeadLetter>,
    ) {
        let mut requests = Vec::with_capacity(batch.len());
        let mut sources = Vec::with_capacity(batch.len());
        for record in batch {
            match super::decode_inbound(record.payload().unwrap_or_default()) {
                Ok(request) => {
                    requests.push(request);
                    sources.push(record);
                }
                Err(reason) => dead.push(self.dead_letter(record, reason, 0)),
            }
        }
        let mut retry = WorkerRetry {
            router_id: &self.config.router_id,
            backoff: self.config.retry_backoff,
            max_attempts: self.config.max_attempts,
        };
        let gave_up = crate::runner::run(&mut self.router, &requests, out, &mut retry);
        for g in gave_up {
            let record = sources[g.index];
            tracing::error!(
                router = %self.config.router_id,
                partition = record.partition(),
                offset = record.offset(),
                attempts = g.attempts,
                "record given up on, dead-lettered: {}",
                g.failure
            );
            if matches!(g.failure, crate::runner::Failure::Panicked(_)) {
                self.stats.panics += 1;
            }
            dead.push(self.dead_letter(record, g.failure.to_string(), g.attempts));
        }
    }

    fn dead_letter(
        &self,
        record: &OwnedMessage,
        reason: String,
        attempts: u32,
    ) -> records::DeadLetter {
        records::DeadLetter {
            topic: record.topic().to_owned(),
            partition: record.partition(),
            offset: record.offset(),
            key: record.key().unwrap_or_default().to_vec(),
            value: record.payload().unwrap_or_default().to_vec(),
            reason,
            attempts,
            failed_ms: self.clock.now_ms(),
            router_id: self.config.router_id.clone(),
        }
    }

    /// Commits the processed offsets if `commit_interval` has passed (or
    /// `idle`: nothing is arriving, so there is no batch to fold them into).
    fn commit_pending(&mut self, idle: bool) {
        if self.pending_commit.is_empty()
            || (!idle && self.last_commit.elapsed() < self.config.commit_interval)
        {
            return;
        }
        // Only partitions still ours: a rebalance since they were processed
        // may have moved them, and an old offset must not overwrite the new
        // owner's progress.
        let owned = self.consumer.assignment().unwrap_or_default();
        let mut offsets = TopicPartitionList::new();
        let topic = super::INBOUND_TOPIC;
        for (partition, offset) in self.pending_commit.drain() {
            if owned.find_partition(topic, partition).is_none() {
                continue;
            }
            if let Err(e) = offsets.add_partition_offset(topic, partition, Offset::Offset(offset)) {
                tracing::warn!(router = %self.config.router_id, "offset list: {e}");
            }
        }
        self.last_commit = Instant::now();
        // Async: a synchronous commit blocks the router for as long as the
        // group coordinator is unreachable (25 s across a broker restart).
        // A commit that fails or is lost only means a replay from the last
        // commit that did land, and replays are deduplicated.
        if let Err(e) = self.consumer.commit(&offsets, CommitMode::Async) {
            tracing::warn!(router = %self.config.router_id, "commit failed: {e}");
        }
    }

    /// Seeks every partition of the batch back to its first record.
    fn rewind(&mut self, batch: &[OwnedMessage]) -> Result<(), String> {
        self.stats.replays += 1;
        let mut first: HashMap<(String, i32), i64> = HashMap::new();
        for record in batch {
            first
                .entry((record.topic().to_owned(), record.partition()))
                .or_insert(record.offset());
        }
        for ((topic, partition), offset) in first {
            self.consumer
                .seek(
                    &topic,
                    partition,
                    Offset::Offset(offset),
                    Duration::from_secs(5),
                )
                .map_err(|e| format!("rewind {topic}/{partition} to {offset}: {e}"))?;
        }
        Ok(())
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

impl crate::runner::Retry<RedisStore> for WorkerRetry<'_> {
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
