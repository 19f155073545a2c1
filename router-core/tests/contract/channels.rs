//! `ChannelStore` checks: creation (once), the record's counts, roles,
//! member changes (their max_members refusal and counts), pages of members
//! (order, boundaries, 2,500 members without a gap), read positions, and
//! every call on a channel that does not exist. Channel ids are distinct
//! per check: Redis Cluster runs them all on one cluster.

use palaver_protocol::pb;
use palaver_router_core::store::{ChannelChange, ChannelRecord, GroupRecord, Store};

fn record(id: &str) -> ChannelRecord {
    ChannelRecord {
        conversation_id: id.into(),
        title: "Announcements".into(),
        settings: pb::ChannelSettings {
            public: true,
            admins_only_post: true,
        },
        created_ms: 1_700_000_000_123,
        // The store counts the members it is given.
        member_count: 0,
        admin_count: 0,
    }
}

fn member(user: &str) -> pb::Member {
    pb::Member {
        user_id: user.into(),
        role: pb::Role::Member as i32,
    }
}

fn admin(user: &str) -> pb::Member {
    pb::Member {
        user_id: user.into(),
        role: pb::Role::Admin as i32,
    }
}

fn users(list: &[&str]) -> Vec<String> {
    list.iter().map(|u| u.to_string()).collect()
}

fn counts<S: Store>(s: &mut S, id: &str) -> (u32, u32) {
    let r = s.channel(id).unwrap().unwrap();
    (r.member_count, r.admin_count)
}

/// Every member, page by page of `limit`.
fn all_members<S: Store>(s: &mut S, id: &str, limit: usize) -> Vec<pb::Member> {
    let mut all: Vec<pb::Member> = Vec::new();
    loop {
        let after = all.last().map_or(String::new(), |m| m.user_id.clone());
        let (page, more) = s.channel_members(id, &after, limit).unwrap();
        assert!(page.len() <= limit);
        assert!(!more || page.len() == limit, "more after a short page");
        all.extend(page);
        if !more {
            return all;
        }
    }
}

pub fn channels_are_created_once_with_their_counts<S: Store>(mut s: S) {
    let id = "chan-create";
    assert_eq!(s.channel(id).unwrap(), None);
    let members = [admin("ann"), member("bob"), member("cat")];
    assert!(s.create_channel(&record(id), &members).unwrap());
    let expected = ChannelRecord {
        member_count: 3,
        admin_count: 1,
        ..record(id)
    };
    assert_eq!(s.channel(id).unwrap(), Some(expected.clone()));
    // A second create changes nothing: not the record, not the members.
    let other = ChannelRecord {
        title: "Other".into(),
        settings: pb::ChannelSettings::default(),
        created_ms: 5,
        ..record(id)
    };
    assert!(!s
        .create_channel(&other, &[admin("dan"), admin("bob")])
        .unwrap());
    assert_eq!(s.channel(id).unwrap(), Some(expected));
    assert_eq!(s.channel_members(id, "", 10).unwrap().0, members.to_vec());
    // Roles: admin, member, not a member, no such channel.
    assert_eq!(s.channel_role(id, "ann").unwrap(), Some(pb::Role::Admin));
    assert_eq!(s.channel_role(id, "bob").unwrap(), Some(pb::Role::Member));
    assert_eq!(s.channel_role(id, "dan").unwrap(), None);
    assert_eq!(s.channel_role("chan-create-none", "ann").unwrap(), None);
    // Default settings and an empty title survive too.
    let plain = ChannelRecord {
        conversation_id: "chan-create-plain".into(),
        title: String::new(),
        settings: pb::ChannelSettings::default(),
        created_ms: 0,
        member_count: 0,
        admin_count: 0,
    };
    assert!(s.create_channel(&plain, &[admin("ann")]).unwrap());
    assert_eq!(
        s.channel("chan-create-plain").unwrap(),
        Some(ChannelRecord {
            member_count: 1,
            admin_count: 1,
            ..plain
        })
    );
}

