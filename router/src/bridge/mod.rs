//! The gateway's Kafka/Redis backend: an [`api::Backend`] that sends writes
//! through Kafka to the router tier and serves reads from Redis.
//!
//! - Writes (Send, Receipt, Typing, CreateConversation, ChangeMembers, and
//!   anything else that is not a read) become `InboundRecord`s on
//!   `palaver.inbound`, keyed by [`Inbound::partition_key`], by an
//!   idempotent acks=all producer (`writes.rs`: replaced if it fails for
//!   good). If Kafka does not take a write in time the client gets
//!   `Error(UNAVAILABLE)` (it retries with the same client_msg_id).
//! - A delivery consumer reads this gateway's topic `palaver.deliver.<id>`
//!   and hands the frames of every `DeliveryBatch` fetched so far to the
//!   gateway's [`DeliverySink`] in one call.
//! - Reads (Sync, History, PresenceQuery, PresenceSubscribe) run the routing
//!   logic over a read-only use of [`RedisStore`] on a small pool of reader
//!   threads — never on core threads.
//! - Presence is batched per gateway ([`presence`]); a connection's close
//!   waits for the router's answers to the membership changes it sent
//!   before (`unanswered.rs`), so a member it removed hears nothing of it.
//!
//! [`api::Backend`]: crate::api::Backend

pub mod presence;
mod unanswered;
mod writes;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::api::{
    Backend, BackendError, DeliverySink, Inbound, Outbound, Session, SessionAddr, TierLimits,
};
use crate::bus::{Addressed, ChannelPost, Output};
use crate::kafka;
use crate::logic::{PresenceVisibility, Router, RouterConfig, SystemClock};
use crate::redis_store::{RedisConfig, RedisStore};
use crossbeam_channel::{Receiver, Sender};
use palaver_protocol::pb::frame::Body;
use palaver_protocol::{sent_client_msg_id, BodyKind};
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

use presence::{Presence, PresenceTiming};
use unanswered::{AnswerSink, Unanswered};
use writes::{PendingWrite, Writes};

/// Settings of the Kafka/Redis bridge.
#[derive(Clone, Debug)]
pub struct BridgeConfig {
    /// Kafka `bootstrap.servers`.
    pub brokers: String,
    pub redis: RedisConfig,
    pub presence: PresenceTiming,
    /// Reader threads for Sync / History / presence reads.
    pub readers: usize,
    /// Producer linger, ms (latency vs batching): how long librdkafka
    /// collects client writes into one produce request. 1 ms. Measured on
    /// the 2-core bench machine (`bench/results/2026-11-29-kafka-batch/`):
    /// 5 ms cut the broker's CPU at 8,000 msg/s (49 → 30 % of a core) and
    /// kept that rate from collapsing, but added ~5 ms to every write and
    /// pushed the 1000-member fan-out's p99 to its 100 ms budget, while the
    /// highest rate holding p99 < 50 ms did not move; 1 ms stays.
    pub linger_ms: u32,
    /// A write Kafka has not acknowledged by then is answered UNAVAILABLE.
    pub produce_timeout: Duration,
    /// Limits and defaults of the read paths (same as the routers').
    pub router: RouterConfig,
    /// Partitions of `palaver.inbound` if this gateway has to create it.
    pub inbound_partitions: i32,
    /// The account cap across gateways (SPEC §4): a connection that makes
    /// a user hold more (all gateways, a device counted once) is closed
    /// with `TOO_MANY_CONNECTIONS` once the registry shows it. None: no cap
    /// across gateways (each gateway still applies its own at Hello).
    pub max_connections_per_account: Option<u32>,
    /// The router tier's history archive (SPEC §7): the readers serve
    /// History and Sync below the Redis window from it. None: the window
    /// is all there is (set it whenever the routers have `--cassandra`).
    pub archive: Option<palaver_archive::ArchiveConfig>,
}

