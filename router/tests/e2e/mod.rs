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

use palaver_gateway::bridge::presence::PresenceTiming;
use palaver_gateway::bridge::{BridgeConfig, KafkaRedisBridge};
use palaver_gateway::config::BackendConfig;
use palaver_gateway::{auth, devcerts, Config, GatewayHandle};
use palaver_protocol::pb::{self, frame::Body};
use palaver_router::redis_store::RedisConfig;
use palaver_tools::client::{new_client_msg_id, Client, ConnectOptions};
use palaver_tools::stack::{Kafka, Redis, RedisCluster, WorkDir};

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
    pub dir: WorkDir,
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

    /// Starts gateway `id` (2 cores) with a short lease for the fault tests.
    pub fn add_gateway(&mut self, id: &str) -> usize {
        let data_dir: PathBuf = self.dir.path().join("gw-data");
        let mut config = Config::default();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.cores = 2;
        config.data_dir = data_dir.clone();
        config.gateway_id = id.into();
        config.backend = BackendConfig::Kafka {
            brokers: self.kafka.bootstrap(),
            redis: self.redis_spec.clone(),
        };
        let mut bridge_config =
            BridgeConfig::new(self.kafka.bootstrap(), self.redis_config.clone());
        bridge_config.presence = PresenceTiming {
            flush_interval: Duration::from_millis(50),
            tick: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(3),
        };
        bridge_config.inbound_partitions = 4;
        let bridge = Arc::new(KafkaRedisBridge::new(bridge_config));
        let handle = GatewayHandle::start(config, bridge.clone()).expect("gateway starts");
        let ca = std::fs::read(data_dir.join(devcerts::CA_CERT_FILE)).unwrap();
        self.gateways.push(Gateway {
            opts: ConnectOptions::new(handle.local_addr, ca),
            handle: Some(handle),
            bridge,
        });
        self.gateways.len() - 1
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
        let mut c = Client::connect(&self.gateways[gateway].opts).expect("TLS connect");
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

pub fn deliver_of(f: &pb::Frame) -> Option<&pb::Message> {
    match &f.body {
        Some(Body::Deliver(d)) => d.message.as_ref(),
        _ => None,
    }
}

pub fn ack_of(f: &pb::Frame) -> Option<&pb::SendAck> {
    match &f.body {
        Some(Body::SendAck(a)) => Some(a),
        _ => None,
    }
}

/// Sends and waits for the ack, retrying with the same client_msg_id on
/// UNAVAILABLE or silence (what a real client does).
pub fn send_reliably(c: &mut Client, conv: &str, text: &str) -> pb::SendAck {
    try_send_reliably(c, conv, text, Duration::from_secs(90))
        .unwrap_or_else(|| panic!("no SendAck for {text}"))
}

/// [`send_reliably`] that gives up after `patience` without an ack.
pub fn try_send_reliably(
    c: &mut Client,
    conv: &str,
    text: &str,
    patience: Duration,
) -> Option<pb::SendAck> {
    let cmid = new_client_msg_id();
    let deadline = Instant::now() + patience;
    loop {
        if Instant::now() >= deadline {
            return None;
        }
        let id = c
            .request(Body::Send(pb::Send {
                conversation_id: conv.into(),
                client_msg_id: cmid.clone(),
                kind: pb::ContentKind::Text as i32,
                body: text.as_bytes().to_vec(),
                ..Default::default()
            }))
            .unwrap();
        match c.recv_until(Duration::from_secs(20), "SendAck or Error", |f| {
            f.request_id == id
        }) {
            Ok(f) => match &f.body {
                Some(Body::SendAck(a)) => return Some(a.clone()),
                // A client's retry back-off.
                Some(Body::Error(e)) if e.code == pb::ErrorCode::Unavailable as u32 => {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                other => panic!("unexpected answer to Send: {other:?}"),
            },
            Err(_) => continue,
        }
    }
}

pub fn next_deliver(c: &mut Client) -> pb::Message {
    let f = c
        .recv_until(T, "Deliver", |f| deliver_of(f).is_some())
        .unwrap();
    deliver_of(&f).unwrap().clone()
}

pub fn group_of(c: &mut Client, members: &[&str]) -> String {
    let id = c
        .request(Body::CreateConversation(pb::CreateConversation {
            kind: pb::ConversationKind::Group as i32,
            title: "team".into(),
            member_user_ids: members.iter().map(|s| s.to_string()).collect(),
        }))
        .unwrap();
    let f = c
        .recv_until(T, "ConversationCreated", |f| f.request_id == id)
        .unwrap();
    match f.body {
        Some(Body::ConversationCreated(cc)) => cc.conversation.unwrap().conversation_id,
        other => panic!("expected ConversationCreated, got {other:?}"),
    }
}
