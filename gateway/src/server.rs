//! Starting and stopping a gateway: resolves credentials (configured files or
//! dev ones in the data directory), binds one SO_REUSEPORT listener per core,
//! attaches the backend, spawns the core threads and the admin endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use mio::{Poll, Waker};
use palaver_credentials::auth::Authenticator;
use palaver_credentials::devcerts;
use palaver_router::api::Backend;
use socket2::{Domain, Protocol, Socket, Type};

use crate::accounts::Accounts;
use crate::admin::AdminServer;
use crate::config::Config;
use crate::core::{Core, CoreClock, Shared, WAKER_TOKEN};
use crate::metrics::{self, CoreMetrics, GlobalMetrics};
use crate::sink::{Control, GatewaySink, Mailbox};
use crate::tls::{TlsFiles, TlsStore};

/// A running gateway.
pub struct GatewayHandle {
    pub gateway_id: String,
    pub local_addr: SocketAddr,
    /// CA certificate clients should trust when dev certificates are in use.
    pub dev_ca_cert: Option<PathBuf>,
    /// HS256 secret file when the dev JWT key is in use.
    pub dev_jwt_secret: Option<PathBuf>,
    shared: Arc<Shared>,
    mailboxes: Vec<Arc<Mailbox>>,
    metrics: Vec<Arc<CoreMetrics>>,
    global: Arc<GlobalMetrics>,
    threads: Vec<JoinHandle<()>>,
    admin: Option<AdminServer>,
}

