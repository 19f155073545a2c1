//! Gateway configuration: one struct, filled from built-in defaults, then an
//! optional TOML file, then environment variables and command-line flags
//! (clap handles both; a flag beats its variable). [`Config::validate`] names
//! the offending field for anything that cannot work.
//!
//! The backend section is an enum so a Kafka/Redis backend can be added next
//! to the embedded one without touching the rest.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything a gateway process needs to start.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This gateway's id, unique among gateways sharing a backend.
    /// Empty = derived from host name and process id.
    pub gateway_id: String,
    /// Address phones connect to (shared by all core threads via SO_REUSEPORT).
    pub listen: SocketAddr,
    /// Admin HTTP address (`/metrics`, `/healthz`); `None` disables it.
    pub admin: Option<SocketAddr>,
    /// Core threads; 0 = one per available CPU.
    pub cores: usize,
    /// Where dev certificates, the dev JWT key and the embedded engine's
    /// durable store (`store/`) live.
    pub data_dir: PathBuf,
    /// Listen backlog per core listener.
    pub backlog: u32,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub drain: DrainConfig,
    pub backend: BackendConfig,
    /// Tuning of the Kafka/Redis bridge (`[backend] kind = "kafka"` only).
    pub bridge: BridgeTuning,
    /// The push worker in-process (`[backend] kind = "embedded"` only;
    /// with Kafka, `palaver-push` sends the pushes).
    pub push: PushConfig,
    /// Whose presence and last seen a user may see (SPEC §10):
    /// `shared_conversation` (default) or `everyone`.
    #[serde(deserialize_with = "from_str")]
    pub presence_visibility: palaver_router::PresenceVisibility,
}

/// A field parsed with its `FromStr`.
fn from_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM). With `key`; both absent = dev certs.
    pub cert: Option<PathBuf>,
    /// Server private key (PEM).
    pub key: Option<PathBuf>,
    /// CA bundle (PEM) for client certificates; set = client certs required.
    pub client_ca: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// File holding the HS256 secret (raw bytes, surrounding whitespace trimmed).
    pub hs256_secret_file: Option<PathBuf>,
    /// File holding an Ed25519 public key (PEM, SPKI) for EdDSA tokens.
    pub ed25519_public_key_file: Option<PathBuf>,
    /// Clock skew tolerated on `exp`, seconds.
    pub leeway_s: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hs256_secret_file: None,
            ed25519_public_key_file: None,
            leeway_s: 5,
        }
    }
}

