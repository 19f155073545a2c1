//! `palaver-archiver`: writes every message the routers store to the history
//! archive (Cassandra). Run one or more beside the routers with the same
//! `--group`; they share the partitions of `palaver.stored`. The routers need
//! `--cassandra` too (they stream what they store, and read below the
//! Redis window from the archive).

#![forbid(unsafe_code)]

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use palaver_archive::ArchiveConfig;
use palaver_router::kafka::archiver::{Archiver, ArchiverConfig};
use palaver_router::redis_store::RedisConfig;

#[derive(Parser, Debug)]
#[command(
    name = "palaver-archiver",
    version,
    about = "Palaver history archiver (palaver.stored → Cassandra)"
)]
struct Args {
    /// Kafka bootstrap servers, host:port[,host:port...]
    #[arg(long, env = "PALAVER_KAFKA_BROKERS")]
    brokers: String,
    /// Redis of the router tier: redis://host:port/ or redis+cluster://...
    #[arg(long, env = "PALAVER_REDIS")]
    redis: String,
    /// Cassandra (or ScyllaDB) nodes, host:port[,host:port...]
    #[arg(long, env = "PALAVER_CASSANDRA")]
    cassandra: String,
    /// Keyspace of the archive (created if absent, with --replication-factor).
    #[arg(long, env = "PALAVER_CASSANDRA_KEYSPACE", default_value = "palaver")]
    cassandra_keyspace: String,
    /// Replicas of each message when the keyspace is created.
    #[arg(long, default_value_t = 1)]
    replication_factor: u32,
    /// How long archived messages are kept (a TTL on each row), days.
    #[arg(long, env = "PALAVER_RETENTION_DAYS", default_value_t = 5 * 365)]
    retention_days: u64,
    /// Consumer group shared by all archivers.
    #[arg(long, default_value = "palaver-archiver")]
    group: String,
    /// This archiver's name in logs and dead letters (default: archiver-<pid>).
    #[arg(long)]
    archiver_id: Option<String>,
    /// Records per batch (one round of Cassandra writes and one commit each).
    #[arg(long, default_value_t = 2_000)]
    max_batch: usize,
}

fn main() {
    palaver_router::logging::init_worker_logging();
    let args = Args::parse();
    let fail = |flag: &str, e: String| -> ! {
        eprintln!("palaver-archiver: {flag} {e}");
        std::process::exit(2);
    };
    let redis = RedisConfig::parse(&args.redis).unwrap_or_else(|e| fail("--redis", e));
    let nodes =
        ArchiveConfig::parse_nodes(&args.cassandra).unwrap_or_else(|e| fail("--cassandra", e));
    let mut archive = ArchiveConfig::new(nodes);
    archive.keyspace = args.cassandra_keyspace;
    archive.replication_factor = args.replication_factor.max(1);
    if args.retention_days == 0 || args.retention_days > 20 * 365 {
        fail(
            "--retention-days",
            format!(
                "{}: must be 1 to 7300 (Cassandra's TTL is at most 20 years)",
                args.retention_days
            ),
        );
    }
    archive.retention = Duration::from_secs(args.retention_days * 24 * 3600);
    let mut config = ArchiverConfig::new(args.brokers, redis, archive);
    config.consumer.group_id = args.group;
    if let Some(id) = args.archiver_id {
        config.consumer.client_id = id;
    }
    config.consumer.max_batch = args.max_batch.max(1);

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(signal, stop.clone()) {
            eprintln!("palaver-archiver: cannot handle signal {signal}: {e}");
            std::process::exit(1);
        }
    }
    let mut archiver = match Archiver::new(config) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("palaver-archiver: {e}");
            std::process::exit(1);
        }
    };
    tracing::info!("archiver running");
    archiver.run(&stop);
}