impl BridgeConfig {
    pub fn new(brokers: impl Into<String>, redis: RedisConfig) -> Self {
        Self {
            brokers: brokers.into(),
            redis,
            presence: PresenceTiming::default(),
            readers: 2,
            linger_ms: 1,
            produce_timeout: Duration::from_secs(5),
            router: RouterConfig::default(),
            inbound_partitions: kafka::DEFAULT_INBOUND_PARTITIONS,
            max_connections_per_account: None,
            archive: None,
        }
    }
}

/// Reader pool work.
#[allow(clippy::large_enum_variant)]
enum ReadJob {
    /// A read request; `after_flush` is the presence change count it must
    /// wait for (so a Sync sees every message it would not get live).
    Read {
        request: Inbound,
        after_flush: u64,
    },
    /// The connection closed: drop its watches. Queued behind the
    /// connection's earlier reads, so a PresenceSubscribe still queued when
    /// it closed cannot leave watches behind for a connection that is gone.
    Closed(SessionAddr),
    Stop,
}

/// The reader threads' queues. A connection's reads all go to one reader,
/// in the order its core submitted them, and its close follows them.
#[derive(Clone)]
struct Readers(Vec<Sender<ReadJob>>);

impl Readers {
    fn of(&self, conn: u64) -> &Sender<ReadJob> {
        // Connection keys carry a per-core counter in their low bits.
        &self.0[(conn % self.0.len() as u64) as usize]
    }
}

struct Started {
    gateway_id: String,
    sink: Arc<dyn DeliverySink>,
    reads: Readers,
    presence: Arc<Presence>,
    threads: Vec<JoinHandle<()>>,
}

/// The Kafka/Redis backend of one gateway.
pub struct KafkaRedisBridge {
    config: Result<BridgeConfig, String>,
    /// Created by `start` (read without a lock on the hot path).
    writes: OnceLock<Arc<Writes>>,
    started: Mutex<Option<Started>>,
    /// Read without a lock on the hot path.
    presence: OnceLock<Arc<Presence>>,
    reads: OnceLock<Readers>,
    /// Membership changes not answered yet, which a close waits for.
    unanswered: Arc<Unanswered>,
    gateway_id: OnceLock<String>,
    stop: Arc<AtomicBool>,
}

impl KafkaRedisBridge {
    /// Nothing connects before [`Backend::start`].
    pub fn new(config: BridgeConfig) -> Self {
        Self::with_config(Ok(config))
    }

    /// From the gateway config's strings; a bad Redis spec is reported by
    /// `start` (with what to write instead).
    pub fn from_spec(brokers: &str, redis: &str) -> Self {
        Self::with_config(
            RedisConfig::parse(redis)
                .map(|r| BridgeConfig::new(brokers, r))
                .map_err(|e| format!("backend.redis: {e}")),
        )
    }

    /// Whose presence a user may see (SPEC §10); for reads and for the
    /// presence events fanned out to this gateway's watchers.
    pub fn with_presence_visibility(mut self, visibility: PresenceVisibility) -> Self {
        if let Ok(config) = &mut self.config {
            config.router.presence_visibility = visibility;
        }
        self
    }

    /// The history archive the readers read below the window from
    /// ([`BridgeConfig::archive`]).
    pub fn with_archive(mut self, archive: Option<palaver_archive::ArchiveConfig>) -> Self {
        if let Ok(config) = &mut self.config {
            config.archive = archive;
        }
        self
    }

    /// The account cap across gateways ([`BridgeConfig::max_connections_per_account`]).
    pub fn with_max_connections_per_account(mut self, cap: u32) -> Self {
        if let Ok(config) = &mut self.config {
            config.max_connections_per_account = Some(cap);
        }
        self
    }

