//! Operations: graceful drain, certificate reload without dropping
//! connections, session resumption, client certificates, the admin port, and
//! the real binary (dev credentials, SIGHUP, SIGTERM → exit 0).
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use palaver_gateway::devcerts;
use palaver_protocol::pb::{self, frame::Body};
use palaver_testkit::client::{Client, ConnectOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

#[test]
fn drain_sends_goaway_with_jittered_delay_then_stops() {
    let t = start(|c| {
        c.drain.reconnect_delay_ms = 500;
        c.drain.reconnect_jitter_ms = 1000;
        c.drain.deadline_ms = 3000;
    });
    let mut clients: Vec<Client> = ["alice", "bob", "carol"]
        .iter()
        .map(|u| t.login(u, "phone"))
        .collect();
    let handshaking = TcpStream::connect(t.addr).unwrap();
    // TLS done, no Hello yet: SPEC §15 closes it without a frame.
    let mut unwelcomed = t.connect();
    t.gw().drain();
    for c in &mut clients {
        let frames = c.expect_close(T).unwrap();
        // SPEC §4 DRAINING: GoAway is the last frame of the connection.
        assert!(
            matches!(
                frames.last().and_then(|f| f.body.as_ref()),
                Some(Body::GoAway(_))
            ),
            "{frames:?}"
        );
        let goaway = frames
            .iter()
            .find_map(|f| match &f.body {
                Some(Body::GoAway(g)) => Some(g.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("expected GoAway, got {frames:?}"));
        assert_eq!(goaway.reason, pb::GoAwayReason::Shutdown as i32);
        assert!(
            (500..1500).contains(&goaway.reconnect_delay_ms),
            "{}",
            goaway.reconnect_delay_ms
        );
    }
    assert_eq!(unwelcomed.expect_close(T).unwrap(), vec![]);
    wait_until(T, "core threads to finish", || t.gw().is_finished());
    // The listener is closed: new connections are refused.
    assert!(TcpStream::connect(t.addr).is_err());
    drop(handshaking);
}

#[test]
fn certificate_reload_keeps_connections_and_serves_the_new_cert() {
    let t = start(|_| {});
    let mut before = t.login("alice", "phone");
    let old_ca = t.ca.clone();
    // New CA and server certificate in the same files.
    devcerts::write_dev_certs(&t.dir, &[]).unwrap();
    t.gw().reload_tls().unwrap();
    let new_ca = std::fs::read(t.dir.join(devcerts::CA_CERT_FILE)).unwrap();
    assert_ne!(old_ca, new_ca);

    assert_healthy(&mut before);
    // New handshakes use the new certificate: old CA no longer verifies it.
    assert!(Client::connect(&ConnectOptions::new(t.addr, old_ca)).is_err());
    let mut c = Client::connect(&ConnectOptions::new(t.addr, new_ca)).unwrap();
    c.hello(&t.token("bob"), "phone", T).unwrap();
    assert_healthy(&mut c);

    // A broken file keeps the current certificate in force.
    std::fs::write(t.dir.join(devcerts::SERVER_CERT_FILE), "garbage").unwrap();
    assert!(t.gw().reload_tls().is_err());
    assert_healthy(&mut before);
    assert!(t
        .gw()
        .metrics_text()
        .contains("palaver_tls_reloads_failed_total{gateway=\"gw-test\"} 1"));
}

#[test]
fn reconnect_resumes_the_tls_session_with_a_ticket() {
    let t = start(|_| {});
    let opts = t.opts();
    let config = opts.tls_config().unwrap();
    let mut first = Client::connect_with(&opts, config.clone()).unwrap();
    assert!(!first.resumed());
    // Tickets arrive after the handshake; a round trip makes sure we have one.
    first.hello(&t.token("alice"), "phone", T).unwrap();
    drop(first);
    let mut second = Client::connect_with(&opts, config).unwrap();
    assert!(second.resumed(), "second connection should resume");
    second.hello(&t.token("alice"), "phone", T).unwrap();
    assert_healthy(&mut second);
}

#[test]
fn client_certificates_are_required_when_a_client_ca_is_set() {
    // Client CA: a separate dev CA; sign a client certificate with it.
    let ca_dir = temp_dir("client-ca");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "client CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(ca_dir.join("client-ca.pem"), ca_cert.pem()).unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client_params = rcgen::CertificateParams::new(vec!["phone-1".to_string()]).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();

    let client_ca = ca_dir.join("client-ca.pem");
    let t = start(move |c| c.tls.client_ca = Some(client_ca));
    // No client certificate: TLS 1.3 clients learn it on their first read.
    let refused =
        Client::connect(&t.opts()).and_then(|mut c| c.hello(&t.token("alice"), "phone", T));
    assert!(refused.is_err(), "connection without client cert must fail");

    let mut opts = t.opts();
    opts.client_cert = Some((
        client_cert.pem().into_bytes(),
        client_key.serialize_pem().into_bytes(),
    ));
    let mut c = Client::connect(&opts).unwrap();
    c.hello(&t.token("alice"), "phone", T).unwrap();
    assert_healthy(&mut c);
    let _ = std::fs::remove_dir_all(&ca_dir);
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn admin_port_serves_metrics_and_health() {
    let t = start(|c| c.admin = Some("127.0.0.1:0".parse().unwrap()));
    let admin = t.gw().admin_addr().unwrap();
    let mut c = t.login("alice", "phone");
    c.ping(1, T).unwrap();
    let (status, body) = http_get(admin, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, metrics) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    let connections: i64 = metrics
        .lines()
        .filter(|l| l.starts_with("palaver_connections{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(connections, 1);
    assert!(metrics.contains("type=\"ping\"} 1"), "{metrics}");
    assert!(metrics.contains("palaver_handshakes_ok_total"));
    assert_eq!(http_get(admin, "/nope").0, 404);
    t.gw().drain();
    assert_eq!(http_get(admin, "/healthz").0, 503);
}

#[test]
fn the_binary_runs_with_dev_credentials_reloads_on_sighup_and_drains_on_sigterm() {
    let dir = temp_dir("bin");
    let mut child = Command::new(env!("CARGO_BIN_EXE_palaver-gateway"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--cores",
            "1",
            "--gateway-id",
            "gw-bin",
        ])
        .args(["--drain-deadline-ms", "2000"])
        .arg("--data-dir")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let addr: std::net::SocketAddr = first
        .split(" listening on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected banner {first:?}"))
        .parse()
        .unwrap();
    // The banner names the backend that runs.
    let mut second = String::new();
    out.read_line(&mut second).unwrap();
    assert!(
        second.starts_with("  backend:   embedded engine"),
        "{second:?}"
    );
    // With no --max-connections, the cap follows the (raised) file limit.
    let mut third = String::new();
    out.read_line(&mut third).unwrap();
    let numbers: Vec<u64> = third
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        third.starts_with("  limits:    max ") && numbers.len() == 2,
        "{third:?}"
    );
    let (cap, nofile) = (numbers[0], numbers[1]);
    assert_eq!(
        cap,
        palaver_gateway::config::derive_max_connections(nofile) as u64,
        "{third:?}"
    );
    let (soft, hard) = nofile_limits();
    if hard == u64::MAX {
        assert!(nofile >= soft, "{third:?}");
    } else {
        // The child raised its soft limit to the hard one it inherited.
        assert_eq!(nofile, hard, "{third:?}");
    }
    // The data dir now holds the dev CA and secret, as `palaver token` expects.
    let ca = std::fs::read(dir.join(devcerts::CA_CERT_FILE)).unwrap();
    let secret = devcerts::read_secret(&dir.join(devcerts::JWT_SECRET_FILE)).unwrap();
    let mut c = Client::connect(&ConnectOptions::new(addr, ca.clone())).unwrap();
    c.hello(
        &palaver_gateway::auth::mint_hs256(&secret, "alice", None, 60),
        "phone",
        T,
    )
    .unwrap();

    // SIGHUP: reload (same files); the connection survives.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    assert_healthy(&mut c);

    // SIGTERM: GoAway(SHUTDOWN), then exit 0.
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let frames = c.expect_close(T).unwrap();
    assert!(frames.iter().any(|f| matches!(&f.body,
        Some(Body::GoAway(g)) if g.reason == pb::GoAwayReason::Shutdown as i32)));
    let mut status = None;
    wait_until(T, "gateway process to exit", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "exit status {status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_low_soft_file_limit_is_raised_and_an_explicit_cap_wins() {
    let (_, hard) = nofile_limits();
    if hard == u64::MAX || hard <= 1024 {
        return; // nothing to raise on this host
    }
    let dir = temp_dir("nofile");
    let banner = |extra: &str| {
        // Start with the soft limit lowered to 1024, read the banner, stop.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -S -n 1024 && exec \"$0\" --listen 127.0.0.1:0 --cores 1 --data-dir \"$1\" {extra}"
            ))
            .arg(env!("CARGO_BIN_EXE_palaver-gateway"))
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        for _ in 0..3 {
            line.clear();
            out.read_line(&mut line).unwrap();
        }
        child.kill().unwrap();
        child.wait().unwrap();
        line
    };
    let derived = format!(
        "  limits:    max {} connections (file limit {hard})",
        palaver_gateway::config::derive_max_connections(hard)
    );
    assert_eq!(banner("").trim_end(), derived);
    assert_eq!(
        banner("--max-connections 5").trim_end(),
        format!("  limits:    max 5 connections (file limit {hard})")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn invalid_configuration_fails_at_start_naming_the_field() {
    let dir = temp_dir("badcfg");
    let cfg = dir.join("gw.toml");
    std::fs::write(&cfg, "[limits]\nmax_outbound_bytes = 10\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_palaver-gateway"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.max_outbound_bytes"), "{err}");

    std::fs::write(&cfg, "[limits]\nheartbeat = 10\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_palaver-gateway"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("heartbeat"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eddsa_tokens_with_a_configured_public_key() {
    let dir = temp_dir("eddsa");
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let public = dir.join("jwt.pub.pem");
    std::fs::write(&public, kp.public_key_pem()).unwrap();
    let t = start(move |c| c.auth.ed25519_public_key_file = Some(public));
    let token =
        palaver_gateway::auth::mint_eddsa(kp.serialize_pem().as_bytes(), "erin", None, 60).unwrap();
    let mut c = t.connect();
    assert_eq!(c.hello(&token, "phone", T).unwrap().user_id, "erin");
    // The dev HS256 secret is not accepted when a key is configured.
    let mut c2 = t.connect();
    assert!(c2.hello(&t.token("mallory"), "phone", T).is_err());
    assert_healthy(&mut c);
    let _ = std::fs::remove_dir_all(&dir);
}

/// (soft, hard) RLIMIT_NOFILE of this process, via `ulimit` in a shell that
/// inherits it (the test crate has no libc dependency). Unlimited is u64::MAX.
fn nofile_limits() -> (u64, u64) {
    let get = |flag: &str| {
        let out = Command::new("sh")
            .args(["-c", &format!("ulimit {flag} -n")])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if text == "unlimited" {
            u64::MAX
        } else {
            text.parse().unwrap()
        }
    };
    (get("-S"), get("-H"))
}