/// Every limit the gateway enforces (protocol ones are announced in Welcome).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_frame_bytes: u32,
    pub max_body_bytes: u32,
    pub max_sends_per_second: u32,
    /// Budget for every other request, in cost units per second (SPEC §13).
    pub max_requests_per_second: u32,
    /// Requests with a response one connection may have awaiting it.
    pub max_requests_in_flight: u32,
    /// Connections one user may hold on this gateway (all devices; a
    /// device reconnecting replaces its connection and is not one more).
    /// One more is refused with `TOO_MANY_CONNECTIONS`.
    pub max_connections_per_account: u32,
    /// Sends per second shared by all of one user's connections on this
    /// gateway (token bucket, burst the same), besides each connection's.
    pub max_account_sends_per_second: u32,
    /// Request budget (cost units per second) shared by all of one user's
    /// connections on this gateway, besides each connection's.
    pub max_account_requests_per_second: u32,
    /// A repeated identical Typing within this window is dropped.
    pub typing_coalesce_ms: u32,
    pub max_group_members: u32,
    /// Most members a channel may have (SPEC §21), announced in Welcome.
    /// With the Kafka backend the routers' `--max-channel-members` replaces
    /// it (0 from routers that predate channels: none announced).
    pub max_channel_members: u32,
    /// Channels one connection may have open (OpenChannel LIVE or COUNTS)
    /// at once; one more is answered QUOTA_EXCEEDED. Bounds what a
    /// connection makes this gateway hold and do per channel post.
    pub max_open_channels_per_connection: u32,
    /// How often a connection with channels open in COUNTS mode gets one
    /// ChannelActivity with the channels that moved (batched, not a frame
    /// per message).
    pub channel_activity_interval_ms: u32,
    /// Typing of one channel a core hands on per second, at most (to its
    /// connections that have the channel LIVE); more is dropped.
    pub channel_typing_per_second: u32,
    pub max_batch: u32,
    pub heartbeat_interval_ms: u32,
    pub handshake_timeout_ms: u32,
    pub hello_timeout_ms: u32,
    /// Unsent bytes one connection may hold: above it the gateway stops
    /// reading the connection's requests, and a frame from the backend that
    /// does not fit closes it as a slow consumer.
    pub max_outbound_bytes: u32,
    /// How long a connection may fall behind without reading before it is
    /// closed as a slow consumer (SPEC §13): output waiting (the kernel's
    /// send buffer full) and less than half of `max_outbound_bytes` read
    /// by the client in this time.
    pub slow_consumer_timeout_ms: u32,
    /// SO_SNDBUF of accepted sockets: what the kernel may hold for one
    /// connection besides the gateway's own output queue (Linux doubles it
    /// for bookkeeping). 0 leaves the kernel's autotuning, which lets a
    /// client that stops reading pin megabytes of kernel memory.
    pub socket_send_buffer_bytes: u32,
    /// Connections this process holds at most (all cores together).
    /// 0 (the default) derives it at start from the process's file limit,
    /// see [`derive_max_connections`]; any other value is used as given.
    pub max_connections: u32,
    /// TLS handshake steps (and accepts) one core runs per loop turn.
    pub handshakes_per_turn: u32,
    /// Storage quotas of the embedded engine (SPEC §13): bytes one account,
    /// and one conversation, may store per UTC day (a message weighs its
    /// body plus 256); a Send beyond is QUOTA_EXCEEDED. With the Kafka
    /// backend the router tier applies its own (`palaver-router
    /// --account-bytes-per-day`, `--conversation-bytes-per-day`).
    pub account_bytes_per_day: u64,
    pub conversation_bytes_per_day: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let p = palaver_protocol::Limits::default();
        LimitsConfig {
            max_frame_bytes: p.max_frame_bytes,
            max_body_bytes: p.max_body_bytes,
            max_sends_per_second: p.max_sends_per_second,
            max_requests_per_second: p.max_requests_per_second,
            max_requests_in_flight: p.max_requests_in_flight,
            max_connections_per_account: p.max_connections_per_account,
            max_account_sends_per_second: p.max_account_sends_per_second,
            max_account_requests_per_second: p.max_account_requests_per_second,
            typing_coalesce_ms: 2_000,
            max_group_members: p.max_group_members,
            max_channel_members: p.max_channel_members,
            max_open_channels_per_connection: 64,
            channel_activity_interval_ms: 1_000,
            channel_typing_per_second: 5,
            max_batch: p.max_batch,
            heartbeat_interval_ms: p.heartbeat_interval_ms,
            handshake_timeout_ms: 10_000,
            hello_timeout_ms: p.hello_timeout_ms,
            max_outbound_bytes: 256 * 1024,
            slow_consumer_timeout_ms: 10_000,
            socket_send_buffer_bytes: DEFAULT_SOCKET_SEND_BUFFER,
            max_connections: 0,
            handshakes_per_turn: 64,
            account_bytes_per_day: palaver_router::RouterConfig::default().account_bytes_per_day,
            conversation_bytes_per_day: palaver_router::RouterConfig::default()
                .conversation_bytes_per_day,
        }
    }
}

