//! The stack of the end-to-end and fault tests: real Apache Kafka and
//! Redis (the test kit's stack), `palaver-router` processes (this crate's
//! binary), `palaver-gateway` processes with the Kafka/Redis bridge (the
//! workspace's gateway binary, started by the test kit), real TLS clients;
//! and [`traffic`], the chat traffic the fault tests run while a fault
//! happens. Nothing here links the gateway crate: the arrows run protocol →
//! router → gateway only.
#![allow(dead_code)]
// Configs are filled field by field, like an operator's config file.
#![allow(clippy::field_reassign_with_default)]

pub mod traffic;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use palaver_credentials::{auth, devcerts};
use palaver_protocol::pb;
use palaver_router::redis_store::RedisConfig;
use palaver_testkit::chat::ChatServer;
use palaver_testkit::client::{Client, ConnectOptions};
use palaver_testkit::stack::{self, Kafka, Redis, RedisCluster, WorkDir};

pub const T: Duration = Duration::from_secs(30);

/// A `palaver-router` process, killed on drop.
pub struct RouterProcess {
    child: Child,
}

impl RouterProcess {
    pub fn start(brokers: &str, redis: &str, id: &str, log_dir: &std::path::Path) -> Self {
        let log = std::fs::File::create(log_dir.join(format!("{id}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_palaver-router"))
            .args(["--brokers", brokers, "--redis", redis, "--router-id", id])
            .args(["--partitions", "4", "--max-batch", "200"])
            // The broker's minimum session, so a killed router's partitions
            // move within the test's patience (the default is 10 s).
            .args(["--session-timeout-ms", "6000"])
            .env("RUST_LOG", "info,rdkafka=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn palaver-router");
        Self { child }
    }

    /// SIGKILL: no flush, no commit, no goodbye to the group.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Redis, Kafka, routers and gateways of one test.
pub struct Stack {
    pub redis: Option<Redis>,
    pub redis_cluster: Option<RedisCluster>,
    pub redis_spec: String,
    pub redis_config: RedisConfig,
    pub kafka: Kafka,
    pub routers: Vec<RouterProcess>,
    pub gateways: Vec<stack::Gateway>,
    pub dir: WorkDir,
}

/// The tests' gateway config: the Kafka/Redis backend, a short presence
/// lease (a killed gateway's users go offline within 3 s), and the
/// partitions the routers are started with. The fault matrix's traffic is
/// four devices of one user sending as fast as SendAcks come (see
/// `traffic.rs`), which is not what it tests: the account's send rate
/// (SPEC §13, 100/s per gateway by default) is lifted, as the gateway's own
/// tests lift the connection's.
fn gateway_config(brokers: &str, redis_spec: &str) -> String {
    format!(
        "[backend]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\nredis = \"{redis_spec}\"\n\n\
         [bridge]\npresence_flush_ms = 50\npresence_tick_ms = 500\npresence_lease_ms = 3000\n\
         inbound_partitions = 4\n\n\
         [limits]\nmax_account_sends_per_second = 10000\n"
    )
}

impl Stack {
    /// One Kafka node, standalone Redis (`cluster` false) or a 3-master
    /// Redis Cluster, and `routers` router processes.
    pub fn start(cluster: bool, routers: usize) -> Self {
        Self::start_with(cluster, 1, routers)
    }

    /// As [`Stack::start`] with `kafka_nodes` Kafka brokers.
    pub fn start_with(cluster: bool, kafka_nodes: usize, routers: usize) -> Self {
        let kafka = if kafka_nodes == 1 {
            Kafka::start().expect("start Kafka")
        } else {
            Kafka::start_cluster(kafka_nodes).expect("start a Kafka cluster")
        };
        let (redis, redis_cluster, redis_spec, redis_config) = if cluster {
            let c = RedisCluster::start(3).expect("start Redis Cluster");
            let hosts: Vec<String> = c
                .nodes()
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port()))
                .collect();
            let spec = format!("redis+cluster://{}", hosts.join(","));
            let config = RedisConfig::cluster(c.urls());
            (None, Some(c), spec, config)
        } else {
            let r = Redis::start().expect("start redis-server");
            let spec = r.url();
            let config = RedisConfig::standalone(r.url());
            (Some(r), None, spec, config)
        };
        let dir = WorkDir::temp("e2e").unwrap();
        let mut stack = Stack {
            redis,
            redis_cluster,
            redis_spec,
            redis_config,
            kafka,
            routers: Vec::new(),
            gateways: Vec::new(),
            dir,
        };
        for i in 0..routers {
            stack.add_router(&format!("router-{i}"));
        }
        stack
    }