    fn with_config(config: Result<BridgeConfig, String>) -> Self {
        Self {
            config,
            writes: OnceLock::new(),
            started: Mutex::new(None),
            presence: OnceLock::new(),
            reads: OnceLock::new(),
            unanswered: Arc::default(),
            gateway_id: OnceLock::new(),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Stops every background thread at once without flushing presence or
    /// deregistering: to the rest of the cluster this gateway has crashed
    /// (its lease will expire). For fault tests and `kill -9` rehearsals.
    pub fn halt(&self) {
        self.stop_threads(false);
    }

    /// Producers of client writes replaced after a fatal error (see
    /// `writes.rs`).
    pub fn producers_replaced(&self) -> u64 {
        self.writes.get().map_or(0, |w| w.replaced())
    }

    /// Raises a fatal error on the producer of client writes, as librdkafka
    /// does when a broker answers out of sequence: for fault tests.
    pub fn raise_fatal_producer_error(&self, reason: &str) {
        if let Some(writes) = self.writes.get() {
            writes.raise_fatal_error(reason);
        }
    }

    fn stop_threads(&self, clean: bool) {
        let Some(started) = self.started.lock().expect("started").take() else {
            return;
        };
        started.presence.stop(clean);
        self.stop.store(true, Ordering::Release);
        if let Some(writes) = self.writes.get() {
            writes.wake();
        }
        for reader in &started.reads.0 {
            let _ = reader.send(ReadJob::Stop);
        }
        for t in started.threads {
            let _ = t.join();
        }
        if let (true, Some(writes), Ok(config)) = (clean, self.writes.get(), &self.config) {
            writes.flush(config.produce_timeout);
        }
        tracing::info!(gateway = %started.gateway_id, clean, "bridge stopped");
        drop(started.sink);
    }

    /// Delivers a GoAway(REPLACED) to a connection on any gateway: through
    /// the sink if it is here, else through that gateway's delivery topic.
    fn replaced_handler(
        gateway_id: String,
        sink: Arc<dyn DeliverySink>,
        writes: Arc<Writes>,
    ) -> presence::ReplacedHandler {
        Box::new(move |Addressed { to: old, frame, .. }| {
            let outbound = Outbound {
                conn: old.conn,
                frame,
                answers_request: false,
            };
            if *old.gateway_id == *gateway_id {
                sink.deliver(vec![outbound]);
                return;
            }
            let topic = kafka::delivery_topic(&old.gateway_id);
            for value in kafka::encode_delivery_batches(vec![outbound]) {
                writes.send(&topic, old.gateway_id.as_bytes(), &value, None);
            }
        })
    }
}

impl Backend for KafkaRedisBridge {
    /// Read from Redis, where every router publishes the limits it
    /// enforces when it starts (`RedisStore::publish_tier_limits`).
    fn enforced_limits(&self) -> Option<TierLimits> {
        let config = self.config.as_ref().ok()?;
        let read = RedisStore::connect(config.redis.clone()).and_then(|mut s| s.tier_limits());
        match read {
            Ok(limits) => limits,
            Err(e) => {
                tracing::warn!("reading the router tier's limits from Redis: {e}");
                None
            }
        }
    }

    fn start(&self, gateway_id: &str, sink: Arc<dyn DeliverySink>) -> Result<(), BackendError> {
        let mut started = self.started.lock().expect("started");
        if started.is_some() || self.gateway_id.get().is_some() {
            return Err(BackendError::Config(
                "the bridge serves one gateway, once".into(),
            ));
        }
        let config = self
            .config
            .as_ref()
            .map_err(|e| BackendError::Config(e.clone()))?;
        kafka::check_gateway_id(gateway_id).map_err(BackendError::Config)?;
        let topic = kafka::delivery_topic(gateway_id);
        kafka::ensure_topics(
            &config.brokers,
            &[
                (kafka::INBOUND_TOPIC, config.inbound_partitions),
                (kafka::CHANNELS_TOPIC, config.inbound_partitions),
                (&topic, 1),
            ],
            Duration::from_secs(10),
        )
        .map_err(BackendError::Unavailable)?;
        let mut producer_config = kafka::producer_config(&config.brokers, config.linger_ms);
        producer_config.set(
            "message.timeout.ms",
            config.produce_timeout.as_millis().max(1).to_string(),
        );
        // Failed writes and the router's answers pass `unanswered` first.
        let answers: Arc<dyn DeliverySink> = Arc::new(AnswerSink {
            inner: sink.clone(),
            unanswered: self.unanswered.clone(),
        });
        let writes = Writes::new(producer_config, answers.clone())
            .map(Arc::new)
            .map_err(|e| BackendError::Config(format!("{e} (brokers {})", config.brokers)))?;

        // Delivery consumer: assigned at the topic's current end before
        // start returns, so every record produced from now on is seen.
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", format!("palaver-gateway-{gateway_id}"))
            .set("enable.auto.commit", "false")
            // Long poll (see crate::kafka::FETCH_WAIT_MAX_MS).
            .set("fetch.min.bytes", "1")
            .set("fetch.wait.max.ms", kafka::FETCH_WAIT_MAX_MS)
            .set("reconnect.backoff.max.ms", kafka::RECONNECT_BACKOFF_MAX_MS)
            .set("socket.nagle.disable", "true")
            .create()
            .map_err(|e| BackendError::Config(format!("Kafka consumer: {e}")))?;
        // A just-created topic's leadership can still be settling on a
        // multi-broker cluster (NotLeaderForPartition): retry for a while.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let (_, high) = loop {
            match consumer.fetch_watermarks(&topic, 0, Duration::from_secs(5)) {
                Ok(marks) => break marks,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!("offsets of {topic}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(BackendError::Unavailable(format!(
                        "offsets of {topic}: {e}"
                    )))
                }
            }
        };
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&topic, 0, Offset::Offset(high))
            .map_err(|e| BackendError::Unavailable(e.to_string()))?;
        // Every partition of the channel posts, from their ends too: a
        // gateway hands what comes from now on to its connections that
        // have the channel open (those catch up on the past by Sync).
        let metadata = consumer
            .fetch_metadata(Some(kafka::CHANNELS_TOPIC), Duration::from_secs(10))
            .map_err(|e| {
                BackendError::Unavailable(format!("metadata of {}: {e}", kafka::CHANNELS_TOPIC))
            })?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == kafka::CHANNELS_TOPIC)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(BackendError::Unavailable(format!(
                "{} has no partitions",
                kafka::CHANNELS_TOPIC
            )));
        }
        for partition in partitions {
            let (_, high) = consumer
                .fetch_watermarks(kafka::CHANNELS_TOPIC, partition, Duration::from_secs(10))
                .map_err(|e| {
                    BackendError::Unavailable(format!(
                        "offsets of {} [{partition}]: {e}",
                        kafka::CHANNELS_TOPIC
                    ))
                })?;
            assignment
                .add_partition_offset(kafka::CHANNELS_TOPIC, partition, Offset::Offset(high))
                .map_err(|e| BackendError::Unavailable(e.to_string()))?;
        }
        consumer
            .assign(&assignment)
            .map_err(|e| BackendError::Unavailable(format!("assign {topic}: {e}")))?;

        let presence = Arc::new(Presence::waiting_for(gateway_id, self.unanswered.clone()));
        presence
            .start(
                &config.redis,
                config.presence,
                config.router.presence_visibility,
                config.max_connections_per_account,
                sink.clone(),
                Self::replaced_handler(gateway_id.to_owned(), sink.clone(), writes.clone()),
            )
            .map_err(BackendError::Unavailable)?;

        let mut threads = Vec::new();
        let stop = self.stop.clone();
        let delivery_sink = answers;
        threads.push(
            std::thread::Builder::new()
                .name("palaver-delivery".into())
                .spawn(move || delivery_loop(consumer, delivery_sink, stop))
                .map_err(|e| BackendError::Unavailable(format!("spawn: {e}")))?,
        );
        let (keeper, stop) = (writes.clone(), self.stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name("palaver-producer".into())
                .spawn(move || keeper.keep(&stop))
                .map_err(|e| BackendError::Unavailable(format!("spawn: {e}")))?,
        );

        // The reads this gateway serves follow the limits the router tier
        // enforces (and announces through this gateway's Welcome).
        let mut read_config = config.router.clone();
        if let Some(tier) = self.enforced_limits() {
            read_config.max_group_members = tier.max_group_members as usize;
            read_config.max_body_bytes = tier.max_body_bytes as usize;
            read_config.max_batch = (tier.max_batch as usize).max(1);
            read_config.max_channel_members = tier.max_channel_members as usize;
            read_config.default_batch = read_config.default_batch.min(read_config.max_batch);
        }
        // One driver session for all readers (it pools its connections).
        let archive = match &config.archive {
            None => None,
            Some(archive) => Some(crate::redis_store::ArchiveLink {
                archive: Arc::new(palaver_archive::CassandraArchive::connect(archive).map_err(
                    |e| {
                        BackendError::Unavailable(format!(
                            "Cassandra {}: {e}",
                            archive.nodes.join(",")
                        ))
                    },
                )?),
                // Readers never append: the bound is the routers'.
                max_unarchived: crate::redis_store::DEFAULT_MAX_UNARCHIVED,
            }),
        };
        let mut reads = Vec::new();
        for i in 0..config.readers.max(1) {
            let (reads_tx, reads_rx) = crossbeam_channel::unbounded();
            reads.push(reads_tx);
            let mut store = RedisStore::connect(config.redis.clone())
                .map_err(|e| BackendError::Unavailable(format!("Redis: {e}")))?;
            if let Some(link) = &archive {
                store = store.with_archive(link.clone());
            }
            let reader = Reader {
                gateway_id: gateway_id.to_owned(),
                router: Router::new(store, read_config.clone(), Arc::new(SystemClock))
                    .with_watches(presence.watches.clone()),
                sink: sink.clone(),
                presence: presence.clone(),
                jobs: reads_rx,
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("palaver-reader-{i}"))
                    .spawn(move || reader.run())
                    .map_err(|e| BackendError::Unavailable(format!("spawn: {e}")))?,
            );
        }
        let _ = self.writes.set(writes);
        let _ = self.presence.set(presence.clone());
        let reads = Readers(reads);
        let _ = self.reads.set(reads.clone());
        let _ = self.gateway_id.set(gateway_id.to_owned());
        *started = Some(Started {
            gateway_id: gateway_id.to_owned(),
            sink,
            reads,
            presence,
            threads,
        });
        tracing::info!(gateway = gateway_id, brokers = %config.brokers, "Kafka/Redis bridge started");
        Ok(())
    }

    fn session_opened(&self, session: &Session) {
        if let Some(p) = self.presence.get() {
            p.session_opened(session);
        }
    }

    fn session_reopened(&self, session: &Session) {
        if let Some(p) = self.presence.get() {
            p.session_reopened(session);
        }
    }

    fn session_closed(&self, session: &Session, at_ms: i64) {
        self.unanswered.closed(session.addr.conn);
        if let Some(p) = self.presence.get() {
            p.session_closed(session, at_ms);
        }
        if let Some(reads) = self.reads.get() {
            let _ = reads
                .of(session.addr.conn)
                .send(ReadJob::Closed(session.addr.clone()));
        }
    }

    fn submit(&self, request: Inbound) {
        let served_from_store = BodyKind::of(&request.body).served_from_store();
        if served_from_store {
            let after_flush = self.presence.get().map_or(0, |p| p.enqueued());
            if let Some(reads) = self.reads.get() {
                let _ = reads.of(request.from.addr.conn).send(ReadJob::Read {
                    request,
                    after_flush,
                });
            }
            return;
        }
        let key = request.partition_key().to_owned();
        let value = kafka::inbound_record(&request).encode_to_vec();
        let pending = PendingWrite {
            conn: request.from.addr.conn,
            request_id: request.request_id,
            client_msg_id: sent_client_msg_id(&request.body),
        };
        let Some(writes) = self.writes.get() else {
            tracing::warn!("request submitted before the bridge started; dropped");
            return;
        };
        if let Body::ChangeMembers(_) = request.body {
            self.unanswered
                .sent(request.from.addr.conn, request.request_id);
        }
        writes.send(kafka::INBOUND_TOPIC, key.as_bytes(), &value, Some(pending));
    }

    fn shutdown(&self) {
        self.stop_threads(true);
    }
}

