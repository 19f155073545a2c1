//! `palaver cluster up --push-providers FILE` end to end: Redis, Kafka, a
//! router, two gateway processes and `palaver-push` (all the workspace's
//! debug binaries, as processes), with the providers file naming the APNs
//! test server (HTTP/2 over TLS, JWT checked). A phone registers its token
//! over the protocol and disconnects; the next message to it comes out as a
//! push at the test server.
//!
//! Needs the binaries beside this test: `cargo test --workspace` builds
//! them; alone, `cargo build -p palaver-router -p palaver-gateway -p
//! palaver-push --bins` first.
// A test: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use palaver_protocol::pb::{self, frame::Body};
use palaver_push::testing::{ApnsServerConfig, ApnsTestServer, TestKeyPair};
use palaver_testkit::chat::{send_reliably, wait_offline};
use palaver_testkit::client::{Client, ConnectOptions};
use palaver_testkit::stack;
use palaver_tools::cluster;

const T: Duration = Duration::from_secs(30);
const TOPIC: &str = "com.example.palaver";
const BOB_TOKEN: &str = "b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0";

/// Tears the cluster down whatever happens.
struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = cluster::cluster_down(&self.0);
    }
}

#[test]
fn cluster_up_with_push_providers_wakes_a_sleeping_phone() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let key = TestKeyPair::apns();
    let mut server = ApnsServerConfig::new("TEAM123456", "KEY1234567", &key.public_pem);
    server.topics = vec![TOPIC.into()];
    let apns = runtime.block_on(ApnsTestServer::start(server)).unwrap();

    let dir = std::env::temp_dir().join(format!("palaver-cluster-push-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let providers = apns.write_providers(&dir, &key).unwrap();

    let data = dir.join("data");
    let port = stack::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let options = cluster::ClusterOptions {
        archive: false,
        push_providers: Some(providers),
    };
    let state = dir.join("stack");
    let _down = Down(state.clone());
    let procs = cluster::cluster_up(&state, &data, &listen, options).expect("palaver cluster up");
    assert!(procs.iter().any(|p| p.name == "push-1"), "{procs:?}");

    let ca = std::fs::read(data.join("ca.pem")).unwrap();
    let secret =
        palaver_credentials::devcerts::read_secret(&data.join("jwt-hs256.secret")).unwrap();
    let addr: SocketAddr = listen.parse().unwrap();
    let login = |user: &str, device: &str| -> Client {
        let mut c = Client::connect(&ConnectOptions::new(addr, ca.clone())).unwrap();
        let token = palaver_credentials::auth::mint_hs256(&secret, user, None, 3600);
        c.hello(&token, device, T).unwrap();
        c
    };

    // Bob's phone registers its token and writes to alice (so each may see
    // the other's presence, SPEC §10), then sleeps.
    let conversation = palaver_protocol::direct_conversation_id("alice", "bob");
    let mut bob = login("bob", "phone");
    let id = bob
        .request(Body::RegisterPushToken(pb::RegisterPushToken {
            platform: pb::PushPlatform::Apns.into(),
            token: BOB_TOKEN.into(),
            apns_environment: pb::ApnsEnvironment::Production.into(),
            apns_topic: TOPIC.into(),
            locale: String::new(),
        }))
        .unwrap();
    let f = bob
        .recv_until(T, "PushTokenRegistered", |f| f.request_id == id)
        .unwrap();
    assert!(
        matches!(f.body, Some(Body::PushTokenRegistered(_))),
        "{f:?}"
    );
    send_reliably(&mut bob, &conversation, "hi alice", T);
    let mut alice = login("alice", "laptop");
    send_reliably(&mut alice, &conversation, "hi bob", T);
    drop(bob);
    wait_offline(&mut alice, "bob", T);

    send_reliably(&mut alice, &conversation, "wake up", T);
    let began = Instant::now();
    let push = loop {
        if let Some(r) = apns
            .received()
            .into_iter()
            .find(|r| r.device_token == BOB_TOKEN && r.status == Some(200))
        {
            break r;
        }
        assert!(
            began.elapsed() < Duration::from_secs(90),
            "no push; palaver-push log:\n{}",
            std::fs::read_to_string(state.join("push-1.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(push.header("apns-topic"), Some(TOPIC));
    assert_eq!(push.header("apns-collapse-id"), Some(conversation.as_str()));
    assert_eq!(
        push.payload["palaver"]["conversation"],
        conversation.as_str()
    );
    assert!(
        !push.payload.to_string().contains("wake up"),
        "id-only: {}",
        push.payload
    );
    drop(_down);
    let _ = std::fs::remove_dir_all(&dir);
}
