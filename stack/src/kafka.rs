//! Apache Kafka (KRaft) from Maven Central, run on the JDK: one combined
//! node, or several for broker-failure tests; readiness, topics, signals
//! (the Kafka requests themselves: `kafka_wire.rs`).

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::kafka_wire;
use super::*;

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
    installed_jars(
        "PALAVER_KAFKA_LIBS",
        &format!("kafka-{KAFKA_VERSION}"),
        &format!("Apache Kafka {KAFKA_VERSION}"),
    )
}

/// Where install-deps.sh put a Java service's jars: `$<env_var>`, else
/// `~/.cache/palaver/<dir_name>/libs` (`$XDG_CACHE_HOME` if set); an error
/// naming the install script unless `.complete` marks a finished download.
pub(super) fn installed_jars(env_var: &str, dir_name: &str, what: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os(env_var) {
        Some(d) => PathBuf::from(d),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .ok_or_else(|| err("neither XDG_CACHE_HOME nor HOME is set"))?;
            cache.join("palaver").join(dir_name).join("libs")
        }
    };
    if dir.join(".complete").is_file() {
        Ok(dir)
    } else {
        Err(err(format!(
            "{what} is not installed in {}; {INSTALL_HINT}",
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
        // A free port is free when asked, not seconds later when the JVM
        // binds it: another test's process may have taken it by then. A
        // fresh cluster (nothing formatted yet) then starts again on other
        // ports; a kept one (its data formatted) cannot, and says why.
        let fresh = (0..nodes).all(|i| !kafka.node_dir(i).join("data/meta.properties").is_file());
        let mut attempt = 1;
        loop {
            match kafka.launch(&cluster_id) {
                Ok(()) => break,
                Err(e)
                    if fresh && attempt < 3 && e.to_string().contains("Address already in use") =>
                {
                    eprintln!(
                        "stack: Kafka lost a port to another process (attempt {attempt}); \
                         starting again on other ports"
                    );
                    attempt += 1;
                    for i in 0..nodes {
                        kafka.nodes[i].proc = None; // killed on drop
                        kafka.nodes[i].port = free_port()?;
                        kafka.nodes[i].controller_port = free_port()?;
                        let _ = fs::remove_dir_all(kafka.node_dir(i));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        eprintln!(
            "stack: Apache Kafka {KAFKA_VERSION}, {nodes} node(s) at {}, ready in {:.1} s",
            kafka.bootstrap(),
            began.elapsed().as_secs_f64()
        );
        Ok(kafka)
    }

    /// Configures, formats and starts every node, and waits until the
    /// cluster serves.
    fn launch(&mut self, cluster_id: &str) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.write_config(i)?;
            self.format(i, cluster_id)?;
        }
        for i in 0..self.nodes.len() {
            self.spawn(i)?;
        }
        self.wait_ready()
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
            "# Written by palaver-stack (stack/src/kafka.rs).\n\
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
        let mut last;
        loop {
            for &i in &running {
                if let Some(p) = self.nodes[i].proc.as_mut() {
                    p.check_alive(&format!("Kafka node {}", i + 1))?;
                }
            }
            match probe_ready(&bootstrap, running.len(), self.nodes.len()) {
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
        let md = kafka_wire::metadata(&self.bootstrap(), Some(&[topic]), Duration::from_secs(10))
            .map_err(|e| err(format!("metadata of {topic}: {e}")))?;
        let leader = md
            .topic(topic)
            .and_then(|t| t.partitions.iter().find(|p| p.id == partition))
            .map(|p| p.leader)
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

/// The topic whose creation and leader prove that the cluster serves
/// clients (created by the first readiness wait, kept for the next).
const PROBE_TOPIC: &str = "palaver.ready";

/// One readiness probe: every running broker is in the metadata and the
/// probe topic exists with a leader.
fn probe_ready(bootstrap: &str, brokers: usize, nodes: usize) -> std::result::Result<(), String> {
    let timeout = Duration::from_secs(2);
    let md = kafka_wire::metadata(bootstrap, None, timeout)?;
    if md.brokers.len() < brokers {
        return Err(format!(
            "metadata lists {} of {brokers} brokers",
            md.brokers.len()
        ));
    }
    if md.topic(PROBE_TOPIC).is_some_and(|t| t.led()) {
        return Ok(());
    }
    if brokers < nodes {
        // A restarted node of a cluster whose probe topic existed: metadata
        // listing it is the condition.
        if md.topic(PROBE_TOPIC).is_some() {
            return Ok(());
        }
    }
    let replicas = nodes.min(3) as i16;
    kafka_wire::create_topic(bootstrap, PROBE_TOPIC, 1, replicas, Duration::from_secs(5))?;
    let md = kafka_wire::metadata(bootstrap, Some(&[PROBE_TOPIC]), timeout)?;
    if md.topic(PROBE_TOPIC).is_some_and(|t| t.led()) {
        Ok(())
    } else {
        Err(format!("{PROBE_TOPIC} has no leader yet"))
    }
}

/// Creates `name` with `partitions` partitions (the broker's default
/// replication factor) on the cluster at `bootstrap`, retrying until the
/// broker accepts it, and waits until every partition has a leader. An
/// existing topic is left alone.
pub fn create_topic(bootstrap: &str, name: &str, partitions: u32) -> Result<()> {
    let deadline = Instant::now() + KAFKA_START_DEADLINE;
    let mut last;
    loop {
        last = match kafka_wire::create_topic(
            bootstrap,
            name,
            partitions,
            -1,
            Duration::from_secs(10),
        )
        .and_then(|()| kafka_wire::metadata(bootstrap, Some(&[name]), Duration::from_secs(5)))
        {
            Ok(md) => match md.topic(name) {
                Some(t) if t.led() && t.partitions.len() == partitions as usize => return Ok(()),
                _ => "not every partition has a leader yet".to_string(),
            },
            Err(e) => e,
        };
        if Instant::now() > deadline {
            return Err(err(format!("create topic {name} on {bootstrap}: {last}")));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
