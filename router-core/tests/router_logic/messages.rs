//! Send: acks, Delivers, seqs, dedup, pushes, batches and store failures.

use super::*;

#[test]
fn direct_send_acks_sender_and_delivers_to_other_devices() {
    let mut h = Harness::new();
    let alice_phone = h.open("alice", "phone", 1);
    let alice_laptop = h.open("alice", "laptop", 2);
    let bob = h.open("bob", "phone", 3);

    let out = h.send(&alice_phone, DM, 5);
    let a = ack(reply_to(&out, &alice_phone, 5)).expect("SendAck");
    assert_eq!(a.seq, 1);
    assert_eq!(a.client_msg_id, cmid(5));
    assert_eq!(a.conversation_id, DM);
    assert_eq!(a.server_time_ms, T0);
    assert!(!a.message_id.is_empty());

    for s in [&alice_laptop, &bob] {
        let frames = to(&out, &s.addr);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].request_id, 0);
        let m = delivered(frames[0]).expect("Deliver");
        assert_eq!(m.seq, 1);
        assert_eq!(m.message_id, a.message_id);
        assert_eq!(m.sender_user_id, "alice");
        assert_eq!(m.sender_device_id, "phone");
        assert_eq!(m.body, b"message 5");
        assert_eq!(m.client_msg_id, cmid(5));
        assert_eq!(m.server_time_ms, T0);
    }
    assert_eq!(out.frames.len(), 3);
    assert!(out.pushes.is_empty());

    // Bob answers: alice's two devices get it.
    let out = h.send(&bob, DM, 6);
    assert_eq!(ack(reply_to(&out, &bob, 6)).unwrap().seq, 2);
    assert_eq!(to(&out, &alice_phone.addr).len(), 1);
    assert_eq!(to(&out, &alice_laptop.addr).len(), 1);
}

/// The recipients' Delivers leave before the sender's SendAck (the
/// delivery is the latency that counts), in one Send and in a batch of
/// them; each connection's own order is unchanged.
#[test]
fn delivers_are_written_before_the_senders_ack() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    h.open("bob", "phone", 2);
    h.open("bob", "laptop", 3);

    let out = h.send(&alice, DM, 1);
    let order: Vec<(u64, bool)> = out
        .frames
        .iter()
        .map(|f| (f.to.conn, ack(&f.frame).is_some()))
        .collect();
    // Bob's devices in the store's order, then alice's ack.
    assert_eq!(order.len(), 3, "{order:?}");
    assert_eq!(order[2], (1, true), "{order:?}");
    let mut delivered_to: Vec<u64> = order[..2]
        .iter()
        .map(|&(conn, is_ack)| {
            assert!(!is_ack);
            conn
        })
        .collect();
    delivered_to.sort_unstable();
    assert_eq!(delivered_to, [2, 3]);

    let reqs: Vec<Inbound> = (2..4)
        .map(|n| request(&alice, n, send_body(DM, n, "batched")))
        .collect();
    let mut out = Output::default();
    let mut progress = palaver_router_core::logic::BatchProgress::default();
    h.router
        .handle_batch(&reqs, &mut out, &mut progress)
        .expect("memory store does not fail");
    let seqs: Vec<(u64, u64)> = out
        .frames
        .iter()
        .map(|f| match &f.frame.body {
            Some(Body::SendAck(a)) => (f.to.conn, a.seq),
            _ => (f.to.conn, delivered(&f.frame).expect("Deliver").seq),
        })
        .collect();
    // Per Send, in input order: its two Delivers, then its ack.
    let sends: Vec<u64> = seqs.iter().map(|&(_, seq)| seq).collect();
    assert_eq!(sends, [2, 2, 2, 3, 3, 3]);
    let acks: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].0 == 1).collect();
    assert_eq!(acks, [2, 5], "{seqs:?}");
}

#[test]
fn direct_conversation_lists_for_both_users_after_first_message() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    h.send(&alice, DM, 1);
    for s in [&alice, &bob] {
        let out = h.req(s, 3, Body::Sync(pb::Sync::default()));
        let Some(Body::SyncBatch(batch)) = &reply_to(&out, s, 3).body else {
            panic!("expected SyncBatch");
        };
        assert_eq!(batch.conversations.len(), 1);
        let c = &batch.conversations[0];
        assert_eq!(c.conversation_id, DM);
        assert_eq!(c.kind, pb::ConversationKind::Direct as i32);
        assert_eq!(c.last_seq, 1);
        let members: Vec<&str> = c.members.iter().map(|m| m.user_id.as_str()).collect();
        assert_eq!(members, ["alice", "bob"]);
        assert_eq!(seqs(&batch.messages), [1]);
    }
}

