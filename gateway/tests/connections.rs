//! Connection-level behaviour over real TLS on loopback: handshake, ALPN,
//! authentication, malformed input, state violations, timeouts, limits.
//! Every bad-input test also checks that a healthy connection is unaffected.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use palaver_gateway::auth;
use palaver_protocol::pb::{self, frame::Body};
use palaver_testkit::client::{text_send, Client, ClientError};

#[test]
fn handshake_alpn_hello_and_ping() {
    let t = start(|_| {});
    let mut c = t.connect();
    assert_eq!(c.alpn(), Some(palaver_protocol::ALPN));
    let w = c.hello(&t.token("alice"), "phone", T).unwrap();
    assert_eq!(w.user_id, "alice");
    assert_eq!(w.protocol_version, 1);
    assert_eq!(w.heartbeat_interval_ms, 30_000);
    assert!(w.session_id.starts_with("gw-test/"));
    assert_eq!(w.limits.unwrap().max_frame_bytes, 65_536);
    assert!(w.server_time_ms > 1_600_000_000_000);
    c.ping(42, T).unwrap();
    // Pings never reach the backend; they are counted as frames in.
    let pings = t.metric(|m| m.frames_in[3].load(std::sync::atomic::Ordering::Relaxed) as i64);
    assert!(pings >= 1);
    assert!(t.metric(|m| m.handshakes_ok.load(std::sync::atomic::Ordering::Relaxed) as i64) >= 1);
}

#[test]
fn no_alpn_is_served_as_palaver_1() {
    // SPEC §1: a ClientHello without the ALPN extension is accepted and
    // treated as palaver/1.
    let t = start(|_| {});
    let mut opts = t.opts();
    opts.alpn = vec![];
    let mut c = Client::connect(&opts).expect("a handshake without ALPN succeeds");
    assert_eq!(c.alpn(), None, "no ALPN offered, none selected");
    let w = c.hello(&t.token("alice"), "phone", T).unwrap();
    assert_eq!(w.user_id, "alice");
    assert_healthy(&mut c);
}

#[test]
fn wrong_alpn_gets_no_application_protocol() {
    // SPEC §1: an ALPN list without palaver/1 is refused with the TLS alert
    // no_application_protocol.
    let t = start(|_| {});
    let mut healthy = t.login("alice", "phone");
    for alpn in [
        vec![b"h2".to_vec()],
        vec![b"palaver/2".to_vec(), b"http/1.1".to_vec()],
    ] {
        let mut opts = t.opts();
        opts.alpn = alpn.clone();
        match Client::connect(&opts) {
            Err(ClientError::Tls(rustls::Error::AlertReceived(
                rustls::AlertDescription::NoApplicationProtocol,
            ))) => {}
            Err(e) => panic!("ALPN {alpn:?}: expected no_application_protocol, got {e}"),
            Ok(_) => panic!("handshake with ALPN {alpn:?} must fail"),
        }
    }
    t.wait_metric(
        "failed handshakes",
        |m| {
            m.handshakes_failed
                .load(std::sync::atomic::Ordering::Relaxed) as i64
        },
        |v| v >= 2,
    );
    assert_healthy(&mut healthy);
}

#[test]
fn bad_token_expired_token_and_wrong_version() {
    let t = start(|_| {});
    let mut healthy = t.login("alice", "phone");

    let mut c = t.connect();
    match c.hello("not-a-jwt", "phone", T) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, 1003),
        other => panic!("expected UNAUTHENTICATED, got {other:?}"),
    }
    c.expect_close(T).unwrap();

    let wrong_key = auth::mint_hs256(b"some-other-secret-some-other-secret", "bob", None, 3600);
    let mut c = t.connect();
    match c.hello(&wrong_key, "phone", T) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, 1003),
        other => panic!("expected UNAUTHENTICATED, got {other:?}"),
    }

    let expired = auth::mint_hs256(&t.secret, "bob", None, -600);
    let mut c = t.connect();
    match c.hello(&expired, "phone", T) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, 1004),
        other => panic!("expected TOKEN_EXPIRED, got {other:?}"),
    }
    c.expect_close(T).unwrap();

    let mut c = t.connect();
    let hello = pb::Hello {
        protocol_version: 7,
        token: t.token("bob"),
        device_id: "phone".into(),
        ..Default::default()
    };
    match c.hello_with(hello, T) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, 1002),
        other => panic!("expected UNSUPPORTED_VERSION, got {other:?}"),
    }
    c.expect_close(T).unwrap();

    assert_healthy(&mut healthy);
}

