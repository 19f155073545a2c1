//! Real Redis, Redis Cluster and Tansu (Kafka-API broker) processes on free
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
/// puts tansu even when that directory is not on PATH).
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

/// A service's working directory; a temporary one is removed on drop.
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
            remove_on_drop: true,
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
        if self.remove_on_drop {
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

/// One `redis-server` on a loopback port, no persistence.
pub struct Redis {
    proc: Proc,
    port: u16,
    dir: WorkDir,
    extra_args: Vec<String>,
}

impl Redis {
    /// A standalone server in a temporary directory.
    pub fn start() -> Result<Self> {
        Self::start_with(WorkDir::temp("redis")?, &[])
    }

    /// A server in `dir`, with extra command-line arguments.
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
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", &dir.path().to_string_lossy()])
            .args(extra_args);
        Proc::spawn(cmd, dir.path().join(format!("redis-{port}.log")))
    }

    fn wait_ready(&mut self) -> Result<()> {
        let port = self.port;
        wait_until("redis-server", &mut self.proc, || {
            redis_inline(port, "PING").is_ok_and(|r| r.starts_with("+PONG"))
        })
    }

    /// Kills the server and starts it again on the same port (state is lost:
    /// persistence is off).
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.proc = Self::spawn(&self.dir, self.port, &self.extra_args)?;
        self.wait_ready()
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

/// Where a Tansu broker keeps its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TansuStorage {
    /// In memory: lost when the broker stops.
    Memory,
    /// A SQLite file in the broker's working directory: survives a restart.
    Sqlite,
}

/// One Tansu broker on a loopback port.
pub struct Tansu {
    proc: Proc,
    port: u16,
    dir: WorkDir,
    storage: TansuStorage,
}

impl Tansu {
    /// A broker with in-memory storage in a temporary directory.
    pub fn start() -> Result<Self> {
        Self::start_with(WorkDir::temp("tansu")?, TansuStorage::Memory)
    }

    /// A broker whose data survives `restart` (SQLite).
    pub fn start_durable() -> Result<Self> {
        Self::start_with(WorkDir::temp("tansu")?, TansuStorage::Sqlite)
    }

    pub fn start_with(dir: WorkDir, storage: TansuStorage) -> Result<Self> {
        let port = free_port()?;
        let proc = Self::spawn(&dir, port, &storage)?;
        let mut tansu = Self {
            proc,
            port,
            dir,
            storage,
        };
        tansu.wait_ready()?;
        Ok(tansu)
    }

    fn spawn(dir: &WorkDir, port: u16, storage: &TansuStorage) -> Result<Proc> {
        let url = format!("tcp://127.0.0.1:{port}");
        let storage_url = match storage {
            TansuStorage::Memory => "memory://tansu/".to_string(),
            // Tansu resolves the path against its working directory (an
            // absolute path would be joined to it too).
            TansuStorage::Sqlite => "sqlite://tansu.db".to_string(),
        };
        let mut cmd = Command::new(find_binary("tansu")?);
        cmd.current_dir(dir.path())
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &storage_url])
            .env(
                "RUST_LOG",
                std::env::var("TANSU_LOG").unwrap_or("warn".into()),
            );
        Proc::spawn(cmd, dir.path().join(format!("tansu-{port}.log")))
    }

    fn wait_ready(&mut self) -> Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        wait_until("tansu", &mut self.proc, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
    }

    /// Kills the broker and starts it again on the same port and storage.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.proc = Self::spawn(&self.dir, self.port, &self.storage)?;
        self.wait_ready()
    }

    /// Kills the broker (a fault test's crash); `restart` brings it back.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Creates a topic with `partitions` partitions (retrying until the
    /// broker accepts requests, within the start deadline).
    pub fn create_topic(&self, name: &str, partitions: u32) -> Result<()> {
        create_topic(&self.bootstrap(), name, partitions)
    }

    pub fn detach(self) -> u32 {
        let Self { proc, dir, .. } = self;
        std::mem::forget(dir);
        proc.detach()
    }
}

/// Creates a topic on the broker at `bootstrap` with the `tansu topic` CLI.
pub fn create_topic(bootstrap: &str, name: &str, partitions: u32) -> Result<()> {
    let tansu = find_binary("tansu")?;
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        let out = Command::new(&tansu)
            .args(["topic", "create", name])
            .args(["--broker", &format!("tcp://{bootstrap}")])
            .args(["--partitions", &partitions.to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| err(format!("tansu topic create: {e}")))?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(err(format!(
                "tansu topic create {name} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
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
/// a workspace's binaries in one directory), else on PATH.
pub fn find_palaver_binary(name: &str) -> Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file());
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

/// Starts Redis, Tansu (SQLite storage), one router and two gateways
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

        let tansu = Tansu::start_with(WorkDir::kept(dir.join("tansu"))?, TansuStorage::Sqlite)?;
        let brokers = tansu.bootstrap();
        procs.push(ClusterProcess {
            name: "tansu".into(),
            pid: tansu.pid(),
            port: tansu.port(),
        });
        tansu.detach();

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