pub fn channel_member_changes_keep_their_counts<S: Store>(mut s: S) {
    let id = "chan-change";
    s.create_channel(&record(id), &[admin("ann"), member("bob")])
        .unwrap();
    // Added and promoted in one call: joins as an admin. A member added
    // again is untouched (an admin stays one); a non-member removed and a
    // non-member promoted (not added) are ignored.
    let change = s
        .change_channel_members(
            id,
            &users(&["eve", "dan", "ann", "bob"]),
            &users(&["eve", "zed"]),
            &users(&["nobody"]),
            10,
        )
        .unwrap();
    assert_eq!(
        change,
        Some(ChannelChange {
            added: users(&["dan", "eve"]),
            removed: vec![],
            promoted: users(&["eve"]),
            member_count: 4,
            admin_count: 2,
        })
    );
    assert_eq!(counts(&mut s, id), (4, 2));
    assert_eq!(s.channel_role(id, "eve").unwrap(), Some(pb::Role::Admin));
    assert_eq!(s.channel_role(id, "dan").unwrap(), Some(pb::Role::Member));
    assert_eq!(s.channel_role(id, "ann").unwrap(), Some(pb::Role::Admin));
    assert_eq!(s.channel_role(id, "zed").unwrap(), None);
    // Promoting a member; promoting an admin is no promotion.
    let change = s
        .change_channel_members(id, &[], &users(&["dan", "ann"]), &[], 10)
        .unwrap()
        .unwrap();
    assert_eq!(change.promoted, users(&["dan"]));
    assert_eq!((change.member_count, change.admin_count), (4, 3));
    assert_eq!(counts(&mut s, id), (4, 3));
    // Removing an admin and a member.
    let change = s
        .change_channel_members(id, &[], &[], &users(&["dan", "bob", "bob"]), 10)
        .unwrap()
        .unwrap();
    assert_eq!(change.removed, users(&["bob", "dan"]));
    assert!(change.added.is_empty() && change.promoted.is_empty());
    assert_eq!((change.member_count, change.admin_count), (2, 2));
    assert_eq!(counts(&mut s, id), (2, 2));
    assert_eq!(s.channel_role(id, "dan").unwrap(), None);
    // Past max_members: nothing changes, not even the removals.
    let before = all_members(&mut s, id, 10);
    assert_eq!(
        s.change_channel_members(
            id,
            &users(&["p", "q", "r"]),
            &users(&["ann", "p"]),
            &users(&["eve"]),
            3,
        )
        .unwrap(),
        None
    );
    assert_eq!(all_members(&mut s, id, 10), before);
    assert_eq!(counts(&mut s, id), (2, 2));
    assert_eq!(s.channel_role(id, "eve").unwrap(), Some(pb::Role::Admin));
    // Exactly max_members is allowed; the removals count before the check.
    // A user named twice is one user (adding "p" twice joins one).
    let change = s
        .change_channel_members(id, &users(&["p", "q", "p"]), &[], &users(&["eve"]), 3)
        .unwrap()
        .unwrap();
    assert_eq!(change.added, users(&["p", "q"]));
    assert_eq!(change.removed, users(&["eve"]));
    assert_eq!((change.member_count, change.admin_count), (3, 1));
    assert_eq!(counts(&mut s, id), (3, 1));
    // At the limit already: an add of members only is no join.
    let change = s
        .change_channel_members(id, &users(&["p"]), &[], &[], 3)
        .unwrap()
        .unwrap();
    assert!(change.added.is_empty());
    assert_eq!((change.member_count, change.admin_count), (3, 1));
    // A channel over a lowered limit may still lose members.
    let change = s
        .change_channel_members(id, &[], &[], &users(&["q"]), 1)
        .unwrap();
    assert_eq!(change, None, "2 members after is still more than 1");
    let change = s
        .change_channel_members(id, &[], &[], &users(&["q", "p"]), 1)
        .unwrap()
        .unwrap();
    assert_eq!((change.member_count, change.admin_count), (1, 1));
    // The last admin leaves: counts 0, the channel stays, empty.
    let change = s
        .change_channel_members(id, &[], &[], &users(&["ann"]), 10)
        .unwrap()
        .unwrap();
    assert_eq!((change.member_count, change.admin_count), (0, 0));
    assert_eq!(counts(&mut s, id), (0, 0));
    assert_eq!(s.channel_members(id, "", 10).unwrap(), (vec![], false));
}