#[test]
fn unsupported_version_names_the_supported_versions() {
    // SPEC §4.1, §16: the UNSUPPORTED_VERSION message names the versions
    // the server supports.
    let t = start(|_| {});
    let mut c = t.connect();
    let hello = pb::Hello {
        protocol_version: 2,
        token: t.token("bob"),
        device_id: "phone".into(),
        ..Default::default()
    };
    match c.hello_with(hello, T) {
        Err(ClientError::Server(e)) => {
            assert_eq!(e.code, 1002);
            assert_eq!(
                e.message,
                "protocol version 2 is not supported; supported: 1"
            );
        }
        other => panic!("expected UNSUPPORTED_VERSION, got {other:?}"),
    }
    c.expect_close(T).unwrap();
}

fn hello_frame(request_id: u32, token: String) -> pb::Frame {
    palaver_protocol::frame(
        request_id,
        Body::Hello(pb::Hello {
            protocol_version: 1,
            token,
            device_id: "phone".into(),
            ..Default::default()
        }),
    )
}

/// The frames encoded back to back: written with one TLS write.
fn pipelined(frames: &[pb::Frame]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for f in frames {
        palaver_protocol::encode_frame(f, &mut bytes);
    }
    bytes
}

#[test]
fn requests_pipelined_behind_hello_are_answered_after_welcome() {
    // SPEC §4.2: frames may follow Hello without waiting for Welcome; they
    // are processed in order once the Hello succeeded.
    let t = start(|_| {});
    let mut c = t.connect();
    let bytes = pipelined(&[
        hello_frame(1, t.token("alice")),
        palaver_protocol::frame(2, Body::Ping(pb::Ping { nonce: 7 })),
        palaver_protocol::frame(3, text_send("dm:alice:bob", "hi")),
    ]);
    c.send_raw(&bytes).unwrap();
    let first = c.recv_timeout(T, "Welcome").unwrap();
    assert_eq!(first.request_id, 1);
    assert!(
        matches!(first.body, Some(Body::Welcome(_))),
        "Welcome comes first, got {first:?}"
    );
    let (mut pong, mut ack) = (false, false);
    while !(pong && ack) {
        let f = c.recv_timeout(T, "Pong and SendAck").unwrap();
        match (f.request_id, &f.body) {
            (2, Some(Body::Pong(p))) if p.nonce == 7 => pong = true,
            (3, Some(Body::SendAck(a))) if a.seq == 1 => ack = true,
            _ => panic!("unexpected {f:?}"),
        }
    }
    assert_healthy(&mut c);
}

#[test]
fn frames_pipelined_behind_a_failed_hello_are_dropped() {
    let t = start(|_| {});
    let mut healthy = t.login("alice", "phone");

    // Refused Hello: its Error, the close, and nothing for the Ping behind it.
    let mut c = t.connect();
    let bytes = pipelined(&[
        hello_frame(1, "not-a-jwt".into()),
        palaver_protocol::frame(2, Body::Ping(pb::Ping { nonce: 7 })),
    ]);
    c.send_raw(&bytes).unwrap();
    let frames = c.expect_close(T).unwrap();
    assert_eq!(frames.len(), 1, "only the Error, got {frames:?}");
    assert_eq!(frames[0].request_id, 1);
    assert_eq!(error_code(&frames[0]), Some(1003));

    // A second Hello pipelined behind an accepted one is still a violation,
    // judged after Welcome.
    let mut c = t.connect();
    let bytes = pipelined(&[
        hello_frame(1, t.token("bob")),
        hello_frame(2, t.token("bob")),
    ]);
    c.send_raw(&bytes).unwrap();
    let frames = c.expect_close(T).unwrap();
    assert!(
        matches!(
            frames.first().and_then(|f| f.body.as_ref()),
            Some(Body::Welcome(_))
        ),
        "{frames:?}"
    );
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(frames[1].request_id, 2);
    assert_eq!(error_code(&frames[1]), Some(1005));

    assert_healthy(&mut healthy);
}

/// Claims for tokens shaped by hand (SPEC §4 *Tokens*); `exp` is relative
/// to the moment the token is signed.
#[derive(serde::Serialize, Default, Clone)]
struct RawClaims {
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
}