impl Drop for KafkaRedisBridge {
    fn drop(&mut self) {
        self.stop_threads(true);
    }
}

/// Records handed to the sink together at most (one `deliver` call, so one
/// wake per core thread for all of them).
const MAX_DELIVERY_RECORDS_PER_HANDOFF: usize = 256;

/// Reads this gateway's delivery topic and feeds the sink: waits for one
/// record, then drains whatever the consumer has already fetched (up to
/// [`MAX_DELIVERY_RECORDS_PER_HANDOFF`] records) and hands all their frames
/// to the sink in ONE call, in record order — the sink splits it by core
/// and wakes each core once, not once per record.
/// Reads this gateway's delivery topic and every channel post, and hands
/// each poll's worth to the sink: the frames, then the channel posts.
fn delivery_loop(consumer: BaseConsumer, sink: Arc<dyn DeliverySink>, stop: Arc<AtomicBool>) {
    let mut frames: Vec<Outbound> = Vec::new();
    let mut posts: Vec<Arc<ChannelPost>> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let mut timeout = Duration::from_millis(100);
        for _ in 0..MAX_DELIVERY_RECORDS_PER_HANDOFF {
            match consumer.poll(timeout) {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!("delivery consumer: {e}");
                    break;
                }
                Some(Ok(message)) if message.topic() == kafka::CHANNELS_TOPIC => {
                    match kafka::decode_channel_post(message.payload().unwrap_or_default()) {
                        Ok(post) => posts.push(Arc::new(post)),
                        Err(e) => tracing::warn!(
                            offset = message.offset(),
                            "bad channel record skipped: {e}"
                        ),
                    }
                }
                Some(Ok(message)) => {
                    match kafka::decode_delivery_batch(message.payload().unwrap_or_default()) {
                        Ok(batch) => frames.extend(batch),
                        Err(e) => tracing::warn!(
                            offset = message.offset(),
                            "bad delivery record skipped: {e}"
                        ),
                    }
                }
            }
            timeout = Duration::ZERO;
        }
        if !frames.is_empty() {
            sink.deliver(std::mem::take(&mut frames));
        }
        if !posts.is_empty() {
            sink.deliver_channel(std::mem::take(&mut posts));
        }
    }
}

