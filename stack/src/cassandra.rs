//! Apache Cassandra from Maven Central, run on the JDK: one node on free
//! loopback ports, its data in the work dir, ready when its CQL port answers
//! an OPTIONS request; killed by PID.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::*;

/// The Apache Cassandra release `tools/scripts/install-deps.sh` fetches
/// from Maven Central (keep the two in step, and `tools/cassandra/pom.xml`).
pub const CASSANDRA_VERSION: &str = "5.0.6";

/// How long a node may take to start (JVM start, commit log replay, schema)
/// before its readiness wait gives up.
const CASSANDRA_START_DEADLINE: Duration = Duration::from_secs(120);

/// JVM flags: a bounded heap (the node's memtables take a quarter of it),
/// and what Cassandra's own `jvm17-server.options` opens to it on Java 17.
const CASSANDRA_JVM_FLAGS: &[&str] = &[
    "-Xms256m",
    "-Xmx512m",
    "-Xss512k",
    "-XX:+UseSerialGC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    "-Djdk.attach.allowAttachSelf=true",
    "-Dcassandra-foreground=yes",
    "-Dcassandra.skip_wait_for_gossip_to_settle=0",
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-exports=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-exports=java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports=java.sql/java.sql=ALL-UNNAMED",
    "--add-exports=java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports=jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.math=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=java.base/java.net=ALL-UNNAMED",
];

/// The directory holding the Cassandra jars: `$PALAVER_CASSANDRA_LIBS`, else
/// `~/.cache/palaver/cassandra-<CASSANDRA_VERSION>/libs` (install-deps.sh
/// puts them there; `.complete` marks a finished download).
pub fn cassandra_libs() -> Result<PathBuf> {
    installed_jars(
        "PALAVER_CASSANDRA_LIBS",
        &format!("cassandra-{CASSANDRA_VERSION}"),
        &format!("Apache Cassandra {CASSANDRA_VERSION}"),
    )
}

/// One Apache Cassandra node on loopback ports (CQL and internode), data,
/// commit log and logs in its work dir, so a killed node restarts from its
/// own data. The JVM is killed by PID when the handle drops.
pub struct Cassandra {
    proc: Option<Proc>,
    /// The node's loopback address (127.0.0.1 alone; 127.0.0.x in a
    /// [`CassandraCluster`], where every node uses the same storage port).
    ip: Ipv4Addr,
    cql_port: u16,
    storage_port: u16,
    /// `ip:storage_port` of the seed node(s).
    seeds: String,
    /// Its token on the ring (one token per node).
    initial_token: i64,
    // Dropped after the process: it dies before its files go.
    dir: WorkDir,
    libs: PathBuf,
    java: PathBuf,
}

impl Cassandra {
    /// One node in a temporary directory.
    pub fn start() -> Result<Self> {
        Self::start_in(WorkDir::temp("cassandra")?)
    }

    /// One node with its data under `dir` (kept data is reused: a second
    /// `palaver cluster up` finds its messages again).
    pub fn start_in(dir: WorkDir) -> Result<Self> {
        let storage_port = free_port()?;
        let mut node = Self::configured(
            dir,
            Ipv4Addr::LOCALHOST,
            free_port()?,
            storage_port,
            format!("127.0.0.1:{storage_port}"),
            0,
        )?;
        let began = Instant::now();
        node.spawn()?;
        node.wait_ready()?;
        eprintln!(
            "stack: Apache Cassandra {CASSANDRA_VERSION} at {}, ready in {:.1} s",
            node.address(),
            began.elapsed().as_secs_f64()
        );
        Ok(node)
    }

    /// A node's handle with its config written, not started.
    fn configured(
        dir: WorkDir,
        ip: Ipv4Addr,
        cql_port: u16,
        storage_port: u16,
        seeds: String,
        initial_token: i64,
    ) -> Result<Self> {
        let node = Self {
            proc: None,
            ip,
            cql_port,
            storage_port,
            seeds,
            initial_token,
            dir,
            libs: cassandra_libs()?,
            java: java_binary()?,
        };
        node.write_config()?;
        Ok(node)
    }

