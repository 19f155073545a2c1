//! The store contract: checks every `Store` implementation must pass, run
//! against `MemoryStore` (tests/memory_store.rs) and `RedisStore` on standalone
//! Redis and Redis Cluster (tests/redis_store.rs). Each check takes a fresh store.
// Each test binary uses a different subset of the helpers.
#![allow(dead_code)]

use std::time::Duration;

use palaver_protocol::pb;
use palaver_router::api::{Session, SessionAddr};
use palaver_router::store::{
    message_size, Appended, GroupAdds, GroupRecord, Membership, QuotaCharge, QuotaOwner, RangeRead,
    Retention, SessionChange, SessionsApplied, Store, UserPresence,
};

/// One `#[test]` per check of the contract, each on a fresh store, so the
/// first failure hides none of the others. Every check is named here once;
/// `every_check_of_the_contract_is_run` fails if one is added to this file
/// but not here.
///
/// `$fresh` makes `(keep_alive, store)` (a server the store needs, kept
/// until the check ends); `$expire(step_ms)` makes the hook that lets a
/// gateway's lease run out (`step_ms` of a manual clock for a store that has
/// one; a store on a real clock waits for its own expiry).
#[macro_export]
macro_rules! store_contract_tests {
    ($fresh:expr, $expire:expr) => {
        mod store_contract {
            use super::*;

            $crate::store_contract_tests!(@checks $fresh;
                append_batch_in_order,
                dedup_follows_the_window,
                ranges_and_senders,
                quotas_count_per_owner_and_day,
                dedup_is_per_sender,
                reads_stay_within_their_byte_budget,
                receipts_and_groups,
                users_and_push,
                presence_links_and_consent,
                group_add_counts,
            );

            #[test]
            fn sessions_and_registry() {
                let (_keep, s, expire) = $expire($fresh(), 201);
                contract::sessions_and_registry(s, expire);
            }

            #[test]
            fn presence_events_ignore_dead_gateways() {
                let (_keep, s, expire) = $expire($fresh(), 501);
                contract::presence_events_ignore_dead_gateways(s, expire);
            }

            #[test]
            fn a_gateway_reaped_while_stalled_rejoins() {
                let (_keep, s, expire) = $expire($fresh(), 501);
                contract::a_gateway_reaped_while_stalled_rejoins(s, expire);
            }
        }
    };
    (@checks $fresh:expr; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                let (_keep, s) = $fresh();
                contract::$check(s);
            }
        )*
    };
}

