//! One chat scenario suite for every backend. A test crate implements
//! [`ChatServer`] for what it started (the gateway's tests: one gateway on
//! the embedded engine; the router's: gateways on the Kafka/Redis bridge
//! with `palaver-router` processes) and runs the same scenarios, so both
//! backends are held to the same behaviour by one copy of the checks.
//!
//! Each scenario uses its own users, so scenarios run in any order against
//! one server and sequence numbers start at 1 in each. With more than one
//! gateway, the users of a scenario are spread over the first and the last.

use std::time::{Duration, Instant};

use palaver_protocol::pb::{self, frame::Body};

use crate::client::{new_client_msg_id, text_send, Client};

/// A running deployment the suite logs into.
pub trait ChatServer {
    /// Gateways clients can reach (at least 1).
    fn gateways(&self) -> usize;

    /// Connected to gateway `gateway` and welcomed as `user` on `device`,
    /// with `resume` cursors in the Hello (empty: none).
    fn login_resuming(
        &self,
        gateway: usize,
        user: &str,
        device: &str,
        resume: Vec<pb::Cursor>,
    ) -> Client;

    /// How long to wait for any one answer.
    fn patience(&self) -> Duration;

    fn login(&self, gateway: usize, user: &str, device: &str) -> Client {
        self.login_resuming(gateway, user, device, Vec::new())
    }

    /// The other side of the deployment from gateway 0 (0 if there is one).
    fn far_gateway(&self) -> usize {
        self.gateways().saturating_sub(1)
    }
}

/// Every scenario, in order.
pub fn run_all(s: &impl ChatServer) {
    one_to_one_with_receipts_and_typing(s);
    group_of_three_fans_out(s);
    duplicate_client_msg_id_is_stored_once_and_delivered_again(s);
    concurrent_senders_get_gapless_seqs_in_order(s);
    offline_user_catches_up_with_sync_and_resume(s);
    requests_with_request_id_zero_free_their_in_flight_slots(s);
}

/// 1:1 both ways (across gateways when there are two), a Read receipt
/// reaching the sender, Typing relayed both ways.
pub fn one_to_one_with_receipts_and_typing(s: &impl ChatServer) {
    let t = s.patience();
    let mut alice = s.login(0, "alice", "phone");
    let mut bob = s.login(s.far_gateway(), "bob", "phone");
    let dm = palaver_protocol::direct_conversation_id("alice", "bob");

    assert_eq!(send_reliably(&mut alice, &dm, "hi bob", t).seq, 1);
    let m = next_deliver(&mut bob, t);
    assert_eq!(
        (m.sender_user_id.as_str(), m.seq, m.body.as_slice()),
        ("alice", 1, &b"hi bob"[..])
    );
    assert_eq!(send_reliably(&mut bob, &dm, "hello alice", t).seq, 2);
    let m = next_deliver(&mut alice, t);
    assert_eq!((m.sender_user_id.as_str(), m.seq), ("bob", 2));

    // bob reads alice's message: alice learns it.
    bob.request(Body::Receipt(pb::Receipt {
        conversation_id: dm.clone(),
        kind: pb::ReceiptKind::Read as i32,
        up_to_seq: 1,
    }))
    .expect("send Receipt");
    let f = alice
        .recv_until(t, "ReceiptUpdate", |f| {
            matches!(f.body, Some(Body::ReceiptUpdate(_)))
        })
        .expect("ReceiptUpdate");
    let Some(Body::ReceiptUpdate(r)) = f.body else {
        unreachable!()
    };
    assert_eq!(
        (r.user_id.as_str(), r.up_to_seq, r.kind),
        ("bob", 1, pb::ReceiptKind::Read as i32)
    );

    // Typing is relayed, never stored.
    typing_reaches(&mut alice, &mut bob, &dm, "alice", t);
    typing_reaches(&mut bob, &mut alice, &dm, "bob", t);
}

fn typing_reaches(from: &mut Client, to: &mut Client, conv: &str, who: &str, t: Duration) {
    from.request(Body::Typing(pb::Typing {
        conversation_id: conv.into(),
        active: true,
        user_id: String::new(),
    }))
    .expect("send Typing");
    let f = to
        .recv_until(t, "Typing", |f| matches!(f.body, Some(Body::Typing(_))))
        .expect("Typing");
    let Some(Body::Typing(ty)) = f.body else {
        unreachable!()
    };
    assert_eq!((ty.user_id.as_str(), ty.active), (who, true));
}

