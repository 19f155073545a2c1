//! Channels (SPEC §21): stored once, published once, whatever the member
//! count; joins, leaves and admins; member pages; OpenChannel; read
//! positions; Typing; mentions.

use palaver_router_core::store::ChannelStore;

use super::*;

fn create_channel(h: &mut Harness, creator: &Session, members: &[&str], public: bool) -> String {
    let out = h.req(
        creator,
        70,
        create_channel_body("news", members, public, false),
    );
    match &reply_to(&out, creator, 70).body {
        Some(Body::ConversationCreated(c)) => {
            let c = c.conversation.as_ref().unwrap();
            assert_eq!(c.kind, pb::ConversationKind::Channel as i32);
            assert!(c.conversation_id.starts_with("chn:"), "{c:?}");
            assert!(c.members.is_empty(), "a channel's members are paged");
            assert_eq!(c.member_count, members.len() as u32 + 1);
            c.conversation_id.clone()
        }
        other => panic!("expected ConversationCreated, got {other:?}"),
    }
}

/// `n` members joined straight in the store (as many joins would).
fn fill(h: &mut Harness, channel: &str, n: usize) {
    let users: Vec<String> = (0..n).map(|i| format!("m{i:06}")).collect();
    for chunk in users.chunks(10_000) {
        h.router
            .store_mut()
            .change_channel_members(channel, chunk, &[], &[], 1_000_000)
            .unwrap()
            .unwrap();
    }
}

fn change(h: &mut Harness, s: &Session, channel: &str, add: &[&str], remove: &[&str]) -> Output {
    let ids = |v: &[&str]| v.iter().map(|u| u.to_string()).collect::<Vec<_>>();
    h.req(
        s,
        31,
        Body::ChangeMembers(pb::ChangeMembers {
            conversation_id: channel.into(),
            add_user_ids: ids(add),
            remove_user_ids: ids(remove),
            promote_user_ids: Vec::new(),
        }),
    )
}

fn open(h: &mut Harness, s: &Session, channel: &str, mode: pb::ChannelMode) -> Output {
    h.req(
        s,
        72,
        Body::OpenChannel(pb::OpenChannel {
            conversation_id: channel.into(),
            mode: mode as i32,
        }),
    )
}

fn page(
    h: &mut Harness,
    s: &Session,
    conversation: &str,
    after: &str,
    limit: u32,
) -> pb::MemberPage {
    let out = h.req(
        s,
        71,
        Body::ListMembers(pb::ListMembers {
            conversation_id: conversation.into(),
            after_user_id: after.into(),
            limit,
        }),
    );
    match &reply_to(&out, s, 71).body {
        Some(Body::MemberPage(p)) => p.clone(),
        other => panic!("expected MemberPage, got {other:?}"),
    }
}

#[test]
fn a_channel_message_is_one_post_not_a_frame_per_member() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let alice_laptop = h.open("alice", "laptop", 3);
    let channel = create_channel(&mut h, &alice, &["bob"], false);
    let out = h.send(&bob, &channel, 1);
    // bob's SendAck, nothing addressed to alice's two devices.
    assert_eq!(out.frames.len(), 1, "{:?}", out.frames);
    assert_eq!(ack(reply_to(&out, &bob, 1)).unwrap().seq, 1);
    assert!(to(&out, &alice.addr).is_empty() && to(&out, &alice_laptop.addr).is_empty());
    assert_eq!(out.channel_posts.len(), 1);
    let post = &out.channel_posts[0];
    assert_eq!(post.conversation_id, channel);
    assert_eq!(post.last_seq, 1);
    assert_eq!(post.from.as_ref(), Some(&bob.addr));
    assert_eq!(delivered(&post.frame).unwrap().body, b"message 1");
    assert_eq!(post.frame.request_id, 0);
    // Sync and History serve it like any conversation's.
    let batch = sync(&mut h, &alice, &[], 0);
    assert_eq!(batch.conversations.len(), 1);
    assert_eq!(
        batch.conversations[0].kind,
        pb::ConversationKind::Channel as i32
    );
    assert_eq!(seqs(&batch.messages), vec![1]);
    assert_eq!(
        seqs(&history(&mut h, &bob, &channel, 0, 10).messages),
        vec![1]
    );
}