impl LimitsConfig {
    /// Takes the limits the router tier enforces where they differ from
    /// this gateway's, so Welcome announces what is enforced (issue: a
    /// gateway configured otherwise told clients limits no router applied).
    /// Returns what changed, one line per field, for the log.
    pub fn adopt_tier_limits(&mut self, tier: &palaver_router::TierLimits) -> Vec<String> {
        let mut changed = Vec::new();
        for (field, ours, theirs) in [
            (
                "max_group_members",
                &mut self.max_group_members,
                tier.max_group_members,
            ),
            (
                "max_body_bytes",
                &mut self.max_body_bytes,
                tier.max_body_bytes,
            ),
            ("max_batch", &mut self.max_batch, tier.max_batch),
            (
                "max_channel_members",
                &mut self.max_channel_members,
                tier.max_channel_members,
            ),
        ] {
            if *ours != theirs {
                changed.push(format!(
                    "limits.{field}: this gateway's {ours} replaced by the router tier's {theirs} (what the routers enforce is what Welcome announces)"
                ));
                *ours = theirs;
            }
        }
        changed
    }

    /// What each connection's [`RequestPolicy`](crate::policy::RequestPolicy) enforces.
    pub fn policy(&self) -> crate::policy::PolicyLimits {
        crate::policy::PolicyLimits {
            max_body_bytes: self.max_body_bytes,
            max_sends_per_second: self.max_sends_per_second,
            max_requests_per_second: self.max_requests_per_second,
            max_requests_in_flight: self.max_requests_in_flight,
            typing_coalesce_ms: self.typing_coalesce_ms,
            max_account_sends_per_second: self.max_account_sends_per_second,
            max_account_requests_per_second: self.max_account_requests_per_second,
        }
    }

    /// The protocol-level limits (announced to clients).
    pub fn protocol(&self) -> palaver_protocol::Limits {
        palaver_protocol::Limits {
            max_frame_bytes: self.max_frame_bytes,
            max_body_bytes: self.max_body_bytes,
            max_sends_per_second: self.max_sends_per_second,
            max_requests_per_second: self.max_requests_per_second,
            max_requests_in_flight: self.max_requests_in_flight,
            max_connections_per_account: self.max_connections_per_account,
            max_account_sends_per_second: self.max_account_sends_per_second,
            max_account_requests_per_second: self.max_account_requests_per_second,
            max_group_members: self.max_group_members,
            max_channel_members: self.max_channel_members,
            max_batch: self.max_batch,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            hello_timeout_ms: self.hello_timeout_ms,
            ..palaver_protocol::Limits::default()
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrainConfig {
    /// After this long, connections still open are closed.
    pub deadline_ms: u32,
    /// Minimum `GoAway.reconnect_delay_ms`.
    pub reconnect_delay_ms: u32,
    /// Random extra delay per connection, so clients don't reconnect together.
    pub reconnect_jitter_ms: u32,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            deadline_ms: 10_000,
            reconnect_delay_ms: 1_000,
            reconnect_jitter_ms: 4_000,
        }
    }
}

/// `[push]`: the embedded engine's in-process push worker
/// (`palaver_push::embedded`): the same decisions and provider clients as
/// `palaver-push`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// The providers' credentials: the TOML file `palaver-push
    /// --providers` reads (`[apns]` key_file, key_id, team_id; `[fcm]`
    /// service_account_file). Absent: nothing is sent and the push events
    /// are only counted; a file with neither section: the pushes that
    /// would have been sent are counted.
    pub providers: Option<PathBuf>,
    /// What a push shows: `id-only` (conversation and seq, no body; the
    /// default) or `preview` (the sender and the kind of content; never
    /// the body).
    pub content: Option<String>,
    /// Push events the engine queues for the push thread at most; more are
    /// dropped and counted (the engine never waits). 0: 10,000.
    pub queue: usize,
}