/// Binds `addr` with SO_REUSEPORT (so every core, and other gateway
/// processes, can share the port; the kernel spreads accepts). A
/// `send_buffer` other than 0 is the SO_SNDBUF accepted sockets get
/// (`limits.socket_send_buffer_bytes`; see
/// [`DEFAULT_SOCKET_SEND_BUFFER`](crate::config::DEFAULT_SOCKET_SEND_BUFFER)
/// for why it is bounded).
pub fn bind_reuseport(
    addr: SocketAddr,
    backlog: u32,
    send_buffer: u32,
) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Inherited by accepted sockets (small frames must not wait for Nagle).
    socket.set_tcp_nodelay(true)?;
    if send_buffer > 0 {
        // Inherited by accepted sockets on Linux, and fixes their send
        // buffer (no autotuning); the core sets it again on other systems.
        socket.set_send_buffer_size(send_buffer as usize)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

impl GatewayHandle {
    /// Starts a gateway serving `backend`.
    pub fn start(mut config: Config, backend: Arc<dyn Backend>) -> anyhow::Result<GatewayHandle> {
        config.validate()?;
        // Raise the file limit; a cap of 0 (default) follows from it.
        config.apply_host_limits();
        let gateway_id = config.effective_gateway_id();
        let cores = config.core_count();

        let (tls_files, dev_ca_cert) = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => (
                TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: config.tls.client_ca.clone(),
                },
                None,
            ),
            _ => {
                let dev = devcerts::ensure_dev_certs(&config.data_dir, &[])
                    .context("creating dev certificates (data_dir)")?;
                (
                    TlsFiles {
                        cert: dev.server_cert,
                        key: dev.server_key,
                        client_ca: config.tls.client_ca.clone(),
                    },
                    Some(dev.ca_cert),
                )
            }
        };
        let tls = Arc::new(TlsStore::new(tls_files)?);

        let (auth, dev_jwt_secret) = if config.auth.hs256_secret_file.is_none()
            && config.auth.ed25519_public_key_file.is_none()
        {
            let secret = devcerts::ensure_jwt_secret(&config.data_dir)
                .context("creating the dev JWT secret (data_dir)")?;
            let auth = Authenticator::from_files(Some(&secret), None, config.auth.leeway_s)?;
            (auth, Some(secret))
        } else {
            let auth = Authenticator::from_files(
                config.auth.hs256_secret_file.as_deref(),
                config.auth.ed25519_public_key_file.as_deref(),
                config.auth.leeway_s,
            )?;
            (auth, None)
        };

        // Bind every listener before starting anything, so a taken port
        // fails the start cleanly. Port 0: the first bind picks the port.
        let mut listeners = Vec::with_capacity(cores);
        let mut addr = config.listen;
        for _ in 0..cores {
            let l = bind_reuseport(addr, config.backlog, config.limits.socket_send_buffer_bytes)
                .with_context(|| format!("listen: cannot bind {addr}"))?;
            addr = l.local_addr()?;
            listeners.push(l);
        }

        // Clients are told the limits that are enforced: with the Kafka/Redis
        // tier, the routers' (published in Redis), whatever this file says.
        if let Some(tier) = backend.enforced_limits() {
            for change in config.limits.adopt_tier_limits(&tier) {
                tracing::warn!("{change}");
            }
        }

        let shared = Arc::new(Shared {
            gateway_id: gateway_id.as_str().into(),
            config: config.clone(),
            backend: backend.clone(),
            auth,
            tls,
            live_connections: AtomicUsize::new(0),
            accounts: Accounts::new(
                config.limits.max_connections_per_account,
                config.limits.policy(),
            ),
            draining: AtomicBool::new(false),
            cores_running: AtomicUsize::new(cores),
            clock: CoreClock::new(),
        });

        let mut mailboxes = Vec::with_capacity(cores);
        let mut metrics = Vec::with_capacity(cores);
        let mut prepared = Vec::with_capacity(cores);
        for listener in listeners {
            let poll = Poll::new().context("creating poll")?;
            let waker = Waker::new(poll.registry(), WAKER_TOKEN).context("creating waker")?;
            let m = Arc::new(CoreMetrics::default());
            let (mailbox, rx) = Mailbox::new(waker, m.clone());
            mailboxes.push(mailbox.clone());
            metrics.push(m.clone());
            prepared.push((poll, listener, mailbox, rx, m));
        }

        backend
            .start(&gateway_id, Arc::new(GatewaySink::new(mailboxes.clone())))
            .context("starting the backend")?;

        // A backend that can run on a core thread (the embedded engine)
        // runs on core 0; other threads wake it through core 0's waker.
        let host_mailbox = mailboxes[0].clone();
        let mut host = backend.take_host(Arc::new(move || host_mailbox.nudge()));

        let mut threads = Vec::with_capacity(cores);
        for (index, (poll, listener, mailbox, rx, m)) in prepared.into_iter().enumerate() {
            let host = if index == 0 { host.take() } else { None };
            let core = Core::new(index, shared.clone(), m, poll, listener, mailbox, rx)
                .context("setting up a core thread")?
                .with_host(host);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("palaver-core-{index}"))
                    .spawn(move || core.run())
                    .context("spawning a core thread")?,
            );
        }

        let global = Arc::new(GlobalMetrics::default());
        let admin = match config.admin {
            Some(admin_addr) => {
                let (shared2, metrics2, global2) =
                    (shared.clone(), metrics.clone(), global.clone());
                let handler = Arc::new(move |path: &str| match path {
                    "/metrics" => (
                        200,
                        "text/plain; version=0.0.4",
                        metrics::render(&shared2.gateway_id, &metrics2, &global2),
                    ),
                    "/healthz" => {
                        if shared2.draining.load(Ordering::Acquire) {
                            (503, "text/plain", "draining\n".to_string())
                        } else {
                            (200, "text/plain", "ok\n".to_string())
                        }
                    }
                    _ => (404, "text/plain", "not found\n".to_string()),
                });
                Some(
                    AdminServer::start(admin_addr, handler)
                        .with_context(|| format!("admin: cannot bind {admin_addr}"))?,
                )
            }
            None => None,
        };

        Ok(GatewayHandle {
            gateway_id,
            local_addr: addr,
            dev_ca_cert,
            dev_jwt_secret,
            shared,
            mailboxes,
            metrics,
            global,
            threads,
            admin,
        })
    }

    /// Adds the in-process push worker's counters to `/metrics` (the handle
    /// [`build_backend_with_push`] returned; the first one given stays).
    pub fn report_push(&self, push: palaver_push::embedded::EmbeddedPushHandle) {
        let _ = self.global.push.set(push);
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::local_addr)
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Per-core counters.
    /// Skips the core clock `by` ahead: every connection's deadlines
    /// (handshake, Hello, heartbeat, slow consumer, linger) come that much
    /// sooner, and the cores notice within a tick (100 ms). For tests, which
    /// thereby run the real timeouts without waiting for them.
    pub fn skip_time(&self, by: std::time::Duration) {
        self.shared.clock.skip(by);
        for mailbox in &self.mailboxes {
            mailbox.nudge();
        }
    }

    pub fn core_metrics(&self) -> &[Arc<CoreMetrics>] {
        &self.metrics
    }

    pub fn metrics_text(&self) -> String {
        metrics::render(&self.gateway_id, &self.metrics, &self.global)
    }

    /// Connections open in this process.
    pub fn connections(&self) -> usize {
        self.shared.live_connections.load(Ordering::Relaxed)
    }

    /// Re-reads certificate files; new handshakes use them, established
    /// connections are untouched. On error the old certificate stays.
    pub fn reload_tls(&self) -> anyhow::Result<()> {
        let result = self.shared.tls.reload();
        let counter = if result.is_ok() {
            &self.global.tls_reloads_ok
        } else {
            &self.global.tls_reloads_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    /// Graceful drain: stop accepting, GoAway(SHUTDOWN) to every session with
    /// a jittered reconnect delay, close what is left at the drain deadline.
    /// Core threads exit when their connections are gone; see [`Self::join`].
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
        self.global.draining.store(1, Ordering::Relaxed);
        let d = &self.shared.config.drain;
        for mb in &self.mailboxes {
            mb.send_control(Control::Drain {
                reconnect_delay_ms: d.reconnect_delay_ms,
                reconnect_jitter_ms: d.reconnect_jitter_ms,
                deadline_ms: d.deadline_ms,
            });
        }
    }

    /// Closes every connection now and stops the core threads.
    pub fn stop(&self) {
        for mb in &self.mailboxes {
            mb.send_control(Control::Stop);
        }
    }

    /// True once every core thread has exited.
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    /// Waits for the core threads, then shuts the backend down.
    pub fn join(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.admin.take();
        self.shared.backend.shutdown();
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
            self.shared.backend.shutdown();
        }
    }
}

