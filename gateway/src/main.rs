//! `palaver-gateway`: with no options, a complete single-node chat server
//! (embedded engine, dev certificate and dev JWT key in `./.palaver/`); with
//! a `[backend]` of kind `kafka`, one gateway of the Kafka/Redis tier. The
//! start-up banner names the backend that runs.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use palaver_gateway::config::{Config, DEFAULT_DATA_DIR};
use palaver_gateway::server::describe_backend;
use palaver_gateway::{build_backend_with_push, GatewayHandle};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// Palaver gateway: holds phones' TLS connections and serves the chat
/// protocol. Settings come from defaults, then --config FILE (TOML, same
/// field names as below, limits under [limits], TLS under [tls], JWT under
/// [auth], drain under [drain]), then environment variables, then flags.
#[derive(Parser, Debug)]
#[command(name = "palaver-gateway", version)]
struct Args {
    /// TOML config file.
    #[arg(long, env = "PALAVER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address phones connect to, shared by all core threads (SO_REUSEPORT) and by other
    /// gateway processes on this host. [default: 0.0.0.0:7443]
    #[arg(long, env = "PALAVER_LISTEN", value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Admin HTTP address for /metrics and /healthz, e.g. 127.0.0.1:7444. [default: disabled]
    #[arg(long, env = "PALAVER_ADMIN", value_name = "ADDR:PORT")]
    admin: Option<SocketAddr>,
    /// Core threads (one event loop each); 0 = one per CPU. [default: 0]
    #[arg(long, env = "PALAVER_CORES")]
    cores: Option<usize>,
    /// Gateway id, unique per process among gateways sharing a backend. [default: <hostname>-<pid>]
    #[arg(long, env = "PALAVER_GATEWAY_ID")]
    gateway_id: Option<String>,
    /// Directory for the dev certificate, the dev JWT secret and the embedded
    /// engine's durable store (store/; created and reused). [default: .palaver]
    #[arg(long, env = "PALAVER_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Listen backlog per core listener. [default: 4096]
    #[arg(long, env = "PALAVER_BACKLOG")]
    backlog: Option<u32>,
    /// Server certificate chain, PEM (with --tls-key). [default: dev certificate in the data dir]
    #[arg(long, env = "PALAVER_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Server private key, PEM. [default: dev key in the data dir]
    #[arg(long, env = "PALAVER_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// CA bundle, PEM: when set, clients must present a certificate it signed. [default: none]
    #[arg(long, env = "PALAVER_TLS_CLIENT_CA", value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// HS256 JWT secret file. [default: dev secret in the data dir, if no JWT key is given]
    #[arg(long, env = "PALAVER_JWT_HS256_SECRET_FILE", value_name = "FILE")]
    jwt_hs256_secret_file: Option<PathBuf>,
    /// Ed25519 public key (PEM) for EdDSA JWTs. [default: none]
    #[arg(long, env = "PALAVER_JWT_ED25519_PUBLIC_KEY", value_name = "FILE")]
    jwt_ed25519_public_key: Option<PathBuf>,
    /// Clock skew tolerated on a token's exp, seconds. [default: 5]
    #[arg(long, env = "PALAVER_JWT_LEEWAY_S")]
    jwt_leeway_s: Option<u64>,
    /// Heartbeat interval announced in Welcome; silence for 2.5x this closes the
    /// connection (HEARTBEAT_TIMEOUT). [default: 30000]
    #[arg(long, env = "PALAVER_HEARTBEAT_INTERVAL_MS")]
    heartbeat_interval_ms: Option<u32>,
    /// Time allowed for the TLS handshake. [default: 10000]
    #[arg(long, env = "PALAVER_HANDSHAKE_TIMEOUT_MS")]
    handshake_timeout_ms: Option<u32>,
    /// Time from accept until Hello must be received (HELLO_TIMEOUT). [default: 10000]
    #[arg(long, env = "PALAVER_HELLO_TIMEOUT_MS")]
    hello_timeout_ms: Option<u32>,
    /// Largest encoded frame accepted (FRAME_TOO_LARGE above). [default: 65536]
    #[arg(long, env = "PALAVER_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<u32>,
    /// Largest Send.body accepted (BODY_TOO_LARGE above). [default: 61440]
    #[arg(long, env = "PALAVER_MAX_BODY_BYTES")]
    max_body_bytes: Option<u32>,
    /// Sustained Send frames per second per connection, burst the same (RATE_LIMITED). [default: 50]
    #[arg(long, env = "PALAVER_MAX_SENDS_PER_SECOND")]
    max_sends_per_second: Option<u32>,
    /// Budget per connection for requests other than Send, in cost units per
    /// second (Typing 5, Sync/History 5, group ops 10, others 1; RATE_LIMITED). [default: 100]
    #[arg(long, env = "PALAVER_MAX_REQUESTS_PER_SECOND")]
    max_requests_per_second: Option<u32>,
    /// Requests with a response one connection may have awaiting it (RATE_LIMITED above). [default: 64]
    #[arg(long, env = "PALAVER_MAX_REQUESTS_IN_FLIGHT")]
    max_requests_in_flight: Option<u32>,
    /// Connections one user may hold on this gateway, all devices (TOO_MANY_CONNECTIONS
    /// above; a device reconnecting replaces its connection). [default: 16]
    #[arg(long, env = "PALAVER_MAX_CONNECTIONS_PER_ACCOUNT")]
    max_connections_per_account: Option<u32>,
    /// Sends per second shared by all of one user's connections on this gateway,
    /// burst the same (RATE_LIMITED). [default: 100]
    #[arg(long, env = "PALAVER_MAX_ACCOUNT_SENDS_PER_SECOND")]
    max_account_sends_per_second: Option<u32>,
    /// Request budget in cost units per second shared by all of one user's
    /// connections on this gateway (RATE_LIMITED). [default: 200]
    #[arg(long, env = "PALAVER_MAX_ACCOUNT_REQUESTS_PER_SECOND")]
    max_account_requests_per_second: Option<u32>,
    /// An identical Typing repeated within this window is dropped. [default: 2000]
    #[arg(long, env = "PALAVER_TYPING_COALESCE_MS")]
    typing_coalesce_ms: Option<u32>,
    /// Most members in a group. [default: 1000]
    #[arg(long, env = "PALAVER_MAX_GROUP_MEMBERS")]
    max_group_members: Option<u32>,
    /// Largest Sync/History page. [default: 500]
    #[arg(long, env = "PALAVER_MAX_BATCH")]
    max_batch: Option<u32>,
    /// Unread bytes per connection (the gateway's queue and the kernel's): above
    /// it the gateway stops reading the connection, and an event (a frame that
    /// answers no request) that does not fit closes it (SLOW_CONSUMER). [default: 262144]
    #[arg(long, env = "PALAVER_MAX_OUTBOUND_BYTES")]
    max_outbound_bytes: Option<u32>,
    /// How long a connection with output waiting may read less than half of
    /// --max-outbound-bytes before it is closed as a slow consumer. [default: 10000]
    #[arg(long, env = "PALAVER_SLOW_CONSUMER_TIMEOUT_MS")]
    slow_consumer_timeout_ms: Option<u32>,
    /// SO_SNDBUF of accepted sockets (bytes the kernel holds per connection
    /// besides the gateway's queue); 0 = kernel autotuning. [default: 65536]
    #[arg(long, env = "PALAVER_SOCKET_SEND_BUFFER_BYTES")]
    socket_send_buffer_bytes: Option<u32>,
    /// Bytes one account may store per UTC day (embedded engine; a message
    /// weighs its body plus 256), then QUOTA_EXCEEDED. [default: 67108864]
    #[arg(long, env = "PALAVER_ACCOUNT_BYTES_PER_DAY")]
    account_bytes_per_day: Option<u64>,
    /// Bytes one conversation may store per UTC day, all senders together
    /// (embedded engine). [default: 268435456]
    #[arg(long, env = "PALAVER_CONVERSATION_BYTES_PER_DAY")]
    conversation_bytes_per_day: Option<u64>,
    /// Connections this process holds; more are refused at accept. [default:
    /// the file limit (RLIMIT_NOFILE, raised to its hard limit at start) minus 256]
    #[arg(long, env = "PALAVER_MAX_CONNECTIONS")]
    max_connections: Option<u32>,
    /// Accepts and TLS handshake steps per core per event-loop turn. [default: 64]
    #[arg(long, env = "PALAVER_HANDSHAKES_PER_TURN")]
    handshakes_per_turn: Option<u32>,
    /// Drain: connections still open after this are closed. [default: 10000]
    #[arg(long, env = "PALAVER_DRAIN_DEADLINE_MS")]
    drain_deadline_ms: Option<u32>,
    /// Drain: minimum reconnect delay in GoAway. [default: 1000]
    #[arg(long, env = "PALAVER_RECONNECT_DELAY_MS")]
    reconnect_delay_ms: Option<u32>,
    /// Drain: random extra reconnect delay per connection, up to this. [default: 4000]
    #[arg(long, env = "PALAVER_RECONNECT_JITTER_MS")]
    reconnect_jitter_ms: Option<u32>,
    /// Whose presence and last seen a user may see: shared_conversation (only
    /// users sharing a conversation with them) or everyone. [default: shared_conversation]
    #[arg(long, env = "PALAVER_PRESENCE_VISIBILITY")]
    presence_visibility: Option<palaver_router::PresenceVisibility>,
    /// Embedded engine: run it on a thread of its own instead of on core 0
    /// (`[backend] engine_thread`; see `palaver-gateway` README, threading).
    /// The durable engine always has its own thread.
    #[arg(long, env = "PALAVER_ENGINE_THREAD")]
    engine_thread: bool,
    /// Embedded engine: keep everything in memory only, lost at exit (tests,
    /// benchmarks; `[backend] durable = false`). Without it the engine keeps
    /// messages, seqs, conversations, members, receipts, dedup, push marks and
    /// quotas in DATA_DIR/store/, committed to disk (fsync) before any
    /// SendAck: a restart or a crash loses no acknowledged message.
    #[arg(long, env = "PALAVER_EPHEMERAL")]
    ephemeral: bool,
    /// Embedded engine, durable store: delete messages older than this many
    /// days, 0 = never (`[backend] retention_days`). [default: 1826]
    #[arg(long, env = "PALAVER_RETENTION_DAYS")]
    retention_days: Option<u32>,
    /// Log filter (tracing env-filter syntax). [default: info]
    #[arg(long, env = "PALAVER_LOG")]
    log: Option<String>,
}

