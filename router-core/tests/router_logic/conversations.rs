//! Groups and direct conversations: creation, membership, roles, the
//! limits on adding, what a removed member still gets.

use super::*;

#[test]
fn membership_is_enforced() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let mallory = h.open("mallory", "phone", 2);
    let group = h.create_group(&alice, &["bob"]);

    let e = assert_error(
        &h.send(&mallory, &group, 1),
        &mallory,
        1,
        ErrorCode::Forbidden,
    );
    assert_eq!(e.client_msg_id, cmid(1));
    assert_error(&h.send(&mallory, DM, 2), &mallory, 2, ErrorCode::Forbidden);
    let e = assert_error(
        &h.send(&mallory, "grp:nope", 3),
        &mallory,
        3,
        ErrorCode::NotFound,
    );
    assert_eq!(e.client_msg_id, cmid(3));

    let typing = Body::Typing(pb::Typing {
        conversation_id: group.clone(),
        active: true,
        user_id: String::new(),
    });
    assert_error(
        &h.req(&mallory, 4, typing),
        &mallory,
        4,
        ErrorCode::Forbidden,
    );
    let history = Body::History(pb::History {
        conversation_id: group.clone(),
        ..Default::default()
    });
    assert_error(
        &h.req(&mallory, 5, history),
        &mallory,
        5,
        ErrorCode::Forbidden,
    );
    let receipt = Body::Receipt(pb::Receipt {
        conversation_id: DM.into(),
        kind: pb::ReceiptKind::Read as i32,
        up_to_seq: 1,
    });
    assert_error(
        &h.req(&mallory, 6, receipt),
        &mallory,
        6,
        ErrorCode::Forbidden,
    );
    let change = Body::ChangeMembers(pb::ChangeMembers {
        conversation_id: group.clone(),
        add_user_ids: vec!["mallory".into()],
        ..Default::default()
    });
    assert_error(
        &h.req(&mallory, 7, change),
        &mallory,
        7,
        ErrorCode::Forbidden,
    );
    // Mallory's Sync never shows the group.
    let out = h.req(&mallory, 8, Body::Sync(pb::Sync::default()));
    let Some(Body::SyncBatch(batch)) = &reply_to(&out, &mallory, 8).body else {
        panic!("expected SyncBatch");
    };
    assert!(batch.conversations.is_empty() && batch.messages.is_empty());
}

#[test]
fn group_creation_roles_and_notification() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let alice_tablet = h.open("alice", "tablet", 4);
    let bob = h.open("bob", "phone", 2);
    let out = h.req(
        &alice,
        5,
        create_group_body("Friends", &["carol", "bob", "alice", "bob"]),
    );
    let Some(Body::ConversationCreated(created)) = &reply_to(&out, &alice, 5).body else {
        panic!("expected ConversationCreated");
    };
    let c = created.conversation.as_ref().unwrap();
    assert!(c.conversation_id.starts_with("grp:"));
    assert_eq!(c.kind, pb::ConversationKind::Group as i32);
    assert_eq!(c.title, "Friends");
    let got: Vec<(&str, pb::Role)> = c
        .members
        .iter()
        .map(|m| (m.user_id.as_str(), m.role()))
        .collect();
    assert_eq!(
        got,
        [
            ("alice", pb::Role::Admin),
            ("bob", pb::Role::Member),
            ("carol", pb::Role::Member)
        ]
    );
    // Other online member devices learn about it with request_id 0.
    for s in [&bob, &alice_tablet] {
        let frames = to(&out, &s.addr);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].request_id, 0);
        assert!(matches!(frames[0].body, Some(Body::ConversationCreated(_))));
    }
    // Two groups never share an id.
    let other = h.create_group(&alice, &["bob"]);
    assert_ne!(other, c.conversation_id);
}

