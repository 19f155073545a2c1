//! The history archiver: a handler on the at-least-once consumer loop
//! ([`super::consumer_loop`]) of the `palaver-archiver` group, reading
//! `palaver.stored` (what the routers stored, keyed by conversation) and
//! writing it to the archive (Cassandra).
//!
//! Why a stream, not the router writing Cassandra itself: the router's
//! batch then waits for one more store, in the latency of every Send, and
//! fails when Cassandra does; off the stream, the archive is written in
//! large batches at its own pace, an outage only delays it (the Redis
//! window keeps what is not archived), and archivers scale by partitions.
//!
//! One poll batch at a time:
//! 1. the messages of each conversation, in seq order, above the seq the
//!    archive already confirmed (`c:{<conv>}:arch` in Redis);
//! 2. a gap between that seq and the first message of the batch (a router
//!    crashed after storing, before its record left) is filled from the
//!    Redis window, which never trims an unarchived message; seqs below
//!    the window's oldest were trimmed before the archive existed and are
//!    gone (said once per conversation);
//! 3. everything is written to Cassandra (idempotent by seq) — if that
//!    fails, the batch fails and runs again after a backoff;
//! 4. each conversation's confirmed seq is raised to the end of its
//!    contiguous archived run: from then on the window may trim below it.
//!
//! Replays (a crash between 3 and the offset commit) write the same rows
//! again: nothing is stored twice, nothing is skipped.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;

use palaver_archive::{ArchiveConfig, CassandraArchive};
use palaver_protocol::pb;
use prost::Message as _;
use rdkafka::message::{Message, OwnedMessage};

use super::consumer_loop::{Batch, ConsumerLoop, Handler, LoopConfig, LoopStats};
use super::records;
use crate::bus::BusError;
use crate::redis_store::{RedisConfig, RedisStore};
use crate::store::StoreError;

/// Most messages read from the window to fill one conversation's gap in
/// one batch (the rest in the next).
const MAX_GAP_FILL: u64 = 5_000;

/// Settings of one archiver.
#[derive(Clone, Debug)]
pub struct ArchiverConfig {
    /// The consumer loop: brokers, the group (`palaver-archiver`), this
    /// archiver's name, batch size, timeouts.
    pub consumer: LoopConfig,
    pub redis: RedisConfig,
    pub archive: ArchiveConfig,
}

impl ArchiverConfig {
    pub fn new(brokers: impl Into<String>, redis: RedisConfig, archive: ArchiveConfig) -> Self {
        let mut consumer = LoopConfig::new(
            brokers,
            "palaver-archiver",
            format!("archiver-{}", std::process::id()),
            &[super::STORED_TOPIC],
        );
        // Large batches: one Cassandra round of concurrent inserts each.
        consumer.max_batch = 2_000;
        Self {
            consumer,
            redis,
            archive,
        }
    }
}

/// Counters of one archiver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArchiverStats {
    /// Messages written to the archive (a replayed one counts again).
    pub archived: u64,
    /// Of those, read from the window to fill a gap in the stream.
    pub gap_filled: u64,
    /// Batches that failed (archive or Redis down) and ran again.
    pub failed_batches: u64,
}

/// The archiver: the consumer loop with the archive writer as its handler.
pub struct Archiver {
    consumer_loop: ConsumerLoop,
    handler: ArchiveHandler,
}

impl Archiver {
    /// Connects to Redis and Cassandra (creating the table if absent) and
    /// joins the group.
    pub fn new(config: ArchiverConfig) -> Result<Self, String> {
        super::ensure_topics(
            &config.consumer.brokers,
            &[
                (super::STORED_TOPIC, super::DEFAULT_INBOUND_PARTITIONS),
                (super::DLQ_TOPIC, 1),
            ],
            std::time::Duration::from_secs(10),
        )?;
        let store = RedisStore::connect(config.redis.clone())
            .map_err(|e| format!("Redis {:?}: {e}", config.redis.urls))?;
        let archive = CassandraArchive::connect(&config.archive)
            .map_err(|e| format!("Cassandra {}: {e}", config.archive.nodes.join(",")))?;
        let consumer_loop = ConsumerLoop::new(LoopConfig {
            topics: vec![super::STORED_TOPIC.to_string()],
            ..config.consumer.clone()
        })?;
        Ok(Self {
            consumer_loop,
            handler: ArchiveHandler {
                store,
                archive,
                client_id: config.consumer.client_id,
                stats: ArchiverStats::default(),
                lost_reported: std::collections::HashSet::new(),
            },
        })
    }