impl Args {
    fn into_config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_toml_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($arg:ident => $($field:ident).+),* $(,)?) => {
                $(if let Some(v) = self.$arg { c.$($field).+ = v.into(); })*
            };
        }
        set!(
            listen => listen,
            cores => cores,
            gateway_id => gateway_id,
            data_dir => data_dir,
            backlog => backlog,
            jwt_leeway_s => auth.leeway_s,
            heartbeat_interval_ms => limits.heartbeat_interval_ms,
            handshake_timeout_ms => limits.handshake_timeout_ms,
            hello_timeout_ms => limits.hello_timeout_ms,
            max_frame_bytes => limits.max_frame_bytes,
            max_body_bytes => limits.max_body_bytes,
            max_sends_per_second => limits.max_sends_per_second,
            max_requests_per_second => limits.max_requests_per_second,
            max_requests_in_flight => limits.max_requests_in_flight,
            max_connections_per_account => limits.max_connections_per_account,
            max_account_sends_per_second => limits.max_account_sends_per_second,
            max_account_requests_per_second => limits.max_account_requests_per_second,
            typing_coalesce_ms => limits.typing_coalesce_ms,
            max_group_members => limits.max_group_members,
            max_batch => limits.max_batch,
            max_outbound_bytes => limits.max_outbound_bytes,
            slow_consumer_timeout_ms => limits.slow_consumer_timeout_ms,
            socket_send_buffer_bytes => limits.socket_send_buffer_bytes,
            account_bytes_per_day => limits.account_bytes_per_day,
            conversation_bytes_per_day => limits.conversation_bytes_per_day,
            max_connections => limits.max_connections,
            handshakes_per_turn => limits.handshakes_per_turn,
            drain_deadline_ms => drain.deadline_ms,
            reconnect_delay_ms => drain.reconnect_delay_ms,
            reconnect_jitter_ms => drain.reconnect_jitter_ms,
            presence_visibility => presence_visibility,
        );
        if self.engine_thread || self.ephemeral || self.retention_days.is_some() {
            match &mut c.backend {
                palaver_gateway::config::BackendConfig::Embedded {
                    engine_thread,
                    durable,
                    retention_days,
                } => {
                    *engine_thread |= self.engine_thread;
                    *durable &= !self.ephemeral;
                    if let Some(days) = self.retention_days {
                        *retention_days = days;
                    }
                }
                palaver_gateway::config::BackendConfig::Kafka { .. } => anyhow::bail!(
                    "--engine-thread, --ephemeral, --retention-days: only for the embedded engine"
                ),
            }
        }
        if self.admin.is_some() {
            c.admin = self.admin;
        }
        if self.tls_cert.is_some() {
            c.tls.cert = self.tls_cert;
        }
        if self.tls_key.is_some() {
            c.tls.key = self.tls_key;
        }
        if self.tls_client_ca.is_some() {
            c.tls.client_ca = self.tls_client_ca;
        }
        if self.jwt_hs256_secret_file.is_some() {
            c.auth.hs256_secret_file = self.jwt_hs256_secret_file;
        }
        if self.jwt_ed25519_public_key.is_some() {
            c.auth.ed25519_public_key_file = self.jwt_ed25519_public_key;
        }
        c.validate()?;
        Ok(c)
    }
}

