//! `palaver-router`: one router worker of the Kafka/Redis tier. Run as many
//! as you like with the same `--group`; they share the partitions of
//! `palaver.inbound`.

#![forbid(unsafe_code)]

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use palaver_router::kafka::worker::{RouterWorker, WorkerConfig};
use palaver_router::redis_store::RedisConfig;

#[derive(Parser, Debug)]
#[command(
    name = "palaver-router",
    version,
    about = "Palaver router worker (Kafka consumer group + Redis)"
)]
struct Args {
    /// Kafka bootstrap servers, host:port[,host:port...]
    #[arg(long, env = "PALAVER_KAFKA_BROKERS")]
    brokers: String,
    /// Redis: redis://host:port/ or redis+cluster://host:port,host:port,...
    #[arg(long, env = "PALAVER_REDIS")]
    redis: String,
    /// Consumer group shared by all routers.
    #[arg(long, default_value = "palaver-router")]
    group: String,
    /// This router's name in logs and dead letters (default: router-<pid>).
    #[arg(long)]
    router_id: Option<String>,
    /// Partitions of palaver.inbound when this router has to create it.
    #[arg(long, default_value_t = palaver_router::kafka::DEFAULT_INBOUND_PARTITIONS)]
    partitions: i32,
    /// Records per batch (one produce flush and one offset commit per batch).
    #[arg(long, default_value_t = 500)]
    max_batch: usize,
    /// Attempts per record on store errors before it goes to palaver.dlq.
    #[arg(long, default_value_t = 5)]
    max_attempts: u32,
    /// Producer linger, ms.
    #[arg(long, default_value_t = 1)]
    linger_ms: u32,
    /// Consumer-group session timeout, ms: a dead router's partitions move to
    /// the others after this; a stall this long (broker GC, CPU starvation)
    /// makes a live router rejoin. At least the broker's
    /// group.min.session.timeout.ms (6000).
    #[arg(long, default_value_t = 10_000)]
    session_timeout_ms: u64,
    /// Whose presence and last seen a user may see: shared_conversation (only
    /// users sharing a conversation with them) or everyone. Set it the same
    /// on routers and gateways.
    #[arg(long, env = "PALAVER_PRESENCE_VISIBILITY", default_value_t = palaver_router::PresenceVisibility::SharedConversation)]
    presence_visibility: palaver_router::PresenceVisibility,
    /// Members of a group, creator included (TOO_MANY_MEMBERS beyond).
    /// Gateways announce the routers' value in Welcome, whatever their own
    /// config says.
    #[arg(long, env = "PALAVER_MAX_GROUP_MEMBERS", default_value_t = palaver_router::RouterConfig::default().max_group_members)]
    max_group_members: usize,
    /// Members of a channel (SPEC §21; TOO_MANY_MEMBERS beyond); announced
    /// likewise.
    #[arg(long, env = "PALAVER_MAX_CHANNEL_MEMBERS", default_value_t = palaver_router::RouterConfig::default().max_channel_members)]
    max_channel_members: usize,
    /// Largest Send body, bytes (BODY_TOO_LARGE beyond; announced likewise).
    #[arg(long, env = "PALAVER_MAX_BODY_BYTES", default_value_t = palaver_router::RouterConfig::default().max_body_bytes)]
    max_body_bytes: usize,
    /// Largest Sync/History `limit` honoured (Welcome's `max_batch`,
    /// announced likewise; not the Kafka batch of --max-batch).
    #[arg(long, env = "PALAVER_MAX_SYNC_BATCH", default_value_t = palaver_router::RouterConfig::default().max_batch)]
    max_sync_batch: usize,
    /// Bytes one account may store per UTC day (each message: its body plus
    /// 256); a Send beyond is refused QUOTA_EXCEEDED (SPEC §13).
    #[arg(long, env = "PALAVER_ACCOUNT_BYTES_PER_DAY", default_value_t = palaver_router::RouterConfig::default().account_bytes_per_day)]
    account_bytes_per_day: u64,
    /// Bytes one conversation may store per UTC day, all senders together.
    #[arg(long, env = "PALAVER_CONVERSATION_BYTES_PER_DAY", default_value_t = palaver_router::RouterConfig::default().conversation_bytes_per_day)]
    conversation_bytes_per_day: u64,
    /// Messages of each conversation kept in Redis. Without --cassandra,
    /// older ones are gone for good; with it, Redis is a cache of the
    /// archive and History/Sync read older messages from Cassandra.
    #[arg(long, env = "PALAVER_HISTORY_WINDOW", default_value_t = palaver_router::RouterConfig::default().history_window)]
    history_window: usize,
    /// The history archive: Cassandra (or ScyllaDB) nodes, host:port[,...].
    /// Run palaver-archiver beside the routers to fill it.
    #[arg(long, env = "PALAVER_CASSANDRA")]
    cassandra: Option<String>,
    /// Keyspace of the archive (created if absent).
    #[arg(long, env = "PALAVER_CASSANDRA_KEYSPACE", default_value = "palaver")]
    cassandra_keyspace: String,
    /// With --cassandra: messages of one conversation not yet archived that
    /// Redis may hold; beyond, Sends there are answered UNAVAILABLE until
    /// the archiver catches up.
    #[arg(long, env = "PALAVER_MAX_UNARCHIVED", default_value_t = palaver_router::redis_store::DEFAULT_MAX_UNARCHIVED)]
    max_unarchived: u64,
}

fn main() {
    palaver_router::logging::init_worker_logging();
    let args = Args::parse();
    let redis = match RedisConfig::parse(&args.redis) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("palaver-router: --redis {e}");
            std::process::exit(2);
        }
    };
    let mut config = WorkerConfig::new(args.brokers, redis);
    config.consumer.group_id = args.group;
    if let Some(id) = args.router_id {
        config.consumer.client_id = id;
    }
    config.inbound_partitions = args.partitions;
    config.consumer.max_batch = args.max_batch.max(1);
    config.max_attempts = args.max_attempts.max(1);
    config.consumer.linger_ms = args.linger_ms;
    config.consumer.session_timeout = std::time::Duration::from_millis(args.session_timeout_ms);
    config.router.presence_visibility = args.presence_visibility;
    config.router.account_bytes_per_day = args.account_bytes_per_day;
    config.router.max_group_members = args.max_group_members.max(1);
    config.router.max_channel_members = args.max_channel_members.max(2);
    config.router.max_body_bytes = args.max_body_bytes;
    config.router.max_batch = args.max_sync_batch.max(1);
    config.router.default_batch = config.router.default_batch.min(config.router.max_batch);
    config.router.conversation_bytes_per_day = args.conversation_bytes_per_day;
    config.consumer.retry_backoff = Duration::from_millis(100);
    config.router.history_window = args.history_window.max(1);
    if let Some(nodes) = args.cassandra {
        let nodes = match palaver_archive::ArchiveConfig::parse_nodes(&nodes) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("palaver-router: --cassandra {e}");
                std::process::exit(2);
            }
        };
        let mut cassandra = palaver_archive::ArchiveConfig::new(nodes);
        cassandra.keyspace = args.cassandra_keyspace;
        config.archive = Some(palaver_router::kafka::worker::ArchiveSettings {
            cassandra,
            max_unarchived: args.max_unarchived.max(1),
        });
    }

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(signal, stop.clone()) {
            eprintln!("palaver-router: cannot handle signal {signal}: {e}");
            std::process::exit(1);
        }
    }
    let mut worker = match RouterWorker::new(config) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("palaver-router: {e}");
            std::process::exit(1);
        }
    };
    tracing::info!("router worker running");
    worker.run(&stop);
}
