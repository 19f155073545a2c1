//! The durable store (`palaver_router::disk`): the whole store contract
//! (tests/contract), then what only a store on disk has to show: a commit
//! survives closing and reopening, an uncommitted turn is gone and reuses
//! no seq anyone was told, history is unbounded (50,000 messages paged back
//! to seq 1), retention, a clear error for a file in use, and channels
//! kept across a reopen.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use palaver_protocol::pb;
use palaver_router::disk::{DiskConfig, DiskStore};
use palaver_router::store::{
    Appended, ChannelRecord, ChannelStore, ConversationStore, GroupAdds, GroupRecord, Membership,
    QuotaCharge, QuotaOwner, RangeRead, SessionChange, SessionStore, UserStore,
};
use palaver_router::ManualClock;
use palaver_testkit::stack::WorkDir;

// The store contract lives beside the core's traits (and runs on the
// memory store there).
#[path = "../../router-core/tests/contract/mod.rs"]
mod contract;
use contract::*;

type Keep = (WorkDir, Arc<ManualClock>);

/// A fresh store in a fresh directory, on a manual clock.
fn fresh() -> (Keep, DiskStore) {
    let dir = WorkDir::temp("disk-store").unwrap();
    let clock = Arc::new(ManualClock::new(1_000));
    let store =
        DiskStore::open_with_clock(dir.path(), &DiskConfig::default(), clock.clone()).unwrap();
    ((dir, clock), store)
}

/// Leases run out by the store's injected clock: no sleeping.
#[allow(clippy::type_complexity)]
fn expire(
    ((dir, clock), store): (Keep, DiskStore),
    step_ms: i64,
) -> (WorkDir, DiskStore, Box<dyn FnMut(&mut DiskStore, &str)>) {
    (dir, store, Box::new(move |_, _| clock.advance(step_ms)))
}

crate::store_contract_tests!(fresh, expire);

/// Every `pub fn …<S: Store>` check of tests/contract runs here too (the
/// macro runs them all; this guards against a check run by hand elsewhere).
#[test]
fn every_check_of_the_contract_is_run_on_disk() {
    let macro_source = include_str!("../../router-core/tests/contract/mod.rs");
    for name in check_names() {
        assert!(
            macro_source.contains(&format!("                {name},"))
                || macro_source.contains(&format!("fn {name}() {{")),
            "{name} is not in store_contract_tests!"
        );
    }
    assert!(include_str!("disk_store.rs").contains("store_contract_tests!(fresh, expire)"));
}

fn reopen(dir: &WorkDir) -> DiskStore {
    DiskStore::open_with_clock(
        dir.path(),
        &DiskConfig::default(),
        Arc::new(ManualClock::new(1_000)),
    )
    .unwrap()
}

fn all_after(s: &mut DiskStore, conversation: &str, after_seq: u64) -> Vec<pb::Message> {
    s.messages_after(&[RangeRead {
        conversation_id: conversation.into(),
        after_seq,
        limit: 100_000,
        max_bytes: usize::MAX,
    }])
    .unwrap()
    .remove(0)
}

