//! A connection's life: handshake, Hello, heartbeats, protocol errors,
//! drain, and the size of the rules.

use super::*;

#[test]
fn handshake_not_done_in_time_is_dropped_silently() {
    let mut l = limits();
    l.handshake_timeout_ms = 5_000;
    let mut p = Pair::new(l);
    p.server.tls_done_at = None;
    p.run_until(4_999);
    assert!(p.server.policy.is_handshaking());
    assert_eq!(p.server.dropped, None);
    p.run_until(60_000);
    assert_eq!(
        p.server.dropped,
        Some((5_000, Dropped::Expired(Expiry::Handshake)))
    );
    assert!(p.client.received.is_empty(), "nothing to tell before TLS");
}

#[test]
fn hello_timeout_counts_from_accept_and_sends_hello_timeout() {
    let mut p = Pair::new(limits());
    // A slow handshake does not move the Hello deadline.
    p.server.tls_done_at = Some(4_000);
    p.run_until(9_999);
    assert_eq!(p.server.policy.phase(), Phase::Open);
    assert!(p.client.received.is_empty());
    p.run_until(60_000);
    assert_eq!(p.server.expired, vec![(10_000, Expiry::Hello)]);
    assert_eq!(
        p.client.error_codes(),
        vec![pb::ErrorCode::HelloTimeout as u32]
    );
    assert_eq!(p.client.conn.phase(), ClientPhase::Closed);
    // The client read the Error, FIN followed, the client closed: no linger.
    assert!(p.server.fin_sent);
    assert_eq!(p.server.dropped, Some((10_000, Dropped::PeerClosed)));
}

#[test]
fn a_pinging_client_stays_and_a_silent_one_gets_heartbeat_timeout() {
    let mut p = Pair::established(limits());
    p.run_until(600_000);
    assert_eq!(p.server.dropped, None);
    assert_eq!(p.pongs(), 20, "one Ping per 30 s interval for 10 minutes");
    assert!(p.server.expired.is_empty());

    p.client.pinging = false;
    let last_activity = p.client.last_sent;
    p.run_until(1_000_000);
    // Silence for 2.5 intervals after the last frame received.
    assert_eq!(
        p.server.expired,
        vec![(last_activity + 75_000, Expiry::Heartbeat)]
    );
    assert_eq!(
        p.client.error_codes(),
        vec![pb::ErrorCode::HeartbeatTimeout as u32]
    );
    assert_eq!(
        p.server.dropped,
        Some((last_activity + 75_000, Dropped::PeerClosed))
    );
}

#[test]
fn a_frame_before_hello_is_a_protocol_violation_and_a_bad_token_unauthenticated() {
    let mut p = Pair::new(limits());
    p.send(Body::Ping(pb::Ping { nonce: 1 }));
    p.settle();
    assert_eq!(
        p.client.error_codes(),
        vec![pb::ErrorCode::ProtocolViolation as u32]
    );
    assert_eq!(p.server.dropped, Some((0, Dropped::PeerClosed)));

    let mut p = Pair::new(limits());
    p.hello("forged");
    p.settle();
    assert_eq!(
        p.client.error_codes(),
        vec![pb::ErrorCode::Unauthenticated as u32]
    );
    assert_eq!(p.client.conn.phase(), ClientPhase::Closed);
}

#[test]
fn drain_sends_goaway_with_the_delay_and_closes_at_the_deadline() {
    // A client that reads: GoAway, FIN, it closes; nothing more is forwarded.
    let mut p = Pair::established(limits());
    p.run_for(5_000);
    assert!(drain(&mut p, 1_500, 10_000));
    p.send_text(1);
    p.settle();
    let g = p.client.last_go_away().expect("GoAway");
    assert_eq!(
        (g.reason, g.reconnect_delay_ms),
        (pb::GoAwayReason::Shutdown as i32, 1_500)
    );
    assert!(p.server.forwarded.is_empty());
    assert_eq!(p.server.dropped, Some((5_000, Dropped::PeerClosed)));

    // A client that does not read: dropped at the drain deadline.
    let mut p = Pair::established(limits());
    p.client.reading = false;
    p.client.pinging = false;
    assert!(drain(&mut p, 1_000, 10_000));
    assert!(
        !drain(&mut p, 1_000, 10_000),
        "draining twice changes nothing"
    );
    p.run_until(100_000);
    assert_eq!(
        p.server.dropped,
        Some((10_000, Dropped::Expired(Expiry::Linger)))
    );

    // Not authenticated or still in TLS: nothing to tell, closed at once.
    let mut p = Pair::new(limits());
    assert!(!drain(&mut p, 1_000, 10_000));
    assert_eq!(p.server.dropped, Some((0, Dropped::Drained)));
    let mut p = Pair::new(limits());
    p.server.tls_done_at = None;
    p.settle();
    assert!(!drain(&mut p, 1_000, 10_000));
    assert!(p.client.received.is_empty());
}

#[test]
fn the_rules_stay_small() {
    assert_eq!(std::mem::size_of::<ConnPolicy>(), 64);
}