/// A repeat gets the original ack, stores nothing, and delivers the
/// original again (at-least-once: its first attempt may have stopped
/// before delivering); the repeat's own content is discarded.
#[test]
fn duplicate_send_gets_original_ack_is_not_stored_and_redelivers_the_original() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let first = h.send(&alice, DM, 9);
    let original = ack(reply_to(&first, &alice, 9)).unwrap().clone();
    let delivered_first = delivered(to(&first, &bob.addr)[0]).unwrap().clone();

    h.clock.advance(60_000);
    let again = h.req(&alice, 10, send_body(DM, 9, "different body, same id"));
    assert_eq!(ack(reply_to(&again, &alice, 10)).unwrap(), &original);
    let redelivered = to(&again, &bob.addr);
    assert_eq!(redelivered.len(), 1, "the original, once more");
    assert_eq!(delivered(redelivered[0]).unwrap(), &delivered_first);

    // The next new message is seq 2: the duplicate used no seq.
    let next = h.send(&alice, DM, 11);
    assert_eq!(ack(reply_to(&next, &alice, 11)).unwrap().seq, 2);
    let out = h.req(
        &bob,
        1,
        Body::History(pb::History {
            conversation_id: DM.into(),
            ..Default::default()
        }),
    );
    let Some(Body::HistoryPage(page)) = &reply_to(&out, &bob, 1).body else {
        panic!("expected HistoryPage");
    };
    assert_eq!(seqs(&page.messages), [1, 2]);
    assert_eq!(page.messages[0].body, b"message 9");

    // After 24 h the id is forgotten: a new message.
    h.clock.advance(24 * 60 * 60 * 1000);
    let late = h.send(&alice, DM, 9);
    assert_eq!(ack(reply_to(&late, &alice, 9)).unwrap().seq, 3);
}

#[test]
fn seqs_are_gapless_and_delivered_in_order_under_many_sends() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let carol = h.open("carol", "phone", 3);
    let group = h.create_group(&alice, &["bob", "carol"]);
    let mut carol_seen = Vec::new();
    let mut message_ids = std::collections::HashSet::new();
    for n in 1..=2000u32 {
        let from = if n % 2 == 0 { &alice } else { &bob };
        let out = h.send(from, &group, n);
        let a = ack(reply_to(&out, from, n)).unwrap();
        assert_eq!(a.seq, n as u64);
        assert!(
            message_ids.insert(a.message_id.clone()),
            "message id reused"
        );
        carol_seen.extend(
            to(&out, &carol.addr)
                .iter()
                .map(|f| delivered(f).unwrap().seq),
        );
    }
    assert_eq!(carol_seen, (1..=2000).collect::<Vec<u64>>());
}

#[test]
fn group_fan_out_to_1000_members_delivers_each_exactly_once_in_one_lookup() {
    let mut h = Harness::new();
    let creator = h.open("u0000", "phone", 0);
    let creator_tablet = h.open("u0000", "tablet", 10_000);
    let others: Vec<String> = (1..1000).map(|i| format!("u{i:04}")).collect();
    let mut sessions = Vec::new();
    for (i, user) in others.iter().enumerate() {
        // Every tenth member is offline.
        if i % 10 != 0 {
            sessions.push(h.open(user, "phone", i as u64 + 1));
        }
    }
    let refs: Vec<&str> = others.iter().map(String::as_str).collect();
    let group = h.create_group(&creator, &refs);
    // Every member's phone is registered for pushes.
    for user in &others {
        h.register_token(user, "phone");
    }

    let lookups_before = h.calls().count("recipients");
    let sessions_before = h.calls().count("sessions_of_users");
    let calls_before = h.calls().total();
    let out = h.send(&creator, &group, 1);
    // One read of every member's sessions and push devices.
    assert_eq!(h.calls().count("recipients"), lookups_before + 1);
    assert_eq!(h.calls().count("sessions_of_users"), sessions_before);
    // Constant store calls per send, whatever the group size.
    assert!(
        h.calls().total() - calls_before <= 6,
        "{:?}",
        h.calls().calls
    );

    let mut per_conn: HashMap<u64, usize> = HashMap::new();
    for f in &out.frames {
        if let Some(m) = delivered(&f.frame) {
            assert_eq!(m.seq, 1);
            *per_conn.entry(f.to.conn).or_default() += 1;
        }
    }
    assert_eq!(per_conn.len(), sessions.len() + 1);
    assert!(per_conn.values().all(|n| *n == 1));
    for s in &sessions {
        assert_eq!(per_conn.get(&s.addr.conn), Some(&1), "{s:?}");
    }
    assert_eq!(per_conn.get(&creator_tablet.addr.conn), Some(&1));
    assert!(!per_conn.contains_key(&creator.addr.conn));
    // The 100 offline members get one push each, with no device online.
    assert_eq!(out.pushes.len(), 100);
    assert!(out
        .pushes
        .iter()
        .all(|p| p.conversation_id == group && p.seq == 1 && p.online_device_ids.is_empty()));
}

