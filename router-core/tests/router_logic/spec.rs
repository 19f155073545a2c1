//! SPEC's rules checked one by one: the error code of every bad request, the
//! corrections made silently, late joiners, the body table.

use super::*;

#[test]
fn every_bad_request_gets_the_right_error_code() {
    let mut h = Harness::with_config(RouterConfig {
        max_body_bytes: 10,
        ..RouterConfig::default()
    });
    let alice = h.open("alice", "phone", 1);
    let send = |conversation_id: &str, client_msg_id: Vec<u8>, kind: i32, body: &[u8]| {
        Body::Send(pb::Send {
            conversation_id: conversation_id.into(),
            client_msg_id,
            kind,
            body: body.to_vec(),
            ..Default::default()
        })
    };
    let text = pb::ContentKind::Text as i32;
    let cases: Vec<(Body, ErrorCode)> = vec![
        (
            send(DM, vec![1; 15], text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send(DM, vec![1; 17], text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (send(DM, cmid(1), text, &[0; 11]), ErrorCode::BodyTooLarge),
        (send(DM, cmid(1), 0, b"hi"), ErrorCode::InvalidArgument),
        (send(DM, cmid(1), 99, b"hi"), ErrorCode::InvalidArgument),
        (
            send("dm:bob:alice", cmid(1), text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send("dm:alice:alice", cmid(1), text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send("dm:alice", cmid(1), text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send("dm:alice:b:c", cmid(1), text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send("chan:1", cmid(1), text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send("grp:", cmid(1), text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send(&format!("grp:{}", "x".repeat(400)), cmid(1), text, b"hi"),
            ErrorCode::InvalidArgument,
        ),
        (
            send("grp:missing", cmid(1), text, b"hi"),
            ErrorCode::NotFound,
        ),
        (
            send("dm:bob:carol", cmid(1), text, b"hi"),
            ErrorCode::Forbidden,
        ),
        (
            Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Direct as i32,
                member_user_ids: vec!["alice".into()],
                ..Default::default()
            }),
            ErrorCode::InvalidArgument,
        ),
        (
            Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Direct as i32,
                member_user_ids: vec!["bob".into(), "carol".into()],
                ..Default::default()
            }),
            ErrorCode::InvalidArgument,
        ),
        (
            Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Direct as i32,
                member_user_ids: vec!["b:c".into()],
                ..Default::default()
            }),
            ErrorCode::InvalidArgument,
        ),
        (
            Body::CreateConversation(pb::CreateConversation {
                kind: 0,
                member_user_ids: vec!["bob".into()],
                ..Default::default()
            }),
            ErrorCode::InvalidArgument,
        ),
        (
            create_group_body(&"t".repeat(300), &["bob"]),
            ErrorCode::InvalidArgument,
        ),
        (create_group_body("t", &[""]), ErrorCode::InvalidArgument),
        (
            Body::Deliver(pb::Deliver::default()),
            ErrorCode::InvalidArgument,
        ),
        (
            Body::Hello(pb::Hello::default()),
            ErrorCode::InvalidArgument,
        ),
        (Body::Ping(pb::Ping::default()), ErrorCode::InvalidArgument),
        (
            Body::Receipt(pb::Receipt {
                conversation_id: DM.into(),
                kind: 7,
                up_to_seq: 1,
            }),
            ErrorCode::InvalidArgument,
        ),
        (
            Body::PresenceSubscribe(pb::PresenceSubscribe {
                user_ids: vec![String::new()],
                unsubscribe: false,
            }),
            ErrorCode::InvalidArgument,
        ),
    ];
    for (i, (body, code)) in cases.into_iter().enumerate() {
        let request_id = 1000 + i as u32;
        let is_send = matches!(body, Body::Send(_));
        let client_msg_id = match &body {
            Body::Send(s) => s.client_msg_id.clone(),
            _ => Vec::new(),
        };
        let out = h.req(&alice, request_id, body);
        let e = assert_error(&out, &alice, request_id, code);
        if is_send {
            assert_eq!(e.client_msg_id, client_msg_id, "case {i}");
        }
    }
    // Nothing was stored by any of them.
    let batch = sync(&mut h, &alice, &[], 0);
    assert!(batch.messages.is_empty());
}

/// SPEC §14 "Error codes per request": one case per row, in the table's
/// order, plus cases where two rows fail and the earlier row decides.
#[test]
fn spec_error_codes_per_request() {
    let mut h = Harness::with_config(RouterConfig {
        max_body_bytes: 10,
        max_group_members: 3,
        max_watches_per_connection: 2,
        ..RouterConfig::default()
    });
    let alice = h.open("alice", "phone", 1);
    let carol = h.open("carol", "phone", 3);
    // alice is admin of `own`, a plain member of `member_of`, never in
    // `foreign`, removed from `left`.
    let own = new_group(&mut h, &alice, 501, &["bob"]);
    let member_of = new_group(&mut h, &carol, 502, &["alice"]);
    let foreign = new_group(&mut h, &carol, 503, &["dave"]);
    let left = new_group(&mut h, &carol, 504, &["alice"]);
    h.req(&carol, 505, change(&left, &[], &["alice"], &[]));

    let text = pb::ContentKind::Text as i32;
    let send = |conversation_id: &str, client_msg_id: Vec<u8>, kind: i32, body: &[u8]| {
        Body::Send(pb::Send {
            conversation_id: conversation_id.into(),
            client_msg_id,
            kind,
            body: body.to_vec(),
            ..Default::default()
        })
    };
    let receipt = |conversation_id: &str, kind: i32| {
        Body::Receipt(pb::Receipt {
            conversation_id: conversation_id.into(),
            kind,
            up_to_seq: 1,
        })
    };
    let read = pb::ReceiptKind::Read as i32;
    let typing = |conversation_id: &str| {
        Body::Typing(pb::Typing {
            conversation_id: conversation_id.into(),
            active: true,
            user_id: String::new(),
        })
    };
    let history = |conversation_id: &str| {
        Body::History(pb::History {
            conversation_id: conversation_id.into(),
            ..Default::default()
        })
    };
    let create = |kind: i32, title: &str, members: &[&str]| {
        Body::CreateConversation(pb::CreateConversation {
            kind,
            title: title.into(),
            member_user_ids: members.iter().map(|m| m.to_string()).collect(),
            channel: Default::default(),
        })
    };
    let direct = pb::ConversationKind::Direct as i32;
    let group = pb::ConversationKind::Group as i32;
    let presence = |ids: Vec<String>, subscribe: bool| {
        if subscribe {
            Body::PresenceSubscribe(pb::PresenceSubscribe {
                user_ids: ids,
                unsubscribe: false,
            })
        } else {
            Body::PresenceQuery(pb::PresenceQuery { user_ids: ids })
        }
    };
    let ids = |l: &[&str]| l.iter().map(|u| u.to_string()).collect::<Vec<_>>();

    use ErrorCode::*;
    let mut cases: Vec<(&str, Body, ErrorCode)> = Vec::new();
    // Conversation check c1..c4, through each request that names one.
    let c1 = [
        "",
        "chan:1",
        "dm:bob:alice",
        "dm:alice:alice",
        "dm:alice",
        "dm:alice:b:c",
        "dm:alice:b c",
        "grp:",
        "grp:a b",
    ];
    let checks: Vec<(&str, ErrorCode)> = c1
        .iter()
        .map(|id| (*id, InvalidArgument))
        .chain([
            ("dm:bob:carol", Forbidden),
            ("grp:missing", NotFound),
            (foreign.as_str(), Forbidden),
            (left.as_str(), Forbidden),
        ])
        .collect();
    for (id, code) in &checks {
        cases.push(("send c1-c4", send(id, cmid(1), text, b"hi"), *code));
        cases.push(("receipt c1-c4", receipt(id, read), *code));
        cases.push(("typing c1-c4", typing(id), *code));
        cases.push(("history c1-c4", history(id), *code));
    }
    cases.extend([
        // Send
        ("send body", send(DM, cmid(1), text, &[0; 11]), BodyTooLarge),
        (
            "send body first",
            send(DM, vec![], 0, &[0; 11]),
            BodyTooLarge,
        ),
        (
            "send no cmid",
            send(DM, vec![], text, b"hi"),
            InvalidArgument,
        ),
        (
            "send 15-byte cmid",
            send(DM, vec![1; 15], text, b"hi"),
            InvalidArgument,
        ),
        ("send kind 0", send(DM, cmid(1), 0, b"hi"), InvalidArgument),
        (
            "send kind 99",
            send(DM, cmid(1), 99, b"hi"),
            InvalidArgument,
        ),
        (
            "send kind first",
            send("grp:missing", cmid(1), 0, b"hi"),
            InvalidArgument,
        ),
        // Receipt
        ("receipt kind 0", receipt(DM, 0), InvalidArgument),
        ("receipt kind 9", receipt(DM, 9), InvalidArgument),
        (
            "receipt kind first",
            receipt("grp:missing", 0),
            InvalidArgument,
        ),
        // Presence
        (
            "query 1001 ids",
            presence(vec!["u".into(); 1001], false),
            InvalidArgument,
        ),
        (
            "subscribe 1001 ids",
            presence(vec!["u".into(); 1001], true),
            InvalidArgument,
        ),
        (
            "query empty id",
            presence(ids(&[""]), false),
            InvalidArgument,
        ),
        (
            "subscribe bad id",
            presence(ids(&["a b"]), true),
            InvalidArgument,
        ),
        (
            "subscribe over watch limit",
            presence(ids(&["u1", "u2", "u3"]), true),
            InvalidArgument,
        ),
        // CreateConversation
        ("create kind 0", create(0, "", &["bob"]), InvalidArgument),
        ("create kind 9", create(9, "", &["bob"]), InvalidArgument),
        ("direct none", create(direct, "", &[]), InvalidArgument),
        (
            "direct two",
            create(direct, "", &["bob", "carol"]),
            InvalidArgument,
        ),
        (
            "direct self and other",
            create(direct, "", &["alice", "bob"]),
            InvalidArgument,
        ),
        (
            "direct self",
            create(direct, "", &["alice"]),
            InvalidArgument,
        ),
        (
            "direct bad id",
            create(direct, "", &["b c"]),
            InvalidArgument,
        ),
        (
            "group long title",
            create(group, &"t".repeat(257), &["bob"]),
            InvalidArgument,
        ),
        (
            "group empty id",
            create(group, "", &["bob", ""]),
            InvalidArgument,
        ),
        (
            "group too big",
            create(group, "", &["b", "c", "d"]),
            TooManyMembers,
        ),
        (
            "group id before size",
            create(group, "", &["b", "c", "d", ""]),
            InvalidArgument,
        ),
        // ChangeMembers
        (
            "change direct",
            change(DM, &["carol"], &[], &[]),
            InvalidArgument,
        ),
        (
            "change malformed",
            change("", &["carol"], &[], &[]),
            InvalidArgument,
        ),
        (
            "change missing",
            change("grp:missing", &["carol"], &[], &[]),
            NotFound,
        ),
        (
            "change bad id",
            change(&own, &["a b"], &[], &[]),
            InvalidArgument,
        ),
        (
            "change ids before membership",
            change(&foreign, &[""], &[], &[]),
            InvalidArgument,
        ),
        (
            "change non-member",
            change(&foreign, &["erin"], &[], &[]),
            Forbidden,
        ),
        (
            "change removed member",
            change(&left, &[], &["alice"], &[]),
            Forbidden,
        ),
        (
            "change nothing",
            change(&own, &[], &[], &[]),
            InvalidArgument,
        ),
        (
            "change add+remove",
            change(&own, &["carol"], &["carol"], &[]),
            InvalidArgument,
        ),
        (
            "change promote+remove",
            change(&own, &[], &["bob"], &["bob"]),
            InvalidArgument,
        ),
        (
            "change promote stranger",
            change(&own, &[], &[], &["zed"]),
            InvalidArgument,
        ),
        (
            "change as non-admin",
            change(&member_of, &["erin"], &[], &[]),
            Forbidden,
        ),
        (
            "change remove other as non-admin",
            change(&member_of, &[], &["carol"], &[]),
            Forbidden,
        ),
        (
            "change over size",
            change(&own, &["x", "y"], &[], &[]),
            TooManyMembers,
        ),
    ]);
    for (i, (what, body, code)) in cases.into_iter().enumerate() {
        let request_id = 1000 + i as u32;
        let client_msg_id = match &body {
            Body::Send(s) => s.client_msg_id.clone(),
            _ => Vec::new(),
        };
        let out = h.req(&alice, request_id, body);
        let frames = to(&out, &alice.addr);
        let e = frames
            .first()
            .and_then(|f| error(f))
            .unwrap_or_else(|| panic!("{what}: expected {code:?}, got {frames:?}"));
        assert_eq!((e.code, frames.len()), (code as u32, 1), "{what}: {e:?}");
        assert_eq!(frames[0].request_id, request_id, "{what}");
        assert_eq!(e.client_msg_id, client_msg_id, "{what}");
    }
    // Nothing was stored by any of them, and alice's groups are unchanged.
    let batch = sync(&mut h, &alice, &[], 0);
    assert!(batch.messages.is_empty());
    let mut listed: Vec<String> = batch
        .conversations
        .iter()
        .map(|c| c.conversation_id.clone())
        .collect();
    listed.sort();
    let mut expected = vec![own.clone(), member_of.clone()];
    expected.sort();
    assert_eq!(listed, expected);
}

/// SPEC §6, §7, §11: what the server accepts and corrects without an error.
#[test]
fn spec_silent_corrections() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let carol = h.open("carol", "phone", 3);

    // DIRECT: the other user listed twice counts once; title ignored.
    let out = h.req(
        &alice,
        1,
        Body::CreateConversation(pb::CreateConversation {
            kind: pb::ConversationKind::Direct as i32,
            title: "ignored".into(),
            member_user_ids: vec!["bob".into(), "bob".into()],
            channel: Default::default(),
        }),
    );
    let Some(Body::ConversationCreated(c)) = &reply_to(&out, &alice, 1).body else {
        panic!("expected ConversationCreated");
    };
    let c = c.conversation.as_ref().unwrap();
    assert_eq!((c.conversation_id.as_str(), c.title.as_str()), (DM, ""));

    // GROUP: duplicates count once, the listed creator is left out (and
    // stays the one admin), an empty list makes a group of the creator alone.
    let out = h.req(&alice, 2, create_group_body("t", &["bob", "alice", "bob"]));
    let Some(Body::ConversationCreated(c)) = &reply_to(&out, &alice, 2).body else {
        panic!("expected ConversationCreated");
    };
    let members: Vec<(&str, pb::Role)> = c
        .conversation
        .as_ref()
        .unwrap()
        .members
        .iter()
        .map(|m| (m.user_id.as_str(), m.role()))
        .collect();
    assert_eq!(
        members,
        [("alice", pb::Role::Admin), ("bob", pb::Role::Member)]
    );
    let group = c.conversation.as_ref().unwrap().conversation_id.clone();
    let alone = new_group(&mut h, &alice, 3, &[]);

    // ChangeMembers: adding a member and promoting an admin change nothing;
    // only the requester hears about it.
    let out = h.req(
        &alice,
        4,
        change(&group, &["bob", "bob"], &["zed"], &["alice"]),
    );
    let changed = members_changed(reply_to(&out, &alice, 4));
    assert!(changed.added_user_ids.is_empty() && changed.removed_user_ids.is_empty());
    assert_eq!(out.frames.len(), 1);

    // Sync: cursors of foreign or malformed conversations are ignored and
    // never listed; of several cursors for one conversation the last counts.
    let foreign = new_group(&mut h, &carol, 5, &["dave"]);
    h.send(&carol, &foreign, 6);
    for n in 1..=3 {
        h.send(&alice, &alone, n);
    }
    let batch = sync(
        &mut h,
        &alice,
        &[
            (&foreign, 0),
            ("dm:bob:carol", 0),
            ("not an id", 0),
            (&alone, 0),
            (&alone, 2),
            (&group, 0),
            (DM, 0),
        ],
        0,
    );
    assert!(batch.conversations.is_empty(), "{:?}", batch.conversations);
    assert_eq!(seqs(&batch.messages), [3]);
    assert!(batch.messages.iter().all(|m| m.conversation_id == alone));
    assert!(!batch.has_more);
}

/// SPEC §11 "History and late joiners": a member added later reads the
/// whole history; a removed one reads none of it; re-added, all of it.
#[test]
fn spec_late_joiners_read_the_whole_history() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let dave = h.open("dave", "phone", 4);
    let group = new_group(&mut h, &alice, 1, &["bob"]);
    for n in 1..=3 {
        h.send(&alice, &group, 10 + n);
    }
    h.req(&alice, 2, change(&group, &["dave"], &[], &[]));
    assert_eq!(
        seqs(&history(&mut h, &dave, &group, 0, 0).messages),
        [1, 2, 3]
    );
    let batch = sync(&mut h, &dave, &[], 0);
    assert_eq!(batch.conversations.len(), 1);
    assert_eq!(batch.conversations[0].conversation_id, group);
    assert_eq!(seqs(&batch.messages), [1, 2, 3]);

    h.req(&alice, 3, change(&group, &[], &["dave"], &[]));
    let out = h.req(
        &dave,
        5,
        Body::History(pb::History {
            conversation_id: group.clone(),
            ..Default::default()
        }),
    );
    assert_error(&out, &dave, 5, ErrorCode::Forbidden);
    assert!(sync(&mut h, &dave, &[(&group, 0)], 0).messages.is_empty());

    h.req(&alice, 4, change(&group, &["dave"], &[], &[]));
    assert_eq!(
        seqs(&history(&mut h, &dave, &group, 0, 0).messages),
        [1, 2, 3]
    );
}

/// The router handles every body the protocol's table routes to the backend,
/// and refuses the rest: a body added to the table as a request without a
/// handler (or the reverse) fails here.
#[test]
fn router_handles_exactly_the_backend_requests_of_the_body_table() {
    use palaver_protocol::BodyKind;
    for kind in BodyKind::ALL {
        let mut h = Harness::new();
        let alice = h.open("alice", "phone", 1);
        let out = h.req(&alice, 9, kind.default_body());
        let refused = to(&out, &alice.addr).iter().any(|f| {
            error(f).is_some_and(|e| e.message.ends_with("is not a request the server accepts"))
        });
        assert_eq!(refused, !kind.is_backend_request(), "{kind:?}: {out:?}");
    }
}