#[test]
fn group_size_is_capped_on_create_and_add() {
    let mut h = Harness::with_config(RouterConfig {
        max_group_members: 3,
        ..RouterConfig::default()
    });
    let alice = h.open("alice", "phone", 1);
    let out = h.req(&alice, 1, create_group_body("big", &["b", "c", "d"]));
    assert_error(&out, &alice, 1, ErrorCode::TooManyMembers);
    let group = h.create_group(&alice, &["b", "c"]);
    let change = Body::ChangeMembers(pb::ChangeMembers {
        conversation_id: group.clone(),
        add_user_ids: vec!["d".into()],
        ..Default::default()
    });
    assert_error(
        &h.req(&alice, 2, change),
        &alice,
        2,
        ErrorCode::TooManyMembers,
    );
    // Swapping one member for another stays within the cap.
    let swap = Body::ChangeMembers(pb::ChangeMembers {
        conversation_id: group,
        add_user_ids: vec!["d".into()],
        remove_user_ids: vec!["c".into()],
        ..Default::default()
    });
    let out = h.req(&alice, 3, swap);
    let changed = members_changed(reply_to(&out, &alice, 3));
    assert_eq!(changed.added_user_ids, ["d"]);
    assert_eq!(changed.removed_user_ids, ["c"]);
}

#[test]
fn admin_rules_for_changing_members() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let alice_laptop = h.open("alice", "laptop", 11);
    let bob = h.open("bob", "phone", 2);
    let carol = h.open("carol", "phone", 3);
    let dave = h.open("dave", "phone", 4);
    let group = h.create_group(&alice, &["bob", "carol"]);
    let change = |add: &[&str], remove: &[&str], promote: &[&str]| {
        Body::ChangeMembers(pb::ChangeMembers {
            conversation_id: group.clone(),
            add_user_ids: add.iter().map(|s| s.to_string()).collect(),
            remove_user_ids: remove.iter().map(|s| s.to_string()).collect(),
            promote_user_ids: promote.iter().map(|s| s.to_string()).collect(),
        })
    };

    // A member may not add, remove others or promote.
    assert_error(
        &h.req(&bob, 1, change(&["dave"], &[], &[])),
        &bob,
        1,
        ErrorCode::Forbidden,
    );
    assert_error(
        &h.req(&bob, 2, change(&[], &["carol"], &[])),
        &bob,
        2,
        ErrorCode::Forbidden,
    );
    assert_error(
        &h.req(&bob, 3, change(&[], &[], &["bob"])),
        &bob,
        3,
        ErrorCode::Forbidden,
    );
    assert_error(
        &h.req(&bob, 4, change(&[], &[], &[])),
        &bob,
        4,
        ErrorCode::InvalidArgument,
    );
    assert_error(
        &h.req(&alice, 5, change(&["dave"], &["dave"], &[])),
        &alice,
        5,
        ErrorCode::InvalidArgument,
    );
    assert_error(
        &h.req(&alice, 6, change(&[], &[], &["zed"])),
        &alice,
        6,
        ErrorCode::InvalidArgument,
    );

    // The admin adds dave as admin and removes carol.
    let out = h.req(&alice, 7, change(&["dave"], &["carol"], &["dave"]));
    let changed = members_changed(reply_to(&out, &alice, 7));
    assert_eq!(changed.actor_user_id, "alice");
    assert_eq!(changed.added_user_ids, ["dave"]);
    assert_eq!(changed.removed_user_ids, ["carol"]);
    assert_eq!(
        roles(changed),
        [
            ("alice".to_string(), pb::Role::Admin),
            ("bob".to_string(), pb::Role::Member),
            ("dave".to_string(), pb::Role::Admin)
        ]
    );
    // Everyone before and after hears it, with request_id 0, with the
    // whole conversation after the change: the actor's other devices, the
    // added, the removed and the other members.
    for s in [&alice_laptop, &carol, &dave, &bob] {
        let frames = to(&out, &s.addr);
        assert_eq!(frames.len(), 1, "{s:?}");
        assert_eq!(frames[0].request_id, 0);
        assert_eq!(members_changed(frames[0]), changed);
    }
    // Carol is out, dave is in.
    assert_error(&h.send(&carol, &group, 8), &carol, 8, ErrorCode::Forbidden);
    assert_eq!(
        ack(reply_to(&h.send(&dave, &group, 9), &dave, 9))
            .unwrap()
            .seq,
        1
    );

    // A member may leave on their own.
    let out = h.req(&bob, 10, change(&[], &["bob"], &[]));
    assert_eq!(
        members_changed(reply_to(&out, &bob, 10)).removed_user_ids,
        ["bob"]
    );
    assert_eq!(to(&out, &alice.addr).len(), 1);
    assert_error(&h.send(&bob, &group, 11), &bob, 11, ErrorCode::Forbidden);

    // Dave (an admin) leaves; alice adds two members and leaves as the last admin.
    h.req(&dave, 12, change(&[], &["dave"], &[]));
    let out = h.req(&alice, 13, change(&["erin", "frank"], &[], &[]));
    assert_eq!(
        members_changed(reply_to(&out, &alice, 13)).added_user_ids,
        ["erin", "frank"]
    );
    let out = h.req(&alice, 14, change(&[], &["alice"], &[]));
    // The last admin left: the smallest remaining user id becomes admin.
    assert_eq!(
        roles(members_changed(reply_to(&out, &alice, 14))),
        [
            ("erin".to_string(), pb::Role::Admin),
            ("frank".to_string(), pb::Role::Member)
        ]
    );

    // Direct conversations have fixed members; unknown groups are not found.
    let dm = Body::ChangeMembers(pb::ChangeMembers {
        conversation_id: DM.into(),
        add_user_ids: vec!["carol".into()],
        ..Default::default()
    });
    assert_error(
        &h.req(&alice, 15, dm),
        &alice,
        15,
        ErrorCode::InvalidArgument,
    );
    let unknown = Body::ChangeMembers(pb::ChangeMembers {
        conversation_id: "grp:unknown".into(),
        add_user_ids: vec!["carol".into()],
        ..Default::default()
    });
    assert_error(&h.req(&alice, 16, unknown), &alice, 16, ErrorCode::NotFound);
}