/// One reader thread: the routing logic's read paths over Redis.
struct Reader {
    gateway_id: String,
    router: Router<RedisStore>,
    sink: Arc<dyn DeliverySink>,
    presence: Arc<Presence>,
    jobs: Receiver<ReadJob>,
}

impl Reader {
    fn run(mut self) {
        loop {
            let (request, after_flush) = match self.jobs.recv() {
                Ok(ReadJob::Read {
                    request,
                    after_flush,
                }) => (request, after_flush),
                Ok(ReadJob::Closed(addr)) => {
                    crate::presence::lock(&self.presence.watches).drop_conn(&addr);
                    continue;
                }
                Ok(ReadJob::Stop) | Err(_) => return,
            };
            let frames = match &request.body {
                Body::Sync(_) => {
                    // Sessions opened before this Sync must be registered
                    // first: a message stored after registration is delivered
                    // live, one stored before is in this Sync's answer.
                    self.presence
                        .wait_flushed(after_flush, Duration::from_secs(5));
                    self.read(&request)
                }
                _ => self.read(&request),
            };
            if !frames.is_empty() {
                self.sink.deliver(frames);
            }
        }
    }

    /// Runs one request served from Redis through the router
    /// (PresenceSubscribe adds to this gateway's watches, shared with the
    /// presence subscriber).
    /// A request that fails (the store, or a panic: a bug) is answered
    /// UNAVAILABLE / INTERNAL by the one runner, and the reader lives on.
    fn read(&mut self, request: &Inbound) -> Vec<Outbound> {
        let mut out = Output::default();
        let gave_up = crate::runner::run(
            &mut self.router,
            std::slice::from_ref(request),
            &mut out,
            &mut ReadRetry,
        );
        if let Some(g) = gave_up.first() {
            tracing::warn!(
                user = %request.from.user_id,
                request_id = request.request_id,
                "read answered with an error: {}",
                g.failure
            );
            // What the failed attempt produced (a store error leaves its
            // partial output) is dropped: only the error goes out.
            let error = out.frames.pop();
            out.frames.clear();
            out.frames.extend(error);
        }
        out.frames
            .into_iter()
            .filter(|a| *a.to.gateway_id == *self.gateway_id)
            .map(|a| Outbound {
                conn: a.to.conn,
                frame: a.frame,
                answers_request: a.answers_request,
            })
            .collect()
    }
}

