//! `ConversationStore` checks: appends, dedup, reads within a byte budget,
//! receipts, groups, quota counters.

use palaver_protocol::pb;
use palaver_router_core::store::{
    message_size, Appended, GroupRecord, Membership, QuotaCharge, QuotaOwner, RangeRead, Store,
};

use super::*;

/// Storage quota counters: a charge is taken only while the day's total
/// stays within its limit, refunds always apply, owners and days apart.
pub fn quotas_count_per_owner_and_day<S: Store>(mut s: S) {
    let charge = |owner: QuotaOwner, period, amount| QuotaCharge {
        owner,
        period,
        amount,
        limit: 1000,
    };
    let alice = || QuotaOwner::Account("alice".into());
    let conv = || QuotaOwner::Conversation("alice".into());
    let got = s
        .charge_quotas(&[
            charge(alice(), 20_000, 600),
            charge(alice(), 20_000, 400),
            charge(alice(), 20_000, 1),
            charge(conv(), 20_000, 1000),
        ])
        .unwrap();
    assert_eq!(
        got,
        vec![true, true, false, true],
        "an account and a conversation of the same name are apart"
    );
    // A refund makes room again, and never goes below zero.
    assert_eq!(
        s.charge_quotas(&[charge(alice(), 20_000, -300), charge(alice(), 20_000, 301)])
            .unwrap(),
        vec![true, false]
    );
    assert_eq!(
        s.charge_quotas(&[charge(alice(), 20_000, 300)]).unwrap(),
        vec![true]
    );
    assert_eq!(
        s.charge_quotas(&[
            charge(conv(), 20_000, -5000),
            charge(conv(), 20_000, 1000),
            charge(conv(), 20_000, 1),
        ])
        .unwrap(),
        vec![true, true, false]
    );
    // The next day starts from zero.
    assert_eq!(
        s.charge_quotas(&[charge(alice(), 20_001, 1000)]).unwrap(),
        vec![true]
    );
    // A single charge above the limit is never taken.
    assert_eq!(
        s.charge_quotas(&[charge(QuotaOwner::Account("bob".into()), 20_001, 1001)])
            .unwrap(),
        vec![false]
    );
}

/// The dedup key is (conversation, sender, client_msg_id) (SPEC §6): another
/// member reusing a client_msg_id gets a message of his own, and each
/// sender's retry still gets its own original ack.
pub fn dedup_is_per_sender<S: Store>(mut s: S) {
    let first = stored(
        s.append_message("g", message("g", 9, "alice"), &retention(0, 10))
            .unwrap(),
    );
    let mut copied = message("g", 9, "bob");
    copied.message_id = "bob's".into();
    copied.body = b"bob's own words".to_vec();
    let second = stored(s.append_message("g", copied, &retention(1, 10)).unwrap());
    assert_eq!((first.seq, second.seq), (1, 2));
    assert_eq!(second.body, b"bob's own words");
    for (sender, seq, id) in [("alice", 1, "m9"), ("bob", 2, "bob's")] {
        match s
            .append_message("g", message("g", 9, sender), &retention(2, 10))
            .unwrap()
        {
            Appended::Duplicate(ack) => {
                assert_eq!((ack.seq, ack.message_id.as_str()), (seq, id), "{sender}")
            }
            other => panic!("{sender}'s retry: {other:?}"),
        }
    }
    // Looking for duplicates stores nothing.
    let found = s
        .find_duplicates(
            vec![
                ("g".into(), message("g", 9, "bob")),
                ("g".into(), message("g", 9, "carol")),
                ("other".into(), message("other", 9, "alice")),
            ],
            &retention(3, 10),
        )
        .unwrap();
    let seqs: Vec<Option<u64>> = found.iter().map(|a| a.as_ref().map(|a| a.seq)).collect();
    assert_eq!(seqs, vec![Some(2), None, None]);
    assert_eq!(
        s.last_seqs(&["g".into(), "other".into()]).unwrap(),
        vec![2, 0]
    );
}

