//! The stack of the end-to-end and fault tests: real Apache Kafka and
//! Redis (tools' stack), `palaver-router` processes (this crate's binary),
//! in-process gateways with the Kafka/Redis bridge, real TLS clients; and
//! [`traffic`], the chat traffic the fault tests run while a fault happens.
#![allow(dead_code)]
// Configs are filled field by field, like an operator's config file.
#![allow(clippy::field_reassign_with_default)]

pub mod traffic;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palaver_gateway::config::BackendConfig;
use palaver_gateway::{auth, devcerts, Config, GatewayHandle};
use palaver_protocol::pb;
use palaver_router::bridge::presence::PresenceTiming;
use palaver_router::bridge::{BridgeConfig, KafkaRedisBridge};
use palaver_router::redis_store::RedisConfig;
use palaver_testkit::chat::ChatServer;
use palaver_testkit::client::{Client, ConnectOptions};
use palaver_testkit::stack::{Kafka, Redis, RedisCluster, WorkDir};

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
    pub gateways: Vec<Gateway>,
    pub gateway_processes: Vec<GatewayProcess>,
    pub dir: WorkDir,
}

/// A gateway in a process of its own, SIGKILLed on drop.
pub struct GatewayProcess {
    child: Child,
    opts: Option<ConnectOptions>,
}

impl GatewayProcess {
    /// SIGKILL: no drain, no presence flush, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The tests' gateway (2 cores, a short presence lease), in this process.
pub fn start_gateway(
    id: &str,
    data_dir: &std::path::Path,
    brokers: &str,
    redis_spec: &str,
    redis_config: RedisConfig,
) -> (GatewayHandle, Arc<KafkaRedisBridge>) {
    let mut config = Config::default();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.cores = 2;
    config.data_dir = data_dir.to_path_buf();
    config.gateway_id = id.into();
    config.backend = BackendConfig::Kafka {
        brokers: brokers.into(),
        redis: redis_spec.into(),
    };
    let mut bridge_config = BridgeConfig::new(brokers, redis_config);
    bridge_config.presence = PresenceTiming {
        flush_interval: Duration::from_millis(50),
        tick: Duration::from_millis(500),
        lease_ttl: Duration::from_secs(3),
    };
    bridge_config.inbound_partitions = 4;
    let bridge = Arc::new(KafkaRedisBridge::new(bridge_config));
    let handle = GatewayHandle::start(config, bridge.clone()).expect("gateway starts");
    (handle, bridge)
}

/// The body of the child test [`Stack::add_gateway_process`] runs: starts
/// the gateway its environment describes, writes its port, and serves until
/// killed. Without that environment (a plain `--ignored` run) it returns.
pub fn gateway_process_main() {
    let Ok(id) = std::env::var("PALAVER_TEST_GATEWAY") else {
        return;
    };
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let redis_spec = env("PALAVER_TEST_REDIS");
    let redis_config = RedisConfig::parse(&redis_spec).expect("Redis spec");
    let (handle, _bridge) = start_gateway(
        &id,
        std::path::Path::new(&env("PALAVER_TEST_DATA_DIR")),
        &env("PALAVER_TEST_BROKERS"),
        &redis_spec,
        redis_config,
    );
    let port_file = PathBuf::from(env("PALAVER_TEST_PORT_FILE"));
    let tmp = port_file.with_extension("tmp");
    std::fs::write(&tmp, handle.local_addr.port().to_string()).unwrap();
    std::fs::rename(&tmp, &port_file).unwrap();
    loop {
        std::thread::park();
    }
}

pub struct Gateway {
    pub handle: Option<GatewayHandle>,
    pub bridge: Arc<KafkaRedisBridge>,
    pub opts: ConnectOptions,
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
            gateway_processes: Vec::new(),
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

    /// Starts gateway `id` in this process.
    pub fn add_gateway(&mut self, id: &str) -> usize {
        let data_dir: PathBuf = self.dir.path().join("gw-data");
        let (handle, bridge) = start_gateway(
            id,
            &data_dir,
            &self.kafka.bootstrap(),
            &self.redis_spec,
            self.redis_config.clone(),
        );
        let ca = std::fs::read(data_dir.join(devcerts::CA_CERT_FILE)).unwrap();
        self.gateways.push(Gateway {
            opts: ConnectOptions::new(handle.local_addr, ca),
            handle: Some(handle),
            bridge,
        });
        self.gateways.len() - 1
    }

    /// Starts gateway `id` as a process of its own (this test binary run
    /// as `child_test`, which must call [`gateway_process_main`]), so a test
    /// can SIGKILL it. Needs the dev CA an in-process gateway created.
    pub fn add_gateway_process(&mut self, id: &str, child_test: &str) {
        let data_dir: PathBuf = self.dir.path().join("gw-data");
        let port_file = self.dir.path().join(format!("{id}.port"));
        let log = std::fs::File::create(self.dir.path().join(format!("{id}.log"))).unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .args([child_test, "--exact", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env("PALAVER_TEST_GATEWAY", id)
            .env("PALAVER_TEST_BROKERS", self.kafka.bootstrap())
            .env("PALAVER_TEST_REDIS", &self.redis_spec)
            .env("PALAVER_TEST_DATA_DIR", &data_dir)
            .env("PALAVER_TEST_PORT_FILE", &port_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn a gateway process");
        let mut process = GatewayProcess { child, opts: None };
        // Ready: the child wrote its listening port.
        let deadline = Instant::now() + T;
        let port: u16 = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break port;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("gateway process {id} exited ({status}) before listening");
            }
            assert!(
                Instant::now() < deadline,
                "gateway process {id} never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let ca = std::fs::read(data_dir.join(devcerts::CA_CERT_FILE)).unwrap();
        process.opts = Some(ConnectOptions::new(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            ca,
        ));
        self.gateway_processes.push(process);
    }

    /// Where clients reach every gateway: in-process ones first, then the
    /// gateway processes, each in start order.
    pub fn gateway_addrs(&self) -> Vec<ConnectOptions> {
        self.gateways
            .iter()
            .map(|g| g.opts.clone())
            .chain(
                self.gateway_processes
                    .iter()
                    .map(|p| p.opts.clone().expect("listening")),
            )
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

    /// A gateway crash as the cluster sees it: the bridge stops at once
    /// (no presence flush, no lease renewal), then the sockets go away.
    pub fn crash_gateway(&mut self, gateway: usize) {
        let gw = &mut self.gateways[gateway];
        gw.bridge.halt();
        if let Some(h) = gw.handle.take() {
            h.stop();
            h.join();
        }
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
        for gw in &mut self.gateways {
            if let Some(h) = gw.handle.take() {
                h.stop();
                h.join();
            }
        }
        self.routers.clear();
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