#[test]
fn membership_changes_update_conversation_lists() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let group = h.create_group(&alice, &[]);
    let listed = |h: &mut Harness, s: &Session| -> Vec<String> {
        let out = h.req(s, 1, Body::Sync(pb::Sync::default()));
        let Some(Body::SyncBatch(b)) = &reply_to(&out, s, 1).body else {
            panic!("expected SyncBatch");
        };
        b.conversations
            .iter()
            .map(|c| c.conversation_id.clone())
            .collect()
    };
    assert!(listed(&mut h, &bob).is_empty());
    h.req(
        &alice,
        2,
        Body::ChangeMembers(pb::ChangeMembers {
            conversation_id: group.clone(),
            add_user_ids: vec!["bob".into()],
            ..Default::default()
        }),
    );
    assert_eq!(listed(&mut h, &bob), vec![group.clone()]);
    h.req(
        &bob,
        3,
        Body::ChangeMembers(pb::ChangeMembers {
            conversation_id: group.clone(),
            remove_user_ids: vec!["bob".into()],
            ..Default::default()
        }),
    );
    assert!(listed(&mut h, &bob).is_empty());
}

#[test]
fn direct_create_returns_the_canonical_id() {
    let mut h = Harness::new();
    let bob = h.open("bob", "phone", 1);
    let out = h.req(
        &bob,
        3,
        Body::CreateConversation(pb::CreateConversation {
            kind: pb::ConversationKind::Direct as i32,
            member_user_ids: vec!["alice".into()],
            ..Default::default()
        }),
    );
    let Some(Body::ConversationCreated(c)) = &reply_to(&out, &bob, 3).body else {
        panic!("expected ConversationCreated");
    };
    let c = c.conversation.as_ref().unwrap();
    assert_eq!(c.conversation_id, DM);
    assert_eq!(c.conversation_id, direct_conversation_id("bob", "alice"));
    assert_eq!(c.kind, pb::ConversationKind::Direct as i32);
    assert_eq!(c.last_seq, 0);
    // It is listed for alice right away.
    let alice = h.open("alice", "phone", 2);
    let batch = sync(&mut h, &alice, &[], 0);
    assert_eq!(batch.conversations.len(), 1);
}

