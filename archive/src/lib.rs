//! Palaver's history archive: every stored message, kept for years in
//! Apache Cassandra (or ScyllaDB, which speaks the same CQL protocol).
//!
//! One table, `messages`, partitioned by `(conversation_id, bucket)` and
//! clustered by `seq`: a conversation's messages are contiguous seqs from 1,
//! so `bucket = seq / BUCKET_SEQS` needs no index to find, pages read one or
//! two partitions, and a partition holds at most [`BUCKET_SEQS`] messages of
//! at most ~61 KiB each (a 60 KiB body and the envelope): under 62 MB
//! however the conversation is used, well under the 100 MB a partition
//! should stay below. A write is keyed by (conversation, seq), so writing a
//! message again (the archiver is at-least-once) stores it once.
//!
//! Retention is a TTL on every write (default 5 years), and the table
//! compacts by time window, so whole SSTables expire at once instead of
//! leaving tombstones to read through.
//!
//! The router reads here below its Redis window (History and Sync of old
//! messages) and the archiver (`palaver-archiver`, in the router crate)
//! writes here; both call this crate's blocking API from their own threads:
//! the async driver runs on a small runtime this crate owns.

use std::future::Future;
use std::time::Duration;

use futures_util::future::try_join_all;
use palaver_protocol::pb;
use prost::Message as _;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;

/// Seqs per partition (see the module doc for the size bound).
pub const BUCKET_SEQS: u64 = 1_000;

/// Default retention: 5 years (TTL of every archived message).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// The longest TTL Cassandra accepts (20 years).
const MAX_TTL_S: u64 = 630_720_000;

/// The heaviest message a row can hold (a 60 KiB body, ids and times): a
/// read sizes its chunks by it, so it fetches at most one message past its
/// byte budget.
const HEAVIEST_MESSAGE_BYTES: usize = 65 * 1024;

/// Batches in flight at once during a write.
const WRITE_CONCURRENCY: usize = 64;

/// Rows of one single-partition batch, at most.
const BATCH_ROWS: usize = 200;

/// Bytes of one single-partition batch, at most (beyond one row): well
/// under the native protocol's frame limit, and Cassandra applies one
/// partition's batch as one mutation in memory.
const BATCH_BYTES: usize = 512 * 1024;

/// A history read walking down past this many empty buckets in a row stops:
/// what lies below has expired (retention), or was never archived.
const EMPTY_BUCKETS_TO_STOP: u32 = 4;

/// How long `connect` retries a schema statement a node refused (see there).
const DDL_PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive configuration: {0}")]
    Config(String),
    /// Cassandra could not be reached or did not answer in time: retry.
    #[error("archive unavailable: {0}")]
    Unavailable(String),
    /// A stored row does not decode: lost or foreign data.
    #[error("archive row corrupt: {0}")]
    Corrupt(String),
}

pub type ArchiveResult<T> = Result<T, ArchiveError>;

fn unavailable(what: &str, e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Unavailable(format!("{what}: {e}"))
}

/// Where the archive is and how it keeps messages.
#[derive(Clone, Debug)]
pub struct ArchiveConfig {
    /// `host:port` of one or more Cassandra nodes (the driver discovers the
    /// rest of the cluster).
    pub nodes: Vec<String>,
    /// Keyspace; created with `replication_factor` if absent.
    pub keyspace: String,
    /// Replicas of each message (SimpleStrategy) when the keyspace is created.
    pub replication_factor: u32,
    /// Consistency of writes and reads: QUORUM by default, so a read sees
    /// every acknowledged write with one replica of three down.
    pub consistency: Consistency,
    /// How long an archived message is kept (the TTL of its row).
    pub retention: Duration,
    /// Connect and per-request timeout.
    pub timeout: Duration,
}

impl ArchiveConfig {
    pub fn new(nodes: Vec<String>) -> Self {
        Self {
            nodes,
            keyspace: "palaver".into(),
            replication_factor: 1,
            consistency: Consistency::Quorum,
            retention: DEFAULT_RETENTION,
            timeout: Duration::from_secs(5),
        }
    }

    /// Parses `host:port[,host:port...]`.
    pub fn parse_nodes(spec: &str) -> Result<Vec<String>, String> {
        let nodes: Vec<String> = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if nodes.is_empty() {
            return Err(format!("{spec:?}: expected host:port[,host:port...]"));
        }
        for n in &nodes {
            match n.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
                _ => return Err(format!("{n:?}: expected host:port (e.g. 127.0.0.1:9042)")),
            }
        }
        Ok(nodes)
    }
}

/// The bucket (partition) holding `seq`.
pub fn bucket_of(seq: u64) -> i64 {
    (seq / BUCKET_SEQS) as i64
}

