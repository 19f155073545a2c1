//! The SDK through the full stack `palaver cluster up` starts (Redis, Apache
//! Kafka, a router, gateway processes sharing one port; the `palaver` binary
//! run as a person runs it, so it needs the workspace's binaries built beside
//! this test, as `cargo test --workspace` does): a gateway process
//! gets SIGTERM (GoAway, reconnect after the delay to another gateway, Sync)
//! and later another one gets SIGKILL, while messages flow. Nothing is lost,
//! doubled or reordered.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    assert_exactly_once_in_order, connected_count, first_reconnect, messages_in, sent_in, Recorder,
    Tokens,
};
use palaver_client::{
    direct_conversation_id, ClientConfig, ClientEvent, ConnectionState, PalaverClient,
};
use palaver_testkit::stack;

const SIGTERM: i32 = 15; // Linux signal numbers (the cluster stack is Linux-only)
const SIGKILL: i32 = 9;
const T: Duration = Duration::from_secs(60);

/// Tears the cluster down whatever happens.
struct Cluster {
    palaver: PathBuf,
    dir: PathBuf,
    extra: Vec<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.extra {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = palaver_cluster(&self.palaver, "down", &self.dir.join("stack"), &[]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `palaver cluster ACTION --dir DIR ARGS..`; its stdout, or why it
/// failed.
fn palaver_cluster(
    palaver: &Path,
    action: &str,
    dir: &Path,
    args: &[&OsStr],
) -> Result<String, String> {
    let out = Command::new(palaver)
        .args(["cluster", action, "--dir"])
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run {}: {e}", palaver.display()))?;
    if !out.status.success() {
        return Err(format!(
            "palaver cluster {action} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The gateway a client is on, from its session id (`gw1/...`).
fn gateway_of(r: &Recorder) -> String {
    r.snapshot()
        .into_iter()
        .rev()
        .find_map(|(_, e)| match e {
            ClientEvent::StateChanged {
                state: ConnectionState::Connected { session_id, .. },
            } => session_id.split('/').next().map(str::to_string),
            _ => None,
        })
        .expect("connected")
}

fn client(config: ClientConfig, tokens: Arc<Tokens>) -> (Arc<PalaverClient>, Arc<Recorder>) {
    let r = Recorder::new();
    let c = PalaverClient::new(config, tokens, r.clone(), None).unwrap();
    c.connect().unwrap();
    r.wait_connected(1);
    (c, r)
}

fn send(sender: &PalaverClient, conv: &str, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let t = format!("{prefix}{i:04}");
            sender.send_text(conv.into(), t.clone()).unwrap();
            t
        })
        .collect()
}

fn tokens(data: &Path, user: &str) -> Arc<Tokens> {
    let secret_file = data.join("jwt-hs256.secret");
    let secret = palaver_gateway::devcerts::read_secret(&secret_file).unwrap();
    Arc::new(Tokens {
        secret,
        user: user.into(),
        first_ttl_s: 3600,
        cached: Default::default(),
        calls: Default::default(),
        refreshes: Default::default(),
    })
}

#[test]
fn gateway_processes_terminated_and_killed_under_traffic_lose_nothing() {
    // `palaver`, palaver-router and palaver-gateway: cargo put them beside
    // this test's deps directory (the CLI finds the others beside itself;
    // PATH is for the stack's own lookups).
    let bin_dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin_dir.clone()];
    dirs.extend(std::env::split_paths(&path));
    std::env::set_var("PATH", std::env::join_paths(dirs).unwrap());

    let dir = std::env::temp_dir().join(format!("palaver-sdk-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    let port = stack::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut cluster = Cluster {
        palaver: bin_dir.join("palaver"),
        dir: dir.clone(),
        extra: Vec::new(),
    };
    let started = Instant::now();
    let up = palaver_cluster(
        &cluster.palaver,
        "up",
        &dir.join("stack"),
        &[
            "--listen".as_ref(),
            listen.as_ref(),
            "--data-dir".as_ref(),
            data.as_ref(),
        ],
    )
    .expect("palaver cluster up");
    println!("cluster up in {:?}:\n{up}", started.elapsed());
    // One `NAME pid PID port PORT` line per process.
    let pid_of = |name: &str| -> u32 {
        up.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&name) && f.get(1) == Some(&"pid"))
            .and_then(|f| f.get(2)?.parse().ok())
            .unwrap_or_else(|| panic!("no pid of {name} in:\n{up}"))
    };

    let ca = std::fs::read_to_string(data.join("ca.pem")).unwrap();
    let config = |device: &str| {
        let mut c = ClientConfig::new(&listen, &ca, device);
        c.server_name = "localhost".into();
        c.backoff_base_ms = 100;
        c.backoff_max_ms = 2_000;
        c
    };
    let (alice, ra) = client(config("phone"), tokens(&data, "alice"));
    let (_bob, rb) = client(config("phone"), tokens(&data, "bob"));
    let conv = direct_conversation_id("alice".into(), "bob".into()).unwrap();

    // A third gateway, so one is left after two are gone.
    let gw3 = Command::new(bin_dir.join("palaver-gateway"))
        .arg("--config")
        .arg(dir.join("stack/gateway.toml"))
        .args(["--gateway-id", "gw3", "--listen", &listen, "--cores", "1"])
        .arg("--data-dir")
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    cluster.extra.push(gw3);

    // 1. SIGTERM the gateway alice is on: GoAway(SHUTDOWN, ≥ 1 s), reconnect
    //    to another gateway, Sync.
    let expected = send(&alice, &conv, "t", 150);
    ra.wait("traffic", T, |e| sent_in(e) >= 20);
    let victim = gateway_of(&ra);
    stack::signal(pid_of(&victim), SIGTERM).unwrap();
    let got = rb.wait_messages(&conv, 150);
    assert_exactly_once_in_order(&format!("SIGTERM {victim}"), &got, &expected);
    ra.wait_connected(2);
    let ev = ra.snapshot();
    let (lost, back) = first_reconnect(&ev);
    let waited = ev[back].0.duration_since(ev[lost].0);
    assert!(
        waited >= Duration::from_millis(1_000),
        "reconnected {waited:?} after GoAway"
    );
    assert!(
        ev[back..]
            .iter()
            .any(|(_, e)| matches!(e, ClientEvent::SyncComplete)),
        "synced after reconnecting"
    );
    assert_ne!(gateway_of(&ra), victim);

    // 2. SIGKILL the gateway bob is on now: no GoAway, a dead socket.
    let expected2 = send(&alice, &conv, "k", 150);
    rb.wait("traffic", T, |e| messages_in(e, &conv) >= 170);
    let victim2 = gateway_of(&rb);
    let pid2 = match victim2.as_str() {
        "gw3" => cluster.extra[0].id(),
        name => pid_of(name),
    };
    stack::signal(pid2, SIGKILL).unwrap();
    let got = rb.wait_messages(&conv, 300);
    let got2: Vec<_> = got.into_iter().skip(150).collect();
    assert_exactly_once_in_order(&format!("SIGKILL {victim2}"), &got2, &expected2);
    assert!(
        connected_count(
            &rb.snapshot()
                .into_iter()
                .map(|(_, e)| e)
                .collect::<Vec<_>>()
        ) >= 2
    );
    alice.shutdown();
    drop(cluster);
}