pub fn channel_members_page_in_order<S: Store>(mut s: S) {
    let id = "chan-page";
    // Ids given out of order; pages are bytewise ascending.
    let given = [
        member("m"),
        admin("B"),
        member("a"),
        member("é"),
        member("z"),
        member("a1"),
    ];
    s.create_channel(&record(id), &given).unwrap();
    let ids =
        |page: &[pb::Member]| -> Vec<String> { page.iter().map(|m| m.user_id.clone()).collect() };
    let (page, more) = s.channel_members(id, "", 3).unwrap();
    assert_eq!(ids(&page), users(&["B", "a", "a1"]));
    assert_eq!(page[0].role, pb::Role::Admin as i32);
    assert_eq!(page[1].role, pb::Role::Member as i32);
    assert!(more);
    // After is exclusive; a boundary page that ends the channel says so.
    let (page, more) = s.channel_members(id, "a1", 3).unwrap();
    assert_eq!(ids(&page), users(&["m", "z", "é"]));
    assert!(!more, "nothing after the last member");
    // After an id that is no member: from the next one.
    let (page, more) = s.channel_members(id, "b", 2).unwrap();
    assert_eq!(ids(&page), users(&["m", "z"]));
    assert!(more);
    let (page, more) = s.channel_members(id, "é", 2).unwrap();
    assert_eq!((page, more), (vec![], false));
    // One past the boundary: a page of exactly the rest has no more.
    let (page, more) = s.channel_members(id, "", 6).unwrap();
    assert_eq!(page.len(), 6);
    assert!(!more);
    let (page, more) = s.channel_members(id, "", 5).unwrap();
    assert_eq!(page.len(), 5);
    assert!(more);
    // A page of none still says whether members follow.
    assert_eq!(s.channel_members(id, "", 0).unwrap(), (vec![], true));
    assert_eq!(s.channel_members(id, "é", 0).unwrap(), (vec![], false));
    // A channel with no members, and none at all.
    s.create_channel(&record("chan-page-empty"), &[]).unwrap();
    assert_eq!(counts(&mut s, "chan-page-empty"), (0, 0));
    assert_eq!(
        s.channel_members("chan-page-empty", "", 10).unwrap(),
        (vec![], false)
    );
    assert_eq!(
        s.channel_members("chan-page-none", "", 10).unwrap(),
        (vec![], false)
    );
}

pub fn a_large_channel_pages_without_gaps<S: Store>(mut s: S) {
    let id = "chan-large";
    // Unpadded numbers: bytewise order is not numeric order.
    let first: Vec<pb::Member> = (0..1500).map(|i| member(&format!("u{i}"))).collect();
    s.create_channel(&record(id), &first).unwrap();
    let more: Vec<String> = (1500..2500).map(|i| format!("u{i}")).collect();
    let change = s
        .change_channel_members(id, &more, &users(&["u7"]), &[], 2500)
        .unwrap()
        .unwrap();
    assert_eq!(change.added.len(), 1000);
    assert_eq!((change.member_count, change.admin_count), (2500, 1));
    assert_eq!(counts(&mut s, id), (2500, 1));
    // Full: one more is refused.
    assert_eq!(
        s.change_channel_members(id, &users(&["u2500"]), &[], &[], 2500)
            .unwrap(),
        None
    );
    let mut expected: Vec<String> = (0..2500).map(|i| format!("u{i}")).collect();
    expected.sort();
    let mut pages = 0;
    let mut seen: Vec<String> = Vec::new();
    let mut after = String::new();
    loop {
        let (page, more) = s.channel_members(id, &after, 1000).unwrap();
        pages += 1;
        seen.extend(page.iter().map(|m| m.user_id.clone()));
        if !more {
            break;
        }
        after = seen.last().unwrap().clone();
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, expected, "every member once, ascending");
    let admins: Vec<String> = all_members(&mut s, id, 1000)
        .into_iter()
        .filter(|m| m.role == pb::Role::Admin as i32)
        .map(|m| m.user_id)
        .collect();
    assert_eq!(admins, users(&["u7"]));
}