/// Reads return what fits their byte budget (`message_size`, measured the
/// same by every store, the first message always) and no more: a History
/// or Sync of large messages never copies `limit` of them to return a few.
pub fn reads_stay_within_their_byte_budget<S: Store>(mut s: S) {
    // 150 messages of 1-3 KB, so seqs pass 127 (a 2-byte varint).
    for i in 1..=150u32 {
        let mut m = message("big", (i % 250) as u8, "u");
        m.client_msg_id = i.to_be_bytes().repeat(4);
        m.body = vec![7; 1000 * (1 + i as usize % 3)];
        s.append_message("big", m, &retention(0, 1000)).unwrap();
    }
    let read = |after_seq, limit, max_bytes| RangeRead {
        conversation_id: "big".into(),
        after_seq,
        limit,
        max_bytes,
    };
    let all = s
        .messages_after(&[read(0, 500, usize::MAX)])
        .unwrap()
        .remove(0);
    assert_eq!(all.len(), 150);
    let sizes: Vec<usize> = all.iter().map(message_size).collect();
    // Exactly the prefix that fits, at a boundary and one byte under it,
    // on both sides of seq 128.
    for (after, k) in [(0usize, 5usize), (120, 20)] {
        let exact: usize = sizes[after..after + k].iter().sum();
        for (budget, want) in [(exact, k), (exact - 1, k - 1)] {
            let got = s
                .messages_after(&[read(after as u64, 500, budget)])
                .unwrap()
                .remove(0);
            assert_eq!(
                got,
                all[after..after + want].to_vec(),
                "after {after}, {budget} B"
            );
        }
    }
    // The first message always, whatever the budget; the limit still binds.
    let one = s.messages_after(&[read(10, 500, 0)]).unwrap().remove(0);
    assert_eq!(one, all[10..11].to_vec());
    let two = s
        .messages_after(&[read(10, 2, usize::MAX)])
        .unwrap()
        .remove(0);
    assert_eq!(two, all[10..12].to_vec());
    // History: the newest that fit, ascending, and whether older remain.
    let newest: usize = sizes[140..].iter().sum();
    let page = s.messages_before("big", 0, 500, newest).unwrap();
    assert_eq!(page.messages, all[140..].to_vec());
    assert!(page.has_more);
    let page = s.messages_before("big", 141, 500, newest - 1).unwrap();
    assert_eq!(page.messages.first().map(|m| m.seq), Some(132));
    assert_eq!(page.messages.last().map(|m| m.seq), Some(140));
    let page = s.messages_before("big", 0, 500, 0).unwrap();
    assert_eq!(page.messages, all[149..].to_vec());
    let page = s.messages_before("big", 4, 500, usize::MAX).unwrap();
    assert_eq!(page.messages, all[..3].to_vec());
    assert!(!page.has_more);
    let page = s.messages_before("big", 4, 2, usize::MAX).unwrap();
    assert_eq!(page.messages, all[1..3].to_vec());
    assert!(page.has_more);
}

pub fn ranges_and_senders<S: Store>(mut s: S) {
    for i in 1..=10u8 {
        let sender = if i % 2 == 0 { "even" } else { "odd" };
        s.append_message("c2", message("c2", i, sender), &retention(0, 100))
            .unwrap();
    }
    let after = s
        .messages_after(&[
            RangeRead {
                conversation_id: "c2".into(),
                after_seq: 7,
                limit: 2,
                max_bytes: usize::MAX,
            },
            RangeRead {
                conversation_id: "nope".into(),
                after_seq: 0,
                limit: 2,
                max_bytes: usize::MAX,
            },
        ])
        .unwrap();
    assert_eq!(
        after[0].iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![8, 9]
    );
    assert!(after[1].is_empty());
    let page = s.messages_before("c2", 0, 3, usize::MAX).unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![8, 9, 10]
    );
    assert!(page.has_more);
    let page = s.messages_before("c2", 3, 5, usize::MAX).unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(!page.has_more);
    assert_eq!(s.senders_between("c2", 1, 2).unwrap(), vec!["even"]);
    let mut both = s.senders_between("c2", 0, 10).unwrap();
    both.sort();
    assert_eq!(both, vec!["even", "odd"]);
}