/// What a channel Send costs the store and the bus does not grow with the
/// member count: the same calls, the same frames, one post, at 10,000
/// members and at 100,000.
#[test]
fn a_channel_sends_cost_is_flat_from_ten_thousand_to_a_hundred_thousand_members() {
    let mut costs = Vec::new();
    for members in [10_000, 100_000] {
        let mut h = Harness::new();
        let alice = h.open("alice", "phone", 1);
        let channel = create_channel(&mut h, &alice, &[], false);
        fill(&mut h, &channel, members);
        // Online members too: the router looks none of them up.
        for i in 0..100 {
            h.open(&format!("m{i:06}"), "phone", 100 + i);
        }
        h.send(&alice, &channel, 1);
        h.router.store_mut().reset_counts();
        let out = h.send(&alice, &channel, 2);
        assert_eq!(ack(reply_to(&out, &alice, 2)).unwrap().seq, 2);
        let (calls, items, _) = h.calls().work();
        eprintln!("a channel Send at {members} members: store calls {calls:?}, items {items:?}");
        costs.push((calls, items, out.frames.len(), out.channel_posts.len()));
    }
    assert_eq!(costs[0], costs[1], "10,000 vs 100,000 members");
    let (calls, _, frames, posts) = &costs[1];
    assert_eq!((*frames, *posts), (1, 1));
    let total: usize = calls.iter().map(|(_, n)| n).sum();
    assert!(total <= 6, "store calls per channel Send: {calls:?}");
}

#[test]
fn announcement_channels_take_posts_from_admins_only_and_mentions_push_members() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let out = h.req(
        &alice,
        70,
        create_channel_body("news", &["bob", "carol"], false, true),
    );
    let Some(Body::ConversationCreated(c)) = &reply_to(&out, &alice, 70).body else {
        panic!("{out:?}");
    };
    let channel = c.conversation.as_ref().unwrap().conversation_id.clone();
    assert!(
        c.conversation
            .as_ref()
            .unwrap()
            .channel
            .unwrap()
            .admins_only_post
    );
    assert_error(&h.send(&bob, &channel, 1), &bob, 1, ErrorCode::Forbidden);
    // carol is offline with a push device; dave is no member.
    h.register_token("carol", "phone");
    h.register_token("dave", "phone");
    let mut body = send_body(&channel, 2, "release");
    if let Body::Send(s) = &mut body {
        s.mention_user_ids = vec!["carol".into(), "dave".into(), "alice".into()];
    }
    let out = h.req(&alice, 2, body);
    assert_eq!(ack(reply_to(&out, &alice, 2)).unwrap().seq, 1);
    let pushed: Vec<&str> = out.pushes.iter().map(|p| p.user_id.as_str()).collect();
    assert_eq!(
        pushed,
        vec!["carol"],
        "only mentioned members, not the sender"
    );
    // No mention, no push, whoever is offline.
    let out = h.send(&alice, &channel, 3);
    assert!(out.pushes.is_empty());
}

#[test]
fn joining_leaving_and_the_last_admin() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let carol = h.open("carol", "phone", 3);
    let public = create_channel(&mut h, &alice, &[], true);
    let private = create_channel(&mut h, &alice, &[], false);
    // bob joins the public one himself; the private one refuses him.
    let out = change(&mut h, &bob, &public, &["bob"], &[]);
    let joined = members_changed(reply_to(&out, &bob, 31));
    assert_eq!(joined.added_user_ids, vec!["bob"]);
    assert_eq!(joined.conversation.as_ref().unwrap().member_count, 2);
    assert!(
        to(&out, &alice.addr).is_empty(),
        "members are not told of joins"
    );
    assert_error(
        &change(&mut h, &bob, &private, &["bob"], &[]),
        &bob,
        31,
        ErrorCode::Forbidden,
    );
    // A member adds nobody else.
    assert_error(
        &change(&mut h, &bob, &public, &["carol"], &[]),
        &bob,
        31,
        ErrorCode::Forbidden,
    );
    // An admin adds carol: she hears of it.
    let out = change(&mut h, &alice, &public, &["carol"], &[]);
    assert_eq!(
        members_changed(to(&out, &carol.addr)[0]).added_user_ids,
        vec!["carol"]
    );
    // alice, the only admin, may not leave while others stay.
    assert_error(
        &change(&mut h, &alice, &public, &[], &["alice"]),
        &alice,
        31,
        ErrorCode::InvalidArgument,
    );
    // bob leaves; sending is then refused.
    let out = change(&mut h, &bob, &public, &[], &["bob"]);
    assert_eq!(
        members_changed(reply_to(&out, &bob, 31)).removed_user_ids,
        vec!["bob"]
    );
    assert_error(&h.send(&bob, &public, 5), &bob, 5, ErrorCode::Forbidden);
    let page = page(&mut h, &alice, &public, "", 0);
    let ids: Vec<&str> = page.members.iter().map(|m| m.user_id.as_str()).collect();
    assert_eq!(ids, vec!["alice", "carol"]);
    assert_eq!(page.member_count, 2);
}