pub fn channel_read_positions_rise_only<S: Store>(mut s: S) {
    let id = "chan-read";
    s.create_channel(&record(id), &[admin("ann"), member("bob")])
        .unwrap();
    s.create_channel(&record("chan-read-2"), &[member("ann")])
        .unwrap();
    assert_eq!(s.read_position(id, "ann").unwrap(), 0);
    assert_eq!(s.raise_read_position(id, "ann", 7).unwrap(), 7);
    assert_eq!(
        s.raise_read_position(id, "ann", 5).unwrap(),
        7,
        "never lower"
    );
    assert_eq!(s.raise_read_position(id, "ann", 7).unwrap(), 7);
    assert_eq!(s.read_position(id, "ann").unwrap(), 7);
    // Per user and per channel.
    assert_eq!(s.read_position(id, "bob").unwrap(), 0);
    assert_eq!(s.read_position("chan-read-2", "ann").unwrap(), 0);
    assert_eq!(s.raise_read_position(id, "bob", 3).unwrap(), 3);
    assert_eq!(s.raise_read_position(id, "ann", 1 << 40).unwrap(), 1 << 40);
    assert_eq!(s.read_position(id, "ann").unwrap(), 1 << 40);
    assert_eq!(s.read_position(id, "bob").unwrap(), 3);
    // A member who leaves takes the position along: back, it starts at 0.
    s.change_channel_members(id, &[], &[], &users(&["bob"]), 10)
        .unwrap()
        .unwrap();
    assert_eq!(s.read_position(id, "bob").unwrap(), 0);
    s.change_channel_members(id, &users(&["bob"]), &[], &[], 10)
        .unwrap()
        .unwrap();
    assert_eq!(s.read_position(id, "bob").unwrap(), 0);
    assert_eq!(s.read_position(id, "ann").unwrap(), 1 << 40);
}

pub fn calls_on_a_missing_channel_change_nothing<S: Store>(mut s: S) {
    let id = "chan-missing";
    assert_eq!(s.channel(id).unwrap(), None);
    assert_eq!(s.channel_role(id, "ann").unwrap(), None);
    assert_eq!(
        s.change_channel_members(id, &users(&["ann"]), &users(&["ann"]), &users(&["bob"]), 10)
            .unwrap(),
        Some(ChannelChange::default())
    );
    assert_eq!(s.channel_members(id, "", 10).unwrap(), (vec![], false));
    assert_eq!(s.raise_read_position(id, "ann", 9).unwrap(), 0);
    assert_eq!(s.read_position(id, "ann").unwrap(), 0);
    // Nothing of that was kept: created now, it has just its members.
    assert_eq!(s.channel(id).unwrap(), None);
    assert_eq!(s.channel_role(id, "ann").unwrap(), None);
    assert!(s.create_channel(&record(id), &[admin("bob")]).unwrap());
    assert_eq!(counts(&mut s, id), (1, 1));
    assert_eq!(s.channel_members(id, "", 10).unwrap().0, vec![admin("bob")]);
    assert_eq!(s.read_position(id, "ann").unwrap(), 0);
    // A group is no channel.
    let group = GroupRecord {
        conversation_id: "chan-missing-group".into(),
        title: "g".into(),
        members: vec![admin("ann")],
        created_ms: 1,
    };
    assert!(s.create_group(&group).unwrap());
    assert_eq!(s.channel("chan-missing-group").unwrap(), None);
    assert_eq!(s.channel_role("chan-missing-group", "ann").unwrap(), None);
    assert_eq!(
        s.raise_read_position("chan-missing-group", "ann", 3)
            .unwrap(),
        0
    );
}