#[test]
fn pushes_are_coalesced_until_connect_or_receipt() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    h.register_token("bob", "phone");
    h.register_token("alice", "tablet");
    let out = h.send(&alice, DM, 1);
    assert_eq!(out.pushes.len(), 1);
    assert_eq!(out.pushes[0].user_id, "bob");
    assert_eq!(out.pushes[0].sender_user_id, "alice");
    assert!(
        h.send(&alice, DM, 2).pushes.is_empty(),
        "second push not coalesced"
    );

    // Bob connects and leaves again: the next message pushes again.
    let bob = h.open("bob", "phone", 2);
    h.close(&bob, T0 + 5);
    assert_eq!(h.send(&alice, DM, 3).pushes.len(), 1);
    assert!(h.send(&alice, DM, 4).pushes.is_empty());

    // A receipt (from another device session that then closes) clears it too.
    let bob = h.open("bob", "tablet", 3);
    h.close(&bob, T0 + 6);
    h.send(&alice, DM, 5);
    h.req(
        &bob,
        1,
        Body::Receipt(pb::Receipt {
            conversation_id: DM.into(),
            kind: pb::ReceiptKind::Delivered as i32,
            up_to_seq: 5,
        }),
    );
    assert_eq!(h.send(&alice, DM, 6).pushes.len(), 1);
    // The sender never gets a push for her own message.
    let out = h.send(&alice, DM, 7);
    assert!(out.pushes.iter().all(|p| p.user_id != "alice"));
}

#[test]
fn store_failures_become_unavailable_for_the_driver() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    h.router.store_mut().failing = true;
    let send = request(&alice, 5, send_body(DM, 1, "hi"));
    let mut out = Output::default();
    let err = h.router.handle(&send, &mut out).expect_err("store fails");
    assert!(out.frames.is_empty());
    let reply = Router::<Instrumented>::unavailable_reply(&send, &err);
    assert_eq!(reply.to, alice.addr);
    assert_eq!(reply.frame.request_id, 5);
    let e = error(&reply.frame).unwrap();
    assert_eq!(e.code, ErrorCode::Unavailable as u32);
    assert_eq!(e.client_msg_id, cmid(1));

    // Once the store is back, the retried send is stored exactly once.
    h.router.store_mut().failing = false;
    let mut out = Output::default();
    h.router.handle(&send, &mut out).unwrap();
    let mut again = Output::default();
    h.router.handle(&send, &mut again).unwrap();
    assert_eq!(
        ack(&out.frames[0].frame).unwrap(),
        ack(&again.frames[0].frame).unwrap()
    );
}

#[test]
fn a_batch_whose_push_mark_fails_leaves_no_frame_of_its_sends() {
    // The Sends' frames go straight into `out`: when a later Send's push
    // mark fails, the earlier Send's Deliver and ack are taken back (what
    // `out` held before stays), and the retry acks each Send with the seq
    // it got.
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    h.open("bob", "phone", 2);
    h.register_token("carol", "phone");
    let reqs = vec![
        request(&alice, 1, send_body(DM, 1, "to bob, online")),
        request(
            &alice,
            2,
            send_body("dm:alice:carol", 2, "to carol, offline"),
        ),
    ];
    let mut out = Output::default();
    let earlier = Router::<Instrumented>::internal_error_reply(&reqs[0]);
    out.frames.push(earlier.clone());
    h.router.store_mut().fail_on = Some("mark_push_pending");
    let mut progress = palaver_router_core::logic::BatchProgress::default();
    h.router
        .handle_batch(&reqs, &mut out, &mut progress)
        .expect_err("the push mark fails");
    assert_eq!(out.frames, vec![earlier]);
    assert!(out.pushes.is_empty());
    assert_eq!((progress.done, progress.frames), (0, 1));

    h.router.store_mut().fail_on = None;
    let mut out = Output::default();
    h.router
        .handle_batch(&reqs, &mut out, &mut progress)
        .expect("memory store does not fail");
    let acks: Vec<(u32, u64)> = to(&out, &alice.addr)
        .iter()
        .filter_map(|f| ack(f).map(|a| (f.request_id, a.seq)))
        .collect();
    assert_eq!(acks, vec![(1, 1), (2, 1)]);
    // The first attempt stored both before failing, so the retry finds
    // duplicates; it still delivers to bob and pushes to carol, which the
    // failed attempt never did.
    let bob_addr = session("bob", "phone", "g1", 2).addr;
    let to_bob: Vec<u64> = to(&out, &bob_addr)
        .iter()
        .filter_map(|f| delivered(f).map(|m| m.seq))
        .collect();
    assert_eq!(to_bob, vec![1]);
    let pushed: Vec<(&str, u64)> = out
        .pushes
        .iter()
        .map(|p| (p.user_id.as_str(), p.seq))
        .collect();
    assert_eq!(pushed, vec![("carol", 1)]);
}