/// Which chat backend serves requests.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendConfig {
    /// Router logic in-process with an in-memory bus; state in a durable
    /// store in `data_dir/store/` (or in memory with `durable = false`).
    Embedded {
        /// Run the engine on a thread of its own (every message crosses
        /// two threads) instead of on core 0's loop (no hop for core 0's
        /// connections). With few CPUs and a high message rate the own
        /// thread balances better: hosted, core 0 carries the whole engine
        /// besides its share of the connections. The durable engine always
        /// has its own thread (its commits' fsync must not hold core 0).
        #[serde(default)]
        engine_thread: bool,
        /// Keep messages, seqs, conversations, members, receipts, dedup,
        /// push marks and quotas on disk (`data_dir/store/palaver.redb`,
        /// one fsync'd commit per engine turn, before its acks): a restart
        /// or a crash loses no acknowledged message. `false`: in memory
        /// only, gone at exit (tests, benchmarks).
        #[serde(default = "yes")]
        durable: bool,
        /// Durable store: messages older than this many days are deleted
        /// (0 = kept forever).
        #[serde(default = "default_retention_days")]
        retention_days: u32,
    },
    /// The router tier: writes through Kafka, state in Redis
    /// (`palaver_router::bridge`).
    Kafka {
        /// Kafka bootstrap servers, `host:port[,host:port...]`.
        brokers: String,
        /// `redis://host:port/` or `redis+cluster://host:port,host:port,...`.
        redis: String,
        /// The router tier's history archive, Cassandra `host:port[,...]`
        /// (as the routers' `--cassandra`): History and Sync below the
        /// Redis window are read from it. Absent: the window is all.
        #[serde(default)]
        cassandra: Option<String>,
    },
}

fn yes() -> bool {
    true
}

/// Five years.
pub const DEFAULT_RETENTION_DAYS: u32 = 1826;

fn default_retention_days() -> u32 {
    DEFAULT_RETENTION_DAYS
}

impl BackendConfig {
    /// The embedded engine in memory only (nothing on disk): for tests and
    /// benchmarks that want it.
    pub fn ephemeral() -> Self {
        BackendConfig::Embedded {
            engine_thread: false,
            durable: false,
            retention_days: DEFAULT_RETENTION_DAYS,
        }
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig::Embedded {
            engine_thread: false,
            durable: true,
            retention_days: DEFAULT_RETENTION_DAYS,
        }
    }
}

/// Overrides of the Kafka/Redis bridge's defaults; absent keys keep them.
/// Tests and benchmarks shorten the presence lease so that a dead gateway's
/// users go offline within seconds.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeTuning {
    /// Session changes are written to Redis at most this long after they happen.
    pub presence_flush_ms: Option<u32>,
    /// Lease renewal and dead-gateway check period.
    pub presence_tick_ms: Option<u32>,
    /// A gateway that stops renewing its lease is dead after this long.
    pub presence_lease_ms: Option<u32>,
    /// Partitions of `palaver.inbound` if this gateway has to create it.
    pub inbound_partitions: Option<u32>,
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
pub const DEFAULT_DATA_DIR: &str = ".palaver";

impl Default for Config {
    fn default() -> Self {
        Config {
            gateway_id: String::new(),
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            admin: None,
            cores: 0,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            backlog: 4096,
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            drain: DrainConfig::default(),
            backend: BackendConfig::default(),
            bridge: BridgeTuning::default(),
            push: PushConfig::default(),
            presence_visibility: palaver_router::PresenceVisibility::default(),
        }
    }
}

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("config {field}: {problem}")]
pub struct ConfigError {
    pub field: &'static str,
    pub problem: String,
}

fn bad(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        problem: problem.into(),
    }
}

/// Default SO_SNDBUF of accepted sockets (`limits.socket_send_buffer_bytes`).
///
/// The kernel's autotuning grows a socket's send buffer up to
/// `net.ipv4.tcp_wmem`'s maximum (4 MiB by default) whenever the link looks
/// fast, and keeps it while the client does not read: 300 stalled clients
/// pinned 431 MB of kernel memory that the gateway's own accounting never
/// saw. A fixed 64 KiB (the kernel books 128 KiB) keeps a mobile link busy:
/// its bandwidth-delay product is 25-125 KB (2-10 Mbit/s at 100 ms; LTE
/// at 20 Mbit/s and 50 ms is 125 KB), and chat frames are small, so only a
/// large Sync or History page waits a few round trips longer. Memory per
/// stalled connection in the kernel stays at ~128 KiB instead of megabytes,
/// and output beyond it waits in the gateway, where the slow-consumer rule
/// sees it.
pub const DEFAULT_SOCKET_SEND_BUFFER: u32 = 64 * 1024;

