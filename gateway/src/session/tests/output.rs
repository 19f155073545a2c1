//! Output and slow consumers: answers always queued, events that must fit,
//! the falling-behind rule, lingering closes.

use super::*;

#[test]
fn output_full_for_the_slow_consumer_timeout_is_goaway_slow_consumer() {
    let mut p = Pair::established(limits());
    let start = p.now;
    flood_pings_without_reading(&mut p, 2_000);
    assert!(
        p.server.policy.is_stalled(),
        "{:?}",
        p.server.policy.phase()
    );
    assert_eq!(p.server.stalls, 1);
    assert!(p.server.unsent >= 4096);
    assert!(
        !p.server.from_client.is_empty(),
        "the rest waits unread (TCP backpressure)"
    );
    p.run_until(start + 9_999);
    assert!(p.server.policy.is_stalled());
    p.run_until(start + 10_000);
    assert_eq!(
        p.server.expired,
        vec![(start + 10_000, Expiry::SlowConsumer)]
    );
    assert!(p.server.policy.is_closing());
    // It reads at last: the GoAway comes after everything it had not read.
    p.client.reading = true;
    p.settle();
    let last = p.client.received.last().expect("frames");
    assert!(matches!(&last.body, Some(Body::GoAway(g))
        if g.reason == pb::GoAwayReason::SlowConsumer as i32));
    assert_eq!(
        p.server.dropped,
        Some((start + 10_000, Dropped::PeerClosed))
    );
    assert!(
        p.pongs() < 2_000,
        "pings behind the stall were never answered"
    );
}

#[test]
fn a_stalled_reader_that_catches_up_resumes_and_stays() {
    let mut p = Pair::established(limits());
    let start = p.now;
    flood_pings_without_reading(&mut p, 2_000);
    assert!(p.server.policy.is_stalled());
    p.run_until(start + 5_000);
    p.client.reading = true;
    p.client.pinging = true;
    p.run_until(start + 30_000);
    assert_eq!(
        p.pongs(),
        2_000 + 1,
        "every flood Ping answered, plus one heartbeat"
    );
    assert_eq!(p.server.policy.phase(), Phase::Open);
    assert!(p.server.expired.is_empty());
    assert_eq!(p.server.dropped, None);
}

#[test]
fn a_backend_frame_that_does_not_fit_closes_a_slow_consumer_but_one_big_frame_may_go_alone() {
    let deliver = |size: usize| {
        frame(
            0,
            Body::Deliver(pb::Deliver {
                message: Some(pb::Message {
                    body: vec![b'x'; size],
                    ..Default::default()
                }),
            }),
        )
    };
    let mut p = Pair::established(limits());
    p.client.reading = false;
    // Larger than the whole limit, but nothing else waits: it goes.
    assert_eq!(
        p.server.on_backend_frame(deliver(10_000), false, p.now),
        BackendStep::Queue
    );
    p.client.reading = true;
    p.settle();

    p.client.reading = false;
    let mut steps = Vec::new();
    for _ in 0..5 {
        steps.push(p.server.on_backend_frame(deliver(1_000), false, p.now));
    }
    assert_eq!(
        steps,
        [
            BackendStep::Queue,
            BackendStep::Queue,
            BackendStep::Queue,
            BackendStep::Queue,
            BackendStep::SlowConsumer
        ]
    );
    assert!(p.server.policy.is_closing());
    // Closing: further frames are stale.
    assert_eq!(
        p.server.on_backend_frame(deliver(10), false, p.now),
        BackendStep::Stale
    );
    p.client.reading = true;
    p.settle();
    assert_eq!(
        p.client.last_go_away().map(|g| g.reason),
        Some(pb::GoAwayReason::SlowConsumer as i32)
    );
}