/// The names of the contract's checks, read from this file's source (the
/// `pub fn <name><S: Store>` items), for the test that each is run.
pub fn check_names() -> Vec<String> {
    include_str!("mod.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("pub fn "))
        .filter(|l| l.contains("<S: Store>"))
        .filter_map(|l| l.split('<').next())
        .map(str::to_string)
        .collect()
}

pub fn retention(now_ms: i64, window: usize) -> Retention {
    Retention {
        now_ms,
        dedup_ttl_ms: 1000,
        history_window: window,
    }
}

pub fn message(conv: &str, cmid: u8, sender: &str) -> pb::Message {
    pb::Message {
        conversation_id: conv.into(),
        client_msg_id: vec![cmid; 16],
        message_id: format!("m{cmid}"),
        sender_user_id: sender.into(),
        body: vec![cmid; 3],
        kind: pb::ContentKind::Text as i32,
        server_time_ms: 1000 + cmid as i64,
        ..Default::default()
    }
}

pub fn stored(a: Appended) -> pb::Message {
    match a {
        Appended::Stored(m) => m,
        Appended::Duplicate(ack) => panic!("unexpected duplicate {ack:?}"),
    }
}

pub fn addr(gw: &str, conn: u64) -> SessionAddr {
    SessionAddr {
        gateway_id: gw.into(),
        conn,
    }
}

pub fn session(user: &str, device: &str, gw: &str, conn: u64) -> Session {
    Session {
        user_id: user.into(),
        device_id: device.into(),
        addr: addr(gw, conn),
    }
}

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

pub fn users_and_push<S: Store>(mut s: S) {
    let users: Vec<String> = vec!["p1".into(), "p2".into()];
    s.add_conversation_to_users("c4", &users).unwrap();
    s.add_conversation_to_users("c5", &users[..1]).unwrap();
    let mut convs = s.conversations_of_user("p1").unwrap();
    convs.sort();
    assert_eq!(convs, vec!["c4", "c5"]);
    s.remove_conversation_from_users("c4", &users).unwrap();
    assert_eq!(s.conversations_of_user("p2").unwrap(), Vec::<String>::new());

    assert_eq!(s.mark_push_pending("c4", &users).unwrap(), vec![true, true]);
    assert_eq!(
        s.mark_push_pending("c4", &users).unwrap(),
        vec![false, false]
    );
    s.clear_push_pending("p1", Some("c4")).unwrap();
    s.clear_push_pending("p2", None).unwrap();
    assert_eq!(s.mark_push_pending("c4", &users).unwrap(), vec![true, true]);
}

/// The presence links of SPEC §10: a direct conversation counts once both
/// of its users have written in it (the append records its writers), a
/// group while both are members; in input order, the viewer's side
/// walked. Plus `written_by_both`, `group_counts` and `members_among`.
pub fn presence_links_and_consent<S: Store>(mut s: S) {
    let dm = "dm:lk-a:lk-b";
    let pairs = [
        ("lk-a", "lk-b"),
        ("lk-b", "lk-a"),
        ("lk-a", "lk-c"),
        ("lk-a", "never-seen"),
        ("lk-a", "lk-a"),
    ];
    assert_eq!(s.presence_links(&pairs).unwrap(), vec![false; 5]);
    // Created (listed for both) and written by one: does not count.
    s.add_conversation_to_users(dm, &["lk-a".into(), "lk-b".into()])
        .unwrap();
    s.append_message(dm, message(dm, 1, "lk-a"), &retention(0, 100))
        .unwrap();
    s.append_message(dm, message(dm, 2, "lk-a"), &retention(0, 100))
        .unwrap();
    assert_eq!(s.written_by_both(&[dm.into()]).unwrap(), [false]);
    assert_eq!(s.presence_links(&pairs[..2]).unwrap(), [false, false]);
    // Both wrote: counts, both ways, and stays once the messages left the
    // history window.
    s.append_message(dm, message(dm, 3, "lk-b"), &retention(0, 1))
        .unwrap();
    s.append_message(dm, message(dm, 4, "lk-a"), &retention(0, 1))
        .unwrap();
    assert_eq!(
        s.written_by_both(&[dm.into(), "dm:lk-a:lk-c".into()])
            .unwrap(),
        [true, false]
    );
    assert_eq!(
        s.presence_links(&pairs).unwrap(),
        [true, true, false, false, false]
    );
    // A group counts while both are members; other groups of either do not.
    let member = |u: &str| pb::Member {
        user_id: u.into(),
        role: pb::Role::Member as i32,
    };
    for (id, members) in [
        ("grp:lk1", &["lk-a", "lk-c"][..]),
        ("grp:lk2", &["lk-a", "lk-d"]),
        ("grp:lk3", &["lk-c", "lk-d"]),
    ] {
        let group = GroupRecord {
            conversation_id: id.into(),
            title: String::new(),
            members: members.iter().map(|u| member(u)).collect(),
            created_ms: 1,
        };
        assert!(s.create_group(&group).unwrap());
        let users: Vec<String> = members.iter().map(|u| u.to_string()).collect();
        s.add_conversation_to_users(id, &users).unwrap();
    }
    assert_eq!(
        s.group_counts(&["lk-a".into(), "lk-c".into(), "lk-b".into()])
            .unwrap(),
        [2, 2, 0]
    );
    assert_eq!(
        s.presence_links(&[("lk-a", "lk-c"), ("lk-c", "lk-a"), ("lk-b", "lk-c")])
            .unwrap(),
        [true, true, false]
    );
    assert_eq!(
        s.members_among("grp:lk1", &["lk-c".into(), "lk-d".into(), "lk-a".into()])
            .unwrap(),
        [true, false, true]
    );
    assert_eq!(
        s.members_among("grp:none", &["lk-c".into()]).unwrap(),
        [false]
    );
    // Removed from the only shared group: no longer linked.
    s.update_members("grp:lk1", &[], &["lk-c".into()]).unwrap();
    s.remove_conversation_from_users("grp:lk1", &["lk-c".into()])
        .unwrap();
    assert_eq!(
        s.presence_links(&[("lk-a", "lk-c"), ("lk-c", "lk-a"), ("lk-c", "lk-d")])
            .unwrap(),
        [false, false, true]
    );
    assert_eq!(s.group_counts(&["lk-c".into()]).unwrap(), [1]);
    assert_eq!(
        s.members_among("grp:lk1", &["lk-c".into()]).unwrap(),
        [false]
    );
    // Direct conversations are not groups.
    assert_eq!(s.group_counts(&["lk-b".into()]).unwrap(), [0]);
    assert_eq!(s.presence_links(&[]).unwrap(), Vec::<bool>::new());
}

/// The day's group-add counts: per adder and by strangers, per user, per
/// UTC day.
pub fn group_add_counts<S: Store>(mut s: S) {
    let users: Vec<String> = vec!["ad-x".into(), "ad-y".into()];
    let none = GroupAdds::default();
    assert_eq!(s.group_adds_on(7, "ad-a", &users).unwrap(), [none, none]);
    s.count_group_adds(7, "ad-a", &[("ad-x".into(), true), ("ad-y".into(), false)])
        .unwrap();
    s.count_group_adds(7, "ad-a", &[("ad-x".into(), true)])
        .unwrap();
    s.count_group_adds(7, "ad-b", &[("ad-x".into(), true), ("ad-y".into(), false)])
        .unwrap();
    let adds = |by_adder, by_strangers| GroupAdds {
        by_adder,
        by_strangers,
    };
    assert_eq!(
        s.group_adds_on(7, "ad-a", &users).unwrap(),
        [adds(2, 3), adds(1, 0)]
    );
    assert_eq!(
        s.group_adds_on(7, "ad-b", &users).unwrap(),
        [adds(1, 3), adds(1, 0)]
    );
    assert_eq!(
        s.group_adds_on(7, "ad-c", &users).unwrap(),
        [adds(0, 3), none]
    );
    // Another day starts from nothing.
    assert_eq!(s.group_adds_on(8, "ad-a", &users).unwrap(), [none, none]);
    s.count_group_adds(8, "ad-a", &[("ad-x".into(), true)])
        .unwrap();
    assert_eq!(
        s.group_adds_on(8, "ad-a", &users[..1]).unwrap(),
        [adds(1, 1)]
    );
}

/// A came-online event.
fn online(user: &str) -> pb::Presence {
    pb::Presence {
        user_id: user.into(),
        online: true,
        last_seen_ms: 0,
    }
}

/// A went-offline event, last seen `at_ms`.
fn offline(user: &str, at_ms: i64) -> pb::Presence {
    pb::Presence {
        user_id: user.into(),
        online: false,
        last_seen_ms: at_ms,
    }
}

/// Sessions and the gateway registry: what both backends' presence rests
/// on. `expire_lease(store, gateway)` returns once that gateway's lease has
/// run out (a manual clock moves on for the memory store; Redis is waited
/// on).
pub fn sessions_and_registry<S: Store>(mut s: S, mut expire_lease: impl FnMut(&mut S, &str)) {
    const LEASE: Duration = Duration::from_secs(30);
    let opened = |s: &Session| SessionChange::Opened(s.clone());
    let closed = |s: &Session, at_ms| SessionChange::Closed {
        session: s.clone(),
        at_ms,
    };
    let nothing = SessionsApplied::default();
    assert!(s.register_gateway("gA", LEASE, 1).unwrap().is_empty());
    assert!(s.register_gateway("gB", LEASE, 1).unwrap().is_empty());

    // The first device: came online.
    let a1 = session("s1", "phone", "gA", 1);
    let applied = s.apply_sessions("gA", LEASE, 10, &[opened(&a1)]).unwrap();
    assert_eq!(applied.presence, vec![online("s1")]);
    assert!(applied.replaced.is_empty());
    // The same device again elsewhere: the old address is replaced, and the
    // user does not come online a second time.
    let b7 = session("s1", "phone", "gB", 7);
    let applied = s.apply_sessions("gB", LEASE, 20, &[opened(&b7)]).unwrap();
    assert_eq!(applied.replaced, vec![(b7.clone(), addr("gA", 1))]);
    assert!(applied.presence.is_empty());
    // Registered at the same address again: nothing to replace.
    assert_eq!(
        s.apply_sessions("gB", LEASE, 21, &[opened(&b7)]).unwrap(),
        nothing
    );
    // The replaced connection closing late removes nothing.
    assert_eq!(
        s.apply_sessions("gA", LEASE, 30, &[closed(&a1, 30)])
            .unwrap(),
        nothing
    );
    assert_eq!(
        s.sessions_of_users(&["s1", "s2"]).unwrap(),
        [vec![addr("gB", 7)], vec![]].into_iter().collect()
    );
    // A second device: no change; the user goes offline only with the last
    // device, last seen at its close.
    let tablet = session("s1", "tablet", "gA", 2);
    let mut applied = s
        .apply_sessions("gA", LEASE, 40, &[opened(&tablet)])
        .unwrap();
    // Opened beside the phone on gB: a store may report it, for the
    // account cap across gateways (the memory store, one node, does not).
    let beside = std::mem::take(&mut applied.opened_beside);
    assert!(
        beside.is_empty() || beside == vec![(addr("gA", 2), vec!["gB".into()])],
        "{beside:?}"
    );
    assert_eq!(applied, nothing);
    assert_eq!(
        s.apply_sessions("gB", LEASE, 50, &[closed(&b7, 50)])
            .unwrap(),
        nothing
    );
    assert!(s.presence_of_users(&["s1".into()]).unwrap()[0].online);
    let applied = s
        .apply_sessions("gA", LEASE, 77, &[closed(&tablet, 77)])
        .unwrap();
    assert_eq!(applied.presence, vec![offline("s1", 77)]);
    assert_eq!(
        s.presence_of_users(&["s1".into(), "never".into()]).unwrap(),
        vec![
            UserPresence {
                online: false,
                last_seen_ms: 77
            },
            UserPresence::default()
        ]
    );

    // One batch, applied in order.
    let (t1, t2d, t2e) = (
        session("t1", "d", "gA", 10),
        session("t2", "d", "gA", 11),
        session("t2", "e", "gA", 12),
    );
    let applied = s
        .apply_sessions(
            "gA",
            LEASE,
            100,
            &[opened(&t1), opened(&t2d), opened(&t2e), closed(&t2e, 150)],
        )
        .unwrap();
    assert_eq!(applied.presence, vec![online("t1"), online("t2")]);

    // Connecting clears the user's pending push marks.
    assert_eq!(s.mark_push_pending("pc", &["p1"]).unwrap(), [true]);
    assert_eq!(s.mark_push_pending("pc", &["p1"]).unwrap(), [false]);
    let p1 = session("p1", "d", "gA", 20);
    s.apply_sessions("gA", LEASE, 160, &[opened(&p1)]).unwrap();
    assert_eq!(s.mark_push_pending("pc", &["p1"]).unwrap(), [true]);

    // A gateway whose lease ran out: its sessions stop counting at once,
    // and reaping it takes its users offline for good.
    assert!(s
        .register_gateway("gDead", Duration::from_millis(200), 200)
        .unwrap()
        .is_empty());
    let (t3, t4, t4_elsewhere) = (
        session("t3", "d", "gDead", 1),
        session("t4", "d", "gDead", 2),
        session("t4", "x", "gA", 3),
    );
    s.apply_sessions(
        "gDead",
        Duration::from_millis(200),
        200,
        &[opened(&t3), opened(&t4)],
    )
    .unwrap();
    s.apply_sessions("gA", LEASE, 200, &[opened(&t4_elsewhere)])
        .unwrap();
    assert!(s.dead_gateways().unwrap().is_empty());
    assert!(s.presence_of_users(&["t3".into()]).unwrap()[0].online);
    expire_lease(&mut s, "gDead");
    assert_eq!(s.dead_gateways().unwrap(), ["gDead"]);
    let p = s.presence_of_users(&["t3".into(), "t4".into()]).unwrap();
    assert!(!p[0].online, "t3 only on the dead gateway");
    assert!(p[1].online, "t4 also on gA");
    assert_eq!(
        s.sessions_of_users(&["t3", "t4"]).unwrap(),
        [vec![], vec![addr("gA", 3)]].into_iter().collect()
    );
    assert_eq!(
        s.reap_gateway("gDead", "gA", 999).unwrap(),
        Some(vec![offline("t3", 999)])
    );
    assert_eq!(s.reap_gateway("gDead", "gB", 1000).unwrap(), None);
    assert!(s.dead_gateways().unwrap().is_empty());
    assert_eq!(
        s.presence_of_users(&["t3".into()]).unwrap()[0],
        UserPresence {
            online: false,
            last_seen_ms: 999
        }
    );

    // A clean shutdown: the gateway's users go offline, it is not dead.
    let u1 = session("u1", "d", "gB", 5);
    s.apply_sessions("gB", LEASE, 1100, &[opened(&u1)]).unwrap();
    assert_eq!(
        s.deregister_gateway("gB", 1234).unwrap(),
        vec![offline("u1", 1234)]
    );
    assert!(s.dead_gateways().unwrap().is_empty());
    assert!(!s.presence_of_users(&["u1".into()]).unwrap()[0].online);

    // A gateway id registering again inside its lease (a fast restart):
    // what the previous run left behind is removed first.
    let mut left: Vec<String> = s
        .register_gateway("gA", LEASE, 2000)
        .unwrap()
        .into_iter()
        .map(|p| {
            assert_eq!((p.online, p.last_seen_ms), (false, 2000));
            p.user_id
        })
        .collect();
    left.sort();
    assert_eq!(left, ["p1", "t1", "t2", "t4"]);
    assert!(!s.presence_of_users(&["t4".into()]).unwrap()[0].online);
}

/// Presence events count only sessions on live gateways, as the reads do:
/// a user whose other sessions sit on a dead (lease run out, not yet reaped)
/// gateway comes online with a session elsewhere and goes offline when the
/// last live one closes, whether it closes in a batch, a clean shutdown or
/// a restart. `expire_lease(store, gateway)` returns once that gateway's
/// lease (500 ms) has run out.
pub fn presence_events_ignore_dead_gateways<S: Store>(
    mut s: S,
    mut expire_lease: impl FnMut(&mut S, &str),
) {
    const LEASE: Duration = Duration::from_secs(30);
    const SHORT: Duration = Duration::from_millis(500);
    let gone = |at_ms| UserPresence {
        online: false,
        last_seen_ms: at_ms,
    };
    let here = UserPresence {
        online: true,
        last_seen_ms: 0,
    };
    let opened = |s: &Session| SessionChange::Opened(s.clone());
    let closed = |s: &Session, at_ms| SessionChange::Closed {
        session: s.clone(),
        at_ms,
    };
    let users = |ids: &[&str]| ids.iter().map(|u| u.to_string()).collect::<Vec<_>>();
    for gateway in ["gL", "gX", "gR"] {
        assert!(s.register_gateway(gateway, LEASE, 1).unwrap().is_empty());
    }
    assert!(s.register_gateway("gD", SHORT, 1).unwrap().is_empty());

    // One device each on gD, the gateway that is going to die.
    let on_dead: Vec<Session> = (1..=7u64)
        .map(|i| session(&format!("q{i}"), "tablet", "gD", i))
        .collect();
    let changes: Vec<SessionChange> = on_dead.iter().map(opened).collect();
    let applied = s.apply_sessions("gD", SHORT, 10, &changes).unwrap();
    let firsts: Vec<pb::Presence> = (1..=7).map(|i| online(&format!("q{i}"))).collect();
    assert_eq!(applied.presence, firsts);
    // Second devices on live gateways while gD lives: nobody comes online.
    let (q2_phone, q4_phone, q5_phone, q6_phone) = (
        session("q2", "phone", "gL", 12),
        session("q4", "phone", "gL", 14),
        session("q5", "phone", "gX", 15),
        session("q6", "phone", "gR", 16),
    );
    let applied = s
        .apply_sessions(
            "gL",
            LEASE,
            20,
            &[opened(&q2_phone), opened(&q4_phone), closed(&q4_phone, 25)],
        )
        .unwrap();
    // Opened beside the first devices on gD (dead ones are not judged here:
    // the account cap reads leases only at the cap); a store may report it.
    let mut applied = applied;
    let beside = std::mem::take(&mut applied.opened_beside);
    assert!(
        beside.is_empty()
            || beside
                == vec![
                    (addr("gL", 12), vec!["gD".into()]),
                    (addr("gL", 14), vec!["gD".into()]),
                ],
        "{beside:?}"
    );
    assert_eq!(applied, SessionsApplied::default(), "q4 still on gD");
    assert!(s
        .apply_sessions("gX", LEASE, 30, &[opened(&q5_phone)])
        .unwrap()
        .presence
        .is_empty());
    assert!(s
        .apply_sessions("gR", LEASE, 30, &[opened(&q6_phone)])
        .unwrap()
        .presence
        .is_empty());

    expire_lease(&mut s, "gD");
    assert_eq!(s.dead_gateways().unwrap(), ["gD"]);
    let before = s
        .presence_of_users(&users(&["q1", "q2", "q3", "q5", "q6", "q7"]))
        .unwrap();
    assert_eq!(before, vec![gone(0), here, gone(0), here, here, gone(0)]);

    // q1 reconnects the same device through gL (its old address, on gD, is
    // replaced), q3 connects another device: both came online, as the
    // reads already say.
    let (q1_phone, q3_phone) = (
        session("q1", "tablet", "gL", 21),
        session("q3", "phone", "gL", 23),
    );
    let applied = s
        .apply_sessions("gL", LEASE, 100, &[opened(&q1_phone), opened(&q3_phone)])
        .unwrap();
    assert_eq!(applied.replaced, vec![(q1_phone.clone(), addr("gD", 1))]);
    assert_eq!(applied.presence, vec![online("q1"), online("q3")]);
    assert_eq!(
        s.presence_of_users(&users(&["q1", "q3"])).unwrap(),
        vec![here, here]
    );

    // q2's last live session closes: offline, last seen at the close. In
    // the same batch q7 comes online and goes again (batch order holds),
    // next to a user with no session anywhere else.
    let q7_phone = session("q7", "phone", "gL", 27);
    let fresh = session("q8", "phone", "gL", 28);
    let applied = s
        .apply_sessions(
            "gL",
            LEASE,
            200,
            &[
                closed(&q2_phone, 200),
                opened(&q7_phone),
                opened(&fresh),
                closed(&q7_phone, 210),
            ],
        )
        .unwrap();
    assert!(applied.replaced.is_empty());
    assert_eq!(
        applied.presence,
        vec![
            offline("q2", 200),
            online("q7"),
            online("q8"),
            offline("q7", 210)
        ]
    );
    assert_eq!(
        s.presence_of_users(&users(&["q2", "q7", "q8"])).unwrap(),
        vec![gone(200), gone(210), here]
    );
    assert_eq!(
        s.sessions_of_users(&users(&["q2"])).unwrap(),
        [vec![]].into_iter().collect()
    );

    // A clean shutdown of gX takes q5's last live session: offline.
    assert_eq!(
        s.deregister_gateway("gX", 300).unwrap(),
        vec![offline("q5", 300)]
    );
    // gR restarting inside its lease removes what its previous run left:
    // q6's last live session, offline.
    assert_eq!(
        s.register_gateway("gR", LEASE, 400).unwrap(),
        vec![offline("q6", 400)]
    );
    assert_eq!(
        s.presence_of_users(&users(&["q5", "q6"])).unwrap(),
        vec![gone(300), gone(400)]
    );

    // Reaping gD: q4 (whose other device closed while gD lived) goes
    // offline now; q1's old address was replaced and q3 is on gL, so they
    // stay online. Users already reported offline whose last session was on
    // gD (q2, q5, q6, q7) are reported again, last seen moving to the reap:
    // the store does not record which offline was already announced.
    let mut reaped = s.reap_gateway("gD", "gL", 999).unwrap().unwrap();
    reaped.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    let expected: Vec<pb::Presence> = ["q2", "q4", "q5", "q6", "q7"]
        .iter()
        .map(|u| offline(u, 999))
        .collect();
    assert_eq!(reaped, expected);
    assert_eq!(
        s.presence_of_users(&users(&["q1", "q3", "q4"])).unwrap(),
        vec![here, here, gone(999)]
    );
}

/// A gateway taken for dead while it was only stalled (a paused VM): its
/// lease ran out, another gateway reaped it (its sessions removed, the
/// registry forgot it), then it renews. `rejoin_if_forgotten` says so, once;
/// the gateway is known again, so a real death later is seen and reaped;
/// and the sessions it reopens count, except one whose device reconnected
/// elsewhere meanwhile: that newer connection stays, the old one is replaced.
pub fn a_gateway_reaped_while_stalled_rejoins<S: Store>(
    mut s: S,
    mut expire_lease: impl FnMut(&mut S, &str),
) {
    const LEASE: Duration = Duration::from_secs(30);
    const SHORT: Duration = Duration::from_millis(500);
    // Names of their own: a Redis server is shared by every check.
    let (live, stalled) = ("gw-rejoin-live", "gw-rejoin-stalled");
    s.register_gateway(live, LEASE, 1).unwrap();
    s.register_gateway(stalled, SHORT, 1).unwrap();
    assert!(
        !s.rejoin_if_forgotten(live, LEASE, 2).unwrap(),
        "a registered gateway was not forgotten"
    );
    let (rita, rex) = (
        session("rita", "phone", stalled, 1),
        session("rex", "phone", stalled, 2),
    );
    let opened = [rita.clone(), rex.clone()].map(SessionChange::Opened);
    let applied = s.apply_sessions(stalled, SHORT, 10, &opened).unwrap();
    assert_eq!(applied.presence, vec![online("rita"), online("rex")]);

    expire_lease(&mut s, stalled);
    assert!(s.dead_gateways().unwrap().iter().any(|g| g == stalled));
    let mut reaped = s.reap_gateway(stalled, live, 20).unwrap().unwrap();
    reaped.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    assert_eq!(reaped, vec![offline("rex", 20), offline("rita", 20)]);
    assert_eq!(
        s.sessions_of_users(&["rita"]).unwrap(),
        [vec![]].into_iter().collect()
    );
    // Meanwhile rex's phone gave up on the stalled gateway and connected
    // through the live one.
    let rex_again = session("rex", "phone", live, 9);
    let applied = s
        .apply_sessions(live, LEASE, 25, &[SessionChange::Opened(rex_again.clone())])
        .unwrap();
    assert_eq!(applied.presence, vec![online("rex")]);

    // The stalled gateway runs again.
    assert!(s.rejoin_if_forgotten(stalled, LEASE, 30).unwrap());
    assert!(
        !s.rejoin_if_forgotten(stalled, LEASE, 31).unwrap(),
        "said once"
    );
    assert!(!s.dead_gateways().unwrap().iter().any(|g| g == stalled));
    // rita's connection is still open there: reopened, she is online. rex's
    // old connection is the older one: replaced, his new one stays.
    let reopened = [rita.clone(), rex.clone()].map(SessionChange::Reopened);
    let applied = s.apply_sessions(stalled, SHORT, 40, &reopened).unwrap();
    assert_eq!(applied.presence, vec![online("rita")]);
    assert_eq!(applied.replaced, vec![(rex_again, addr(stalled, 2))]);
    assert_eq!(
        s.sessions_of_users(&["rita", "rex"]).unwrap(),
        [vec![addr(stalled, 1)], vec![addr(live, 9)]]
            .into_iter()
            .collect()
    );
    // Reopened at the address it already has: nothing changes.
    let again = s
        .apply_sessions(stalled, SHORT, 45, &reopened[..1])
        .unwrap();
    assert_eq!(again, SessionsApplied::default());

    // Known again: when it dies for real, it is seen and reaped (rex stays
    // online through the live gateway).
    expire_lease(&mut s, stalled);
    assert!(s.dead_gateways().unwrap().iter().any(|g| g == stalled));
    assert_eq!(
        s.reap_gateway(stalled, live, 50).unwrap(),
        Some(vec![offline("rita", 50)])
    );
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