/// The backend the config asks for.
///
/// # Panics
/// When the durable store cannot be opened (tests; `palaver-gateway` uses
/// [`try_build_backend`] and prints the reason).
pub fn build_backend(config: &Config) -> Arc<dyn Backend> {
    match try_build_backend(config) {
        Ok(backend) => backend,
        Err(e) => panic!("building the backend: {e:#}"),
    }
}

/// Where the embedded engine's durable store lives under the data dir.
pub fn store_dir(config: &Config) -> std::path::PathBuf {
    config.data_dir.join("store")
}

/// The backend the config asks for; fails only when the embedded engine's
/// durable store cannot be opened, or `[push]`'s providers file cannot be
/// used (the error names the file and what to do).
pub fn try_build_backend(config: &Config) -> anyhow::Result<Arc<dyn Backend>> {
    Ok(build_backend_with_push(config)?.0)
}

/// The in-process push worker `[push]` asks for, started: the engine's push
/// sink and a handle on its counters. None without `[push] providers`
/// (then the engine's default sink counts the push events).
fn embedded_push(
    config: &Config,
) -> anyhow::Result<
    Option<(
        palaver_push::embedded::EmbeddedPush,
        palaver_push::embedded::EmbeddedPushHandle,
    )>,
> {
    use anyhow::Context as _;
    let Some(path) = &config.push.providers else {
        tracing::info!(
            "push: no [push] providers configured: push events are counted, not sent \
             (give [push] providers = \"push.toml\" with the APNs/FCM credentials)"
        );
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("push.providers: cannot read {}", path.display()))?;
    let providers: palaver_push::ProvidersConfig = toml::from_str(&text).with_context(|| {
        format!(
            "push.providers: {} is not a providers file ([apns] key_file, key_id, team_id; \
             [fcm] service_account_file)",
            path.display()
        )
    })?;
    let mut push = palaver_push::embedded::EmbeddedPushConfig::default();
    if let Some(content) = &config.push.content {
        push.content = content
            .parse()
            .map_err(|e: String| anyhow::anyhow!("push.content: {e}"))?;
    }
    if config.push.queue > 0 {
        push.queue_capacity = config.push.queue;
    }
    let started = palaver_push::embedded::EmbeddedPush::start(&providers, push)
        .with_context(|| format!("push.providers: {}", path.display()))?;
    Ok(Some(started))
}