    fn write_config(&self) -> Result<()> {
        let d = self.dir.path();
        let data = d.join("data");
        fs::create_dir_all(&data).map_err(|e| err(format!("create {}: {e}", data.display())))?;
        // Test-sized: small caches and memtables. The commit log is synced
        // in groups (every 10 ms) BEFORE a write is acknowledged: with one
        // node there is no quorum of replicas to survive a crash, and
        // Cassandra's default (periodic, every 10 s, acknowledging first)
        // lost the last confirmed seconds of the archive on SIGKILL (found
        // by the archive fault test).
        let yaml = format!(
            "# Written by palaver-stack (stack/src/cassandra.rs).\n\
             cluster_name: palaver\n\
             num_tokens: 1\n\
             initial_token: {token}\n\
             partitioner: org.apache.cassandra.dht.Murmur3Partitioner\n\
             commitlog_sync: group\n\
             commitlog_sync_group_window: 10ms\n\
             commitlog_directory: {data}/commitlog\n\
             data_file_directories: [{data}/data]\n\
             saved_caches_directory: {data}/saved_caches\n\
             hints_directory: {data}/hints\n\
             cdc_raw_directory: {data}/cdc\n\
             seed_provider:\n\
             \x20 - class_name: org.apache.cassandra.locator.SimpleSeedProvider\n\
             \x20   parameters:\n\
             \x20     - seeds: \"{seeds}\"\n\
             listen_address: {ip}\n\
             storage_port: {storage}\n\
             rpc_address: {ip}\n\
             native_transport_port: {cql}\n\
             start_native_transport: true\n\
             endpoint_snitch: SimpleSnitch\n\
             concurrent_reads: 8\n\
             concurrent_writes: 8\n\
             concurrent_counter_writes: 4\n\
             memtable_heap_space: 64MiB\n\
             memtable_offheap_space: 64MiB\n\
             key_cache_size: 8MiB\n\
             auto_snapshot: false\n\
             auto_bootstrap: false\n\
             dynamic_snitch: false\n",
            data = data.display(),
            storage = self.storage_port,
            cql = self.cql_port,
            seeds = self.seeds,
            ip = self.ip,
            token = self.initial_token,
        );
        fs::write(d.join("cassandra.yaml"), yaml)
            .map_err(|e| err(format!("write cassandra.yaml: {e}")))?;
        let logback = format!(
            "<configuration>\n\
             <appender name=\"FILE\" class=\"ch.qos.logback.core.FileAppender\">\n\
             <file>{}</file>\n\
             <encoder><pattern>%-5level [%thread] %date{{ISO8601}} %F:%L - %msg%n</pattern></encoder>\n\
             </appender>\n\
             <root level=\"INFO\"><appender-ref ref=\"FILE\"/></root>\n\
             </configuration>\n",
            d.join("system.log").display()
        );
        fs::write(d.join("logback.xml"), logback)
            .map_err(|e| err(format!("write logback.xml: {e}")))
    }

