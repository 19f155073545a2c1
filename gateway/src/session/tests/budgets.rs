//! What a connection may ask: the send rate, Typing coalescing.

use super::*;

#[test]
fn sends_over_the_rate_are_refused_with_rate_limited_and_the_budget_refills() {
    let mut p = Pair::established(limits());
    let ids: Vec<u32> = (0..60).map(|n| p.send_text(n)).collect();
    p.settle();
    let forwarded: Vec<u32> = p.server.forwarded.iter().map(|(id, _)| *id).collect();
    assert_eq!(forwarded, ids[..50], "a burst of one second's worth");
    assert_eq!(p.server.rate_limited, 10);
    let refused: Vec<u32> = p
        .client
        .received
        .iter()
        .filter(|f| matches!(&f.body, Some(Body::Error(e)) if e.code == pb::ErrorCode::RateLimited as u32))
        .map(|f| f.request_id)
        .collect();
    assert_eq!(refused, ids[50..], "each refusal answers its request");
    assert_eq!(
        p.client.conn.phase(),
        ClientPhase::Established,
        "2xxx keeps the connection"
    );

    // The backend answers; a second later the bucket is full again.
    for (id, _) in std::mem::take(&mut p.server.forwarded) {
        let ack = frame(id, Body::SendAck(pb::SendAck::default()));
        assert_eq!(
            p.server.on_backend_frame(ack, false, p.now),
            BackendStep::Queue
        );
    }
    assert_eq!(p.server.policy.requests_in_flight(), 0);
    p.run_for(1_000);
    (60..110).for_each(|n| {
        p.send_text(n);
    });
    p.send_text(110);
    p.settle();
    assert_eq!(p.server.forwarded.len(), 50);
    assert_eq!(p.server.rate_limited, 11);
}

#[test]
fn identical_typing_within_the_window_is_dropped_unanswered() {
    let mut p = Pair::established(limits());
    let typing = || {
        Body::Typing(pb::Typing {
            conversation_id: "dm:alice:bob".into(),
            active: true,
            user_id: String::new(),
        })
    };
    p.send(typing());
    p.send(typing());
    p.settle();
    assert_eq!((p.server.forwarded.len(), p.server.typing_dropped), (1, 1));
    p.run_for(2_000);
    p.send(typing());
    p.settle();
    assert_eq!(p.server.forwarded.len(), 2);
    assert_eq!(p.client.error_codes(), Vec::<u32>::new());
}