pub fn receipts_and_groups<S: Store>(mut s: S) {
    let read = pb::ReceiptKind::Read;
    assert_eq!(s.advance_receipt("c3", "u", read, 5).unwrap(), Some(0));
    assert_eq!(s.advance_receipt("c3", "u", read, 5).unwrap(), None);
    assert_eq!(s.advance_receipt("c3", "u", read, 3).unwrap(), None);
    assert_eq!(s.advance_receipt("c3", "u", read, 9).unwrap(), Some(5));
    assert_eq!(
        s.advance_receipt("c3", "u", pb::ReceiptKind::Delivered, 2)
            .unwrap(),
        Some(0)
    );

    let member = |u: &str, role: pb::Role| pb::Member {
        user_id: u.into(),
        role: role as i32,
    };
    let group = GroupRecord {
        conversation_id: "grp:1".into(),
        title: "t".into(),
        members: vec![member("a", pb::Role::Admin), member("b", pb::Role::Member)],
        created_ms: 42,
    };
    assert!(s.create_group(&group).unwrap());
    assert!(!s.create_group(&group).unwrap(), "exists already");
    assert_eq!(
        s.membership("grp:1", "a").unwrap(),
        Membership::Member(pb::Role::Admin)
    );
    assert_eq!(s.membership("grp:1", "z").unwrap(), Membership::NotMember);
    assert_eq!(s.membership("grp:2", "a").unwrap(), Membership::NoSuchGroup);
    s.update_members(
        "grp:1",
        &[member("c", pb::Role::Member), member("b", pb::Role::Admin)],
        &["a".into()],
    )
    .unwrap();
    let got = s.groups(&["grp:1".into(), "grp:2".into()]).unwrap();
    assert_eq!(got[1], None);
    let g = got[0].clone().unwrap();
    assert_eq!(g.title, "t");
    assert_eq!(g.created_ms, 42);
    assert_eq!(
        g.members,
        vec![member("b", pb::Role::Admin), member("c", pb::Role::Member)]
    );
    s.update_members("grp:none", &[member("c", pb::Role::Member)], &[])
        .unwrap();
    assert_eq!(s.group("grp:none").unwrap(), None);
}

/// `append_messages`: in slice order, consecutive seqs per conversation,
/// a repeated client_msg_id inside the batch is a duplicate of the first.
pub fn append_batch_in_order<S: Store>(mut s: S) {
    let batch = vec![
        ("b1".to_string(), message("b1", 1, "u")),
        ("b2".to_string(), message("b2", 1, "u")),
        ("b1".to_string(), message("b1", 2, "u")),
        ("b1".to_string(), message("b1", 1, "u")),
        ("b1".to_string(), message("b1", 3, "u")),
    ];
    let results = s.append_messages(batch, &retention(0, 100)).unwrap();
    assert_eq!(results.len(), 5);
    let seqs: Vec<(String, u64, bool)> = results
        .iter()
        .map(|r| match r {
            Appended::Stored(m) => (m.conversation_id.clone(), m.seq, true),
            Appended::Duplicate(a) => (a.conversation_id.clone(), a.seq, false),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        seqs,
        vec![
            ("b1".into(), 1, true),
            ("b2".into(), 1, true),
            ("b1".into(), 2, true),
            ("b1".into(), 1, false),
            ("b1".into(), 3, true),
        ]
    );
    match &results[3] {
        Appended::Duplicate(a) => {
            assert_eq!(a.message_id, "m1");
            assert_eq!(a.server_time_ms, 1001);
        }
        other => panic!("{other:?}"),
    }
    assert!(s
        .append_messages(Vec::new(), &retention(0, 100))
        .unwrap()
        .is_empty());
}

/// Dedup holds while the original is in the window and younger than the
/// TTL (SPEC §6), and is forgotten once it leaves the window.
pub fn dedup_follows_the_window<S: Store>(mut s: S) {
    for i in 1..=10u8 {
        stored(
            s.append_message("w", message("w", i, "u"), &retention(0, 4))
                .unwrap(),
        );
    }
    // #7..#10 are in the window: a retry is a duplicate.
    match s
        .append_message("w", message("w", 7, "u"), &retention(1, 4))
        .unwrap()
    {
        Appended::Duplicate(a) => assert_eq!((a.seq, a.message_id.as_str()), (7, "m7")),
        other => panic!("expected duplicate, got {other:?}"),
    }
    // #6 left the window: stored again, with the next seq.
    let m = stored(
        s.append_message("w", message("w", 6, "u"), &retention(1, 4))
            .unwrap(),
    );
    assert_eq!(m.seq, 11);
}

/// The history epoch (SPEC §7): announced (non-zero) and the same on every
/// read while the store keeps its history, appends included. That it
/// changes when the history is lost is each store's own test (a new memory
/// store, a wiped Redis, a new store file).
pub fn the_history_epoch_is_announced_and_stable<S: Store>(mut s: S) {
    let epoch = s.history_epoch().unwrap();
    assert_ne!(epoch, 0);
    let dm = palaver_router_core::direct_conversation_id("alice", "bob");
    stored(
        s.append_message(&dm, message(&dm, 1, "alice"), &retention(0, 10))
            .unwrap(),
    );
    assert_eq!(s.history_epoch().unwrap(), epoch);
    assert_eq!(s.history_epoch().unwrap(), epoch);
}