    fn spawn(&mut self) -> Result<()> {
        let d = self.dir.path();
        let jamm = fs::read_dir(&self.libs)
            .map_err(|e| err(format!("read {}: {e}", self.libs.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("jamm-") && n.ends_with(".jar"))
            })
            .ok_or_else(|| err(format!("no jamm jar in {}", self.libs.display())))?;
        let mut cmd = Command::new(&self.java);
        cmd.current_dir(d)
            .args(CASSANDRA_JVM_FLAGS)
            // Cassandra measures memtables with jamm, loaded as an agent.
            .arg(format!("-javaagent:{}", jamm.display()))
            // A node joining a new, empty ring (not the seed): no 30 s wait
            // for ring information, and joining beside the others at once.
            .args(if self.ip == Ipv4Addr::LOCALHOST {
                &[][..]
            } else {
                &[
                    "-Dcassandra.ring_delay_ms=1000",
                    "-Dcassandra.consistent.rangemovement=false",
                ][..]
            })
            .arg(format!(
                "-Dcassandra.config=file://{}",
                d.join("cassandra.yaml").display()
            ))
            .arg(format!(
                "-Dlogback.configurationFile={}",
                d.join("logback.xml").display()
            ))
            .arg(format!(
                "-Dcassandra.storagedir={}",
                d.join("data").display()
            ))
            .arg(format!("-Dcassandra.logdir={}", d.display()))
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()))
            .arg("org.apache.cassandra.service.CassandraDaemon");
        // Appends across restarts, so a test's log shows every life.
        let log = d.join("stdout.log");
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| err(format!("open {}: {e}", log.display())))?;
        let out2 = out.try_clone().map_err(|e| err(format!("dup log: {e}")))?;
        cmd.stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(out2);
        let child = cmd
            .spawn()
            .map_err(|e| err(format!("spawn {}: {e}", self.java.display())))?;
        self.proc = Some(Proc {
            child: Some(child),
            log: d.join("system.log"),
        });
        Ok(())
    }

    /// Waits until the CQL port answers an OPTIONS request with SUPPORTED.
    fn wait_ready(&mut self) -> Result<()> {
        let what = format!(
            "Cassandra's CQL port {} to answer OPTIONS with SUPPORTED",
            self.cql_port
        );
        let deadline = Instant::now() + CASSANDRA_START_DEADLINE;
        let mut last;
        loop {
            if let Some(p) = self.proc.as_mut() {
                p.check_alive("Cassandra")?;
            }
            match cql_options(self.ip, self.cql_port) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            if Instant::now() > deadline {
                let log = self.dir.path().join("system.log");
                return Err(err(format!(
                    "waited {CASSANDRA_START_DEADLINE:?} for {what}; last: {last}; log {}:\n{}",
                    log.display(),
                    log_tail(&log)
                )));
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `<ip>:<cql port>`, for a driver's contact points.
    pub fn address(&self) -> String {
        format!("{}:{}", self.ip, self.cql_port)
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, Proc::pid)
    }

    /// Where the node keeps its data (`data/<keyspace>/<table>-<id>/` inside).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The CQL port.
    pub fn port(&self) -> u16 {
        self.cql_port
    }

    /// SIGKILLs the node (a crash: no drain, no flush).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the node again from its data (same ports) and waits until it
    /// serves CQL.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let began = Instant::now();
        self.spawn()?;
        self.wait_ready()?;
        eprintln!(
            "stack: Cassandra restarted, ready in {:.1} s",
            began.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// SIGSTOPs the node (a stall: sockets stay open, nothing answers).
    pub fn pause(&self) -> Result<()> {
        signal(self.pid(), libc::SIGSTOP)
    }

    /// SIGCONTs the node.
    pub fn resume(&self) -> Result<()> {
        signal(self.pid(), libc::SIGCONT)
    }

    /// Leaves the node running after the handle is gone (`palaver cluster
    /// up`); returns its PID.
    pub fn detach(self) -> u32 {
        let Self { proc, dir, .. } = self;
        std::mem::forget(dir);
        proc.map_or(0, Proc::detach)
    }
}

/// Several Cassandra nodes forming one ring, each on its own loopback
/// address (127.0.0.1, .2, …) with the same storage port and its own token;
/// the first is the seed. Started together (joining without bootstrap
/// streaming: the ring is new and empty), ready when every node serves CQL.
pub struct CassandraCluster {
    pub nodes: Vec<Cassandra>,
}

impl CassandraCluster {
    pub fn start(n: usize) -> Result<Self> {
        assert!((1..=9).contains(&n), "1 to 9 nodes");
        let storage_port = free_port()?;
        let cql_port = free_port()?;
        let began = Instant::now();
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let ip = Ipv4Addr::new(127, 0, 0, 1 + i as u8);
            // Evenly spaced tokens over Murmur3's range.
            let step = u64::MAX / n as u64;
            let token = (i64::MIN as i128 + i as i128 * step as i128) as i64;
            let node = Cassandra::configured(
                WorkDir::temp(&format!("cassandra-{}", i + 1))?,
                ip,
                cql_port,
                storage_port,
                format!("127.0.0.1:{storage_port}"),
                token,
            )?;
            nodes.push(node);
        }
        // The seed first (the others gossip with it), then the rest at once.
        nodes[0].spawn()?;
        nodes[0].wait_ready()?;
        for node in nodes.iter_mut().skip(1) {
            node.spawn()?;
        }
        for node in nodes.iter_mut().skip(1) {
            node.wait_ready()?;
        }
        eprintln!(
            "stack: {n} Apache Cassandra {CASSANDRA_VERSION} nodes at {}, ready in {:.1} s",
            nodes
                .iter()
                .map(Cassandra::address)
                .collect::<Vec<_>>()
                .join(", "),
            began.elapsed().as_secs_f64()
        );
        Ok(Self { nodes })
    }

    /// Every node's CQL address (the driver's contact points).
    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(Cassandra::address).collect()
    }
}

/// One CQL v4 OPTIONS request; Ok when the answer is SUPPORTED.
fn cql_options(ip: Ipv4Addr, port: u16) -> std::result::Result<(), String> {
    let addr = SocketAddr::from((ip, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    // Header: version 4 (request), flags 0, stream 1, opcode OPTIONS (5),
    // body length 0.
    s.write_all(&[0x04, 0, 0, 1, 0x05, 0, 0, 0, 0])
        .map_err(|e| format!("write: {e}"))?;
    let mut header = [0u8; 9];
    s.read_exact(&mut header)
        .map_err(|e| format!("read: {e}"))?;
    // Response version 0x84, opcode SUPPORTED (6).
    if header[0] == 0x84 && header[4] == 0x06 {
        Ok(())
    } else {
        Err(format!("unexpected answer header {header:02x?}"))
    }
}
