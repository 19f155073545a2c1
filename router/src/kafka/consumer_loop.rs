//! The at-least-once Kafka consumer loop every worker runs (the router
//! worker, and the workers built after it: the push worker, the history
//! archiver): one member of a consumer group, one poll batch at a time, on
//! one thread. A worker is a [`Handler`]: it turns a batch of records into
//! records to produce; the loop does everything else, once:
//!
//! 1. poll up to `max_batch` records (each partition's in order), waiting up
//!    to the given time for the first;
//! 2. hand them to the handler, which produces its output through a
//!    [`Batch`] (records to topics, dead letters) without waiting record by
//!    record. A handler that panics on the batch gets the records again one
//!    at a time, and the record that panics again goes to `palaver.dlq`
//!    (reason `panicked: …`): a poisoned record never stops its partition
//!    or the thread;
//! 3. wait once until Kafka acknowledged everything produced (acks=all);
//! 4. only then mark the batch's offsets for commit, committed at most every
//!    `commit_interval` and only for partitions this member still owns (a
//!    rebalance since may have moved them).
//!
//! If producing fails, the consumer is rewound to the batch's first offsets
//! and the batch runs again (a producer that failed for good,
//! [`super::fatal_error`], is replaced by a new one first): at-least-once,
//! so a handler's effects must be idempotent (the router's appends dedup,
//! receipts only move forward, an archive write is keyed by seq).

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};

use super::records;
use crate::bus::BusError;
use crate::runner::panic_message;

/// Settings of one consumer loop.
#[derive(Clone, Debug)]
pub struct LoopConfig {
    /// Kafka `bootstrap.servers`.
    pub brokers: String,
    /// The consumer group the worker's instances share.
    pub group_id: String,
    /// This instance's name (Kafka client id, logs, dead letters).
    pub client_id: String,
    /// Topics consumed.
    pub topics: Vec<String>,
    /// Records per poll batch, at most.
    pub max_batch: usize,
    /// Producer linger, ms.
    pub linger_ms: u32,
    /// How long to wait for the batch's output to be acknowledged.
    pub flush_timeout: Duration,
    /// Consumer-group session: a member silent this long loses its
    /// partitions to the others (at least the broker's
    /// group.min.session.timeout.ms). Shorter moves a dead member's
    /// partitions sooner, but a broker or host stalled that long (GC, CPU
    /// starvation) then costs a whole rebalance of a live member.
    pub session_timeout: Duration,
    /// Processed offsets are committed at most this often (and whenever a
    /// poll comes back empty). Committing after every small batch floods the
    /// group coordinator, whose queue then delays heartbeats past the session
    /// timeout (a live router rebalanced at 1,000 msg/s). Offsets not yet
    /// committed are replayed after a crash or rebalance, and handlers are
    /// idempotent.
    pub commit_interval: Duration,
    /// First pause after a failed batch (doubling, at most 5 s).
    pub retry_backoff: Duration,
    /// How often [`ConsumerLoop::run`] logs its counters and consumer lag
    /// (info level): how far behind a worker is, from its log alone.
    pub report_interval: Duration,
}

impl LoopConfig {
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        client_id: impl Into<String>,
        topics: &[&str],
    ) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: group_id.into(),
            client_id: client_id.into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            max_batch: 500,
            linger_ms: 1,
            flush_timeout: Duration::from_secs(15),
            session_timeout: Duration::from_secs(10),
            commit_interval: Duration::from_millis(200),
            retry_backoff: Duration::from_millis(100),
            report_interval: Duration::from_secs(10),
        }
    }
}

