//! The admin endpoint (`/metrics`, `/healthz`) under abuse, against a real
//! `palaver-gateway` process (so its memory can be read from /proc): clients
//! holding connections open with unfinished requests do not stop `/healthz`
//! from answering, and an oversized request head is refused with 431 and
//! closed without the gateway buffering it.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use palaver_gateway::admin::{MAX_CONNECTIONS, MAX_HEAD_BYTES};

/// How long a client waits for an answer before calling the endpoint stuck.
/// A hang guard, not a measurement: answers come in milliseconds.
const GUARD: Duration = Duration::from_secs(30);

/// A `palaver-gateway` process (embedded engine, dev credentials in a temp
/// dir), killed when dropped.
struct Gateway {
    child: Child,
    admin: SocketAddr,
    dir: PathBuf,
}

impl Gateway {
    fn start(tag: &str) -> Gateway {
        let dir =
            std::env::temp_dir().join(format!("palaver-admin-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut child = Command::new(env!("CARGO_BIN_EXE_palaver-gateway"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--cores", "1", "--data-dir"])
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting palaver-gateway");
        // The banner names the admin address: "  admin:     http://ADDR/metrics ...".
        let mut stdout = child.stdout.take().unwrap();
        let mut banner = Vec::new();
        let mut byte = [0u8; 1];
        let admin = loop {
            match stdout.read(&mut byte) {
                Ok(1) => banner.push(byte[0]),
                _ => panic!(
                    "gateway exited before naming its admin address: {}",
                    String::from_utf8_lossy(&banner)
                ),
            }
            let text = String::from_utf8_lossy(&banner);
            if let Some(line) = text
                .lines()
                .find(|l| l.contains("admin:") && text.ends_with('\n'))
            {
                let addr = line
                    .split("http://")
                    .nth(1)
                    .and_then(|s| s.split('/').next())
                    .expect("admin address in banner");
                break addr.parse().expect("admin address");
            }
        };
        // Keep the pipe open (and drained) so the gateway never blocks on stdout.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        Gateway { child, admin, dir }
    }

    /// Peak resident set size of the gateway process so far (VmHWM), bytes:
    /// a buffer allocated and freed again still shows.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kb * 1024
    }

    /// One request, the whole response (read to the server's close).
    fn request(&self, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(self.admin).unwrap();
        s.set_read_timeout(Some(GUARD)).unwrap();
        s.write_all(raw).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)
            .expect("admin endpoint answered and closed");
        String::from_utf8_lossy(&resp).into_owned()
    }

    fn get(&self, path: &str) -> String {
        self.request(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn assert_healthy(gw: &Gateway) {
    let resp = gw.get("/healthz");
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp:?}");
    assert!(resp.ends_with("\r\n\r\nok\n"), "{resp:?}");
}

#[test]
fn slow_clients_holding_connections_do_not_stop_healthz() {
    let gw = Gateway::start("slowloris");
    assert_healthy(&gw);
    // Twice as many connections as the endpoint keeps, each with a request
    // that never ends: the request line and the start of a header, then one
    // more header byte, the way a slowloris client trickles.
    let mut slow: Vec<TcpStream> = (0..2 * MAX_CONNECTIONS)
        .map(|_| {
            let mut s = TcpStream::connect(gw.admin).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").unwrap();
            s
        })
        .collect();
    for s in &mut slow {
        // The server may have evicted this one already: then the write fails.
        let _ = s.write_all(b"a");
    }
    // While they are held open, a scraper still gets its answer.
    assert_healthy(&gw);
    let metrics = gw.get("/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics:?}");
    // And the server ends every slow one itself (evicted, or 408 at the
    // request deadline): each read ends in EOF or a reset, never our guard.
    for mut s in slow {
        s.set_read_timeout(Some(GUARD)).unwrap();
        let mut resp = Vec::new();
        match s.read_to_end(&mut resp) {
            Ok(_) => {
                let text = String::from_utf8_lossy(&resp);
                assert!(
                    text.is_empty() || text.starts_with("HTTP/1.1 408 "),
                    "{text:?}"
                );
            }
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        }
    }
}

#[test]
fn oversized_request_line_gets_431_and_is_not_buffered() {
    let gw = Gateway::start("oversized");
    assert_healthy(&gw);
    let peak_before = gw.peak_rss();
    // A 64 MiB request line with no newline, written while we wait for the
    // answer.
    const REQUEST_BYTES: usize = 64 << 20;
    let mut writer = TcpStream::connect(gw.admin).unwrap();
    let mut reader = writer.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let chunk = vec![b'a'; 64 * 1024];
        let mut sent = 0;
        if writer.write_all(b"GET /").is_err() {
            return sent;
        }
        while sent < REQUEST_BYTES {
            match writer.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent
    });
    reader.set_read_timeout(Some(GUARD)).unwrap();
    let mut resp = Vec::new();
    let end = reader.read_to_end(&mut resp);
    drop(reader);
    let sent = sender.join().unwrap();
    let grown = gw.peak_rss().saturating_sub(peak_before);
    assert!(
        grown < 8 << 20,
        "gateway peak RSS grew by {grown} bytes for a {REQUEST_BYTES}-byte request ({sent} bytes sent)"
    );
    let text = String::from_utf8_lossy(&resp);
    assert!(
        text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{text:?} ({end:?})"
    );
    // Closed by the server: EOF, or a reset if the sender was still writing.
    match end {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
    assert_healthy(&gw);
}

#[test]
fn too_many_header_bytes_get_431() {
    let gw = Gateway::start("headers");
    let mut req = b"GET /healthz HTTP/1.1\r\n".to_vec();
    while req.len() <= MAX_HEAD_BYTES {
        req.extend_from_slice(format!("X-Pad: {}\r\n", "p".repeat(64)).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    let resp = gw.request(&req);
    assert!(resp.starts_with("HTTP/1.1 431 "), "{resp:?}");
    // Just under the limit is still served.
    let mut req = b"GET /healthz HTTP/1.1\r\n".to_vec();
    let pad = format!("X-Pad: {}\r\n", "p".repeat(64));
    while req.len() + pad.len() + 2 <= MAX_HEAD_BYTES {
        req.extend_from_slice(pad.as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    assert!(req.len() <= MAX_HEAD_BYTES);
    let resp = gw.request(&req);
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp:?}");
}