#[test]
fn member_lists_page_in_order_for_channels_and_groups() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let outsider = h.open("zed", "phone", 2);
    let channel = create_channel(&mut h, &alice, &[], false);
    fill(&mut h, &channel, 2_499);
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let p = page(&mut h, &alice, &channel, &after, 1_000);
        assert_eq!(p.member_count, 2_500);
        assert!(p.members.len() <= 500, "capped at max_batch");
        seen.extend(p.members.iter().map(|m| m.user_id.clone()));
        after = seen.last().unwrap().clone();
        if !p.has_more {
            break;
        }
    }
    assert_eq!(seen.len(), 2_500);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "ascending, no repeat");
    assert_eq!(h.calls().count("channel_members"), 5);
    let out = h.req(
        &outsider,
        71,
        Body::ListMembers(pb::ListMembers {
            conversation_id: channel.clone(),
            after_user_id: String::new(),
            limit: 10,
        }),
    );
    assert_error(&out, &outsider, 71, ErrorCode::Forbidden);
    // A group's list pages the same way.
    let group = h.create_group(&alice, &["bob", "carol", "dave"]);
    let first = page(&mut h, &alice, &group, "", 2);
    assert_eq!(
        (first.members.len(), first.has_more, first.member_count),
        (2, true, 4)
    );
    let rest = page(&mut h, &alice, &group, &first.members[1].user_id, 2);
    let ids: Vec<&str> = rest.members.iter().map(|m| m.user_id.as_str()).collect();
    assert_eq!((ids, rest.has_more), (vec!["carol", "dave"], false));
}

#[test]
fn open_channel_says_where_the_channel_and_the_reader_are() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let bob_tablet = h.open("bob", "tablet", 3);
    let outsider = h.open("zed", "phone", 4);
    let channel = create_channel(&mut h, &alice, &["bob"], false);
    for n in 1..=5 {
        h.send(&alice, &channel, n);
    }
    let opened = |out: &Output, s: &Session| match &reply_to(out, s, 72).body {
        Some(Body::ChannelOpened(o)) => o.clone(),
        other => panic!("expected ChannelOpened, got {other:?}"),
    };
    let o = opened(&open(&mut h, &bob, &channel, pb::ChannelMode::Live), &bob);
    assert_eq!(
        (o.mode, o.last_seq, o.read_seq),
        (pb::ChannelMode::Live as i32, 5, 0)
    );
    // READ moves bob's position; his tablet hears of it, nobody else.
    let out = h.req(
        &bob,
        8,
        Body::Receipt(pb::Receipt {
            conversation_id: channel.clone(),
            kind: pb::ReceiptKind::Read as i32,
            up_to_seq: 9,
        }),
    );
    assert_eq!(out.frames.len(), 1, "{:?}", out.frames);
    let update = receipt_update(to(&out, &bob_tablet.addr)[0]);
    assert_eq!((update.user_id.as_str(), update.up_to_seq), ("bob", 5));
    let o = opened(&open(&mut h, &bob, &channel, pb::ChannelMode::Counts), &bob);
    assert_eq!((o.last_seq, o.read_seq), (5, 5));
    // A position never goes back.
    h.req(
        &bob,
        8,
        Body::Receipt(pb::Receipt {
            conversation_id: channel.clone(),
            kind: pb::ReceiptKind::Read as i32,
            up_to_seq: 2,
        }),
    );
    let o = opened(&open(&mut h, &bob, &channel, pb::ChannelMode::Live), &bob);
    assert_eq!(o.read_seq, 5);
    // DELIVERED means nothing in a channel: ignored, no error (clients
    // that predate channels send it for what they sync).
    let out = h.req(
        &bob,
        8,
        Body::Receipt(pb::Receipt {
            conversation_id: channel.clone(),
            kind: pb::ReceiptKind::Delivered as i32,
            up_to_seq: 5,
        }),
    );
    assert!(
        out.frames.is_empty() && out.channel_posts.is_empty(),
        "{out:?}"
    );
    // Non-members are refused; CLOSED is always answered.
    let out = open(&mut h, &outsider, &channel, pb::ChannelMode::Live);
    assert_error(&out, &outsider, 72, ErrorCode::Forbidden);
    let o = opened(
        &open(&mut h, &outsider, &channel, pb::ChannelMode::Closed),
        &outsider,
    );
    assert_eq!(o.mode, pb::ChannelMode::Closed as i32);
    // Groups have no OpenChannel.
    let group = h.create_group(&alice, &["bob"]);
    let out = open(&mut h, &alice, &group, pb::ChannelMode::Live);
    assert_error(&out, &alice, 72, ErrorCode::InvalidArgument);
}

#[test]
fn channel_typing_is_one_post_for_members_only() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let outsider = h.open("zed", "phone", 2);
    let channel = create_channel(&mut h, &alice, &["bob"], false);
    let typing = |c: &str| {
        Body::Typing(pb::Typing {
            conversation_id: c.into(),
            active: true,
            user_id: "forged".into(),
        })
    };
    let out = h.req(&alice, 0, typing(&channel));
    assert!(out.frames.is_empty());
    assert_eq!(out.channel_posts.len(), 1);
    let post = &out.channel_posts[0];
    assert_eq!(post.last_seq, 0, "a Typing moves no count");
    match &post.frame.body {
        Some(Body::Typing(t)) => assert_eq!(t.user_id, "alice"),
        other => panic!("expected Typing, got {other:?}"),
    }
    let out = h.req(&outsider, 5, typing(&channel));
    assert_error(&out, &outsider, 5, ErrorCode::Forbidden);
}
