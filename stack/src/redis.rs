//! Redis and Redis Cluster (Debian's `redis-server`) on free loopback ports.

use std::process::Command;
use std::thread;
use std::time::Instant;

use super::*;

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