#[test]
fn closing_lingers_for_unread_output_then_drops_and_discards_input_meanwhile() {
    let mut p = Pair::established(limits());
    p.client.reading = false;
    p.client.pinging = false;
    p.run_for(1_000);
    let closed_at = p.now;
    // A second Hello is a protocol violation: Error, then close.
    p.hello(GOOD_TOKEN);
    p.send_text(1);
    p.settle();
    assert!(p.server.policy.is_closing());
    assert!(
        p.server.forwarded.is_empty(),
        "input after the violation is dropped"
    );
    assert!(!p.server.fin_sent, "the Error has not left yet");
    p.run_until(closed_at + 1_999);
    assert_eq!(p.server.dropped, None);
    p.run_until(closed_at + 10_000);
    assert_eq!(
        p.server.dropped,
        Some((closed_at + 2_000, Dropped::Expired(Expiry::Linger)))
    );
    assert!(p.server.to_client.iter().any(|f| matches!(&f.body,
        Some(Body::Error(e)) if e.code == pb::ErrorCode::ProtocolViolation as u32)));
}

#[test]
fn after_goaway_slow_consumer_an_unread_connection_lingers_then_drops() {
    let mut p = Pair::established(limits());
    let start = p.now;
    flood_pings_without_reading(&mut p, 2_000);
    p.run_until(start + 10_000 + CLOSE_LINGER_MS as u64 - 1);
    assert!(p.server.policy.is_closing());
    assert_eq!(
        p.server.dropped, None,
        "still waiting for the GoAway to leave"
    );
    p.run_until(start + 60_000);
    assert_eq!(
        p.server.dropped,
        Some((
            start + 10_000 + CLOSE_LINGER_MS as u64,
            Dropped::Expired(Expiry::Linger)
        ))
    );
    let last = p.server.to_client.back().expect("unread output");
    assert!(matches!(&last.body, Some(Body::GoAway(g))
        if g.reason == pb::GoAwayReason::SlowConsumer as i32));
}

#[test]
fn a_closing_backend_frame_goes_last_and_the_connection_closes() {
    let mut p = Pair::established(limits());
    let replaced = frame(
        0,
        Body::GoAway(pb::GoAway {
            reason: pb::GoAwayReason::Replaced as i32,
            reconnect_delay_ms: 0,
            message: String::new(),
        }),
    );
    assert_eq!(
        p.server.on_backend_frame(replaced, true, p.now),
        BackendStep::QueueAndClose
    );
    p.send_text(1);
    p.settle();
    assert!(
        p.server.forwarded.is_empty(),
        "nothing read after the close"
    );
    assert_eq!(
        p.client.last_go_away().map(|g| g.reason),
        Some(pb::GoAwayReason::Replaced as i32)
    );
    assert_eq!(p.client.conn.phase(), ClientPhase::Draining);
    assert_eq!(p.server.dropped, Some((0, Dropped::PeerClosed)));
}

#[test]
fn answers_to_pipelined_requests_are_queued_beyond_the_limit_and_events_fit_beside_them() {
    // The honest client of issue 18: reads continuously, pipelines two
    // History requests; each page is most of the limit (4096 here, 256 KiB
    // by default, while a page may be ~1 MiB).
    let mut p = Pair::established(limits());
    let first = p.send(Body::History(pb::History {
        conversation_id: "dm:alice:bob".into(),
        before_seq: 0,
        limit: 50,
    }));
    let second = p.send(Body::History(pb::History {
        conversation_id: "dm:alice:bob".into(),
        before_seq: 50,
        limit: 50,
    }));
    p.settle();
    assert_eq!(p.server.forwarded.len(), 2);
    // Both answers arrive before the client's next read.
    let now = p.now;
    assert_eq!(
        p.server
            .on_backend_frame(history_page(first, 3_000), false, now),
        BackendStep::Queue
    );
    assert_eq!(
        p.server
            .on_backend_frame(history_page(second, 3_000), false, now),
        BackendStep::Queue,
        "an answer never makes a client a slow consumer"
    );
    // Events fit beside them: the answers do not count against the events'
    // share of the limit.
    assert_eq!(
        p.server.on_backend_frame(deliver(3_000), false, now),
        BackendStep::Queue
    );
    assert_eq!(
        p.server.on_backend_frame(deliver(1_500), false, now),
        BackendStep::SlowConsumer,
        "events beyond the limit still close"
    );

    // The same client again, without the flood of events: it reads on and
    // is never closed.
    let mut p = Pair::established(limits());
    for i in 0..8u32 {
        let id = p.send(Body::History(pb::History {
            conversation_id: "dm:alice:bob".into(),
            before_seq: u64::from(i) * 50,
            limit: 50,
        }));
        p.settle();
        let now = p.now;
        assert_eq!(
            p.server
                .on_backend_frame(history_page(id, 3_000), false, now),
            BackendStep::Queue
        );
    }
    p.run_for(60_000);
    assert_eq!(p.server.dropped, None);
    assert!(p.server.expired.is_empty(), "{:?}", p.server.expired);
    assert_eq!(p.client.count(|b| matches!(b, Body::HistoryPage(_))), 8);
}

