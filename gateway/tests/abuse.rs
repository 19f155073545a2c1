//! Hostile clients with valid tokens: each test floods one connection the way
//! an attacker would and checks the bound that holds (bytes the gateway keeps
//! for the connection, requests that reach the backend), that the abuser is
//! throttled or closed with the code SPEC names, and that a neighbour's
//! requests keep being answered. Round-trip figures are printed, not asserted
//! (timing belongs in benchmarks); the assertions are on counts and bytes.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use palaver_protocol::pb::{self, frame::Body};
use palaver_protocol::{encode_frame, frame};
use palaver_testkit::client::{new_client_msg_id, Client};

/// Bytes one read round can add to a connection's output beyond
/// `max_outbound_bytes`: one 64 KiB read of requests whose replies are at
/// most a few times their size, plus TLS record overhead.
const ROUND_SLACK: i64 = 4 * 64 * 1024;

/// A logged-in client whose socket has a tiny receive buffer, so the server's
/// output backs up into the gateway quickly.
fn login_small_window(t: &TestGateway, user: &str) -> Client {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&t.addr.into()).unwrap();
    let tcp: TcpStream = sock.into();
    let opts = t.opts();
    let mut c = Client::over(tcp, &opts, opts.tls_config().unwrap()).unwrap();
    c.hello(&t.token(user), "phone", T).expect("welcome");
    c
}

/// Writes `chunk` over and over without ever reading, until the socket stops
/// taking it (the gateway stopped reading) or `cap` bytes went out.
fn write_until_blocked(c: &mut Client, chunk: &[u8], cap: usize) -> usize {
    c.tcp()
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut written = 0;
    while written < cap {
        if c.send_raw(chunk).is_err() {
            break;
        }
        written += chunk.len();
    }
    written
}

/// Round trip of one Ping, in microseconds.
fn ping_rtt_us(c: &mut Client) -> u128 {
    let start = Instant::now();
    c.ping(rand_nonce(), T).expect("neighbour's Ping answered");
    start.elapsed().as_micros()
}

fn median(mut v: Vec<u128>) -> u128 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Floods `chunk` from a client that never reads; returns what it wrote.
/// Checks the bound on the gateway's buffered output for that connection,
/// that it is closed as a slow consumer (GoAway SLOW_CONSUMER) once it stays
/// stalled, and that a neighbour is answered throughout.
fn flood_without_reading(t: &TestGateway, what: &str, chunk: &[u8]) {
    let max_outbound = i64::from(t.gw().config().limits.max_outbound_bytes);
    let mut neighbour = t.login("neighbour", "phone");
    let unloaded = median((0..20).map(|_| ping_rtt_us(&mut neighbour)).collect());

    let mut abuser = login_small_window(t, "abuser");
    let cap = 512 << 20;
    let written = write_until_blocked(&mut abuser, chunk, cap);
    assert!(
        written < cap,
        "{what}: the gateway kept reading {written} bytes from a client that never reads"
    );
    let loaded = median((0..20).map(|_| ping_rtt_us(&mut neighbour)).collect());
    // The real slow-consumer timeout (10 s), the clock skipped past it.
    let timeout = u64::from(t.gw().config().limits.slow_consumer_timeout_ms);
    t.skip_time_until(
        "the stalled reader to be closed as a slow consumer",
        Duration::from_millis(timeout),
        3,
        || {
            t.metric(|m| {
                m.slow_consumer_disconnects
                    .load(std::sync::atomic::Ordering::Relaxed) as i64
            }) >= 1
        },
    );
    let held = t.metric(|m| {
        m.max_conn_outbound_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    });
    println!(
        "{what}: abuser wrote {written} bytes before the gateway stopped reading; \
         most output held for one connection {held} bytes (limit {max_outbound}); \
         neighbour ping median {unloaded} us unloaded, {loaded} us during the flood"
    );
    assert!(
        held <= max_outbound + ROUND_SLACK,
        "{what}: one connection made the gateway hold {held} bytes of output"
    );
    // The server closes it. Its GoAway(SLOW_CONSUMER) is queued behind the
    // megabytes it never read, so a reader that catches up within the close
    // linger sees it; a slower one sees only the close (SPEC §15).
    let frames = abuser.expect_close(T).expect("abuser is closed");
    for f in &frames {
        if let Some(Body::GoAway(g)) = &f.body {
            assert_eq!(g.reason, pb::GoAwayReason::SlowConsumer as i32, "{what}");
        }
    }
    assert_healthy(&mut neighbour);
    assert_eq!(
        t.metric(|m| m
            .outbound_buffered_bytes
            .load(std::sync::atomic::Ordering::Relaxed)),
        0,
        "the closed connection's buffer was freed"
    );
}

fn frames_bytes(n: usize, mut make: impl FnMut(usize) -> pb::Frame) -> Vec<u8> {
    let mut buf = Vec::new();
    for i in 0..n {
        encode_frame(&make(i), &mut buf);
    }
    buf
}

#[test]
fn ping_flood_that_never_reads_is_bounded_and_closed() {
    let t = start(|_| {});
    let chunk = frames_bytes(2000, |i| {
        frame(i as u32 + 1, Body::Ping(pb::Ping { nonce: i as u64 }))
    });
    flood_without_reading(&t, "Ping flood", &chunk);
}