/// Group-notification flood: a stranger may add a user to groups only a
/// few times a day (all strangers together), one adder a few more; the
/// user's contacts are not limited by the strangers' budget; and churn in
/// a big group costs the other members bytes per change, not per member.
#[test]
fn group_adds_are_limited_per_day_and_a_groups_changes_per_hour() {
    let config = RouterConfig::default();
    let mut h = Harness::new();
    let victim = h.open("victim", "phone", 1);
    let mallory = h.open("mallory", "phone", 2);
    let eve = h.open("eve", "phone", 3);
    let friend = h.open("friend", "phone", 4);
    let dm = direct_conversation_id("friend", "victim");
    h.send(&friend, &dm, 1);
    h.send(&victim, &dm, 2);

    let strangers = config.max_group_adds_by_strangers_per_day;
    for i in 0..strangers {
        let adder = if i % 2 == 0 { &mallory } else { &eve };
        new_group(&mut h, adder, 100 + i, &["victim"]);
    }
    let out = h.req(&mallory, 200, create_group_body("more", &["victim"]));
    let e = assert_error(&out, &mallory, 200, ErrorCode::QuotaExceeded);
    assert!(e.message.contains("victim"), "{e:?}");
    let out = h.req(&eve, 201, create_group_body("more", &["victim", "other"]));
    assert_error(&out, &eve, 201, ErrorCode::QuotaExceeded);
    // Nothing was created for the refused requests: the victim is in
    // exactly the groups allowed.
    use palaver_router_core::store::UserStore as _;
    let groups = h.router.store_mut().group_counts(&["victim".into()]);
    assert_eq!(groups.unwrap(), [strangers as usize]);
    // A neighbour is unaffected: mallory can still add someone else.
    new_group(&mut h, &mallory, 202, &["neighbour"]);
    // A contact is not held back by the strangers' budget, only by its own.
    for i in 0..config.max_group_adds_per_adder_per_day {
        new_group(&mut h, &friend, 300 + i, &["victim"]);
    }
    let out = h.req(&friend, 399, create_group_body("one more", &["victim"]));
    assert_error(&out, &friend, 399, ErrorCode::QuotaExceeded);
    // The next UTC day the budgets are there again.
    h.clock.advance(24 * 60 * 60 * 1000);
    new_group(&mut h, &mallory, 400, &["victim"]);
    new_group(&mut h, &friend, 401, &["victim"]);

    // Churn in mallory's big group: every change reaches the victim with
    // the whole member list (SPEC §11 keeps v1's MembersChanged), so the
    // group's changes are limited per hour: the victim hears of at most
    // that many, and a neighbouring group is not held back.
    let members: Vec<String> = (0..997).map(|i| format!("crowd{i}")).collect();
    let mut refs: Vec<&str> = members.iter().map(String::as_str).collect();
    refs.push("victim");
    let big = new_group(&mut h, &mallory, 402, &refs);
    let limit = config.max_membership_changes_per_group_per_hour as u32;
    let mut victim_frames = 0;
    let mut victim_bytes = 0;
    for i in 0..limit + 5 {
        // A new sybil each time: the per-adder limit is not what binds.
        let sybil = format!("sybil{}", i / 2);
        // Past the limit only adds: a removal of a user never added would
        // change nothing (answered, not counted).
        let (add, remove): (&[&str], &[&str]) = if i % 2 == 0 || i >= limit {
            (&[&sybil], &[])
        } else {
            (&[], &[&sybil])
        };
        let out = h.req(&mallory, 1000 + i, change(&big, add, remove, &[]));
        let frames = to(&out, &victim.addr);
        if i < limit {
            assert_eq!(frames.len(), 1, "change {i}");
            let got = members_changed(frames[0]);
            assert!(
                got.conversation.as_ref().unwrap().members.len() >= 998,
                "the whole list"
            );
            use prost::Message as _;
            victim_bytes += frames[0].encoded_len();
            victim_frames += 1;
        } else {
            let e = assert_error(&out, &mallory, 1000 + i, ErrorCode::QuotaExceeded);
            assert!(e.message.contains("this hour"), "{e:?}");
            assert!(frames.is_empty());
        }
    }
    println!(
        "{} changes asked of a 1,000-member group in an hour: {victim_frames} reached a member ({victim_bytes} bytes)",
        limit + 5
    );
    let other = new_group(&mut h, &mallory, 1500, &["neighbour"]);
    let out = h.req(&mallory, 1501, change(&other, &["sybil"], &[], &[]));
    assert!(matches!(
        reply_to(&out, &mallory, 1501).body,
        Some(Body::MembersChanged(_))
    ));
    // The next hour the group may change again.
    h.clock.advance(60 * 60 * 1000);
    let out = h.req(&mallory, 1600, change(&big, &["sybil2"], &[], &[]));
    assert_eq!(to(&out, &victim.addr).len(), 1);
}