fn main() {
    let mut args = Args::parse();
    let filter = args.log.take().unwrap_or_else(|| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // Colour codes only for a person watching, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(args) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("palaver-gateway: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = args.into_config()?;
    // Before start, which waits for the backend: say what it is waiting for.
    tracing::info!("starting with backend: {}", describe_backend(&config));
    let (backend, push) = build_backend_with_push(&config)?;
    let gw = GatewayHandle::start(config, backend)?;
    if let Some(push) = push {
        gw.report_push(push);
    }
    let cfg = gw.config();
    println!(
        "palaver-gateway {} listening on {} ({} core threads)",
        gw.gateway_id,
        gw.local_addr,
        cfg.core_count()
    );
    println!("  backend:   {}", describe_backend(cfg));
    println!(
        "  limits:    max {} connections (file limit {})",
        cfg.limits.max_connections,
        palaver_gateway::config::raise_nofile_limit()
    );
    if let Some(admin) = gw.admin_addr() {
        println!("  admin:     http://{admin}/metrics  http://{admin}/healthz");
    }
    if gw.dev_ca_cert.is_some() || gw.dev_jwt_secret.is_some() {
        let dir = std::fs::canonicalize(&cfg.data_dir).unwrap_or_else(|_| cfg.data_dir.clone());
        println!(
            "  data dir:  {} (dev credentials; --data-dir, default ./{DEFAULT_DATA_DIR})",
            dir.display()
        );
    }
    if let Some(ca) = &gw.dev_ca_cert {
        println!("  dev CA:    {} (clients trust this)", ca.display());
    }
    if let Some(secret) = &gw.dev_jwt_secret {
        println!("  dev JWT:   {} (HS256)", secret.display());
        println!("  try:       palaver chat --user alice --to bob   (from this directory)");
    }

    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let mut draining = false;
    loop {
        for sig in signals.pending() {
            match sig {
                SIGHUP => match gw.reload_tls() {
                    Ok(()) => tracing::info!("TLS certificates reloaded"),
                    Err(e) => tracing::error!("TLS reload failed, keeping the old ones: {e:#}"),
                },
                _ if !draining => {
                    draining = true;
                    tracing::info!(
                        "draining: GoAway to every session, deadline {} ms",
                        gw.config().drain.deadline_ms
                    );
                    gw.drain();
                }
                _ => {
                    tracing::warn!("second signal: closing everything now");
                    gw.stop();
                }
            }
        }
        if gw.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    gw.join();
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn help_states_the_real_defaults() {
        let help = Args::command().render_long_help().to_string();
        let d = Config::default();
        let l = &d.limits;
        for (flag, value) in [
            ("--listen", d.listen.to_string()),
            (
                "--heartbeat-interval-ms",
                l.heartbeat_interval_ms.to_string(),
            ),
            ("--max-frame-bytes", l.max_frame_bytes.to_string()),
            ("--max-body-bytes", l.max_body_bytes.to_string()),
            ("--max-sends-per-second", l.max_sends_per_second.to_string()),
            ("--max-outbound-bytes", l.max_outbound_bytes.to_string()),
            (
                "--max-requests-per-second",
                l.max_requests_per_second.to_string(),
            ),
            (
                "--max-requests-in-flight",
                l.max_requests_in_flight.to_string(),
            ),
            ("--typing-coalesce-ms", l.typing_coalesce_ms.to_string()),
            (
                "--max-connections-per-account",
                l.max_connections_per_account.to_string(),
            ),
            (
                "--max-account-sends-per-second",
                l.max_account_sends_per_second.to_string(),
            ),
            (
                "--max-account-requests-per-second",
                l.max_account_requests_per_second.to_string(),
            ),
            (
                "--socket-send-buffer-bytes",
                l.socket_send_buffer_bytes.to_string(),
            ),
            (
                "--account-bytes-per-day",
                l.account_bytes_per_day.to_string(),
            ),
            (
                "--conversation-bytes-per-day",
                l.conversation_bytes_per_day.to_string(),
            ),
            (
                "--slow-consumer-timeout-ms",
                l.slow_consumer_timeout_ms.to_string(),
            ),
            ("--handshake-timeout-ms", l.handshake_timeout_ms.to_string()),
            ("--hello-timeout-ms", l.hello_timeout_ms.to_string()),
            ("--max-group-members", l.max_group_members.to_string()),
            ("--max-batch", l.max_batch.to_string()),
            ("--handshakes-per-turn", l.handshakes_per_turn.to_string()),
            ("--drain-deadline-ms", d.drain.deadline_ms.to_string()),
            (
                "--reconnect-delay-ms",
                d.drain.reconnect_delay_ms.to_string(),
            ),
            (
                "--reconnect-jitter-ms",
                d.drain.reconnect_jitter_ms.to_string(),
            ),
            ("--backlog", d.backlog.to_string()),
            ("--jwt-leeway-s", d.auth.leeway_s.to_string()),
            ("--presence-visibility", d.presence_visibility.to_string()),
            (
                "--retention-days",
                palaver_gateway::config::DEFAULT_RETENTION_DAYS.to_string(),
            ),
        ] {
            let at = help.find(flag).unwrap_or_else(|| panic!("{flag} missing"));
            let section = &help[at..];
            let end = section.find("\n  -").unwrap_or(section.len());
            assert!(
                section[..end].contains(&format!("[default: {value}]")),
                "{flag} should say [default: {value}]: {}",
                &section[..end]
            );
        }
        let at = help.find("--max-connections <").unwrap();
        assert!(help[at..].contains("file limit"), "{}", &help[at..]);
    }

    #[test]
    fn flags_override_and_invalid_values_name_the_field() {
        let args = Args::try_parse_from([
            "palaver-gateway",
            "--listen",
            "127.0.0.1:0",
            "--heartbeat-interval-ms",
            "1000",
        ])
        .unwrap();
        let c = args.into_config().unwrap();
        assert_eq!(c.limits.heartbeat_interval_ms, 1000);
        let args =
            Args::try_parse_from(["palaver-gateway", "--heartbeat-interval-ms", "1"]).unwrap();
        let err = args.into_config().unwrap_err().to_string();
        assert!(err.contains("limits.heartbeat_interval_ms"), "{err}");
    }
}