/// Upper bound of `limits.max_connections`.
pub const MAX_CONNECTIONS_CAP: u32 = 1 << 24;

/// File descriptors kept out of the derived connection cap: per core a
/// listener, a mio Poll and Waker (≈3 × cores, up to 64 cores = 192), plus the
/// admin listener and its connections, Kafka (librdkafka opens a few sockets
/// per broker) and Redis connections, TLS/config files and stdio.
pub const FD_HEADROOM: u64 = 256;

/// The default connection cap for a process whose RLIMIT_NOFILE soft limit
/// is `nofile`: every descriptor but [`FD_HEADROOM`], at least 1, at most
/// [`MAX_CONNECTIONS_CAP`].
pub fn derive_max_connections(nofile: u64) -> u32 {
    nofile
        .saturating_sub(FD_HEADROOM)
        .clamp(1, MAX_CONNECTIONS_CAP as u64) as u32
}

/// Raises this process's RLIMIT_NOFILE soft limit to its hard limit (or, if
/// the hard limit is unlimited, to the kernel's `fs.nr_open`) and returns the
/// soft limit in force afterwards. If raising fails, the current soft limit
/// is returned unchanged.
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
#[allow(unsafe_code)] // two libc calls on a struct we own; see SAFETY below
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    let target = if lim.rlim_max == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
            .unwrap_or(1 << 20)
    } else {
        lim.rlim_max
    };
    if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = target;
        }
    }
    lim.rlim_cur as u64
}

impl Config {
    /// What start does to fit the host: raises the file limit (always, so an
    /// explicit cap above the soft limit can be reached too) and, when
    /// `limits.max_connections` is 0, derives it from the resulting limit.
    /// Returns the file limit in force.
    pub fn apply_host_limits(&mut self) -> u64 {
        let nofile = raise_nofile_limit();
        if self.limits.max_connections == 0 {
            self.limits.max_connections = derive_max_connections(nofile);
        }
        nofile
    }

    /// Parses a TOML file (unknown keys are errors).
    pub fn from_toml_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        Self::from_toml_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    pub fn from_toml_str(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Number of core threads to run.
    pub fn core_count(&self) -> usize {
        if self.cores == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.cores
        }
    }

    /// The gateway id, derived from host name and pid when not configured.
    pub fn effective_gateway_id(&self) -> String {
        if !self.gateway_id.is_empty() {
            return self.gateway_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "gw".to_string());
        format!("{host}-{}", std::process::id())
    }