/// A blocking handle on the archive: one driver session (a connection pool
/// per node) on a runtime of its own. Cheap to share by reference across
/// the calling thread's work; not `Clone` (one pool per process is plenty).
pub struct CassandraArchive {
    runtime: tokio::runtime::Runtime,
    session: Session,
    insert: PreparedStatement,
    after: PreparedStatement,
    before: PreparedStatement,
    ttl_s: i32,
    consistency: Consistency,
    timeout: Duration,
}

impl CassandraArchive {
    /// Connects, creates the keyspace and table if absent, and prepares the
    /// statements.
    pub fn connect(config: &ArchiveConfig) -> ArchiveResult<Self> {
        if config.nodes.is_empty() {
            return Err(ArchiveError::Config("no Cassandra node given".into()));
        }
        if !config
            .keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || config.keyspace.is_empty()
        {
            return Err(ArchiveError::Config(format!(
                "keyspace {:?}: letters, digits and _ only",
                config.keyspace
            )));
        }
        let ttl_s = config.retention.as_secs();
        if ttl_s == 0 || ttl_s > MAX_TTL_S {
            return Err(ArchiveError::Config(format!(
                "retention of {ttl_s} s: must be 1 s to 20 years (Cassandra's largest TTL)"
            )));
        }
        // One worker thread: the driver's connection tasks keep running
        // between calls (keepalives, topology events), and the calls block
        // the caller's thread, not this one.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("palaver-archive")
            .enable_all()
            .build()
            .map_err(|e| ArchiveError::Config(format!("start the driver's runtime: {e}")))?;
        let timeout = config.timeout;
        let ks = &config.keyspace;
        let (session, insert, after, before) = runtime.block_on(async {
            let session = SessionBuilder::new()
                .known_nodes(&config.nodes)
                .connection_timeout(timeout)
                .build()
                .await
                .map_err(|e| unavailable(&format!("connect to {}", config.nodes.join(",")), e))?;
            let ddl = [
                format!(
                    "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = \
                     {{'class': 'SimpleStrategy', 'replication_factor': {}}}",
                    config.replication_factor
                ),
                // Time-window compaction: messages arrive in time order and
                // expire by TTL, so whole SSTables expire together.
                format!(
                    "CREATE TABLE IF NOT EXISTS {ks}.messages (\
                     conversation_id text, bucket bigint, seq bigint, message blob, \
                     PRIMARY KEY ((conversation_id, bucket), seq)) \
                     WITH CLUSTERING ORDER BY (seq ASC) \
                     AND compaction = {{'class': 'TimeWindowCompactionStrategy', \
                     'compaction_window_unit': 'DAYS', 'compaction_window_size': 30}}"
                ),
            ];
            // Each statement until a node takes it, for at most 60 s: on a
            // ring that is still forming, the driver's schema agreement
            // covers only the nodes it has met, so the CREATE TABLE may
            // reach a node the keyspace has not reached yet ("Keyspace ...
            // doesn't exist"). Both statements are IF NOT EXISTS: retrying
            // is safe.
            let deadline = std::time::Instant::now() + DDL_PATIENCE;
            for statement in ddl {
                loop {
                    match session.query_unpaged(statement.as_str(), ()).await {
                        Ok(_) => break,
                        Err(_) if std::time::Instant::now() < deadline => {
                            let _ = session.await_schema_agreement().await;
                            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                        }
                        Err(e) => return Err(unavailable("create the schema", e)),
                    }
                }
            }
            session
                .await_schema_agreement()
                .await
                .map_err(|e| unavailable("schema agreement", e))?;
            let prepare = |cql: String| {
                let session = &session;
                async move {
                    let mut p = session
                        .prepare(cql.as_str())
                        .await
                        .map_err(|e| unavailable(&format!("prepare {cql}"), e))?;
                    p.set_consistency(config.consistency);
                    // Every statement here may be retried: an insert is
                    // keyed by seq, a read has no effect.
                    p.set_is_idempotent(true);
                    Ok::<_, ArchiveError>(p)
                }
            };
            let insert = prepare(format!(
                "INSERT INTO {ks}.messages (conversation_id, bucket, seq, message) \
                 VALUES (?, ?, ?, ?) USING TTL ?"
            ))
            .await?;
            let after = prepare(format!(
                "SELECT seq, message FROM {ks}.messages WHERE conversation_id = ? AND bucket = ? \
                 AND seq > ? AND seq < ? ORDER BY seq ASC LIMIT ?"
            ))
            .await?;
            let before = prepare(format!(
                "SELECT seq, message FROM {ks}.messages WHERE conversation_id = ? AND bucket = ? \
                 AND seq < ? ORDER BY seq DESC LIMIT ?"
            ))
            .await?;
            Ok::<_, ArchiveError>((session, insert, after, before))
        })?;
        Ok(Self {
            runtime,
            session,
            insert,
            after,
            before,
            ttl_s: ttl_s as i32,
            consistency: config.consistency,
            timeout,
        })
    }