/// Every kind of state the store keeps is there after a commit, the store
/// closed and opened again.
#[test]
fn a_commit_survives_closing_and_reopening() {
    let (keep, mut s) = fresh();
    let epoch = s.history_epoch().unwrap();
    let member = |u: &str, role: pb::Role| pb::Member {
        user_id: u.into(),
        role: role as i32,
    };
    let dm = palaver_router::direct_conversation_id("alice", "bob");
    let sent = stored(
        s.append_message(&dm, message(&dm, 1, "alice"), &retention(0, 100))
            .unwrap(),
    );
    stored(
        s.append_message(&dm, message(&dm, 2, "bob"), &retention(0, 100))
            .unwrap(),
    );
    assert!(s
        .create_group(&GroupRecord {
            conversation_id: "grp:1".into(),
            title: "team".into(),
            members: vec![
                member("alice", pb::Role::Admin),
                member("bob", pb::Role::Member)
            ],
            created_ms: 7,
        })
        .unwrap());
    s.add_conversation_to_users("grp:1", &["alice".into(), "bob".into()])
        .unwrap();
    s.add_conversation_to_users(&dm, &["alice".into(), "bob".into()])
        .unwrap();
    s.advance_receipt(&dm, "bob", pb::ReceiptKind::Read, 1)
        .unwrap();
    assert_eq!(s.mark_push_pending(&dm, &["bob"]).unwrap(), vec![true]);
    let quota = |amount| QuotaCharge {
        owner: QuotaOwner::Account("alice".into()),
        period: 5,
        amount,
        limit: 100,
    };
    assert_eq!(s.charge_quotas(&[quota(60)]).unwrap(), vec![true]);
    s.count_group_adds(20_000, "alice", &[("carol".into(), true)])
        .unwrap();
    s.commit().unwrap();
    drop(s);

    let mut s = reopen(&keep.0);
    assert_eq!(s.history_epoch().unwrap(), epoch, "the same history");
    let (_other_dir, mut other) = fresh();
    assert_ne!(
        other.history_epoch().unwrap(),
        epoch,
        "a new file is a new history"
    );
    let history = all_after(&mut s, &dm, 0);
    assert_eq!(history.len(), 2);
    assert_eq!(history[0], sent, "the message as stored, id and seq too");
    assert_eq!(s.last_seqs(std::slice::from_ref(&dm)).unwrap(), vec![2]);
    // Dedup survived: a retry of message 1 gets its original ack.
    match s
        .append_message(&dm, message(&dm, 1, "alice"), &retention(1, 100))
        .unwrap()
    {
        Appended::Duplicate(ack) => assert_eq!((ack.seq, ack.message_id.as_str()), (1, "m1")),
        other => panic!("a retry after a restart was stored again: {other:?}"),
    }
    assert_eq!(
        s.membership("grp:1", "alice").unwrap(),
        Membership::Member(pb::Role::Admin)
    );
    assert_eq!(s.group("grp:1").unwrap().unwrap().title, "team");
    let mut convs = s.conversations_of_user("bob").unwrap();
    convs.sort();
    assert_eq!(convs, vec![dm.clone(), "grp:1".to_string()]);
    assert_eq!(s.group_counts(&["alice".into()]).unwrap(), vec![1]);
    assert_eq!(
        s.written_by_both(std::slice::from_ref(&dm)).unwrap(),
        vec![true]
    );
    assert_eq!(s.presence_links(&[("alice", "bob")]).unwrap(), vec![true]);
    assert_eq!(
        s.advance_receipt(&dm, "bob", pb::ReceiptKind::Read, 1)
            .unwrap(),
        None,
        "the read mark survived"
    );
    assert_eq!(
        s.mark_push_pending(&dm, &["bob"]).unwrap(),
        vec![true],
        "the push mark did not survive: its push was in the previous run's memory queue"
    );
    assert_eq!(
        s.charge_quotas(&[quota(41)]).unwrap(),
        vec![false],
        "the quota counter survived (60 + 41 > 100)"
    );
    assert_eq!(
        s.group_adds_on(20_000, "alice", &["carol".into()]).unwrap(),
        vec![GroupAdds {
            by_adder: 1,
            by_strangers: 1
        }]
    );
}

/// A turn that never committed (the process was killed before its fsync)
/// is gone whole; nobody was told its seqs, and the next message takes the
/// seq after the last committed one.
#[test]
fn an_uncommitted_turn_is_gone_and_seqs_go_on_from_the_last_commit() {
    let (keep, mut s) = fresh();
    for i in 1..=3 {
        s.append_message("c", message("c", i, "u"), &retention(0, 100))
            .unwrap();
    }
    s.commit().unwrap();
    for i in 4..=5 {
        s.append_message("c", message("c", i, "u"), &retention(0, 100))
            .unwrap();
    }
    assert_eq!(
        s.last_seqs(&["c".into()]).unwrap(),
        vec![5],
        "seen in the turn"
    );
    drop(s);
    let mut s = reopen(&keep.0);
    assert_eq!(s.last_seqs(&["c".into()]).unwrap(), vec![3]);
    let seqs: Vec<u64> = all_after(&mut s, "c", 0).iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    let next = stored(
        s.append_message("c", message("c", 4, "u"), &retention(0, 100))
            .unwrap(),
    );
    assert_eq!(next.seq, 4);
}

