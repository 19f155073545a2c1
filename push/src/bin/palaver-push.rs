//! `palaver-push`: the push worker. Reads `palaver.push` (what the routers
//! write for users with a device to push), decides per event (online?
//! muted? read elsewhere?) from the routers' Redis and sends through APNs
//! and FCM. Run one or more beside the routers with the same `--group`;
//! they share the partitions of `palaver.push`.
//!
//! Without any provider configured (no `--providers`, or a file with
//! neither `[apns]` nor `[fcm]`) it says so once and counts what it would
//! have sent, still consuming so the topic's lag does not grow.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use palaver_push::worker::{ContentPolicy, PushWorker, PushWorkerConfig, PUSH_GROUP};
use palaver_push::{ProvidersConfig, Sender, SenderConfig};
use palaver_router::redis_store::RedisConfig;

#[derive(Parser, Debug)]
#[command(
    name = "palaver-push",
    version,
    about = "Palaver push worker (palaver.push → APNs / FCM)"
)]
struct Args {
    /// Kafka bootstrap servers, host:port[,host:port...]
    #[arg(long, env = "PALAVER_KAFKA_BROKERS")]
    brokers: String,
    /// Redis of the router tier: redis://host:port/ or redis+cluster://...
    #[arg(long, env = "PALAVER_REDIS")]
    redis: String,
    /// The providers' credentials, a TOML file with `[apns]` (key_file,
    /// key_id, team_id) and/or `[fcm]` (service_account_file). Without it
    /// nothing is sent; what would have been is counted.
    #[arg(long, env = "PALAVER_PUSH_PROVIDERS")]
    providers: Option<PathBuf>,
    /// Consumer group shared by all push workers.
    #[arg(long, default_value = PUSH_GROUP)]
    group: String,
    /// This worker's name in logs and dead letters (default: push-<pid>).
    #[arg(long)]
    worker_id: Option<String>,
    /// What a push shows: id-only (conversation and seq, no body) or
    /// preview (the sender and the kind of content; never the body).
    #[arg(long, default_value = "id-only")]
    content: String,
    /// Records per poll batch.
    #[arg(long, default_value_t = 500)]
    max_batch: usize,
}

fn main() {
    palaver_router::logging::init_worker_logging();
    let args = Args::parse();
    let fail = |flag: &str, e: String| -> ! {
        eprintln!("palaver-push: {flag} {e}");
        std::process::exit(2);
    };
    let redis = RedisConfig::parse(&args.redis).unwrap_or_else(|e| fail("--redis", e));
    let content: ContentPolicy = args
        .content
        .parse()
        .unwrap_or_else(|e| fail("--content", e));
    let providers = match &args.providers {
        None => ProvidersConfig::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
                fail(
                    "--providers",
                    format!("{}: cannot read it: {e}", path.display()),
                )
            });
            toml::from_str::<ProvidersConfig>(&text).unwrap_or_else(|e| {
                fail(
                    "--providers",
                    format!(
                        "{}: not a providers file ([apns] key_file, key_id, team_id; [fcm] service_account_file): {e}",
                        path.display()
                    ),
                )
            })
        }
    };

    // The sender's tasks (HTTP/2 connections, retries) run here; the
    // consumer loop runs on the main thread and waits for its tickets.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("palaver-push-send")
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("palaver-push: cannot start the sending runtime: {e}");
            std::process::exit(1);
        });
    let sender = if providers.is_empty() {
        tracing::warn!(
            "no push provider configured (--providers with [apns] and/or [fcm]): \
             nothing will be sent; the pushes that would have been are counted"
        );
        Sender::builder(SenderConfig::default()).start(runtime.handle())
    } else {
        let what = args
            .providers
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        match providers.build(SenderConfig::default(), runtime.handle()) {
            Ok((sender, routes)) => {
                let names: Vec<String> = routes.iter().map(ToString::to_string).collect();
                tracing::info!("push providers from {what}: {}", names.join(", "));
                sender
            }
            Err(e) => fail("--providers", format!("{what}: {e}")),
        }
    };

    let mut config = PushWorkerConfig::new(args.brokers, redis);
    config.consumer.group_id = args.group;
    if let Some(id) = args.worker_id {
        config.consumer.client_id = id;
    }
    config.consumer.max_batch = args.max_batch.max(1);
    config.content = content;

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(signal, stop.clone()) {
            eprintln!("palaver-push: cannot handle signal {signal}: {e}");
            std::process::exit(1);
        }
    }
    let mut worker = match PushWorker::new(config, sender) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("palaver-push: {e}");
            std::process::exit(1);
        }
    };
    tracing::info!(content = ?content, "push worker running");
    worker.run(&stop);
}