#[test]
fn token_claims_as_spec_states() {
    let t = start(|_| {});
    let sign = |claims: &RawClaims| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let claims = RawClaims {
            exp: claims.exp.map(|offset| now + offset),
            ..claims.clone()
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&t.secret),
        )
        .unwrap()
    };
    let valid = || RawClaims {
        sub: Some("alice".into()),
        exp: Some(600),
        ..Default::default()
    };
    let cases: Vec<(&str, RawClaims, Option<u32>)> = vec![
        ("valid", valid(), None),
        (
            "unknown claims are ignored",
            RawClaims {
                iss: Some("anyone".into()),
                ..valid()
            },
            None,
        ),
        (
            "device claim matching Hello.device_id",
            RawClaims {
                device: Some("phone".into()),
                ..valid()
            },
            None,
        ),
        (
            "expired within the 5 s leeway",
            RawClaims {
                exp: Some(-1),
                ..valid()
            },
            None,
        ),
        (
            "no exp",
            RawClaims {
                exp: None,
                ..valid()
            },
            Some(1003),
        ),
        (
            "no sub",
            RawClaims {
                sub: None,
                ..valid()
            },
            Some(1003),
        ),
        (
            "expired beyond the leeway",
            RawClaims {
                exp: Some(-60),
                ..valid()
            },
            Some(1004),
        ),
        (
            "aud present",
            RawClaims {
                aud: Some("palaver".into()),
                ..valid()
            },
            Some(1003),
        ),
        (
            "sub not a user id",
            RawClaims {
                sub: Some("al ice".into()),
                ..valid()
            },
            Some(1003),
        ),
        (
            "device claim for another device",
            RawClaims {
                device: Some("tablet".into()),
                ..valid()
            },
            Some(1003),
        ),
    ];
    for (what, claims, code) in cases {
        let mut c = t.connect();
        match (c.hello(&sign(&claims), "phone", T), code) {
            (Ok(w), None) => assert_eq!(w.user_id, "alice", "{what}"),
            (Err(ClientError::Server(e)), Some(code)) => {
                assert_eq!(e.code, code, "{what}: {e:?}");
                c.expect_close(T).unwrap();
            }
            (other, _) => panic!("{what}: expected {code:?}, got {other:?}"),
        }
    }
}

#[test]
fn garbage_before_the_tls_handshake() {
    let t = start(|_| {});
    let mut healthy = t.login("alice", "phone");
    let mut raw = TcpStream::connect(t.addr).unwrap();
    raw.set_read_timeout(Some(T)).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // The server answers with at most a TLS alert, then closes.
    let mut buf = Vec::new();
    let _ = raw.read_to_end(&mut buf);
    assert!(buf.len() < 64, "unexpected answer {buf:?}");
    if let Some(&first) = buf.first() {
        assert_eq!(first, 0x15, "only a TLS alert record may come back");
    }
    t.wait_metric(
        "failed handshake",
        |m| {
            m.handshakes_failed
                .load(std::sync::atomic::Ordering::Relaxed) as i64
        },
        |v| v >= 1,
    );
    assert_healthy(&mut healthy);
}

#[test]
fn garbage_after_the_handshake_outside_and_inside_tls() {
    let t = start(|_| {});
    let mut healthy = t.login("alice", "phone");

    // Raw bytes on the socket that are not TLS records: the TLS layer rejects them.
    let mut c = t.login("bob", "phone");
    c.tcp().write_all(&[0x42; 64]).unwrap();
    c.expect_close(T).unwrap();

    // Bytes inside TLS that are not a frame: MALFORMED_FRAME.
    let mut c = t.login("carol", "phone");
    c.send_raw(&[0x03, 0xff, 0xff, 0xff]).unwrap();
    expect_error_and_close(&mut c, 1000);

    assert_healthy(&mut healthy);
}

#[test]
fn oversized_frame_is_rejected_at_its_prefix() {
    let t = start(|c| {
        c.limits.max_frame_bytes = 4096;
        c.limits.max_body_bytes = 4000;
    });
    let mut healthy = t.login("alice", "phone");
    let mut c = t.login("bob", "phone");
    let mut bytes = Vec::new();
    prost::encoding::encode_varint(100_000, &mut bytes);
    bytes.extend_from_slice(&[0u8; 8192]);
    c.send_raw(&bytes).unwrap();
    expect_error_and_close(&mut c, 1001);
    assert_healthy(&mut healthy);
}

