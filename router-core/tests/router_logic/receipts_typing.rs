//! Receipts and Typing: who hears of them.

use super::*;

#[test]
fn receipts_go_to_senders_of_the_covered_range_and_the_readers_other_devices() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let carol = h.open("carol", "phone", 3);
    let carol_tablet = h.open("carol", "tablet", 4);
    let group = h.create_group(&alice, &["bob", "carol"]);
    h.send(&alice, &group, 1); // seq 1
    h.send(&alice, &group, 2); // seq 2
    h.send(&bob, &group, 3); // seq 3
    h.send(&carol, &group, 4); // seq 4
    let receipt = |kind: pb::ReceiptKind, up_to_seq| {
        Body::Receipt(pb::Receipt {
            conversation_id: group.clone(),
            kind: kind as i32,
            up_to_seq,
        })
    };

    let out = h.req(&carol, 10, receipt(pb::ReceiptKind::Read, 2));
    assert_eq!(out.frames.len(), 2, "{:?}", out.frames);
    let update = receipt_update(to(&out, &alice.addr)[0]);
    assert_eq!(
        update,
        &pb::ReceiptUpdate {
            conversation_id: group.clone(),
            user_id: "carol".into(),
            kind: pb::ReceiptKind::Read as i32,
            up_to_seq: 2
        }
    );
    assert_eq!(receipt_update(to(&out, &carol_tablet.addr)[0]), update);
    assert!(to(&out, &bob.addr).is_empty());
    assert!(to(&out, &carol.addr).is_empty());

    // Not increasing: ignored.
    assert!(h
        .req(&carol, 11, receipt(pb::ReceiptKind::Read, 2))
        .frames
        .is_empty());
    assert!(h
        .req(&carol, 12, receipt(pb::ReceiptKind::Read, 1))
        .frames
        .is_empty());
    // READ implied DELIVERED up to 2.
    assert!(h
        .req(&carol, 13, receipt(pb::ReceiptKind::Delivered, 2))
        .frames
        .is_empty());

    // Beyond the last seq: clamped to 4. Range (2, 4] was sent by bob and carol.
    let out = h.req(&carol, 14, receipt(pb::ReceiptKind::Read, 99));
    assert_eq!(receipt_update(to(&out, &bob.addr)[0]).up_to_seq, 4);
    assert_eq!(to(&out, &carol_tablet.addr).len(), 1);
    assert!(to(&out, &alice.addr).is_empty());
    assert_eq!(out.frames.len(), 2);

    // A delivered receipt from bob reaches alice (seqs 1, 2) and carol (4).
    let out = h.req(&bob, 15, receipt(pb::ReceiptKind::Delivered, 4));
    assert_eq!(
        receipt_update(to(&out, &alice.addr)[0]).kind,
        pb::ReceiptKind::Delivered as i32
    );
    assert_eq!(to(&out, &carol.addr).len(), 1);
    assert_eq!(to(&out, &carol_tablet.addr).len(), 1);
    assert!(to(&out, &bob.addr).is_empty());

    let bad = Body::Receipt(pb::Receipt {
        conversation_id: group.clone(),
        kind: 0,
        up_to_seq: 1,
    });
    assert_error(&h.req(&bob, 16, bad), &bob, 16, ErrorCode::InvalidArgument);
}

#[test]
fn typing_goes_to_other_members_only_with_the_server_set_user() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let alice_laptop = h.open("alice", "laptop", 2);
    let bob = h.open("bob", "phone", 3);
    let bob_tablet = h.open("bob", "tablet", 4);
    let out = h.req(
        &alice,
        7,
        Body::Typing(pb::Typing {
            conversation_id: DM.into(),
            active: true,
            user_id: "bob".into(), // a lie; the server overwrites it
        }),
    );
    assert_eq!(out.frames.len(), 2);
    assert!(to(&out, &alice_laptop.addr).is_empty());
    for s in [&bob, &bob_tablet] {
        let frames = to(&out, &s.addr);
        assert_eq!(frames[0].request_id, 0);
        assert_eq!(
            frames[0].body,
            Some(Body::Typing(pb::Typing {
                conversation_id: DM.into(),
                active: true,
                user_id: "alice".into()
            }))
        );
    }
    // Never stored.
    let out = h.req(
        &bob,
        8,
        Body::History(pb::History {
            conversation_id: DM.into(),
            ..Default::default()
        }),
    );
    let Some(Body::HistoryPage(page)) = &reply_to(&out, &bob, 8).body else {
        panic!("expected HistoryPage");
    };
    assert!(page.messages.is_empty());
}