    pub fn add_router(&mut self, id: &str) {
        let r = RouterProcess::start(
            &self.kafka.bootstrap(),
            &self.redis_spec,
            id,
            self.dir.path(),
        );
        self.routers.push(r);
    }

    /// Starts gateway `id` (a `palaver-gateway` process); returns its index.
    pub fn add_gateway(&mut self, id: &str) -> usize {
        let data_dir: PathBuf = self.dir.path().join("gw-data");
        let config = gateway_config(&self.kafka.bootstrap(), &self.redis_spec);
        let gateway = stack::Gateway::start(self.dir.path(), id, &config, &data_dir)
            .unwrap_or_else(|e| panic!("gateway {id} starts: {e}"));
        self.gateways.push(gateway);
        self.gateways.len() - 1
    }

    /// Where clients reach every gateway, in start order.
    pub fn gateway_addrs(&self) -> Vec<ConnectOptions> {
        let ca = std::fs::read(self.dir.path().join("gw-data").join(devcerts::CA_CERT_FILE))
            .expect("the first gateway wrote the dev CA");
        self.gateways
            .iter()
            .map(|g| ConnectOptions::new(g.addr(), ca.clone()))
            .collect()
    }

    pub fn secret(&self) -> Vec<u8> {
        devcerts::read_secret(
            &self
                .dir
                .path()
                .join("gw-data")
                .join(devcerts::JWT_SECRET_FILE),
        )
        .unwrap()
    }

    pub fn login(&self, gateway: usize, user: &str, device: &str) -> Client {
        self.login_with(gateway, user, device, Vec::new()).0
    }

    /// Hello with resume cursors; returns the client and the Welcome.
    pub fn login_with(
        &self,
        gateway: usize,
        user: &str,
        device: &str,
        resume: Vec<pb::Cursor>,
    ) -> (Client, pb::Welcome) {
        let mut c = Client::connect(&self.gateway_addrs()[gateway]).expect("TLS connect");
        let token = auth::mint_hs256(&self.secret(), user, None, 3600);
        let w = c
            .hello_with(
                pb::Hello {
                    protocol_version: palaver_protocol::PROTOCOL_VERSION,
                    token,
                    device_id: device.into(),
                    client_name: "e2e".into(),
                    client_version: "0".into(),
                    resume,
                },
                T,
            )
            .expect("welcome");
        (c, w)
    }

    /// A gateway crash as the cluster sees it: SIGKILL, so no presence
    /// flush, no lease renewal, no drain; its sockets go away.
    pub fn crash_gateway(&mut self, gateway: usize) {
        self.gateways[gateway].kill();
    }
}

/// The shared chat suite runs against this stack's gateways.
impl ChatServer for Stack {
    fn gateways(&self) -> usize {
        self.gateway_addrs().len()
    }

    fn login_resuming(
        &self,
        gateway: usize,
        user: &str,
        device: &str,
        resume: Vec<pb::Cursor>,
    ) -> Client {
        self.login_with(gateway, user, device, resume).0
    }

    fn patience(&self) -> Duration {
        T
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Gateways before routers, routers before Kafka and Redis.
        self.gateways.clear();
        self.routers.clear();
        if std::thread::panicking() {
            let mut logs = logs_in(self.dir.path());
            logs.extend((0..self.kafka.len()).map(|i| self.kafka.node_path(i).join("server.log")));
            print_warnings_of_logs(&logs);
        }
    }
}

/// The `*.log` files of routers and gateways in `dir`.
fn logs_in(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    logs
}

/// A failed test's evidence: the warnings and errors of every process
/// (the last 40 of each log), on stderr where CI shows them.
fn print_warnings_of_logs(logs: &[PathBuf]) {
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let warnings: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        eprintln!(
            "--- {}: {} warnings/errors, the last 40:",
            log.display(),
            warnings.len()
        );
        for line in &warnings[warnings.len().saturating_sub(40)..] {
            eprintln!("{line}");
        }
    }
}

/// Sends and waits for the ack, retrying with the same client_msg_id on
/// UNAVAILABLE or silence (what a real client does), for up to 90 s.
pub fn send_reliably(c: &mut Client, conv: &str, text: &str) -> pb::SendAck {
    palaver_testkit::chat::send_reliably(c, conv, text, T)
}

pub fn next_deliver(c: &mut Client) -> pb::Message {
    palaver_testkit::chat::next_deliver(c, T)
}

pub fn group_of(c: &mut Client, members: &[&str]) -> String {
    c.create_group("team", members, T)
        .expect("ConversationCreated")
        .conversation_id
}