/// [`try_build_backend`], with a handle on the in-process push worker's
/// counters when `[push]` started one.
pub fn build_backend_with_push(
    config: &Config,
) -> anyhow::Result<(
    Arc<dyn Backend>,
    Option<palaver_push::embedded::EmbeddedPushHandle>,
)> {
    let mut push_handle = None;
    let backend: Arc<dyn Backend> = match &config.backend {
        crate::config::BackendConfig::Kafka {
            brokers,
            redis,
            cassandra,
        } => {
            use palaver_router::bridge::KafkaRedisBridge;
            let archive = match cassandra {
                None => None,
                Some(nodes) => Some(palaver_archive::ArchiveConfig::new(
                    palaver_archive::ArchiveConfig::parse_nodes(nodes)
                        .map_err(|e| anyhow::anyhow!("[backend] cassandra: {e}"))?,
                )),
            };
            let tuned = (config.bridge != crate::config::BridgeTuning::default())
                .then(|| bridge_config(brokers, redis, &config.bridge))
                .flatten();
            let bridge = match tuned {
                Some(bridge_config) => KafkaRedisBridge::new(bridge_config),
                // Defaults, or a Redis spec that does not parse (which the
                // bridge reports when it starts).
                None => KafkaRedisBridge::from_spec(brokers, redis),
            };
            Arc::new(
                bridge
                    .with_archive(archive)
                    .with_presence_visibility(config.presence_visibility)
                    .with_max_connections_per_account(config.limits.max_connections_per_account),
            )
        }
        crate::config::BackendConfig::Embedded {
            engine_thread,
            durable,
            retention_days,
        } => {
            let l = &config.limits;
            let mut router = palaver_router::RouterConfig::default();
            router.max_group_members = l.max_group_members as usize;
            router.max_channel_members = l.max_channel_members as usize;
            router.max_body_bytes = l.max_body_bytes as usize;
            router.max_batch = l.max_batch as usize;
            router.default_batch = router.default_batch.min(router.max_batch);
            router.presence_visibility = config.presence_visibility;
            router.account_bytes_per_day = l.account_bytes_per_day;
            router.conversation_bytes_per_day = l.conversation_bytes_per_day;
            let engine_config = palaver_router::EmbeddedConfig {
                router,
                ..Default::default()
            };
            let push = embedded_push(config)?;
            let clock =
                || -> Arc<dyn palaver_router::Clock> { Arc::new(palaver_router::SystemClock) };
            if *durable {
                // A turn is one commit (a few fsyncs, ~10-30 ms on a VM
                // disk): under load, larger turns share it among more
                // messages, so the rate is not capped at 512 per commit.
                let engine_config = palaver_router::EmbeddedConfig {
                    max_commands_per_flush: 4096,
                    ..engine_config
                };
                let disk = palaver_router::disk::DiskConfig {
                    retention_days: *retention_days,
                    ..Default::default()
                };
                let store = palaver_router::disk::DiskStore::open(&store_dir(config), &disk)?;
                // Its own thread always: a turn's fsync must not hold a
                // core's event loop.
                match push {
                    None => Arc::new(palaver_router::EmbeddedEngine::durable(
                        engine_config,
                        store,
                    )),
                    Some((sink, handle)) => {
                        push_handle = Some(handle);
                        Arc::new(palaver_router::EmbeddedEngine::with_store(
                            store,
                            engine_config,
                            clock(),
                            sink,
                            true,
                        ))
                    }
                }
            } else if let Some((sink, handle)) = push {
                push_handle = Some(handle);
                Arc::new(palaver_router::EmbeddedEngine::with_store(
                    palaver_router::MemoryStore::new(),
                    engine_config,
                    clock(),
                    sink,
                    *engine_thread,
                ))
            } else if *engine_thread {
                Arc::new(palaver_router::EmbeddedEngine::new(engine_config))
            } else {
                // Hosted: the engine runs on core 0 of the gateway that
                // starts with it (no thread of its own, no hop for core 0).
                Arc::new(palaver_router::EmbeddedEngine::hosted(engine_config))
            }
        }
    };
    Ok((backend, push_handle))
}