/// A removed member gets nothing more of the group: no ReceiptUpdate for
/// the messages it sent while a member, no Typing, no Deliver, no presence
/// event through it.
#[test]
fn a_removed_member_gets_nothing_more_of_the_group() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let carol = h.open("carol", "phone", 3);
    let group = h.create_group(&alice, &["bob", "carol"]);
    h.send(&carol, &group, 1);
    h.send(&carol, &group, 2);
    h.req(&carol, 3, presence_subscribe(&["bob"], false));
    let out = h.req(&alice, 4, change(&group, &[], &["carol"], &[]));
    assert_eq!(to(&out, &carol.addr).len(), 1, "the removal itself");

    let read = Body::Receipt(pb::Receipt {
        conversation_id: group.clone(),
        kind: pb::ReceiptKind::Read as i32,
        up_to_seq: 2,
    });
    let out = h.req(&bob, 5, read);
    assert!(to(&out, &carol.addr).is_empty(), "{:?}", out.frames);
    let typing = Body::Typing(pb::Typing {
        conversation_id: group.clone(),
        active: true,
        user_id: String::new(),
    });
    let out = h.req(&bob, 6, typing);
    assert!(to(&out, &carol.addr).is_empty());
    assert_eq!(to(&out, &alice.addr).len(), 1);
    let out = h.send(&bob, &group, 7);
    assert!(to(&out, &carol.addr).is_empty());
    let out = h.close(&bob, T0 + 9);
    assert!(to(&out, &carol.addr).is_empty());
}

/// Every member hears of a change with the whole list after it, each
/// member once with its final role: here the added user is also the heir
/// of the admin who left in the same request.
#[test]
fn members_changed_carries_the_whole_list_to_every_member() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let zoe = h.open("zoe", "phone", 2);
    let group = h.create_group(&alice, &["zoe"]);
    let out = h.req(&alice, 3, change(&group, &["aaron"], &["alice"], &[]));
    let whole = members_changed(reply_to(&out, &alice, 3));
    let want = [
        ("aaron".to_string(), pb::Role::Admin),
        ("zoe".to_string(), pb::Role::Member),
    ];
    assert_eq!(roles(whole), want);
    let bystander = members_changed(to(&out, &zoe.addr)[0]);
    assert_eq!(roles(bystander), want);
    assert_eq!(bystander.added_user_ids, ["aaron"]);
    assert_eq!(bystander.removed_user_ids, ["alice"]);
}