/// No window on disk: 50,000 messages, committed in turns of 500, are all
/// there, and History pages from the newest back to seq 1, in order, each
/// page ending where the next begins. Dedup still follows the window.
#[test]
fn fifty_thousand_messages_page_back_to_seq_1() {
    const N: u32 = 50_000;
    let (_keep, mut s) = fresh();
    let window = 10_000;
    for turn in 0..N / 500 {
        let batch = (1..=500)
            .map(|i| {
                let n = turn * 500 + i;
                let mut m = message("big", 0, "u");
                m.client_msg_id = n.to_be_bytes().to_vec();
                m.message_id = format!("m{n}");
                m.body = n.to_string().into_bytes();
                ("big".to_string(), m)
            })
            .collect();
        let appended = s.append_messages(batch, &retention(0, window)).unwrap();
        assert!(appended.iter().all(|a| matches!(a, Appended::Stored(_))));
        s.commit().unwrap();
    }
    let mut before = 0;
    let mut seen = Vec::with_capacity(N as usize);
    loop {
        let page = s.messages_before("big", before, 500, usize::MAX).unwrap();
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] + 1 == w[1]),
            "ascending, gapless"
        );
        for m in page.messages.iter().rev() {
            assert_eq!(m.body, m.seq.to_string().into_bytes(), "seq {}", m.seq);
            seen.push(m.seq);
        }
        let Some(first) = page.messages.first() else {
            panic!("an empty page at before_seq {before}");
        };
        before = first.seq;
        if !page.has_more {
            break;
        }
    }
    let want: Vec<u64> = (1..=u64::from(N)).rev().collect();
    assert_eq!(seen, want, "every message, newest to seq 1");
    // Sync from 0 reads the oldest first, from disk.
    let first = s
        .messages_after(&[RangeRead {
            conversation_id: "big".into(),
            after_seq: 0,
            limit: 3,
            max_bytes: usize::MAX,
        }])
        .unwrap()
        .remove(0);
    assert_eq!(
        first.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // Dedup: a retry inside the newest 10,000 is a duplicate; one of a
    // message that left that window is a new message (SPEC §6).
    let retry = |n: u32| {
        let mut m = message("big", 0, "u");
        m.client_msg_id = n.to_be_bytes().to_vec();
        m
    };
    match s
        .append_message("big", retry(N - 100), &retention(1, window))
        .unwrap()
    {
        Appended::Duplicate(ack) => assert_eq!(ack.seq, u64::from(N - 100)),
        other => panic!("{other:?}"),
    }
    let again = stored(
        s.append_message("big", retry(100), &retention(1, window))
            .unwrap(),
    );
    assert_eq!(again.seq, u64::from(N) + 1);
}

/// Retention: messages older than `retention_days` go at a commit (the
/// sweep runs at most once a second of the store's clock), newer ones and
/// the seq counter stay.
#[test]
fn retention_deletes_old_messages_and_keeps_the_seq() {
    let dir = WorkDir::temp("disk-retention").unwrap();
    let day_ms = 24 * 60 * 60 * 1000;
    let clock = Arc::new(ManualClock::new(10 * day_ms));
    let config = DiskConfig {
        retention_days: 2,
        ..DiskConfig::default()
    };
    let mut s = DiskStore::open_with_clock(dir.path(), &config, clock.clone()).unwrap();
    for (i, age_days) in [(1u8, 5), (2, 4), (3, 1), (4, 0)] {
        let mut m = message("r", i, "u");
        m.server_time_ms = 10 * day_ms - age_days * day_ms;
        s.append_message("r", m, &retention(0, 100)).unwrap();
    }
    s.commit().unwrap();
    clock.advance(1_000);
    s.commit().unwrap();
    let seqs: Vec<u64> = all_after(&mut s, "r", 0).iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![3, 4], "the two older than 2 days went");
    let page = s.messages_before("r", 0, 10, usize::MAX).unwrap();
    assert!(!page.has_more);
    drop(s);
    let mut s = DiskStore::open_with_clock(dir.path(), &config, clock).unwrap();
    assert_eq!(s.last_seqs(&["r".into()]).unwrap(), vec![4]);
    assert_eq!(all_after(&mut s, "r", 0).len(), 2, "deleted for good");
}