    pub fn stats(&self) -> ArchiverStats {
        self.handler.stats
    }

    pub fn loop_stats(&self) -> LoopStats {
        self.consumer_loop.stats()
    }

    /// Records behind the end of this archiver's partitions (librdkafka's
    /// last report).
    pub fn lag(&self) -> Option<u64> {
        self.consumer_loop.lag()
    }

    /// Runs batches until `stop` is set.
    pub fn run(&mut self, stop: &AtomicBool) {
        self.consumer_loop.run(&mut self.handler, stop);
    }

    /// One batch (see [`ConsumerLoop::run_batch`]).
    pub fn run_batch(&mut self, wait: std::time::Duration) -> Result<usize, String> {
        let result = self.consumer_loop.run_batch(&mut self.handler, wait);
        if result.is_err() {
            self.handler.stats.failed_batches += 1;
        }
        result
    }
}

struct ArchiveHandler {
    store: RedisStore,
    archive: CassandraArchive,
    client_id: String,
    stats: ArchiverStats,
    /// Conversations whose pre-archive loss was already logged.
    lost_reported: std::collections::HashSet<String>,
}

impl ArchiveHandler {
    /// Steps 1–4 of the module doc for the decoded batch.
    fn archive(
        &mut self,
        mut by_conversation: HashMap<String, BTreeMap<u64, pb::Message>>,
    ) -> Result<(), BusError> {
        let ids: Vec<String> = by_conversation.keys().cloned().collect();
        let confirmed = self.store.archived_seqs(&ids).map_err(store_down)?;
        let mut confirm = Vec::with_capacity(ids.len());
        for (id, confirmed) in ids.iter().zip(confirmed) {
            let Some(messages) = by_conversation.get_mut(id) else {
                continue;
            };
            messages.retain(|&seq, _| seq > confirmed);
            let Some(&first) = messages.keys().next() else {
                continue;
            };
            let mut from = confirmed + 1;
            if first > from {
                let wanted = (first - from).min(MAX_GAP_FILL) as usize;
                let fill = self
                    .store
                    .window_after(id, confirmed, wanted)
                    .map_err(store_down)?;
                if let Some(oldest) = fill.first().map(|m| m.seq).filter(|&s| s > from) {
                    // Trimmed from the window before any archive confirmed
                    // them: those seqs were never archived and never will be.
                    if self.lost_reported.insert(id.clone()) {
                        tracing::warn!(
                            archiver = %self.client_id,
                            conversation = %id,
                            "seqs {from}..{oldest} left the Redis window before the archive existed; archiving from {oldest}"
                        );
                    }
                    from = oldest;
                }
                for m in fill.into_iter().filter(|m| m.seq < first) {
                    self.stats.gap_filled += 1;
                    messages.insert(m.seq, m);
                }
            }
            // The contiguous run from `from`: what may be confirmed.
            let mut end = from - 1;
            for &seq in messages.keys() {
                if seq == end + 1 {
                    end = seq;
                } else if seq > end + 1 {
                    break;
                }
            }
            if end >= from {
                confirm.push((id.clone(), end));
            }
        }
        let rows: Vec<(&str, &pb::Message)> = by_conversation
            .iter()
            .flat_map(|(id, ms)| ms.values().map(move |m| (id.as_str(), m)))
            .collect();
        if !rows.is_empty() {
            self.archive
                .write(&rows)
                .map_err(|e| BusError::Unavailable(format!("archive: {e}")))?;
        }
        self.stats.archived += rows.len() as u64;
        self.store.confirm_archived(&confirm).map_err(store_down)
    }
}

fn store_down(e: StoreError) -> BusError {
    BusError::Unavailable(format!("redis: {e}"))
}

impl Handler for ArchiveHandler {
    fn handle(&mut self, batch: &[OwnedMessage], out: &mut Batch<'_>) {
        let mut by_conversation: HashMap<String, BTreeMap<u64, pb::Message>> = HashMap::new();
        for record in batch {
            match records::StoredRecord::decode(record.payload().unwrap_or_default()) {
                Ok(stored) => {
                    let messages = by_conversation.entry(stored.conversation_id).or_default();
                    for m in stored.messages {
                        messages.insert(m.seq, m);
                    }
                }
                Err(e) => out.dead_letter(record, format!("not a StoredRecord: {e}"), 0),
            }
        }
        if let Err(e) = self.archive(by_conversation) {
            tracing::warn!(archiver = %self.client_id, "batch not archived, will retry: {e}");
            out.fail(e);
        }
    }

    fn after_panic(&mut self) {
        self.store.reset_connection();
    }
}