#[test]
fn frames_illegal_in_the_current_state() {
    let t = start(|_| {});
    let mut healthy = t.login("alice", "phone");

    // Send before Hello.
    let mut c = t.connect();
    c.request(text_send("dm:alice:bob", "hi")).unwrap();
    expect_error_and_close(&mut c, 1005);

    // A second Hello.
    let mut c = t.login("bob", "phone");
    c.request(Body::Hello(pb::Hello {
        protocol_version: 1,
        token: t.token("bob"),
        device_id: "phone".into(),
        ..Default::default()
    }))
    .unwrap();
    expect_error_and_close(&mut c, 1005);

    // A server-only frame from a client.
    let mut c = t.login("carol", "phone");
    c.request(Body::Welcome(pb::Welcome::default())).unwrap();
    expect_error_and_close(&mut c, 1005);

    // Invalid device id in Hello.
    let mut c = t.connect();
    match c.hello(&t.token("dave"), "bad device id!", T) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, 1005),
        other => panic!("expected PROTOCOL_VIOLATION, got {other:?}"),
    }

    assert_healthy(&mut healthy);
}

#[test]
fn slowloris_handshake_is_closed_at_the_handshake_timeout() {
    // The real timeout (10 s), the clock skipped past it.
    let t = start(|_| {});
    let handshake_timeout = u64::from(t.gw().config().limits.handshake_timeout_ms);
    let mut healthy = t.login("alice", "phone");
    let mut raw = TcpStream::connect(t.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    // A TLS record header announcing a big ClientHello, then one byte at a time.
    raw.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
    // Accepted (its deadline counts from there), then trickling on.
    wait_until(T, "the trickler accepted", || t.gw().connections() == 2);
    t.gw()
        .skip_time(Duration::from_millis(handshake_timeout - 1_000));
    raw.write_all(&[0x01]).unwrap();
    t.gw().skip_time(Duration::from_millis(1_000));
    let started = Instant::now();
    let mut closed = false;
    while started.elapsed() < T {
        if raw.write_all(&[0x01]).is_err() {
            closed = true;
            break;
        }
        let mut b = [0u8; 16];
        match raw.read(&mut b) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "trickling handshake must be closed");
    t.wait_metric(
        "handshake timeout",
        |m| {
            m.handshake_timeouts
                .load(std::sync::atomic::Ordering::Relaxed) as i64
        },
        |v| v >= 1,
    );
    assert_healthy(&mut healthy);
}

#[test]
fn hello_timeout_after_a_silent_handshake() {
    let t = start(|_| {});
    let hello_timeout = u64::from(t.gw().config().limits.hello_timeout_ms);
    let mut c = t.connect();
    // A second short of it: still open.
    t.gw()
        .skip_time(Duration::from_millis(hello_timeout - 1_000));
    assert!(
        matches!(c.recv(Duration::from_millis(300)), Ok(None)),
        "open before the timeout"
    );
    t.gw().skip_time(Duration::from_millis(1_000));
    // Well before the real 10 s: the skip is what closed it.
    let frames = c.expect_close(Duration::from_secs(3)).expect("closed");
    assert!(
        frames.iter().any(|f| error_code(f) == Some(1006)),
        "expected HELLO_TIMEOUT, got {frames:?}"
    );
}

#[test]
fn heartbeat_timeout_closes_silent_sessions_only() {
    // The real interval (30 s), the clock skipped one interval at a time.
    let t = start(|_| {});
    let interval = Duration::from_millis(u64::from(t.gw().config().limits.heartbeat_interval_ms));
    let mut healthy = t.login("alice", "phone");
    let mut silent = t.login("bob", "phone");
    // alice pings at the announced interval; bob says nothing. bob's
    // deadline is 2.5 intervals after his Hello: closed after the 3rd skip.
    let mut bob_frames = Vec::new();
    let mut bob_closed = false;
    let mut skips = 0;
    while skips < 5 && !bob_closed {
        healthy.ping(rand_nonce(), T).unwrap();
        t.gw().skip_time(interval);
        skips += 1;
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until && !bob_closed {
            match silent.recv(Duration::from_millis(100)) {
                Ok(Some(f)) => bob_frames.push(f),
                Ok(None) => {}
                Err(_) => bob_closed = true,
            }
        }
    }
    assert!(
        skips >= 3,
        "closed after {skips} intervals, before 2.5 had passed"
    );
    assert!(bob_closed, "silent session must be closed");
    assert!(
        bob_frames.iter().any(|f| error_code(f) == Some(1007)),
        "expected HEARTBEAT_TIMEOUT, got {bob_frames:?}"
    );
    assert_eq!(
        t.metric(|m| m
            .heartbeat_timeouts
            .load(std::sync::atomic::Ordering::Relaxed) as i64),
        1
    );
    assert_healthy(&mut healthy);
}

#[test]
fn send_rate_limit_is_not_fatal() {
    let t = start(|c| c.limits.max_sends_per_second = 2);
    let mut c = t.login("alice", "phone");
    let mut ids = Vec::new();
    for i in 0..6 {
        let body = text_send("dm:alice:bob", &format!("m{i}"));
        if let Body::Send(s) = &body {
            ids.push(s.client_msg_id.clone());
        }
        c.request(body).unwrap();
    }
    let limited = c
        .recv_until(T, "RATE_LIMITED", |f| error_code(f) == Some(2001))
        .unwrap();
    match limited.body {
        Some(Body::Error(e)) => assert!(ids.contains(&e.client_msg_id)),
        _ => unreachable!(),
    }
    assert_healthy(&mut c);
}

#[test]
fn server_full_refuses_cheaply_and_recovers() {
    let t = start(|c| c.limits.max_connections = 2);
    let mut a = t.login("alice", "phone");
    let _b = t.login("bob", "phone");
    assert!(
        Client::connect(&t.opts()).is_err(),
        "third connection must be refused"
    );
    assert!(t.metric(|m| m.refused_full.load(std::sync::atomic::Ordering::Relaxed) as i64) >= 1);
    assert_healthy(&mut a);
    drop(_b);
    // Capacity frees up once bob's connection is gone.
    wait_until(T, "bob's slot to free", || t.gw().connections() == 1);
    t.login("carol", "phone");
}

#[test]
fn slow_reader_is_disconnected_and_its_buffer_freed() {
    let max_out: i64 = 64 * 1024;
    let t = start(|c| {
        c.limits.max_frame_bytes = 16 * 1024;
        c.limits.max_body_bytes = 15 * 1024;
        c.limits.max_outbound_bytes = max_out as u32;
        c.limits.max_sends_per_second = 1_000_000;
        c.limits.max_account_sends_per_second = 1_000_000;
    });
    // The reader shrinks its receive buffer and then never reads.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&t.addr.into()).unwrap();
    let opts = t.opts();
    let mut reader = Client::over(sock.into(), &opts, opts.tls_config().unwrap()).unwrap();
    reader.hello(&t.token("reader"), "phone", T).unwrap();

    let mut sender = t.login("sender", "phone");
    let body = "x".repeat(14 * 1024);
    let conv = palaver_protocol::direct_conversation_id("reader", "sender");
    let slow = || {
        t.metric(|m| {
            m.slow_consumer_disconnects
                .load(std::sync::atomic::Ordering::Relaxed) as i64
        })
    };
    let mut peak = 0;
    let mut sent = 0;
    while slow() == 0 {
        assert!(
            sent < 5_000,
            "slow consumer never detected after {sent} messages"
        );
        sender.request(text_send(&conv, &body)).unwrap();
        sent += 1;
        // Keep the sender's own acks flowing so it is not the slow one.
        while sender.recv(Duration::from_millis(1)).unwrap().is_some() {}
        peak = peak.max(t.metric(|m| {
            m.outbound_buffered_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
        }));
    }
    // Gateway-side buffering never exceeded the limit (plus the GoAway).
    assert!(peak <= max_out + 1024, "buffered {peak} > {max_out}");
    // The reader's buffer is released when it is closed (linger at most 2 s).
    t.wait_metric(
        "buffer freed",
        |m| {
            m.outbound_buffered_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
        },
        |v| v == 0,
    );
    wait_until(T, "reader connection closed", || t.gw().connections() == 1);
    assert_healthy(&mut sender);
}

#[test]
fn a_burst_of_handshakes_is_spread_over_turns_and_all_complete() {
    // One handshake step per turn: most of the burst goes through the
    // deferred queue, while an established session keeps being served.
    let t = start(|c| {
        c.cores = 1;
        c.limits.handshakes_per_turn = 1;
    });
    let mut healthy = t.login("alice", "phone");
    let opts = t.opts();
    let secret = t.secret.clone();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let opts = opts.clone();
            let secret = secret.clone();
            std::thread::spawn(move || {
                (0..10)
                    .map(|i| {
                        let mut c = Client::connect(&opts).expect("handshake completes");
                        let token = auth::mint_hs256(&secret, &format!("u{w}x{i}"), None, 60);
                        c.hello(&token, "phone", T).expect("welcome");
                        c
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    while !workers.iter().all(|w| w.is_finished()) {
        assert_healthy(&mut healthy);
    }
    let clients: Vec<Client> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert_eq!(clients.len(), 40);
    assert_eq!(t.gw().connections(), 41);
}