/// Opening a store another process (or handle) has open says which file
/// and what to do, instead of waiting or corrupting it.
#[test]
fn a_store_in_use_is_a_clear_error() {
    let (keep, _s) = fresh();
    let err = DiskStore::open(keep.0.path(), &DiskConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&keep.0.path().display().to_string()), "{err}");
    assert!(err.contains("another palaver-gateway"), "{err}");
}

/// A session opening clears its user's push marks, which are on disk.
#[test]
fn an_open_session_clears_the_push_marks_on_disk() {
    let (_keep, mut s) = fresh();
    assert_eq!(
        s.mark_push_pending("c", &["bob", "carol"]).unwrap(),
        vec![true, true]
    );
    s.apply_sessions(
        "gw",
        std::time::Duration::from_secs(60),
        1_000,
        &[SessionChange::Opened(session("bob", "phone", "gw", 1))],
    )
    .unwrap();
    s.commit().unwrap();
    assert_eq!(
        s.mark_push_pending("c", &["bob", "carol"]).unwrap(),
        vec![true, false],
        "bob's mark was cleared by his session, carol's stays"
    );
}

/// A channel is on disk after a commit: record, counts, members, roles and
/// read positions survive a reopen; a change in a turn that never
/// committed is gone with it, counts included.
#[test]
fn a_channel_survives_reopening_and_an_uncommitted_change_is_gone() {
    let (keep, mut s) = fresh();
    let channel = ChannelRecord {
        conversation_id: "chn:1".into(),
        title: "news".into(),
        settings: pb::ChannelSettings {
            public: true,
            admins_only_post: false,
        },
        created_ms: 9,
        member_count: 0,
        admin_count: 0,
    };
    let members: Vec<pb::Member> = (0..1200)
        .map(|i| pb::Member {
            user_id: format!("u{i}"),
            role: if i == 0 {
                pb::Role::Admin
            } else {
                pb::Role::Member
            } as i32,
        })
        .collect();
    assert!(s.create_channel(&channel, &members).unwrap());
    assert_eq!(s.raise_read_position("chn:1", "u5", 42).unwrap(), 42);
    s.commit().unwrap();
    // Next turn, not committed: a removal and a position.
    s.change_channel_members("chn:1", &[], &[], &["u5".into()], 10_000)
        .unwrap()
        .unwrap();
    s.raise_read_position("chn:1", "u6", 7).unwrap();
    drop(s);
    let mut s = reopen(&keep.0);
    let stored = s.channel("chn:1").unwrap().unwrap();
    assert_eq!((stored.member_count, stored.admin_count), (1200, 1));
    assert_eq!(stored.settings, channel.settings);
    assert_eq!(
        s.channel_role("chn:1", "u0").unwrap(),
        Some(pb::Role::Admin)
    );
    assert_eq!(
        s.channel_role("chn:1", "u5").unwrap(),
        Some(pb::Role::Member)
    );
    assert_eq!(s.read_position("chn:1", "u5").unwrap(), 42);
    assert_eq!(s.read_position("chn:1", "u6").unwrap(), 0);
    let (page, more) = s.channel_members("chn:1", "u0", 1000).unwrap();
    assert_eq!(page.len(), 1000);
    assert_eq!(page[0].user_id, "u1");
    assert!(more, "199 more after");
}