/// A worker on the loop: turns one poll batch into records to produce.
pub trait Handler {
    /// Handles `records` (each partition's in offset order), producing
    /// through `out`. Called again with the same records when the batch is
    /// replayed, and with one record at a time after a panic.
    fn handle(&mut self, records: &[OwnedMessage], out: &mut Batch<'_>);

    /// After the handler panicked, before the records are handled one at a
    /// time: e.g. drop a store connection left mid-reply.
    fn after_panic(&mut self) {}
}

/// What a handler produces for one batch. Records go to the producer at
/// once; the loop waits for all of them together.
pub struct Batch<'a> {
    producer: &'a ThreadedProducer<DeliveryTracker>,
    known_topics: &'a mut HashSet<String>,
    flush_timeout: Duration,
    client_id: &'a str,
    dead_letters: usize,
    /// The first produce error: the batch is rewound and runs again.
    failed: Option<BusError>,
}

impl Batch<'_> {
    /// Produces one record (waits while librdkafka's queue is full, up to
    /// the flush timeout). After a failure, further records are refused
    /// with the same error: the batch will run again.
    pub fn produce(&mut self, topic: &str, key: &[u8], value: &[u8]) -> Result<(), BusError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
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
                    thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    let e = BusError::Unavailable(format!("produce to {topic}: {e}"));
                    self.failed = Some(e.clone());
                    return Err(e);
                }
            }
        }
    }

    /// True if the topic exists (cached once seen): a worker writing to
    /// per-destination topics can drop what has nowhere to go.
    pub fn topic_exists(&mut self, topic: &str) -> bool {
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

    /// Fails the batch: it is rewound and runs again after the loop's
    /// backoff (something the handler needs, a store or the archive, is
    /// down). Nothing of it is committed.
    pub fn fail(&mut self, error: BusError) {
        if self.failed.is_none() {
            self.failed = Some(error);
        }
    }

    /// Sends `record` to `palaver.dlq` with the reason it was given up on.
    pub fn dead_letter(&mut self, record: &OwnedMessage, reason: String, attempts: u32) {
        let letter = records::DeadLetter {
            topic: record.topic().to_owned(),
            partition: record.partition(),
            offset: record.offset(),
            key: record.key().unwrap_or_default().to_vec(),
            value: record.payload().unwrap_or_default().to_vec(),
            reason,
            attempts,
            failed_ms: unix_ms(),
            router_id: self.client_id.to_owned(),
        };
        self.dead_letters += 1;
        // A failure is kept in `failed`: the batch runs again.
        let _ = self.produce(super::DLQ_TOPIC, &letter.key, &letter.encode_to_vec());
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Counters of one loop (logs, tests, metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopStats {
    pub records: u64,
    pub batches: u64,
    /// Records sent to `palaver.dlq` (by the handler or after a panic).
    pub dead_letters: u64,
    /// Batches rewound and run again after a produce failure.
    pub replays: u64,
    /// Records whose handling panicked.
    pub panics: u64,
    /// Producers replaced after a fatal error ([`super::fatal_error`]).
    pub producers_replaced: u64,
    /// Records in the last batch.
    pub last_batch: u64,
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
pub struct DeliveryTracker {
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

/// Logs rebalances (the loop sends its commit before the next poll, so
/// nothing processed is left uncommitted when partitions move), and keeps
/// the consumer lag librdkafka reports in its statistics.
pub struct RebalanceLog {
    client_id: String,
    /// Records behind the end of the assigned partitions, summed (-1 until
    /// the first statistics arrive).
    lag: AtomicI64,
}

impl ClientContext for RebalanceLog {
    fn stats(&self, statistics: Statistics) {
        let lag: i64 = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .map(|p| p.consumer_lag)
            .filter(|lag| *lag >= 0)
            .sum();
        self.lag.store(lag, Ordering::Relaxed);
    }
}

impl ConsumerContext for RebalanceLog {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(client = %self.client_id, partitions = tpl.count(), "partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(client = %self.client_id, partitions = tpl.count(), "partitions revoked")
            }
            Rebalance::Error(e) => tracing::warn!(client = %self.client_id, "rebalance error: {e}"),
        }
    }
}

/// One member of a consumer group running a [`Handler`] at least once.
pub struct ConsumerLoop {
    config: LoopConfig,
    consumer: BaseConsumer<RebalanceLog>,
    producer: ThreadedProducer<DeliveryTracker>,
    known_topics: HashSet<String>,
    stats: LoopStats,
    /// Next offset to commit per (topic, partition): processed, not yet
    /// committed.
    pending_commit: HashMap<(String, i32), i64>,
    last_commit: Instant,
}

impl ConsumerLoop {
    /// Joins the group and subscribes (the topics must exist, or be created
    /// by the broker).
    pub fn new(config: LoopConfig) -> Result<Self, String> {
        let consumer: BaseConsumer<RebalanceLog> =
            super::consumer_config(&config.brokers, &config.group_id, config.session_timeout)
                .set("client.id", &config.client_id)
                // Statistics (consumer lag) every 5 s: a few KB of JSON.
                .set("statistics.interval.ms", "5000")
                .create_with_context(RebalanceLog {
                    client_id: config.client_id.clone(),
                    lag: AtomicI64::new(-1),
                })
                .map_err(|e| format!("Kafka consumer: {e}"))?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| format!("subscribe {topics:?}: {e}"))?;
        let producer = Self::create_producer(&config)?;
        Ok(Self {
            config,
            consumer,
            producer,
            known_topics: HashSet::new(),
            stats: LoopStats::default(),
            pending_commit: HashMap::new(),
            last_commit: Instant::now(),
        })
    }

    fn create_producer(config: &LoopConfig) -> Result<ThreadedProducer<DeliveryTracker>, String> {
        super::producer_config(&config.brokers, config.linger_ms)
            .set("client.id", &config.client_id)
            .create_with_context(DeliveryTracker::default())
            .map_err(|e| format!("Kafka producer: {e}"))
    }

    pub fn config(&self) -> &LoopConfig {
        &self.config
    }

    pub fn stats(&self) -> LoopStats {
        self.stats
    }

    /// Raises a fatal error on the loop's producer, as librdkafka does when
    /// a broker answers out of sequence (see [`super::raise_fatal_error`]):
    /// for fault tests.
    pub fn raise_fatal_producer_error(&self, reason: &str) {
        super::raise_fatal_error(self.producer.client(), reason);
    }

    /// Runs batches until `stop` is set; a failed batch is run again after
    /// a pause (doubling up to 5 s).
    pub fn run(&mut self, handler: &mut dyn Handler, stop: &AtomicBool) {
        let mut pause = self.config.retry_backoff;
        let mut reported = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            match self.run_batch(handler, Duration::from_millis(100)) {
                Ok(_) => pause = self.config.retry_backoff,
                Err(e) => {
                    tracing::warn!(client = %self.config.client_id, "batch failed, replaying: {e}");
                    thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
            if reported.elapsed() >= self.config.report_interval {
                reported = Instant::now();
                tracing::info!(
                    client = %self.config.client_id,
                    records = self.stats.records,
                    batches = self.stats.batches,
                    replays = self.stats.replays,
                    dead_letters = self.stats.dead_letters,
                    lag = ?self.lag(),
                    "consumer loop"
                );
            }
        }
        tracing::info!(client = %self.config.client_id, stats = ?self.stats, "consumer loop stopping");
    }

    /// Polls one batch (waiting up to `wait` for its first record), hands
    /// it to `handler`, waits for its output and marks it for commit.
    /// Returns the number of records; on a produce failure the batch is
    /// rewound (it runs again with the next call) and the error returned.
    pub fn run_batch(
        &mut self,
        handler: &mut dyn Handler,
        wait: Duration,
    ) -> Result<usize, String> {
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let mut timeout = wait;
        while batch.len() < self.config.max_batch {
            match self.consumer.poll(timeout) {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(client = %self.config.client_id, "consumer: {e}");
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

        self.producer
            .context()
            .failures
            .lock()
            .map(|mut f| f.clear())
            .ok();
        let mut out = Batch {
            producer: &self.producer,
            known_topics: &mut self.known_topics,
            flush_timeout: self.config.flush_timeout,
            client_id: &self.config.client_id,
            dead_letters: 0,
            failed: None,
        };
        let handled = catch_unwind(AssertUnwindSafe(|| handler.handle(&batch, &mut out)));
        if handled.is_err() {
            // Whatever the panicking pass produced is not taken back (it
            // is at least once anyway): each record once more on its own,
            // and the one that panics again is dead-lettered.
            handler.after_panic();
            for record in &batch {
                let one = std::slice::from_ref(record);
                if let Err(panic) = catch_unwind(AssertUnwindSafe(|| handler.handle(one, &mut out)))
                {
                    let message = panic_message(&*panic);
                    tracing::error!(
                        client = %self.config.client_id,
                        topic = record.topic(),
                        partition = record.partition(),
                        offset = record.offset(),
                        "record handling panicked, dead-lettered: {message}"
                    );
                    self.stats.panics += 1;
                    handler.after_panic();
                    out.dead_letter(record, format!("panicked: {message}"), 1);
                }
            }
        }
        let produced = match out.failed.take() {
            Some(e) => Err(e.to_string()),
            None => Ok(()),
        };
        let dead_letters = out.dead_letters;
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
                !(topic.starts_with(super::DELIVERY_TOPIC_PREFIX)
                    && e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition))
            })
            .collect();
        let failed = match produced.and(flushed.map_err(|e| format!("flush: {e}"))) {
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
            self.pending_commit.insert(
                (record.topic().to_owned(), record.partition()),
                record.offset() + 1,
            );
        }
        self.commit_pending(false);
        self.stats.records += batch.len() as u64;
        self.stats.batches += 1;
        self.stats.dead_letters += dead_letters as u64;
        self.stats.last_batch = batch.len() as u64;
        Ok(batch.len())
    }

    /// Records behind the end of this member's partitions, as librdkafka
    /// last reported (every 5 s); None before its first report.
    pub fn lag(&self) -> Option<u64> {
        u64::try_from(self.consumer.context().lag.load(Ordering::Relaxed)).ok()
    }

    /// A producer with a fatal error fails every write from then on: the
    /// loop would replay its batch forever. Replaced by a new one (the old
    /// one's unacknowledged records are abandoned; the batch that needed
    /// them is rewound and runs again).
    fn replace_producer_if_fatal(&mut self) {
        let Some(fatal) = super::fatal_error(self.producer.client()) else {
            return;
        };
        match Self::create_producer(&self.config) {
            Ok(fresh) => {
                tracing::error!(
                    client = %self.config.client_id,
                    "Kafka producer failed for good ({fatal}); replaced by a new one"
                );
                // Dropping the old one purges what it still held.
                self.producer = fresh;
                self.stats.producers_replaced += 1;
            }
            Err(e) => tracing::error!(
                client = %self.config.client_id,
                "Kafka producer failed for good ({fatal}); a new one could not be made ({e}), trying again with the next batch"
            ),
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
        for ((topic, partition), offset) in self.pending_commit.drain() {
            if owned.find_partition(&topic, partition).is_none() {
                continue;
            }
            if let Err(e) = offsets.add_partition_offset(&topic, partition, Offset::Offset(offset))
            {
                tracing::warn!(client = %self.config.client_id, "offset list: {e}");
            }
        }
        self.last_commit = Instant::now();
        if offsets.count() == 0 {
            return;
        }
        // Async: a synchronous commit blocks the loop for as long as the
        // group coordinator is unreachable (25 s across a broker restart).
        // A commit that fails or is lost only means a replay from the last
        // commit that did land, and handlers are idempotent.
        if let Err(e) = self.consumer.commit(&offsets, CommitMode::Async) {
            tracing::warn!(client = %self.config.client_id, "commit failed: {e}");
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
