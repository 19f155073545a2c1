//! The `palaver` binary against an in-process gateway: dev certificates and
//! tokens that the gateway accepts, the frame decoder, and two `palaver chat`
//! processes talking to each other.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use palaver_gateway::{build_backend, Config, GatewayHandle};
use palaver_testkit::client::{Client, ConnectOptions};

const T: Duration = Duration::from_secs(15);

fn palaver() -> Command {
    Command::new(env!("CARGO_BIN_EXE_palaver"))
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("palaver-cli-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn gateway(dir: &Path, tune: impl FnOnce(&mut Config)) -> GatewayHandle {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cores: 1,
        data_dir: dir.to_path_buf(),
        ..Default::default()
    };
    tune(&mut config);
    GatewayHandle::start(config.clone(), build_backend(&config)).unwrap()
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn token_minted_from_the_data_dir_is_accepted_by_a_default_gateway() {
    let dir = temp_dir("token");
    // The CLI runs first and creates the secret; the gateway reuses it.
    let token = run_ok(
        palaver()
            .arg("token")
            .args(["--user", "alice", "--data-dir"])
            .arg(&dir),
    );
    let gw = gateway(&dir, |_| {});
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    let mut c = Client::connect(&ConnectOptions::new(gw.local_addr, ca)).unwrap();
    let w = c.hello(token.trim(), "phone", T).unwrap();
    assert_eq!(w.user_id, "alice");

    let bad = palaver()
        .args(["token", "--user", "not valid"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--user"));
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn certs_command_output_serves_a_gateway() {
    let dir = temp_dir("certs");
    let out = dir.join("pki");
    run_ok(
        palaver()
            .arg("certs")
            .arg("--out")
            .arg(&out)
            .args(["--host", "localhost,127.0.0.1"]),
    );
    let gw = gateway(&dir, |c| {
        c.tls.cert = Some(out.join("server.pem"));
        c.tls.key = Some(out.join("server.key"));
    });
    let ca = std::fs::read(out.join("ca.pem")).unwrap();
    let c = Client::connect(&ConnectOptions::new(gw.local_addr, ca)).unwrap();
    assert_eq!(c.alpn(), Some(palaver_protocol::ALPN));
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn decode_prints_frames_and_rejects_non_hex() {
    let out = run_ok(palaver().args(["decode", "06 08 01 62 02 08 07"]));
    assert!(out.contains("Ping"), "{out}");
    assert!(out.contains("nonce: 7"), "{out}");
    let mut child = palaver()
        .args(["decode", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"0x06 0x08 0x01 0x62 0x02 0x08 0x09\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("nonce: 9"));
    let bad = palaver().args(["decode", "zz"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not hex"));
}

/// A running `palaver chat` whose output lines arrive on a channel.
struct Chat {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Chat {
    fn start(dir: &Path, addr: std::net::SocketAddr, user: &str, peer: &str) -> Chat {
        let mut child = palaver()
            .args([
                "chat",
                "--user",
                user,
                "--to",
                peer,
                "--addr",
                &addr.to_string(),
            ])
            .arg("--data-dir")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Chat { child, lines }
    }

    fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn expect(&self, needle: &str) -> String {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no output line containing {needle:?}"),
            }
        }
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        // Closing stdin ends the chat.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + T;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_chat_processes_talk() {
    let dir = temp_dir("chat");
    let gw = gateway(&dir, |_| {});
    let mut alice = Chat::start(&dir, gw.local_addr, "alice", "bob");
    alice.expect("connected as alice");
    let bob = Chat::start(&dir, gw.local_addr, "bob", "alice");
    bob.expect("connected as bob");
    alice.say("hello bob");
    alice.expect("(sent #1 in dm:alice:bob)");
    let line = bob.expect("hello bob");
    assert!(line.contains("alice: hello bob"), "{line}");
    // bob's client acknowledged delivery on its own.
    alice.expect("bob received up to #1");
    alice.say("/quit");
    drop((alice, bob));
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}