/// A read is not retried here (the client repeats it after UNAVAILABLE);
/// after a panic the reader's Redis connection is dropped, as it may have
/// been left mid-reply.
struct ReadRetry;

impl crate::runner::Retry<RedisStore> for ReadRetry {
    fn again(&mut self, _error: &crate::store::StoreError, _attempt: u32) -> bool {
        false
    }

    fn after_panic(&mut self, store: &mut RedisStore) {
        store.reset_connection();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palaver_protocol::pb;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Outbound>>);
    impl DeliverySink for Collect {
        fn deliver(&self, frames: Vec<Outbound>) {
            self.0.lock().expect("frames").extend(frames);
        }
        fn deliver_channel(&self, _: Vec<Arc<crate::bus::ChannelPost>>) {}
        fn reopen_sessions(&self) {}
    }

    /// A PresenceSubscribe still queued for a reader when its connection
    /// closed is answered (to nobody) and leaves no watch behind: the close
    /// is queued behind it on the same reader.
    #[test]
    fn a_close_queued_behind_a_subscribe_leaves_no_watches() {
        let server = palaver_testkit::stack::Redis::start().expect("start redis-server");
        let store = RedisStore::connect(RedisConfig::standalone(server.url())).expect("Redis");
        let presence = Arc::new(Presence::new("gw"));
        let sink = Arc::new(Collect::default());
        let (tx, rx) = crossbeam_channel::unbounded();
        let readers = Readers(vec![tx.clone(), tx]);
        let reader = Reader {
            gateway_id: "gw".into(),
            router: Router::new(store, RouterConfig::default(), Arc::new(SystemClock))
                .with_watches(presence.watches.clone()),
            sink: sink.clone(),
            presence: presence.clone(),
            jobs: rx,
        };
        let from = Session {
            user_id: "alice".into(),
            device_id: "phone".into(),
            addr: SessionAddr {
                gateway_id: "gw".into(),
                conn: 7,
            },
        };
        let subscribe = Inbound {
            from: from.clone(),
            request_id: 1,
            body: Body::PresenceSubscribe(pb::PresenceSubscribe {
                user_ids: vec!["bob".into()],
                unsubscribe: false,
            }),
            received_ms: 0,
        };
        let reads = readers.of(from.addr.conn);
        reads
            .send(ReadJob::Read {
                request: subscribe,
                after_flush: 0,
            })
            .expect("queued");
        reads
            .send(ReadJob::Closed(from.addr.clone()))
            .expect("queued");
        reads.send(ReadJob::Stop).expect("queued");
        reader.run();

        let frames = sink.0.lock().expect("frames");
        assert!(
            frames
                .iter()
                .any(|o| matches!(o.frame.body, Some(Body::PresenceResult(_)))),
            "the subscribe ran: {frames:?}"
        );
        assert_eq!(
            crate::presence::lock(&presence.watches).watching(&from.addr),
            0,
            "the closed connection's watch was dropped"
        );
    }
}