    /// Runs `f` on the driver's runtime, at most twice the request timeout.
    fn run<T>(&self, what: &str, f: impl Future<Output = ArchiveResult<T>>) -> ArchiveResult<T> {
        let deadline = self.timeout * 2;
        self.runtime.block_on(async {
            tokio::time::timeout(deadline, f)
                .await
                .map_err(|_| unavailable(what, format!("no answer in {deadline:?}")))?
        })
    }

    /// Writes `messages` (each with its conversation and seq), all of them,
    /// before returning: Ok means every one is on a quorum of replicas.
    /// Writing a message again is harmless (same key, same value).
    ///
    /// Rows of one partition go in unlogged batches (one mutation each for
    /// Cassandra: a single-partition batch is applied atomically at the
    /// cost of one write), of at most [`BATCH_ROWS`] rows or
    /// [`BATCH_BYTES`]; the batches of different partitions in parallel.
    pub fn write(&self, messages: &[(&str, &pb::Message)]) -> ArchiveResult<()> {
        type Row<'a> = (&'a str, i64, i64, Vec<u8>, i32);
        // Group by partition, keeping the callers' order within one.
        let mut batches: Vec<Vec<Row<'_>>> = Vec::new();
        let mut open: std::collections::HashMap<(&str, i64), (usize, usize)> =
            std::collections::HashMap::new();
        for (conversation_id, message) in messages {
            let bucket = bucket_of(message.seq);
            let bytes = message.encode_to_vec();
            let size = bytes.len();
            let row = (
                *conversation_id,
                bucket,
                message.seq as i64,
                bytes,
                self.ttl_s,
            );
            match open.get_mut(&(*conversation_id, bucket)) {
                Some((index, used))
                    if batches[*index].len() < BATCH_ROWS && *used + size <= BATCH_BYTES =>
                {
                    *used += size;
                    batches[*index].push(row);
                }
                _ => {
                    open.insert((*conversation_id, bucket), (batches.len(), size));
                    batches.push(vec![row]);
                }
            }
        }
        self.run("write", async {
            for chunk in batches.chunks(WRITE_CONCURRENCY) {
                try_join_all(chunk.iter().map(|rows| async move {
                    if let [row] = rows.as_slice() {
                        return self.session.execute_unpaged(&self.insert, row).await;
                    }
                    let mut batch = Batch::new(BatchType::Unlogged);
                    for _ in rows {
                        batch.append_statement(self.insert.clone());
                    }
                    batch.set_consistency(self.consistency);
                    batch.set_is_idempotent(true);
                    self.session.batch(&batch, rows).await
                }))
                .await
                .map_err(|e| unavailable("write", e))?;
            }
            Ok(())
        })
    }

    /// Messages with `after_seq < seq < below_seq`, oldest first: at most
    /// `limit`, and no more than fit `max_bytes` (at least one; 0 = no byte
    /// bound). Expired or never-archived seqs are simply absent.
    pub fn read_after(
        &self,
        conversation_id: &str,
        after_seq: u64,
        below_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> ArchiveResult<Vec<pb::Message>> {
        let mut out = Vec::new();
        if below_seq <= after_seq.saturating_add(1) || limit == 0 {
            return Ok(out);
        }
        let mut budget = Budget::new(limit, max_bytes);
        let mut bound = after_seq;
        let mut bucket = bucket_of(after_seq + 1);
        let last_bucket = bucket_of(below_seq - 1);
        self.run("read", async {
            while bucket <= last_bucket && !budget.full() {
                let chunk = budget.chunk();
                let rows = self
                    .session
                    .execute_unpaged(
                        &self.after,
                        (
                            conversation_id,
                            bucket,
                            bound as i64,
                            below_seq as i64,
                            chunk as i32,
                        ),
                    )
                    .await
                    .map_err(|e| unavailable("read", e))?;
                let messages = decode_rows(rows)?;
                let n = messages.len();
                for m in messages {
                    bound = m.seq;
                    if !budget.take(&m) {
                        return Ok(());
                    }
                    out.push(m);
                }
                if n < chunk {
                    bucket += 1;
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Messages with `seq < before_seq` (0: no bound is not allowed here —
    /// the caller knows where its window starts), newest first: at most
    /// `limit`, no more than fit `max_bytes` (at least one; 0 = no byte
    /// bound). Walks down the buckets, and stops after a few empty ones in a
    /// row (expired by retention).
    pub fn read_before(
        &self,
        conversation_id: &str,
        before_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> ArchiveResult<Vec<pb::Message>> {
        let mut out = Vec::new();
        if before_seq <= 1 || limit == 0 {
            return Ok(out);
        }
        let mut budget = Budget::new(limit, max_bytes);
        let mut bound = before_seq;
        let mut bucket = bucket_of(before_seq - 1);
        let mut empty_in_a_row = 0;
        self.run("read", async {
            while bucket >= 0 && !budget.full() && empty_in_a_row < EMPTY_BUCKETS_TO_STOP {
                let chunk = budget.chunk();
                let rows = self
                    .session
                    .execute_unpaged(
                        &self.before,
                        (conversation_id, bucket, bound as i64, chunk as i32),
                    )
                    .await
                    .map_err(|e| unavailable("read", e))?;
                let messages = decode_rows(rows)?;
                let n = messages.len();
                if n == 0 {
                    empty_in_a_row += 1;
                } else {
                    empty_in_a_row = 0;
                }
                for m in messages {
                    bound = m.seq;
                    if !budget.take(&m) {
                        return Ok(());
                    }
                    out.push(m);
                }
                if n < chunk {
                    bucket -= 1;
                }
            }
            Ok(())
        })?;
        Ok(out)
    }
}

/// What a read may still return: messages and bytes.
struct Budget {
    limit: usize,
    max_bytes: usize,
    taken: usize,
    used: usize,
}

impl Budget {
    fn new(limit: usize, max_bytes: usize) -> Self {
        Self {
            limit,
            max_bytes: if max_bytes == 0 {
                usize::MAX
            } else {
                max_bytes
            },
            taken: 0,
            used: 0,
        }
    }

    fn full(&self) -> bool {
        self.taken >= self.limit || self.used >= self.max_bytes
    }

    /// Rows to ask for next: what the messages left could be, and no more
    /// than the bytes left could hold of the heaviest messages (so a read
    /// fetches at most one message past its budget).
    fn chunk(&self) -> usize {
        let by_bytes = (self.max_bytes - self.used) / HEAVIEST_MESSAGE_BYTES;
        (self.limit - self.taken).min(by_bytes.max(1)).clamp(1, 256)
    }

    /// Counts `m`; false if it does not fit (the first always fits).
    fn take(&mut self, m: &pb::Message) -> bool {
        let size = m.encoded_len();
        if self.taken > 0 && self.used.saturating_add(size) > self.max_bytes {
            self.used = self.max_bytes;
            return false;
        }
        self.taken += 1;
        self.used = self.used.saturating_add(size);
        true
    }
}

fn decode_rows(
    result: scylla::response::query_result::QueryResult,
) -> ArchiveResult<Vec<pb::Message>> {
    let rows = result
        .into_rows_result()
        .map_err(|e| ArchiveError::Corrupt(format!("not rows: {e}")))?;
    let mut out = Vec::new();
    for row in rows
        .rows::<(i64, Vec<u8>)>()
        .map_err(|e| ArchiveError::Corrupt(format!("row type: {e}")))?
    {
        let (seq, bytes) = row.map_err(|e| ArchiveError::Corrupt(format!("row: {e}")))?;
        let message = pb::Message::decode(bytes.as_slice())
            .map_err(|e| ArchiveError::Corrupt(format!("message at seq {seq}: {e}")))?;
        if message.seq != seq as u64 {
            return Err(ArchiveError::Corrupt(format!(
                "row seq {seq} holds message seq {}",
                message.seq
            )));
        }
        out.push(message);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_bucket_seqs_each() {
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(BUCKET_SEQS - 1), 0);
        assert_eq!(bucket_of(BUCKET_SEQS), 1);
        // The heaviest partition stays well under 100 MB.
        assert!(BUCKET_SEQS as usize * HEAVIEST_MESSAGE_BYTES < 70 * 1024 * 1024);
    }

    #[test]
    fn node_lists_parse_or_say_what_is_wrong() {
        assert_eq!(
            ArchiveConfig::parse_nodes("127.0.0.1:9042, b:1").unwrap(),
            vec!["127.0.0.1:9042".to_string(), "b:1".to_string()]
        );
        assert!(ArchiveConfig::parse_nodes("").is_err());
        assert!(ArchiveConfig::parse_nodes("host")
            .unwrap_err()
            .contains("host:port"));
    }

    #[test]
    fn a_budget_always_takes_one_and_stops_at_its_bytes() {
        let big = pb::Message {
            seq: 1,
            body: vec![0; 1000],
            ..Default::default()
        };
        let mut b = Budget::new(10, 10);
        assert!(b.take(&big));
        assert!(!b.take(&big));
        assert!(b.full());
        let mut b = Budget::new(2, 0);
        assert!(b.take(&big) && b.take(&big));
        assert!(b.full());
    }
}