/// A group of three created by one member; messages from two members reach
/// the other two, with the group's seqs.
pub fn group_of_three_fans_out(s: &impl ChatServer) {
    let t = s.patience();
    let far = s.far_gateway();
    let mut anna = s.login(0, "anna", "phone");
    let mut ben = s.login(far, "ben", "phone");
    let mut cleo = s.login(far, "cleo", "tablet");

    let group = anna
        .create_group("trio", &["ben", "cleo"], t)
        .expect("ConversationCreated");
    assert_eq!(group.members.len(), 3);
    let gid = group.conversation_id;

    assert_eq!(send_reliably(&mut anna, &gid, "hello group", t).seq, 1);
    for c in [&mut ben, &mut cleo] {
        let m = next_deliver(c, t);
        assert_eq!(
            (m.conversation_id.as_str(), m.seq, m.body.as_slice()),
            (gid.as_str(), 1, &b"hello group"[..])
        );
    }
    assert_eq!(send_reliably(&mut cleo, &gid, "hi from cleo", t).seq, 2);
    for c in [&mut anna, &mut ben] {
        let m = next_deliver(c, t);
        assert_eq!((m.sender_user_id.as_str(), m.seq), ("cleo", 2));
    }
}

/// The same client_msg_id twice: one seq, the same ack, and the original
/// delivered again for the repeat (at-least-once: a first attempt may have
/// stopped before delivering; clients dedupe by seq).
pub fn duplicate_client_msg_id_is_stored_once_and_delivered_again(s: &impl ChatServer) {
    let t = s.patience();
    let mut dora = s.login(0, "dora", "phone");
    let mut eli = s.login(s.far_gateway(), "eli", "phone");
    let dm = palaver_protocol::direct_conversation_id("dora", "eli");

    let cmid = new_client_msg_id();
    let send = |body: &[u8]| {
        Body::Send(pb::Send {
            conversation_id: dm.clone(),
            client_msg_id: cmid.clone(),
            kind: pb::ContentKind::Text as i32,
            body: body.to_vec(),
            ..Default::default()
        })
    };
    let a1 = send_until_acked(&mut dora, send(b"once"), t);
    let first = next_deliver(&mut eli, t);
    assert_eq!((first.seq, &first.client_msg_id), (1, &cmid));
    let a2 = send_until_acked(&mut dora, send(b"other content, same id"), t);
    assert_eq!(a1, a2, "the retry gets the original ack");
    assert_eq!(a1.seq, 1);
    assert_eq!(
        next_deliver(&mut eli, t),
        first,
        "the repeat delivers the original again, not its own content"
    );
    // The next message is seq 2: the repeat stored nothing. Any further
    // copy of seq 1 (an attempt retried on the way) is the original too.
    assert_eq!(send_reliably(&mut dora, &dm, "after", t).seq, 2);
    loop {
        let m = next_deliver(&mut eli, t);
        if m.seq == 2 {
            break;
        }
        assert_eq!(m, first);
    }
}

