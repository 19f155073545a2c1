//! `UserStore` checks: conversation lists, push marks, presence links and
//! consent, group-add counts.

use palaver_protocol::pb;
use palaver_router_core::store::{GroupAdds, GroupRecord, Store};

use super::*;

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