#[test]
fn a_batch_is_handled_like_one_request_at_a_time_with_one_append_and_one_lookup_per_run_of_sends() {
    let requests = |alice: &Session, bob: &Session| {
        let mut bad = send_body(DM, 9, "bad");
        if let Body::Send(s) = &mut bad {
            s.client_msg_id = vec![1, 2, 3];
        }
        let carol_dm = direct_conversation_id("alice", "carol");
        vec![
            request(alice, 1, send_body(DM, 1, "one")),
            request(alice, 2, send_body(DM, 2, "two")),
            request(bob, 3, send_body(DM, 3, "three")),
            request(alice, 4, send_body(&carol_dm, 4, "four")),
            // A retry of #2 inside the same run: the original ack, and the
            // original delivered again (as one at a time).
            request(alice, 5, send_body(DM, 2, "two again")),
            request(alice, 6, bad),
            request(
                bob,
                7,
                Body::Receipt(pb::Receipt {
                    conversation_id: DM.into(),
                    kind: pb::ReceiptKind::Read as i32,
                    up_to_seq: 2,
                }),
            ),
            request(alice, 8, send_body(DM, 8, "eight")),
        ]
    };

    let mut batched = Harness::new();
    let mut single = Harness::new();
    let mut outs = Vec::new();
    for h in [&mut batched, &mut single] {
        let alice = h.open("alice", "phone", 1);
        let bob = h.open("bob", "phone", 2);
        h.open("carol", "phone", 3);
        outs.push((requests(&alice, &bob), alice, bob));
    }
    let (reqs, alice, bob) = &outs[0];

    let before = batched.calls().calls.clone();
    let mut out = Output::default();
    let mut progress = palaver_router_core::logic::BatchProgress::default();
    batched
        .router
        .handle_batch(reqs, &mut out, &mut progress)
        .expect("memory store does not fail");
    assert_eq!(progress.done, reqs.len());
    let delta = |name: &str| batched.calls().count(name) - before.get(name).copied().unwrap_or(0);
    // Two runs of Sends (the Receipt splits them): one append batch and one
    // recipients lookup each, plus the Receipt's own fan-out lookup.
    assert_eq!(delta("append_messages"), 2, "{:?}", batched.calls().calls);
    assert_eq!(delta("append_message"), 0);
    assert_eq!(delta("recipients"), 2);
    assert_eq!(delta("sessions_of_users"), 1);

    let mut one_by_one = Output::default();
    for c in &outs[1].0 {
        single
            .router
            .handle(c, &mut one_by_one)
            .expect("memory store does not fail");
    }
    assert_eq!(comparable(&out), comparable(&one_by_one));

    // Consecutive seqs in input order; the retry got #2's seq.
    let acks: Vec<(u32, u64)> = to(&out, &alice.addr)
        .iter()
        .filter_map(|f| ack(f).map(|a| (f.request_id, a.seq)))
        .collect();
    assert_eq!(acks, vec![(1, 1), (2, 2), (4, 1), (5, 2), (8, 4)]);
    let to_bob: Vec<u64> = to(&out, &bob.addr)
        .iter()
        .filter_map(|f| delivered(f).map(|m| m.seq))
        .collect();
    // #2 twice: its retry delivers the original again.
    assert_eq!(to_bob, vec![1, 2, 2, 4]);
    assert!(to(&out, &alice.addr)
        .iter()
        .any(|f| f.request_id == 6 && error(f).is_some()));
}
