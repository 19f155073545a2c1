//! Real Redis, Redis Cluster and Apache Kafka (KRaft) processes on free
//! loopback ports, for the integration tests and for `palaver cluster`.
//!
//! Each service gets its own working directory (a temporary one unless the
//! caller gives one), is polled until it answers (with a deadline), and is
//! killed when its handle is dropped — unless the handle is `detach`ed, which
//! `palaver cluster up` does so the processes outlive the CLI.
//!
//! A missing binary is an error naming `tools/scripts/install-deps.sh`; tests
//! `expect()` these results, so a machine without the binaries fails loudly
//! instead of skipping.

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

/// How long a service may take to answer after it was spawned.
const START_DEADLINE: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(25);
const INSTALL_HINT: &str = "run tools/scripts/install-deps.sh to install it";

#[derive(Debug)]
pub struct StackError(String);

impl fmt::Display for StackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StackError {}

pub type Result<T> = std::result::Result<T, StackError>;

fn err(message: impl Into<String>) -> StackError {
    StackError(message.into())
}

/// Finds `name` on PATH or in cargo's bin directory (where `cargo install`
/// puts binaries even when that directory is not on PATH).
pub fn find_binary(name: &str) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(cargo_home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(cargo_home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| err(format!("`{name}` is not installed; {INSTALL_HINT}")))
}

/// A free loopback TCP port: bind port 0, read what the kernel chose, release.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| err(format!("cannot bind a loopback port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| err(format!("local_addr: {e}")))
}

/// Set (to anything) to keep every temporary work dir: the logs of a run
/// that passed, to compare with one that failed.
pub const KEEP_WORK_DIRS: &str = "PALAVER_KEEP_WORK_DIRS";

/// A service's working directory; a temporary one is removed on drop,
/// unless a test is failing or [`KEEP_WORK_DIRS`] is set.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    remove_on_drop: bool,
}