/// Two senders (on different gateways when there are two) pipelining into
/// one group: seqs are 1..=2N without gaps, each sender's own order is
/// kept, and a member sees them in seq order.
pub fn concurrent_senders_get_gapless_seqs_in_order(s: &impl ChatServer) {
    const N: usize = 40;
    let t = s.patience();
    let mut fay = s.login(s.far_gateway(), "fay", "phone");
    let gus = s.login(0, "gus", "phone");
    let conc = fay
        .create_group("busy", &["gus", "hal"], t)
        .expect("ConversationCreated")
        .conversation_id;
    let mut hal = s.login(s.far_gateway(), "hal", "phone");
    let senders: Vec<(&str, Client)> = vec![("fay", fay), ("gus", gus)];
    let mut handles = Vec::new();
    for (user, mut c) in senders {
        let conv = conc.clone();
        handles.push(std::thread::spawn(move || {
            let ids: Vec<u32> = (0..N)
                .map(|i| {
                    c.request(text_send(&conv, &format!("{user}:{i}")))
                        .expect("send")
                })
                .collect();
            ids.into_iter()
                .map(|id| {
                    let f = c
                        .recv_until(t, "SendAck", |f| f.request_id == id)
                        .expect("SendAck");
                    match f.body {
                        Some(Body::SendAck(a)) => a.seq,
                        other => panic!("expected SendAck, got {other:?}"),
                    }
                })
                .collect::<Vec<u64>>()
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        let seqs = h.join().expect("sender thread");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "per-sender order {seqs:?}"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=2 * N as u64).collect::<Vec<_>>());
    let mut got = Vec::new();
    while got.len() < 2 * N {
        let m = next_deliver(&mut hal, t);
        if m.conversation_id == conc {
            got.push(m.seq);
        }
    }
    assert_eq!(
        got,
        (1..=2 * N as u64).collect::<Vec<_>>(),
        "hal sees seq order"
    );
}

/// bob goes offline, misses messages, and catches up: once with an explicit
/// Sync from a cursor (on the other gateway), once with `Hello.resume`.
pub fn offline_user_catches_up_with_sync_and_resume(s: &impl ChatServer) {
    let t = s.patience();
    let far = s.far_gateway();
    let mut ivy = s.login(0, "ivy", "phone");
    let mut watcher = s.login(0, "ivy", "tablet");
    let dm = palaver_protocol::direct_conversation_id("ivy", "jon");
    // A group with jon lets ivy see his presence (SPEC §10: their direct
    // conversation would count only once jon wrote in it too).
    ivy.create_group("ivy and jon", &["jon"], t)
        .expect("ConversationCreated");
    {
        let mut jon = s.login(far, "jon", "phone");
        assert_eq!(send_reliably(&mut ivy, &dm, "one", t).seq, 1);
        assert_eq!(next_deliver(&mut jon, t).seq, 1);
    }
    wait_offline(&mut watcher, "jon", t);
    send_reliably(&mut ivy, &dm, "two", t);
    send_reliably(&mut ivy, &dm, "three", t);

    // Explicit Sync with a cursor, on the other gateway.
    let mut jon = s.login(0, "jon", "phone");
    let id = jon
        .request(Body::Sync(pb::Sync {
            cursors: vec![pb::Cursor {
                conversation_id: dm.clone(),
                after_seq: 1,
            }],
            limit: 0,
        }))
        .expect("send Sync");
    let f = jon
        .recv_until(t, "SyncBatch", |f| f.request_id == id)
        .expect("SyncBatch");
    let Some(Body::SyncBatch(b)) = f.body else {
        panic!("expected SyncBatch, got {f:?}")
    };
    let got: Vec<(u64, &[u8])> = b
        .messages
        .iter()
        .map(|m| (m.seq, m.body.as_slice()))
        .collect();
    assert_eq!(got, vec![(2, &b"two"[..]), (3, &b"three"[..])]);
    assert!(!b.has_more);
    drop(jon);
    wait_offline(&mut watcher, "jon", t);
    send_reliably(&mut ivy, &dm, "four", t);

    // Hello.resume starts the sync right after Welcome.
    let resume = vec![pb::Cursor {
        conversation_id: dm.clone(),
        after_seq: 3,
    }];
    let mut jon = s.login_resuming(far, "jon", "phone", resume);
    let f = jon
        .recv_until(t, "SyncBatch", |f| {
            matches!(f.body, Some(Body::SyncBatch(_)))
        })
        .expect("SyncBatch");
    let Some(Body::SyncBatch(b)) = f.body else {
        unreachable!()
    };
    let got: Vec<(u64, &[u8])> = b
        .messages
        .iter()
        .map(|m| (m.seq, m.body.as_slice()))
        .collect();
    assert_eq!(got, vec![(4, &b"four"[..])]);
    // Live again: the next message is delivered.
    assert_eq!(send_reliably(&mut ivy, &dm, "five", t).seq, 5);
    assert_eq!(next_deliver(&mut jon, t).seq, 5);
}

/// Waits until `user` is reported offline to `observer` (who must share a
/// conversation that counts with them — a group, or a direct conversation
/// both wrote in: presence is private otherwise, and a hidden user looks
/// offline at once, SPEC §10).
pub fn wait_offline(observer: &mut Client, user: &str, patience: Duration) {
    let deadline = Instant::now() + patience;
    while observer
        .presence(user, patience)
        .expect("PresenceResult")
        .online
    {
        assert!(Instant::now() < deadline, "{user} never went offline");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn deliver_of(f: &pb::Frame) -> Option<&pb::Message> {
    match &f.body {
        Some(Body::Deliver(d)) => d.message.as_ref(),
        _ => None,
    }
}

/// The next delivered message (other frames are dropped).
pub fn next_deliver(c: &mut Client, patience: Duration) -> pb::Message {
    let f = c
        .recv_until(patience, "Deliver", |f| deliver_of(f).is_some())
        .expect("Deliver");
    deliver_of(&f).cloned().expect("matched a Deliver")
}

/// Sends a text and waits for its ack, retrying with the same
/// client_msg_id on UNAVAILABLE or silence (what a real client does).
pub fn send_reliably(c: &mut Client, conv: &str, text: &str, patience: Duration) -> pb::SendAck {
    try_send_reliably(c, conv, text, patience.max(Duration::from_secs(90)))
        .unwrap_or_else(|| panic!("no SendAck for {text}"))
}

/// [`send_reliably`] that gives up after `patience` without an ack.
pub fn try_send_reliably(
    c: &mut Client,
    conv: &str,
    text: &str,
    patience: Duration,
) -> Option<pb::SendAck> {
    let send = Body::Send(pb::Send {
        conversation_id: conv.into(),
        client_msg_id: new_client_msg_id(),
        kind: pb::ContentKind::Text as i32,
        body: text.as_bytes().to_vec(),
        ..Default::default()
    });
    try_send_until_acked(c, send, patience)
}

fn send_until_acked(c: &mut Client, send: Body, patience: Duration) -> pb::SendAck {
    try_send_until_acked(c, send, patience.max(Duration::from_secs(90)))
        .expect("no SendAck within the patience")
}

/// Sends `send` (the same client_msg_id each time) until it is acked.
fn try_send_until_acked(c: &mut Client, send: Body, patience: Duration) -> Option<pb::SendAck> {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        let id = c.request(send.clone()).expect("send");
        let answer = c.recv_until(Duration::from_secs(20), "SendAck or Error", |f| {
            f.request_id == id
        });
        // Silence (or a failed connection, until the patience ends): again.
        let Ok(f) = answer else { continue };
        match f.body {
            Some(Body::SendAck(a)) => return Some(a),
            // A client's retry back-off.
            Some(Body::Error(e)) if e.code == pb::ErrorCode::Unavailable as u32 => {
                std::thread::sleep(Duration::from_millis(200));
            }
            other => panic!("unexpected answer to Send: {other:?}"),
        }
    }
    None
}

/// SPEC §3 lets a client send any request with request_id 0; its answer
/// (an Error too) then also carries 0 and looks like an event. Each answer
/// still frees its in-flight slot (SPEC §13): after more such requests than
/// `max_requests_in_flight`, answered one at a time, a request is still
/// served, not refused RATE_LIMITED for good.
pub fn requests_with_request_id_zero_free_their_in_flight_slots(s: &impl ChatServer) {
    let t = s.patience();
    let mut fay = s.login(0, "fay", "phone");
    let missing = "grp:00000000000000000000000000000000";
    // Answered by an Error with request_id 0 (NOT_FOUND): a Send (its own
    // budget), then History (the request budget), 80 in all > 64 slots.
    let requests = (0..40)
        .map(|_| {
            Body::Send(pb::Send {
                conversation_id: missing.into(),
                client_msg_id: new_client_msg_id(),
                kind: pb::ContentKind::Text as i32,
                body: b"x".to_vec(),
                ..Default::default()
            })
        })
        .chain((0..40).map(|_| {
            Body::History(pb::History {
                conversation_id: missing.into(),
                before_seq: 0,
                limit: 1,
            })
        }));
    for (i, body) in requests.enumerate() {
        let mut refused = 0;
        loop {
            fay.send(&pb::Frame {
                request_id: 0,
                body: Some(body.clone()),
            })
            .expect("request written");
            let f = fay
                .recv_until(t, "the answer of a request_id 0 request", |f| {
                    matches!(f.body, Some(Body::Error(_)))
                })
                .expect("answered");
            let Some(Body::Error(e)) = f.body else {
                unreachable!()
            };
            assert_eq!(f.request_id, 0);
            if e.code == pb::ErrorCode::NotFound as u32 {
                break;
            }
            // Over the budget's rate: wait for the refill (SPEC §13), a
            // bounded number of times; an in-flight count that never comes
            // down refuses for good and ends here.
            assert_eq!(e.code, pb::ErrorCode::RateLimited as u32, "{e:?}");
            refused += 1;
            assert!(
                refused < 20,
                "request {i} with request_id 0 refused {refused} times: {}",
                e.message
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // A numbered request is served once the budget has refilled.
    for attempt in 0.. {
        let id = fay
            .request(Body::Sync(pb::Sync {
                cursors: Vec::new(),
                limit: 1,
            }))
            .expect("Sync written");
        let f = fay
            .recv_until(t, "the SyncBatch", |f| f.request_id == id)
            .expect("Sync answered");
        match f.body {
            Some(Body::SyncBatch(_)) => break,
            Some(Body::Error(e)) if e.code == pb::ErrorCode::RateLimited as u32 && attempt < 20 => {
                assert!(e.message.contains("budget"), "{e:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
            other => panic!("{other:?}"),
        }
    }
}