#[test]
fn rate_limited_flood_that_never_reads_is_bounded_and_closed() {
    // Every Receipt past the budget is answered RATE_LIMITED: replies several
    // times the size of the requests.
    let t = start(|_| {});
    let chunk = frames_bytes(1000, |i| {
        frame(
            i as u32 + 1,
            Body::Receipt(pb::Receipt {
                conversation_id: "dm:abuser:x".into(),
                kind: pb::ReceiptKind::Read as i32,
                up_to_seq: 1,
            }),
        )
    });
    flood_without_reading(&t, "RATE_LIMITED flood", &chunk);
    assert!(t.metric(|m| m.rate_limited.load(std::sync::atomic::Ordering::Relaxed) as i64) > 1000);
}

/// Sends `n` messages one at a time, each waiting for its SendAck; returns
/// the round trips in microseconds. Any Error fails the test.
fn send_round_trips(c: &mut Client, conversation: &str, n: usize) -> Vec<u128> {
    (0..n)
        .map(|i| {
            let start = Instant::now();
            let id = c
                .request(Body::Send(pb::Send {
                    conversation_id: conversation.into(),
                    client_msg_id: new_client_msg_id(),
                    kind: pb::ContentKind::Text as i32,
                    body: format!("m{i}").into_bytes(),
                    ..Default::default()
                }))
                .unwrap();
            let f = c
                .recv_until(T, "SendAck or Error", |f| f.request_id == id)
                .expect("neighbour's Send answered");
            assert!(
                matches!(f.body, Some(Body::SendAck(_))),
                "neighbour's Send failed during the flood: {f:?}"
            );
            // Pace like a person typing fast, so the neighbour stays inside
            // its own send budget.
            std::thread::sleep(Duration::from_millis(25));
            start.elapsed().as_micros() - 25_000
        })
        .collect()
}

#[test]
fn typing_flood_into_a_large_group_is_throttled_and_neighbours_unaffected() {
    let t = start(|_| {});
    let typing_in = |m: &palaver_gateway::metrics::CoreMetrics| {
        m.frames_in[palaver_protocol::BodyKind::Typing.metric_index()]
            .load(std::sync::atomic::Ordering::Relaxed) as i64
    };
    let dropped = |m: &palaver_gateway::metrics::CoreMetrics| {
        m.typing_dropped.load(std::sync::atomic::Ordering::Relaxed) as i64
    };

    let mut abuser = t.login("abuser", "phone");
    let members: Vec<String> = (0..999).map(|i| format!("member{i}")).collect();
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    let group = abuser
        .create_group("everyone", &members, T)
        .expect("ConversationCreated")
        .conversation_id;

    let mut alice = t.login("alice", "phone");
    let _bob = t.login("bob", "phone");
    let unloaded = median(send_round_trips(&mut alice, "dm:alice:bob", 20));

    // 120,000 Typing frames, alternating state so that none is a repeat.
    const FLOOD: usize = 120_000;
    let chunk = frames_bytes(FLOOD, |i| {
        frame(
            0,
            Body::Typing(pb::Typing {
                conversation_id: group.clone(),
                active: i % 2 == 0,
                user_id: String::new(),
            }),
        )
    });
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        abuser.send_raw(&chunk).unwrap();
        abuser
    });
    let loaded = send_round_trips(&mut alice, "dm:alice:bob", 40);
    let _abuser = writer.join().unwrap();
    t.wait_metric("the whole flood to be read", typing_in, |n| {
        n >= FLOOD as i64
    });
    let elapsed_s = started.elapsed().as_secs_f64();
    let forwarded = t.metric(typing_in) - t.metric(dropped);
    let limits = &t.gw().config().limits;
    // The budget lets through its burst plus its rate over the flood, each
    // Typing costing 5 units.
    let allowed =
        (f64::from(limits.max_requests_per_second) * (1.0 + elapsed_s) / 5.0).ceil() as i64;
    println!(
        "typing flood: {FLOOD} frames over {elapsed_s:.2} s, {forwarded} forwarded (allowed {allowed}); \
         neighbour send median {unloaded} us unloaded, {} us during the flood (max {} us)",
        median(loaded.clone()),
        loaded.iter().max().unwrap()
    );
    assert!(
        forwarded <= allowed,
        "{forwarded} Typing frames reached the router, budget allows {allowed}"
    );
    assert!(forwarded >= 1, "the first Typing frames are forwarded");
}

#[test]
fn pipelined_requests_beyond_the_in_flight_cap_are_refused() {
    let t = start(|_| {});
    let cap = t.gw().config().limits.max_requests_in_flight as usize;
    let mut c = t.login("alice", "phone");
    let n = 512;
    let buf = frames_bytes(n, |i| {
        frame(
            i as u32 + 1,
            Body::History(pb::History {
                conversation_id: "dm:alice:bob".into(),
                before_seq: 0,
                limit: 10,
            }),
        )
    });
    c.send_raw(&buf).unwrap();
    let (mut answered, mut refused) = (0, 0);
    while answered + refused < n {
        let f = c.recv_timeout(T, "an answer to every History").unwrap();
        match f.body {
            Some(Body::HistoryPage(_)) => answered += 1,
            Some(Body::Error(e)) if e.code == pb::ErrorCode::RateLimited as u32 => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    println!("{n} pipelined History: {answered} answered, {refused} RATE_LIMITED (cap {cap})");
    // Answers that arrive between read rounds free slots, and the request
    // budget (5 units per History) binds too; but most of 512 are refused.
    assert!(answered >= cap.min(20), "the first requests are served");
    assert!(
        answered <= n / 4,
        "{answered} of {n} pipelined requests were served: no cap"
    );
    assert_healthy(&mut c);
    let _ = c.tcp().flush();
}