    /// Checks everything that can be checked before binding sockets.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if !self.gateway_id.is_empty() && !palaver_protocol::is_valid_id(&self.gateway_id) {
            return Err(bad(
                "gateway_id",
                "must be 1..64 characters of [A-Za-z0-9_.@-]",
            ));
        }
        if self.cores > 255 {
            return Err(bad("cores", "at most 255 core threads"));
        }
        if self.backlog == 0 {
            return Err(bad("backlog", "must be > 0"));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(bad(
                "tls.cert/tls.key",
                "give both a certificate and a key, or neither (dev certificate)",
            ));
        }
        if let Some(content) = &self.push.content {
            if let Err(e) = content.parse::<palaver_push::dispatch::ContentPolicy>() {
                return Err(bad("push.content", &e));
            }
        }
        if self.push.providers.is_some() && matches!(self.backend, BackendConfig::Kafka { .. }) {
            return Err(bad(
                "push.providers",
                "the in-process push worker is the embedded engine's; with [backend] kind = \"kafka\" run palaver-push --providers instead",
            ));
        }
        if l.max_frame_bytes < 256 {
            return Err(bad("limits.max_frame_bytes", "must be at least 256"));
        }
        if l.max_body_bytes == 0 || l.max_body_bytes >= l.max_frame_bytes {
            return Err(bad(
                "limits.max_body_bytes",
                "must be > 0 and smaller than limits.max_frame_bytes",
            ));
        }
        if l.max_sends_per_second == 0 {
            return Err(bad("limits.max_sends_per_second", "must be > 0"));
        }
        if l.max_requests_per_second < 10 {
            return Err(bad(
                "limits.max_requests_per_second",
                "must be at least 10 (one group operation costs 10 units)",
            ));
        }
        if l.max_requests_in_flight == 0 || l.max_requests_in_flight > u32::from(u16::MAX) {
            return Err(bad(
                "limits.max_requests_in_flight",
                "must be between 1 and 65535",
            ));
        }
        if l.max_connections_per_account == 0 {
            return Err(bad("limits.max_connections_per_account", "must be > 0"));
        }
        if l.max_account_sends_per_second < l.max_sends_per_second {
            return Err(bad(
                "limits.max_account_sends_per_second",
                "must be at least limits.max_sends_per_second (an account has at least one connection)",
            ));
        }
        if l.max_account_requests_per_second < l.max_requests_per_second {
            return Err(bad(
                "limits.max_account_requests_per_second",
                "must be at least limits.max_requests_per_second (an account has at least one connection)",
            ));
        }
        if l.account_bytes_per_day == 0 {
            return Err(ConfigError {
                field: "limits.account_bytes_per_day",
                problem: "must be at least 1 (a message weighs its body plus 256 bytes)".into(),
            });
        }
        if l.conversation_bytes_per_day == 0 {
            return Err(ConfigError {
                field: "limits.conversation_bytes_per_day",
                problem: "must be at least 1 (a message weighs its body plus 256 bytes)".into(),
            });
        }
        if l.socket_send_buffer_bytes != 0
            && !(4096..=64 * 1024 * 1024).contains(&l.socket_send_buffer_bytes)
        {
            return Err(bad(
                "limits.socket_send_buffer_bytes",
                "must be between 4096 and 67108864 (or 0: the kernel's autotuning)",
            ));
        }
        if l.slow_consumer_timeout_ms < 100 {
            return Err(bad(
                "limits.slow_consumer_timeout_ms",
                "must be at least 100",
            ));
        }
        if l.max_group_members < 2 {
            return Err(bad("limits.max_group_members", "must be at least 2"));
        }
        if l.max_channel_members < 2 {
            return Err(bad("limits.max_channel_members", "must be at least 2"));
        }
        if !(1..=10_000).contains(&l.max_open_channels_per_connection) {
            return Err(bad(
                "limits.max_open_channels_per_connection",
                "must be between 1 and 10000",
            ));
        }
        if !(100..=60_000).contains(&l.channel_activity_interval_ms) {
            return Err(bad(
                "limits.channel_activity_interval_ms",
                "must be between 100 and 60000",
            ));
        }
        if l.channel_typing_per_second == 0 {
            return Err(bad(
                "limits.channel_typing_per_second",
                "must be at least 1",
            ));
        }
        if l.max_batch == 0 {
            return Err(bad("limits.max_batch", "must be > 0"));
        }
        if !(100..=3_600_000).contains(&l.heartbeat_interval_ms) {
            return Err(bad(
                "limits.heartbeat_interval_ms",
                "must be between 100 and 3600000",
            ));
        }
        if l.handshake_timeout_ms < 100 {
            return Err(bad("limits.handshake_timeout_ms", "must be at least 100"));
        }
        if l.hello_timeout_ms < 100 {
            return Err(bad("limits.hello_timeout_ms", "must be at least 100"));
        }
        if (l.max_outbound_bytes as u64) < 2 * l.max_frame_bytes as u64 {
            return Err(bad(
                "limits.max_outbound_bytes",
                "must be at least twice limits.max_frame_bytes",
            ));
        }
        if l.max_connections > MAX_CONNECTIONS_CAP {
            return Err(bad(
                "limits.max_connections",
                "must be between 1 and 16777216 (or 0: derived from the file limit)",
            ));
        }
        if l.handshakes_per_turn == 0 {
            return Err(bad("limits.handshakes_per_turn", "must be > 0"));
        }
        if self.drain.deadline_ms == 0 {
            return Err(bad("drain.deadline_ms", "must be > 0"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
    #[allow(unsafe_code)] // reads the limit back with getrlimit
    fn connection_cap_follows_the_file_limit() {
        assert_eq!(derive_max_connections(20_000), 20_000 - 256);
        assert_eq!(derive_max_connections(1_048_576), 1_048_576 - 256);
        assert_eq!(derive_max_connections(1024), 768);
        assert_eq!(derive_max_connections(100), 1);
        assert_eq!(derive_max_connections(u64::MAX), MAX_CONNECTIONS_CAP);
        // Start raises the soft limit to the hard one, and derives the cap from it.
        let mut c = Config::default();
        let nofile = c.apply_host_limits();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur as u64, nofile);
        if lim.rlim_max != libc::RLIM_INFINITY {
            assert_eq!(lim.rlim_cur, lim.rlim_max);
        }
        assert_eq!(c.limits.max_connections, derive_max_connections(nofile));
        // An explicit value stays authoritative.
        let mut c = Config::default();
        c.limits.max_connections = 7;
        c.apply_host_limits();
        assert_eq!(c.limits.max_connections, 7);
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn toml_overrides_and_unknown_keys() {
        let c = Config::from_toml_str(
            "listen = \"127.0.0.1:9000\"\n[limits]\nheartbeat_interval_ms = 1000\n",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.limits.heartbeat_interval_ms, 1000);
        assert_eq!(c.limits.max_frame_bytes, 65536);
        let err = Config::from_toml_str("[limits]\nheartbeat_ms = 1\n").unwrap_err();
        assert!(err.to_string().contains("heartbeat_ms"), "{err}");
        let c = Config::from_toml_str("[backend]\nkind = \"embedded\"\n").unwrap();
        assert_eq!(c.backend, BackendConfig::default(), "durable by default");
        assert!(matches!(
            c.backend,
            BackendConfig::Embedded {
                durable: true,
                retention_days: 1826,
                ..
            }
        ));
        let c = Config::from_toml_str(
            "[backend]\nkind = \"embedded\"\nengine_thread = true\ndurable = false\n",
        )
        .unwrap();
        assert_eq!(
            c.backend,
            BackendConfig::Embedded {
                engine_thread: true,
                durable: false,
                retention_days: 1826,
            }
        );
        let c =
            Config::from_toml_str("[backend]\nkind = \"embedded\"\nretention_days = 30\n").unwrap();
        assert!(matches!(
            c.backend,
            BackendConfig::Embedded {
                durable: true,
                retention_days: 30,
                ..
            }
        ));
    }

    #[test]
    fn bridge_tuning_from_toml() {
        assert_eq!(Config::default().bridge, BridgeTuning::default());
        let c =
            Config::from_toml_str("[bridge]\npresence_lease_ms = 3000\ninbound_partitions = 4\n")
                .unwrap();
        assert_eq!(
            c.bridge,
            BridgeTuning {
                presence_lease_ms: Some(3000),
                inbound_partitions: Some(4),
                ..BridgeTuning::default()
            }
        );
        assert!(Config::from_toml_str("[bridge]\nlease = 1\n").is_err());
    }

    #[test]
    fn the_router_tiers_limits_replace_the_gateways_own() {
        let mut l = LimitsConfig::default();
        let tier = palaver_router::TierLimits {
            max_group_members: 7,
            max_body_bytes: l.max_body_bytes,
            max_batch: 50,
            max_channel_members: l.max_channel_members,
        };
        let changed = l.adopt_tier_limits(&tier);
        assert_eq!(changed.len(), 2, "{changed:?}");
        assert!(changed[0].contains("limits.max_group_members") && changed[0].contains('7'));
        assert_eq!((l.max_group_members, l.max_batch), (7, 50));
        assert!(l.adopt_tier_limits(&tier).is_empty(), "already the tier's");
        // Routers that predate channels publish none: no gateway announces them.
        let older = palaver_router::TierLimits {
            max_channel_members: 0,
            ..tier
        };
        let changed = l.adopt_tier_limits(&older);
        assert!(
            changed[0].contains("limits.max_channel_members"),
            "{changed:?}"
        );
        assert_eq!(l.protocol().to_pb().max_channel_members, 0);
    }

    #[test]
    fn storage_quotas_from_toml_and_validated() {
        let c = Config::from_toml_str(
            "[limits]\naccount_bytes_per_day = 1000\nconversation_bytes_per_day = 5000\n",
        )
        .unwrap();
        assert_eq!(
            (
                c.limits.account_bytes_per_day,
                c.limits.conversation_bytes_per_day
            ),
            (1000, 5000)
        );
        c.validate().unwrap();
        let zero = Config::from_toml_str("[limits]\naccount_bytes_per_day = 0\n").unwrap();
        assert_eq!(
            zero.validate().unwrap_err().field,
            "limits.account_bytes_per_day"
        );
    }

    #[test]
    fn presence_visibility_from_toml() {
        use palaver_router::PresenceVisibility;
        assert_eq!(
            Config::default().presence_visibility,
            PresenceVisibility::SharedConversation
        );
        let c = Config::from_toml_str("presence_visibility = \"everyone\"\n").unwrap();
        assert_eq!(c.presence_visibility, PresenceVisibility::Everyone);
        let err = Config::from_toml_str("presence_visibility = \"friends\"\n").unwrap_err();
        assert!(err.to_string().contains("shared_conversation"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = Config::default();
        c.limits.heartbeat_interval_ms = 5;
        let err = c.validate().unwrap_err();
        assert_eq!(err.field, "limits.heartbeat_interval_ms");
        let mut c = Config::default();
        c.tls.cert = Some("x.pem".into());
        assert_eq!(c.validate().unwrap_err().field, "tls.cert/tls.key");
        let mut c = Config::default();
        c.limits.max_outbound_bytes = 1000;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_outbound_bytes"));
        // Lifting a connection's rate without its account's would do nothing.
        let mut c = Config::default();
        c.limits.max_sends_per_second = 1000;
        assert_eq!(
            c.validate().unwrap_err().field,
            "limits.max_account_sends_per_second"
        );
        let mut c = Config::default();
        c.limits.max_requests_per_second = 1000;
        assert_eq!(
            c.validate().unwrap_err().field,
            "limits.max_account_requests_per_second"
        );
        let mut c = Config::default();
        c.limits.max_connections_per_account = 0;
        assert_eq!(
            c.validate().unwrap_err().field,
            "limits.max_connections_per_account"
        );
        let mut c = Config::default();
        c.limits.socket_send_buffer_bytes = 100;
        assert_eq!(
            c.validate().unwrap_err().field,
            "limits.socket_send_buffer_bytes"
        );
        c.limits.socket_send_buffer_bytes = 0;
        c.validate().expect("0: the kernel's autotuning");
    }

    #[test]
    fn account_limits_from_toml_and_announced_in_welcome() {
        let c = Config::from_toml_str(
            "[limits]\nmax_connections_per_account = 4\nmax_account_sends_per_second = 60\n\
             max_account_requests_per_second = 150\nsocket_send_buffer_bytes = 131072\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits.socket_send_buffer_bytes, 131072);
        let announced = c.limits.protocol().to_pb();
        assert_eq!(announced.max_connections_per_account, 4);
        assert_eq!(announced.max_account_sends_per_second, 60);
        assert_eq!(announced.max_account_requests_per_second, 150);
        let policy = c.limits.policy();
        assert_eq!(
            (
                policy.max_account_sends_per_second,
                policy.max_account_requests_per_second
            ),
            (60, 150)
        );
        let d = Config::default().limits;
        assert_eq!(
            (
                d.max_connections_per_account,
                d.max_account_sends_per_second,
                d.max_account_requests_per_second,
                d.socket_send_buffer_bytes
            ),
            (16, 100, 200, 64 * 1024)
        );
    }
}