/// The bridge's settings with `[bridge]`'s overrides; None if the Redis
/// spec does not parse.
fn bridge_config(
    brokers: &str,
    redis: &str,
    tuning: &crate::config::BridgeTuning,
) -> Option<palaver_router::bridge::BridgeConfig> {
    let ms = |ms: u32| std::time::Duration::from_millis(u64::from(ms));
    let redis = palaver_router::redis_store::RedisConfig::parse(redis).ok()?;
    let mut config = palaver_router::bridge::BridgeConfig::new(brokers, redis);
    if let Some(flush) = tuning.presence_flush_ms {
        config.presence.flush_interval = ms(flush);
    }
    if let Some(tick) = tuning.presence_tick_ms {
        config.presence.tick = ms(tick);
    }
    if let Some(lease) = tuning.presence_lease_ms {
        config.presence.lease_ttl = ms(lease);
    }
    if let Some(partitions) = tuning.inbound_partitions {
        config.inbound_partitions = i32::try_from(partitions).unwrap_or(i32::MAX);
    }
    Some(config)
}

/// Which backend [`build_backend`] runs for `config`, for the start-up
/// banner and logs. Credentials in a Redis URL (`user:password@`) are left out.
pub fn describe_backend(config: &Config) -> String {
    match &config.backend {
        crate::config::BackendConfig::Embedded {
            durable: true,
            retention_days,
            ..
        } => format!(
            "embedded engine (in-process router on its own thread, durable store in {}, \
             messages kept {})",
            store_dir(config).display(),
            match retention_days {
                0 => "forever".to_string(),
                days => format!("{days} days"),
            }
        ),
        crate::config::BackendConfig::Embedded { engine_thread, .. } => format!(
            "embedded engine (in-process router, in-memory bus and store: nothing kept \
             after exit, {})",
            if *engine_thread {
                "on its own thread"
            } else {
                "on core 0"
            }
        ),
        crate::config::BackendConfig::Kafka { brokers, redis, .. } => {
            format!(
                "Kafka/Redis backend (Kafka {brokers}, Redis {})",
                without_userinfo(redis)
            )
        }
    }
}

/// `scheme://user:pass@host,...` → `scheme://host,...`.
fn without_userinfo(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let hosts: Vec<&str> = rest
        .split(',')
        .map(|h| h.rsplit_once('@').map_or(h, |(_, host)| host))
        .collect();
    let hosts = hosts.join(",");
    if scheme.is_empty() {
        hosts
    } else {
        format!("{scheme}://{hosts}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_description_names_the_backend_that_runs() {
        let embedded = Config::default();
        assert!(describe_backend(&embedded).starts_with("embedded engine"));
        let kafka = Config {
            backend: crate::config::BackendConfig::Kafka {
                brokers: "127.0.0.1:9092".into(),
                redis: "redis://:s3cret@127.0.0.1:6379/".into(),
                cassandra: None,
            },
            ..Config::default()
        };
        let text = describe_backend(&kafka);
        assert_eq!(
            text,
            "Kafka/Redis backend (Kafka 127.0.0.1:9092, Redis redis://127.0.0.1:6379/)"
        );
        assert!(!text.contains("embedded") && !text.contains("s3cret"));
        assert_eq!(
            without_userinfo("redis+cluster://u:p@a:1,u:p@b:2"),
            "redis+cluster://a:1,b:2"
        );
    }

    #[test]
    fn accepted_sockets_inherit_nodelay_and_the_send_buffer_from_the_listener() {
        let listener = bind_reuseport("127.0.0.1:0".parse().unwrap(), 16, 16 * 1024).unwrap();
        let addr = listener.local_addr().unwrap();
        // A second listener on the same port: SO_REUSEPORT works.
        let second = bind_reuseport(addr, 16, 16 * 1024).unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let accepted = loop {
            // The kernel hands the connection to either listener.
            if let Ok((s, _)) = listener.accept().or_else(|_| second.accept()) {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no connection accepted"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(accepted.nodelay().unwrap());
        let sndbuf = socket2::SockRef::from(&accepted)
            .send_buffer_size()
            .unwrap();
        if cfg!(target_os = "linux") {
            // Linux doubles the value for its bookkeeping, and reports that.
            assert_eq!(sndbuf, 2 * 16 * 1024);
        }
    }
}