#[test]
fn a_client_that_stops_reading_is_closed_after_the_timeout_however_little_waits() {
    // Far below the limit: before, only the heartbeat (75 s) would end it,
    // and the kernel meanwhile held whatever its autotuned buffers took.
    let mut p = Pair::established(limits());
    p.client.reading = false;
    let start = p.now;
    assert_eq!(
        p.server.on_backend_frame(deliver(100), false, start),
        BackendStep::Queue
    );
    p.server.output_changed(start);
    assert!(matches!(p.server.policy.phase(), Phase::Behind { .. }));
    p.run_until(start + 9_999);
    assert!(p.server.expired.is_empty());
    p.run_until(start + 10_000);
    assert_eq!(
        p.server.expired,
        vec![(start + 10_000, Expiry::SlowConsumer)]
    );
    // A client that reads what waits is no longer behind.
    let mut p = Pair::established(limits());
    p.client.reading = false;
    let start = p.now;
    p.server.on_backend_frame(deliver(100), false, start);
    p.server.output_changed(start);
    p.run_until(start + 5_000);
    p.client.reading = true;
    p.run_until(start + 60_000);
    assert_eq!(p.server.policy.phase(), Phase::Open);
    assert!(p.server.expired.is_empty());
}

#[test]
fn a_slow_reader_that_keeps_reading_half_the_limit_per_timeout_stays() {
    let mut p = Pair::established(limits());
    p.client.reading = false;
    p.client.pinging = false;
    // 30 pipelined History answers of ~1.5 KB: 45 KB for a 4 KiB limit.
    let mut ids = Vec::new();
    for i in 0..30u32 {
        ids.push(p.send(Body::History(pb::History {
            conversation_id: "dm:alice:bob".into(),
            before_seq: u64::from(i) * 10,
            limit: 10,
        })));
    }
    p.settle();
    let start = p.now;
    for id in ids {
        assert_eq!(
            p.server
                .on_backend_frame(history_page(id, 1_500), false, start),
            BackendStep::Queue
        );
    }
    p.server.output_changed(start);
    p.settle();
    assert!(
        p.server.policy.is_stalled(),
        "{:?}",
        p.server.policy.phase()
    );
    // It reads 3 KB every 5 s: far slower than the server could send, but
    // more than half the limit (2 KiB) per timeout. Above the limit for
    // over a minute, and not closed.
    for step in 1..=12 {
        p.run_until(start + step * 5_000);
        client_reads(&mut p, 3_000);
    }
    assert!(p.server.expired.is_empty(), "{:?}", p.server.expired);
    assert!(p.server.policy.is_open());
    // It stops reading: closed one timeout after its last read.
    let last_read = p.now;
    assert!(p.server.unsent > 0);
    p.run_until(last_read + 60_000);
    assert_eq!(
        p.server.expired.first(),
        Some(&(last_read + 10_000, Expiry::SlowConsumer))
    );
}