impl WorkDir {
    /// A fresh directory under the system temp dir, removed on drop.
    pub fn temp(label: &str) -> Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "palaver-{label}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).map_err(|e| err(format!("create {}: {e}", path.display())))?;
        Ok(Self {
            path,
            remove_on_drop: std::env::var_os(KEEP_WORK_DIRS).is_none(),
        })
    }

    /// A directory the caller owns (created if missing, kept on drop).
    pub fn kept(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        fs::create_dir_all(&path).map_err(|e| err(format!("create {}: {e}", path.display())))?;
        // Absolute: services run with it as working directory.
        let path =
            fs::canonicalize(&path).map_err(|e| err(format!("resolve {}: {e}", path.display())))?;
        Ok(Self {
            path,
            remove_on_drop: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.remove_on_drop {
            return;
        }
        // A failing test's logs and data stay for the post-mortem.
        if std::thread::panicking() {
            eprintln!("kept for inspection: {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A child process killed (and reaped) on drop unless detached.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Result<Self> {
        let out =
            fs::File::create(&log).map_err(|e| err(format!("create {}: {e}", log.display())))?;
        let out2 = out.try_clone().map_err(|e| err(format!("dup log: {e}")))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(out2);
        let child = cmd
            .spawn()
            .map_err(|e| err(format!("spawn {:?}: {e}", cmd.get_program())))?;
        Ok(Self {
            child: Some(child),
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Err with the log's tail when the process has already exited.
    fn check_alive(&mut self, what: &str) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(err(format!(
                    "{what} exited during startup ({status}); log {}:\n{}",
                    self.log.display(),
                    log_tail(&self.log)
                )));
            }
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn detach(mut self) -> u32 {
        let pid = self.pid();
        self.child = None;
        pid
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Polls `ready` until it returns true or the deadline passes.
fn wait_until(what: &str, proc: &mut Proc, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if ready() {
            return Ok(());
        }
        proc.check_alive(what)?;
        if Instant::now() > deadline {
            return Err(err(format!(
                "{what} did not become ready within {START_DEADLINE:?}; log {}:\n{}",
                proc.log.display(),
                log_tail(&proc.log)
            )));
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Sends one inline Redis command and returns the raw reply (enough to check
/// readiness without a Redis client library).
pub fn redis_inline(port: u16, command: &str) -> std::io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if resp_complete(&reply) {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// True when `reply` holds one whole simple/error/integer/bulk RESP reply.
fn resp_complete(reply: &[u8]) -> bool {
    let Some(line_end) = reply.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    if reply.first() != Some(&b'$') {
        return true;
    }
    let len: i64 = std::str::from_utf8(&reply[1..line_end])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(-1);
    len < 0 || reply.len() >= line_end + 2 + len as usize + 2
}

/// How the stack's Redis makes writes durable (its `appendfsync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// `appendfsync always`: Redis fsyncs the AOF before it replies, so a
    /// reply means the write survives a crash of Redis or of the machine.
    /// The router's writes are one Lua script or pipeline per record, so
    /// this costs one fsync per script, not per key. The default.
    Always,
    /// `appendfsync everysec`: up to ~1 s of acknowledged writes can be lost
    /// when the machine (not just Redis) crashes. For measuring the cost of
    /// `Always` only.
    EverySec,
}

impl Fsync {
    fn as_arg(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::EverySec => "everysec",
        }
    }
}

/// One `redis-server` on a loopback port, persisting to an append-only file
/// (AOF) in its work dir, so [`Redis::restart`] after [`Redis::kill`] (a
/// SIGKILL) comes back with every write it acknowledged.
pub struct Redis {
    proc: Proc,
    port: u16,
    dir: WorkDir,
    extra_args: Vec<String>,
}

impl Redis {
    /// A standalone server in a temporary directory, AOF with
    /// `appendfsync always`.
    pub fn start() -> Result<Self> {
        Self::start_with(WorkDir::temp("redis")?, &[])
    }

    /// A standalone server with the given fsync policy.
    pub fn start_fsync(fsync: Fsync) -> Result<Self> {
        Self::start_with(WorkDir::temp("redis")?, &["--appendfsync", fsync.as_arg()])
    }

    /// A server in `dir`, with extra command-line arguments (after the
    /// defaults, so they override them).
    pub fn start_with(dir: WorkDir, extra_args: &[&str]) -> Result<Self> {
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let port = free_port()?;
        let proc = Self::spawn(&dir, port, &extra_args)?;
        let mut redis = Self {
            proc,
            port,
            dir,
            extra_args,
        };
        redis.wait_ready()?;
        Ok(redis)
    }

    fn spawn(dir: &WorkDir, port: u16, extra_args: &[String]) -> Result<Proc> {
        let mut cmd = Command::new(find_binary("redis-server")?);
        cmd.current_dir(dir.path())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--daemonize", "no"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                Fsync::Always.as_arg(),
            ])
            .args(["--dir", &dir.path().to_string_lossy()])
            .args(extra_args);
        Proc::spawn(cmd, dir.path().join(format!("redis-{port}.log")))
    }

    /// Waits until the server answers PING and has loaded its AOF (a
    /// loading server answers `-LOADING`).
    fn wait_ready(&mut self) -> Result<()> {
        let port = self.port;
        wait_until(
            "redis-server (PING answered, AOF loaded)",
            &mut self.proc,
            || redis_inline(port, "PING").is_ok_and(|r| r.starts_with("+PONG")),
        )
    }

    /// Kills the server (SIGKILL) and starts it again on the same port from
    /// its AOF.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.start_again()
    }

    /// Starts a killed server again on the same port from its AOF.
    pub fn start_again(&mut self) -> Result<()> {
        let began = Instant::now();
        self.proc = Self::spawn(&self.dir, self.port, &self.extra_args)?;
        self.wait_ready()?;
        eprintln!(
            "stack: redis-server on {} restarted from its AOF, ready in {:.2} s",
            self.port,
            began.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// SIGSTOPs the server (a stall).
    pub fn pause(&self) -> Result<()> {
        signal(self.pid(), libc::SIGSTOP)
    }

    /// SIGCONTs the server.
    pub fn resume(&self) -> Result<()> {
        signal(self.pid(), libc::SIGCONT)
    }

    /// Kills the server (a fault test's crash); `restart` brings it back.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs one inline command against this server.
    pub fn command(&self, command: &str) -> Result<String> {
        redis_inline(self.port, command).map_err(|e| err(format!("redis {command}: {e}")))
    }

    /// Stops managing the process: it keeps running after this handle is
    /// gone. Returns its pid.
    pub fn detach(self) -> u32 {
        let Self { proc, dir, .. } = self;
        std::mem::forget(dir);
        proc.detach()
    }
}

/// A Redis Cluster of `masters` masters (no replicas), each on its own port.
pub struct RedisCluster {
    // Fields drop in order: the nodes are killed before their parent
    // directory is removed.
    nodes: Vec<Redis>,
    root: Option<WorkDir>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> Result<Self> {
        let root = WorkDir::temp("redis-cluster")?;
        let mut dirs = Vec::new();
        for i in 0..masters {
            let dir = root.path().join(format!("node{i}"));
            dirs.push(WorkDir::kept(dir)?);
        }
        let mut cluster = Self::start_in(dirs)?;
        cluster.root = Some(root);
        Ok(cluster)
    }

    /// One master per given directory.
    pub fn start_in(dirs: Vec<WorkDir>) -> Result<Self> {
        if dirs.len() < 3 {
            return Err(err("a Redis Cluster needs at least 3 masters"));
        }
        let mut nodes = Vec::new();
        for dir in dirs {
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            ];
            nodes.push(Redis::start_with(dir, &args)?);
        }
        let mut cmd = Command::new(find_binary("redis-cli")?);
        cmd.arg("--cluster").arg("create");
        for node in &nodes {
            cmd.arg(format!("127.0.0.1:{}", node.port));
        }
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = cmd
            .output()
            .map_err(|e| err(format!("redis-cli --cluster create: {e}")))?;
        if !out.status.success() {
            return Err(err(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let cluster = Self { nodes, root: None };
        cluster.wait_ok()?;
        Ok(cluster)
    }

    /// Waits until every node reports `cluster_state:ok` and knows every slot.
    fn wait_ok(&self) -> Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let all_ok = self.nodes.iter().all(|n| {
                redis_inline(n.port, "CLUSTER INFO").is_ok_and(|info| {
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                })
            });
            if all_ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(err("Redis Cluster did not reach cluster_state:ok in time"));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    pub fn nodes(&self) -> &[Redis] {
        &self.nodes
    }

    /// `redis://` URLs of every node (what a cluster client is seeded with).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::url).collect()
    }

    pub fn detach(mut self) -> Vec<u32> {
        if let Some(root) = self.root.take() {
            std::mem::forget(root);
        }
        std::mem::take(&mut self.nodes)
            .into_iter()
            .map(Redis::detach)
            .collect()
    }
}

// ---- Apache Kafka (KRaft) -----------------------------------------------------

/// The Apache Kafka release `tools/scripts/install-deps.sh` fetches from
/// Maven Central (keep the two in step, and `tools/kafka/pom.xml`).
pub const KAFKA_VERSION: &str = "4.1.1";

/// JVM flags of every broker: a bounded heap and a small collector, so a
/// test's brokers cost little memory and no CPU when idle.
const KAFKA_JVM_FLAGS: &[&str] = &[
    "-Xms64m",
    "-Xmx256m",
    "-XX:+UseSerialGC",
    "-XX:MaxMetaspaceSize=128m",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
];

/// How long a broker may take to start (JVM start, log recovery, KRaft
/// election) before its readiness wait gives up.
const KAFKA_START_DEADLINE: Duration = Duration::from_secs(90);

/// The directory holding the Kafka jars: `$PALAVER_KAFKA_LIBS`, else
/// `~/.cache/palaver/kafka-<KAFKA_VERSION>/libs` (where install-deps.sh puts
/// them; `.complete` marks a finished download).
pub fn kafka_libs() -> Result<PathBuf> {
    let dir = match std::env::var_os("PALAVER_KAFKA_LIBS") {
        Some(d) => PathBuf::from(d),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .ok_or_else(|| err("neither XDG_CACHE_HOME nor HOME is set"))?;
            cache
                .join("palaver")
                .join(format!("kafka-{KAFKA_VERSION}"))
                .join("libs")
        }
    };
    if dir.join(".complete").is_file() {
        Ok(dir)
    } else {
        Err(err(format!(
            "Apache Kafka {KAFKA_VERSION} is not installed in {}; {INSTALL_HINT}",
            dir.display()
        )))
    }
}

/// `$JAVA_HOME/bin/java`, else `java` on PATH.
pub fn java_binary() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("JAVA_HOME") {
        let java = PathBuf::from(home).join("bin/java");
        if java.is_file() {
            return Ok(java);
        }
    }
    find_binary("java")
}

/// A KRaft cluster id: 16 random bytes, URL-safe base64 without padding.
fn kafka_cluster_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes: [u8; 16] = rand::random();
    let mut bits: u128 = u128::from_be_bytes(bytes);
    // 22 characters carry 132 bits; the first one carries the top 2 bits only.
    let mut out = vec![0u8; 22];
    out[21] = ALPHABET[((bits << 4) & 0x3f) as usize];
    bits >>= 2;
    for c in out[..21].iter_mut().rev() {
        *c = ALPHABET[(bits & 0x3f) as usize];
        bits >>= 6;
    }
    String::from_utf8(out).expect("ascii")
}

/// Sends a signal to a process (SIGSTOP/SIGCONT for stall tests).
#[allow(unsafe_code)] // kill(2); see SAFETY below
pub fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(err(format!(
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        )))
    }
}

/// One node of a [`Kafka`] cluster: a combined broker and KRaft controller.
struct KafkaNode {
    id: u32,
    port: u16,
    controller_port: u16,
    proc: Option<Proc>,
}

/// Apache Kafka in KRaft mode on loopback ports: one combined
/// broker+controller ([`Kafka::start`]) or several ([`Kafka::start_cluster`],
/// each node a broker and a voter of the controller quorum). Log dirs live
/// in the work dir, so a killed node restarts from its own data. Every JVM
/// is killed by PID when the handle drops.
pub struct Kafka {
    nodes: Vec<KafkaNode>,
    // Dropped after the nodes: the processes die before their files go.
    dir: WorkDir,
    libs: PathBuf,
    java: PathBuf,
}

impl Kafka {
    /// One combined broker+controller in a temporary directory.
    pub fn start() -> Result<Self> {
        Self::start_in(WorkDir::temp("kafka")?, 1)
    }

    /// `nodes` brokers (each also a controller), replication factor `nodes`
    /// by default and `min.insync.replicas` 2 (for 3 nodes): a write is
    /// acknowledged once 2 replicas have it.
    pub fn start_cluster(nodes: usize) -> Result<Self> {
        Self::start_in(WorkDir::temp("kafka-cluster")?, nodes)
    }

    /// `nodes` nodes with their log dirs under `dir`.
    pub fn start_in(dir: WorkDir, nodes: usize) -> Result<Self> {
        if nodes == 0 {
            return Err(err("a Kafka cluster needs at least one node"));
        }
        let libs = kafka_libs()?;
        let java = java_binary()?;
        let mut kafka = Self {
            nodes: Vec::new(),
            dir,
            libs,
            java,
        };
        for id in 1..=nodes as u32 {
            kafka.nodes.push(KafkaNode {
                id,
                port: free_port()?,
                controller_port: free_port()?,
                proc: None,
            });
        }
        let began = Instant::now();
        let cluster_id = kafka_cluster_id();
        for i in 0..nodes {
            kafka.write_config(i)?;
            kafka.format(i, &cluster_id)?;
        }
        for i in 0..nodes {
            kafka.spawn(i)?;
        }
        kafka.wait_ready()?;
        eprintln!(
            "stack: Apache Kafka {KAFKA_VERSION}, {nodes} node(s) at {}, ready in {:.1} s",
            kafka.bootstrap(),
            began.elapsed().as_secs_f64()
        );
        Ok(kafka)
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{}", self.nodes[i].id))
    }

    fn write_config(&self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let n = self.nodes.len();
        let dir = self.node_dir(i);
        fs::create_dir_all(dir.join("data"))
            .map_err(|e| err(format!("create {}: {e}", dir.display())))?;
        let voters: Vec<String> = self
            .nodes
            .iter()
            .map(|v| format!("{}@127.0.0.1:{}", v.id, v.controller_port))
            .collect();
        let rf = n.min(3);
        let min_isr = if n >= 3 { 2 } else { 1 };
        let config = format!(
            "# Written by palaver-testkit (testkit/src/stack.rs).\n\
             process.roles=broker,controller\n\
             node.id={id}\n\
             controller.quorum.voters={voters}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             log.dirs={data}\n\
             auto.create.topics.enable=false\n\
             num.partitions=1\n\
             default.replication.factor={rf}\n\
             min.insync.replicas={min_isr}\n\
             offsets.topic.replication.factor={rf}\n\
             offsets.topic.num.partitions=4\n\
             transaction.state.log.replication.factor={rf}\n\
             transaction.state.log.min.isr={min_isr}\n\
             share.coordinator.state.topic.replication.factor={rf}\n\
             share.coordinator.state.topic.min.isr={min_isr}\n\
             group.initial.rebalance.delay.ms=0\n\
             num.network.threads=2\n\
             num.io.threads=2\n\
             num.recovery.threads.per.data.dir=1\n\
             log.segment.bytes=16777216\n\
             # Idle cost: the active controller appends a no-op record every\n\
             # 500 ms by default; every 5 s is enough to detect a dead one.\n\
             metadata.max.idle.interval.ms=5000\n\
             # A killed node's replicas drop out of the ISR quickly.\n\
             replica.lag.time.max.ms=5000\n\
             # Fast leader failover in the broker-failure tests.\n\
             broker.session.timeout.ms=6000\n\
             broker.heartbeat.interval.ms=2000\n",
            id = node.id,
            voters = voters.join(","),
            port = node.port,
            cport = node.controller_port,
            data = dir.join("data").display(),
        );
        fs::write(dir.join("server.properties"), config)
            .map_err(|e| err(format!("write server.properties: {e}")))?;
        let log4j = "status = warn\n\
             appender.out.type = Console\n\
             appender.out.name = out\n\
             appender.out.layout.type = PatternLayout\n\
             appender.out.layout.pattern = [%d] %p %m (%c)%n\n\
             rootLogger.level = info\n\
             rootLogger.appenderRef.out.ref = out\n\
             logger.kafka.name = org.apache.kafka\n\
             logger.kafka.level = warn\n\
             logger.config.name = org.apache.kafka.common.config\n\
             logger.config.level = warn\n\
             logger.kafkalog.name = kafka.log\n\
             logger.kafkalog.level = warn\n\
             logger.coordinator.name = kafka.coordinator\n\
             logger.coordinator.level = warn\n";
        fs::write(dir.join("log4j2.properties"), log4j)
            .map_err(|e| err(format!("write log4j2.properties: {e}")))
    }

    fn java_command(&self, i: usize, main: &str) -> Command {
        let dir = self.node_dir(i);
        let mut cmd = Command::new(&self.java);
        cmd.current_dir(&dir)
            .args(KAFKA_JVM_FLAGS)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                dir.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()))
            .arg(main);
        cmd
    }

    /// `kafka-storage.sh format`: writes meta.properties and the bootstrap
    /// metadata into the node's log dir (once; a restart keeps them).
    fn format(&self, i: usize, cluster_id: &str) -> Result<()> {
        let dir = self.node_dir(i);
        // Already formatted (a kept dir, e.g. a second `palaver cluster
        // up`): the node keeps its data and its cluster id.
        if dir.join("data").join("meta.properties").is_file() {
            return Ok(());
        }
        let mut cmd = self.java_command(i, "kafka.tools.StorageTool");
        // `=`: an id may start with '-', which would read as an option.
        cmd.args(["format", "--ignore-formatted"])
            .arg(format!("--cluster-id={cluster_id}"))
            .arg("--config")
            .arg(dir.join("server.properties"))
            .stdin(Stdio::null());
        // The formatter is a short-lived JVM: a quick, small heap.
        let out = cmd
            .output()
            .map_err(|e| err(format!("spawn {}: {e}", self.java.display())))?;
        if !out.status.success() {
            return Err(err(format!(
                "kafka.tools.StorageTool format failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let dir = self.node_dir(i);
        let mut cmd = self.java_command(i, "kafka.Kafka");
        cmd.arg(dir.join("server.properties"));
        let log = dir.join("server.log");
        // Appends across restarts, so a test's log shows every life.
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| err(format!("open {}: {e}", log.display())))?;
        let out2 = out.try_clone().map_err(|e| err(format!("dup log: {e}")))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(out2);
        let child = cmd
            .spawn()
            .map_err(|e| err(format!("spawn {}: {e}", self.java.display())))?;
        self.nodes[i].proc = Some(Proc {
            child: Some(child),
            log,
        });
        Ok(())
    }

    /// Waits until the cluster serves clients: metadata lists every running
    /// broker, and a probe topic (replicated to all of them) is created and
    /// has a leader for its partition.
    fn wait_ready(&mut self) -> Result<()> {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].proc.is_some())
            .collect();
        let what = format!(
            "Kafka metadata listing {} broker(s) and a probe topic with a leader",
            running.len()
        );
        let deadline = Instant::now() + KAFKA_START_DEADLINE;
        let bootstrap = self.bootstrap();
        let admin = kafka_admin(&bootstrap)?;
        let mut last;
        loop {
            for &i in &running {
                if let Some(p) = self.nodes[i].proc.as_mut() {
                    p.check_alive(&format!("Kafka node {}", i + 1))?;
                }
            }
            match probe_ready(&admin, running.len(), self.nodes.len()) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            if Instant::now() > deadline {
                let log = self.node_dir(running[0]).join("server.log");
                return Err(err(format!(
                    "waited {KAFKA_START_DEADLINE:?} for {what} at {bootstrap}; last: {last}; \
                     log {}:\n{}",
                    log.display(),
                    log_tail(&log)
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `host:port,...` of every node, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The broker port of node `i` (0-based).
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// The node id (`node.id`) of node `i`: `i + 1`.
    pub fn node_id(&self, i: usize) -> u32 {
        self.nodes[i].id
    }

    /// The PID of node `i`'s JVM (0 when it is not running).
    pub fn pid(&self, i: usize) -> u32 {
        self.nodes[i].proc.as_ref().map(Proc::pid).unwrap_or(0)
    }

    /// The node's work directory (its `server.log` and log dir `data/`).
    pub fn node_path(&self, i: usize) -> PathBuf {
        self.node_dir(i)
    }

    /// SIGKILLs node `i` (a crash: no controlled shutdown).
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].proc.take() {
            p.kill();
        }
    }

    /// SIGKILLs every node.
    pub fn kill(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }

    /// Starts node `i` again from its log dir (same ports, same data) and
    /// waits until the cluster is ready again.
    pub fn restart_node(&mut self, i: usize) -> Result<()> {
        self.kill_node(i);
        let began = Instant::now();
        self.spawn(i)?;
        self.wait_ready()?;
        eprintln!(
            "stack: Kafka node {} restarted, ready in {:.1} s",
            self.nodes[i].id,
            began.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Kills and restarts every node from its data.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let began = Instant::now();
        for i in 0..self.nodes.len() {
            self.spawn(i)?;
        }
        self.wait_ready()?;
        eprintln!(
            "stack: Kafka restarted, ready in {:.1} s",
            began.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// SIGSTOPs node `i` (a stall: sockets stay open, nothing answers).
    pub fn pause_node(&self, i: usize) -> Result<()> {
        signal(self.pid(i), libc::SIGSTOP)
    }

    /// SIGCONTs node `i`.
    pub fn resume_node(&self, i: usize) -> Result<()> {
        signal(self.pid(i), libc::SIGCONT)
    }

    /// Creates a topic with `partitions` partitions and the cluster's default
    /// replication factor, and waits until every partition has a leader.
    pub fn create_topic(&self, name: &str, partitions: u32) -> Result<()> {
        create_topic(&self.bootstrap(), name, partitions)
    }

    /// The node index (0-based) leading `topic`'s `partition`, per metadata.
    pub fn leader_of(&self, topic: &str, partition: i32) -> Result<usize> {
        let admin = kafka_admin(&self.bootstrap())?;
        let md = admin
            .inner()
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| err(format!("metadata of {topic}: {e}")))?;
        let leader = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
            .map(|p| p.leader())
            .ok_or_else(|| err(format!("{topic}/{partition} not in metadata")))?;
        self.nodes
            .iter()
            .position(|n| n.id as i32 == leader)
            .ok_or_else(|| err(format!("{topic}/{partition} has no leader ({leader})")))
    }

    /// Stops managing the processes (they outlive this handle); returns the
    /// node PIDs.
    pub fn detach(self) -> Vec<u32> {
        let Self { nodes, dir, .. } = self;
        std::mem::forget(dir);
        nodes
            .into_iter()
            .filter_map(|n| n.proc.map(Proc::detach))
            .collect()
    }
}

fn kafka_admin(bootstrap: &str) -> Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "3")
        .create()
        .map_err(|e| err(format!("Kafka admin client for {bootstrap}: {e}")))
}

/// One readiness probe: every running broker is in the metadata and the
/// probe topic exists with a leader.
fn probe_ready(
    admin: &AdminClient<DefaultClientContext>,
    brokers: usize,
    nodes: usize,
) -> std::result::Result<(), String> {
    let md = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(2))
        .map_err(|e| format!("metadata: {e}"))?;
    if md.brokers().len() < brokers {
        return Err(format!(
            "metadata lists {} of {brokers} brokers",
            md.brokers().len()
        ));
    }
    const PROBE: &str = "palaver.ready";
    let probe_ok = |md: &rdkafka::metadata::Metadata| {
        md.topics().iter().any(|t| {
            t.name() == PROBE
                && t.error().is_none()
                && !t.partitions().is_empty()
                && t.partitions().iter().all(|p| p.leader() >= 0)
        })
    };
    if probe_ok(&md) {
        return Ok(());
    }
    if brokers < nodes {
        // A restarted node of a cluster whose probe topic existed: metadata
        // listing it is the condition.
        if md.topics().iter().any(|t| t.name() == PROBE) {
            return Ok(());
        }
    }
    let topic = NewTopic::new(PROBE, 1, TopicReplication::Fixed(nodes.min(3) as i32));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    let results = futures_executor::block_on(admin.create_topics([&topic], &opts))
        .map_err(|e| format!("create {PROBE}: {e}"))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(format!("create {PROBE}: {code}")),
        }
    }
    let md = admin
        .inner()
        .fetch_metadata(Some(PROBE), Duration::from_secs(2))
        .map_err(|e| format!("metadata: {e}"))?;
    if probe_ok(&md) {
        Ok(())
    } else {
        Err(format!("{PROBE} has no leader yet"))
    }
}

/// Creates `name` with `partitions` partitions (the broker's default
/// replication factor) on the cluster at `bootstrap`, retrying until the
/// broker accepts it, and waits until every partition has a leader. An
/// existing topic is left alone.
pub fn create_topic(bootstrap: &str, name: &str, partitions: u32) -> Result<()> {
    let admin = kafka_admin(bootstrap)?;
    let deadline = Instant::now() + KAFKA_START_DEADLINE;
    let topic = NewTopic::new(name, partitions as i32, TopicReplication::Fixed(-1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let mut last;
    loop {
        last = match futures_executor::block_on(admin.create_topics([&topic], &opts)) {
            Ok(results) => match results.into_iter().next() {
                Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) | None => {
                    let md = admin
                        .inner()
                        .fetch_metadata(Some(name), Duration::from_secs(5))
                        .map_err(|e| err(format!("metadata of {name}: {e}")))?;
                    let led = md.topics().iter().any(|t| {
                        t.name() == name
                            && t.partitions().len() == partitions as usize
                            && t.partitions().iter().all(|p| p.leader() >= 0)
                    });
                    if led {
                        return Ok(());
                    }
                    "not every partition has a leader yet".to_string()
                }
                Some(Err((_, code))) => code.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(err(format!("create topic {name} on {bootstrap}: {last}")));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

// ---- `palaver cluster up|down|status` ---------------------------------------

/// One process of the local cluster, as recorded in the state file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterProcess {
    pub name: String,
    pub pid: u32,
    /// The port it serves (0 when none).
    pub port: u16,
}

const STATE_FILE: &str = "state";

/// The topics `palaver cluster up` creates, with their partition counts
/// (the router's defaults; gateways create their own delivery topics).
const CLUSTER_TOPICS: &[(&str, u32)] = &[
    ("palaver.inbound", 8),
    ("palaver.push", 8),
    ("palaver.dlq", 1),
];

fn pid_alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; its state letter is Z.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Reads `dir/state`: one `name pid port` line per process.
pub fn cluster_state(dir: &Path) -> Result<Vec<ClusterProcess>> {
    let path = dir.join(STATE_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(format!("read {}: {e}", path.display()))),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut f = line.split_whitespace();
            let parsed = (|| {
                Some(ClusterProcess {
                    name: f.next()?.to_string(),
                    pid: f.next()?.parse().ok()?,
                    port: f.next()?.parse().ok()?,
                })
            })();
            parsed.ok_or_else(|| err(format!("{}: bad line {line:?}", path.display())))
        })
        .collect()
}

fn write_state(dir: &Path, procs: &[ClusterProcess]) -> Result<()> {
    let text: String = procs
        .iter()
        .map(|p| format!("{} {} {}\n", p.name, p.pid, p.port))
        .collect();
    fs::write(dir.join(STATE_FILE), text).map_err(|e| err(format!("write state: {e}")))
}

/// Finds a Palaver binary next to the running executable (cargo puts all of
/// a workspace's binaries in one directory; a test executable sits one level
/// below it, in `deps/`), else on PATH.
pub fn find_palaver_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().ok();
    let beside = exe
        .iter()
        .flat_map(|exe| exe.ancestors().skip(1).take(2))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    match beside {
        Some(p) => Ok(p),
        None => find_binary(name).map_err(|_| {
            err(format!(
                "`{name}` not found next to this executable or on PATH; build it with \
                 `cargo build --bins`"
            ))
        }),
    }
}

/// A `palaver-gateway` process (the workspace's binary, see
/// [`find_palaver_binary`]) on a free loopback port, with 2 cores, its
/// config, log and port under a work directory; SIGKILLed on drop (a crash,
/// as the rest of the cluster sees it: no drain, no presence flush).
pub struct Gateway {
    proc: Proc,
    port: u16,
}

impl Gateway {
    /// Starts gateway `id` with `config_toml` (a gateway config file, e.g. a
    /// `[backend]` section) written to `dir/<id>.toml`, logging to
    /// `dir/<id>.log`, dev credentials in `data_dir`. Returns once it accepts
    /// connections (its backend started). The first gateway of a data dir
    /// creates the dev CA and JWT secret the others then use.
    pub fn start(dir: &Path, id: &str, config_toml: &str, data_dir: &Path) -> Result<Self> {
        let binary = find_palaver_binary("palaver-gateway")?;
        let config = dir.join(format!("{id}.toml"));
        fs::write(&config, config_toml)
            .map_err(|e| err(format!("write {}: {e}", config.display())))?;
        let port = free_port()?;
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(&config)
            .args(["--gateway-id", id, "--cores", "2"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "info,rdkafka=warn");
        let mut proc = Proc::spawn(cmd, dir.join(format!("{id}.log")))?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        wait_until(&format!("gateway {id}"), &mut proc, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })?;
        Ok(Self { proc, port })
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGKILL: no drain, no presence flush, no goodbye.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGSTOPs the gateway (a stall: a paused VM, a long GC pause).
    pub fn pause(&self) -> Result<()> {
        signal(self.pid(), libc::SIGSTOP)
    }

    /// SIGCONTs the gateway.
    pub fn resume(&self) -> Result<()> {
        signal(self.pid(), libc::SIGCONT)
    }
}

/// Starts Redis (AOF, `appendfsync always`), Apache Kafka (one KRaft node,
/// log dir under `dir/kafka`), one router and two gateways
/// (`gw1`, `gw2`) sharing `listen` via SO_REUSEPORT, all in the background,
/// with logs and state under `dir`. `data_dir` holds the gateways' dev
/// certificate and JWT secret (as for a single gateway).
pub fn cluster_up(dir: &Path, data_dir: &Path, listen: &str) -> Result<Vec<ClusterProcess>> {
    let running: Vec<ClusterProcess> = cluster_state(dir)?
        .into_iter()
        .filter(|p| pid_alive(p.pid))
        .collect();
    if !running.is_empty() {
        return Err(err(format!(
            "a cluster is already running from {} ({} processes); run `palaver cluster down` first",
            dir.display(),
            running.len()
        )));
    }
    let router_bin = find_palaver_binary("palaver-router")?;
    let gateway_bin = find_palaver_binary("palaver-gateway")?;
    fs::create_dir_all(dir).map_err(|e| err(format!("create {}: {e}", dir.display())))?;
    let mut procs = Vec::new();
    let result = (|| {
        let redis = Redis::start_with(WorkDir::kept(dir.join("redis"))?, &[])?;
        let redis_url = redis.url();
        procs.push(ClusterProcess {
            name: "redis".into(),
            pid: redis.pid(),
            port: redis.port(),
        });
        redis.detach();

        let kafka = Kafka::start_in(WorkDir::kept(dir.join("kafka"))?, 1)?;
        let brokers = kafka.bootstrap();
        for (topic, partitions) in CLUSTER_TOPICS {
            kafka.create_topic(topic, *partitions)?;
        }
        procs.push(ClusterProcess {
            name: "kafka".into(),
            pid: kafka.pid(0),
            port: kafka.port(0),
        });
        kafka.detach();

        let spawn = |name: &str, mut cmd: Command| -> Result<ClusterProcess> {
            let log = dir.join(format!("{name}.log"));
            let out = fs::File::create(&log)
                .map_err(|e| err(format!("create {}: {e}", log.display())))?;
            let out2 = out.try_clone().map_err(|e| err(format!("dup log: {e}")))?;
            let child = cmd
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(out2)
                .spawn()
                .map_err(|e| err(format!("spawn {name}: {e}")))?;
            Ok(ClusterProcess {
                name: name.into(),
                pid: child.id(),
                port: 0,
            })
        };
        let mut router = Command::new(&router_bin);
        router.args([
            "--brokers",
            &brokers,
            "--redis",
            &redis_url,
            "--router-id",
            "router-1",
        ]);
        procs.push(spawn("router-1", router)?);

        let config = dir.join("gateway.toml");
        fs::write(
            &config,
            format!(
                "[backend]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\nredis = \"{redis_url}\"\n"
            ),
        )
        .map_err(|e| err(format!("write {}: {e}", config.display())))?;
        let port: u16 = listen
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| err(format!("listen address {listen:?} must be HOST:PORT")))?;
        for id in ["gw1", "gw2"] {
            let mut gw = Command::new(&gateway_bin);
            gw.arg("--config")
                .arg(&config)
                .args(["--gateway-id", id, "--listen", listen, "--cores", "1"])
                .arg("--data-dir")
                .arg(data_dir);
            let mut p = spawn(id, gw)?;
            p.port = port;
            let pid = p.pid;
            procs.push(p);
            // The first gateway creates the dev certificate; let it finish
            // before the second reads it.
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let deadline = Instant::now() + START_DEADLINE;
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if !pid_alive(pid) || Instant::now() > deadline {
                    return Err(err(format!(
                        "gateway {id} did not start; log {}:\n{}",
                        dir.join(format!("{id}.log")).display(),
                        log_tail(&dir.join(format!("{id}.log")))
                    )));
                }
                thread::sleep(POLL_INTERVAL);
            }
        }
        Ok(())
    })();
    write_state(dir, &procs)?;
    match result {
        Ok(()) => Ok(procs),
        Err(e) => {
            let _ = cluster_down(dir);
            Err(e)
        }
    }
}

/// Stops every process of the state file (SIGTERM, then SIGKILL after a
/// grace period), gateways first, and clears the state.
pub fn cluster_down(dir: &Path) -> Result<Vec<ClusterProcess>> {
    let mut procs = cluster_state(dir)?;
    procs.reverse();
    for p in &procs {
        if !pid_alive(p.pid) {
            continue;
        }
        let _ = Command::new("kill").arg(p.pid.to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while pid_alive(p.pid) && Instant::now() < deadline {
            thread::sleep(POLL_INTERVAL);
        }
        if pid_alive(p.pid) {
            let _ = Command::new("kill")
                .args(["-9", &p.pid.to_string()])
                .status();
        }
    }
    let _ = fs::remove_file(dir.join(STATE_FILE));
    procs.reverse();
    Ok(procs)
}

/// Each recorded process and whether it is running.
pub fn cluster_status(dir: &Path) -> Result<Vec<(ClusterProcess, bool)>> {
    Ok(cluster_state(dir)?
        .into_iter()
        .map(|p| {
            let alive = pid_alive(p.pid);
            (p, alive)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_names_the_install_script() {
        let e = find_binary("palaver-no-such-binary").unwrap_err();
        assert!(
            e.to_string().contains("tools/scripts/install-deps.sh"),
            "{e}"
        );
    }

    #[test]
    fn kafka_cluster_ids_are_22_url_safe_base64_characters() {
        for _ in 0..100 {
            let id = kafka_cluster_id();
            assert_eq!(id.len(), 22, "{id}");
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }

    #[test]
    fn cluster_state_round_trips_and_rejects_bad_lines() {
        let dir = WorkDir::temp("state-test").unwrap();
        assert!(cluster_state(dir.path()).unwrap().is_empty());
        let procs = vec![ClusterProcess {
            name: "redis".into(),
            pid: 42,
            port: 6379,
        }];
        write_state(dir.path(), &procs).unwrap();
        assert_eq!(cluster_state(dir.path()).unwrap(), procs);
        fs::write(dir.path().join(STATE_FILE), "redis notapid 1\n").unwrap();
        assert!(cluster_state(dir.path()).is_err());
    }
}
