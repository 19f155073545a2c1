//! One channel scenario suite (SPEC §21) for every backend, as
//! [`crate::chat`] is for chat: the gateway's tests run it on the embedded
//! engine, the router's through Kafka and Redis across two gateways. Each
//! scenario uses its own users and channels.

use std::time::Duration;

use palaver_protocol::pb::{self, frame::Body};

use crate::chat::{next_deliver, send_reliably, ChatServer};
use crate::client::Client;

/// Every scenario, in order.
pub fn run_all(s: &impl ChatServer) {
    live_connections_get_messages_and_counts_connections_get_batches(s);
    a_removed_member_and_a_closed_connection_get_nothing_more(s);
    members_page_and_read_positions_follow_the_reader(s);
}

/// Creates a channel of `creator` with `members`; returns its id.
pub fn create_channel(
    c: &mut Client,
    members: &[&str],
    settings: pb::ChannelSettings,
    patience: Duration,
) -> String {
    let id = c
        .request(Body::CreateConversation(pb::CreateConversation {
            kind: pb::ConversationKind::Channel as i32,
            title: "channel".into(),
            member_user_ids: members.iter().map(|m| m.to_string()).collect(),
            channel: Some(settings),
        }))
        .expect("send CreateConversation");
    let f = c
        .recv_until(patience, "ConversationCreated", |f| f.request_id == id)
        .expect("ConversationCreated");
    match f.body {
        Some(Body::ConversationCreated(pb::ConversationCreated {
            conversation: Some(conversation),
        })) => {
            assert_eq!(conversation.kind, pb::ConversationKind::Channel as i32);
            conversation.conversation_id
        }
        other => panic!("expected ConversationCreated, got {other:?}"),
    }
}

/// Sets this connection's mode for `channel`; returns the answer.
pub fn open_channel(
    c: &mut Client,
    channel: &str,
    mode: pb::ChannelMode,
    patience: Duration,
) -> Result<pb::ChannelOpened, pb::Error> {
    let id = c
        .request(Body::OpenChannel(pb::OpenChannel {
            conversation_id: channel.into(),
            mode: mode as i32,
        }))
        .expect("send OpenChannel");
    let f = c
        .recv_until(patience, "ChannelOpened", |f| f.request_id == id)
        .expect("an answer to OpenChannel");
    match f.body {
        Some(Body::ChannelOpened(o)) => Ok(o),
        Some(Body::Error(e)) => Err(e),
        other => panic!("expected ChannelOpened, got {other:?}"),
    }
}

/// ChangeMembers; returns the MembersChanged answer.
pub fn change_members(
    c: &mut Client,
    channel: &str,
    add: &[&str],
    remove: &[&str],
    patience: Duration,
) -> pb::MembersChanged {
    let ids = |v: &[&str]| v.iter().map(|u| u.to_string()).collect::<Vec<_>>();
    let id = c
        .request(Body::ChangeMembers(pb::ChangeMembers {
            conversation_id: channel.into(),
            add_user_ids: ids(add),
            remove_user_ids: ids(remove),
            promote_user_ids: Vec::new(),
        }))
        .expect("send ChangeMembers");
    let f = c
        .recv_until(patience, "MembersChanged", |f| f.request_id == id)
        .expect("MembersChanged");
    match f.body {
        Some(Body::MembersChanged(m)) => m,
        other => panic!("expected MembersChanged, got {other:?}"),
    }
}

/// Everything `c` receives until a Pong answers a Ping sent now: what was
/// on its way before the Ping (a barrier, no sleep).
pub fn drain(c: &mut Client, patience: Duration) -> Vec<pb::Frame> {
    let nonce = rand::random::<u64>();
    c.request(Body::Ping(pb::Ping { nonce }))
        .expect("send Ping");
    let mut frames = Vec::new();
    loop {
        let f = c
            .recv_timeout(patience, "Pong")
            .expect("frames until the Pong");
        if matches!(&f.body, Some(Body::Pong(p)) if p.nonce == nonce) {
            return frames;
        }
        frames.push(f);
    }
}

/// The channel's newest seq in the ChannelActivity frames `c` receives,
/// once it reaches `seq`; returns how many ChannelActivity frames it took.
pub fn counts_until(c: &mut Client, channel: &str, seq: u64, patience: Duration) -> usize {
    let mut frames = 0;
    loop {
        let f = c
            .recv_until(patience, "ChannelActivity", |f| {
                matches!(f.body, Some(Body::ChannelActivity(_)))
            })
            .expect("ChannelActivity");
        frames += 1;
        let Some(Body::ChannelActivity(a)) = f.body else {
            unreachable!()
        };
        let last = a
            .channels
            .iter()
            .filter(|c| c.conversation_id == channel)
            .map(|c| c.last_seq)
            .max()
            .unwrap_or(0);
        assert!(
            last <= seq,
            "counts beyond the last message: {last} > {seq}"
        );
        if last == seq {
            return frames;
        }
    }
}

fn is_channel_traffic(f: &pb::Frame, channel: &str) -> bool {
    match &f.body {
        Some(Body::Deliver(d)) => d
            .message
            .as_ref()
            .is_some_and(|m| m.conversation_id == channel),
        Some(Body::Typing(t)) => t.conversation_id == channel,
        Some(Body::ChannelActivity(a)) => a.channels.iter().any(|c| c.conversation_id == channel),
        _ => false,
    }
}

/// A LIVE connection gets each message (not its own) and Typing; a COUNTS
/// one gets a few ChannelActivity frames, not one per message; a member
/// who opened nothing gets nothing live; a member joins a public channel.
pub fn live_connections_get_messages_and_counts_connections_get_batches(s: &impl ChatServer) {
    let t = s.patience();
    let far = s.far_gateway();
    let mut owner = s.login(0, "ch1-owner", "phone");
    let mut live = s.login(far, "ch1-live", "phone");
    let mut counts = s.login(0, "ch1-counts", "phone");
    let mut idle = s.login(far, "ch1-idle", "phone");
    let settings = pb::ChannelSettings {
        public: true,
        admins_only_post: false,
    };
    let channel = create_channel(&mut owner, &["ch1-live"], settings, t);
    // Two join by themselves (public).
    for (c, user) in [(&mut counts, "ch1-counts"), (&mut idle, "ch1-idle")] {
        let joined = change_members(c, &channel, &[user], &[], t);
        assert_eq!(joined.added_user_ids, vec![user.to_string()]);
    }
    let opened = open_channel(&mut live, &channel, pb::ChannelMode::Live, t).expect("LIVE");
    assert_eq!((opened.last_seq, opened.read_seq), (0, 0));
    open_channel(&mut counts, &channel, pb::ChannelMode::Counts, t).expect("COUNTS");
    open_channel(&mut owner, &channel, pb::ChannelMode::Live, t).expect("LIVE");

    const N: u64 = 20;
    for i in 1..=N {
        assert_eq!(
            send_reliably(&mut owner, &channel, &format!("m{i}"), t).seq,
            i
        );
    }
    for i in 1..=N {
        let m = next_deliver(&mut live, t);
        assert_eq!((m.conversation_id.as_str(), m.seq), (channel.as_str(), i));
    }
    let frames = counts_until(&mut counts, &channel, N, t);
    assert!(
        frames < N as usize / 2,
        "{N} messages took {frames} ChannelActivity frames: not batched"
    );
    // The sender's own connection got SendAcks, not copies.
    assert!(
        !drain(&mut owner, t)
            .iter()
            .any(|f| is_channel_traffic(f, &channel)),
        "the sender gets no Deliver of its own message"
    );
    assert!(
        !drain(&mut idle, t)
            .iter()
            .any(|f| is_channel_traffic(f, &channel)),
        "a member who opened nothing gets nothing live"
    );
    // Typing reaches LIVE connections only.
    owner
        .request(Body::Typing(pb::Typing {
            conversation_id: channel.clone(),
            active: true,
            user_id: String::new(),
        }))
        .expect("send Typing");
    let f = live
        .recv_until(t, "Typing", |f| matches!(f.body, Some(Body::Typing(_))))
        .expect("Typing on the LIVE connection");
    let Some(Body::Typing(typing)) = f.body else {
        unreachable!()
    };
    assert_eq!(
        (typing.conversation_id.as_str(), typing.user_id.as_str()),
        (channel.as_str(), "ch1-owner")
    );
}

/// Closing a channel stops what a connection gets of it; a member removed
/// hears of it and of nothing more, on any connection.
pub fn a_removed_member_and_a_closed_connection_get_nothing_more(s: &impl ChatServer) {
    let t = s.patience();
    let far = s.far_gateway();
    let mut owner = s.login(0, "ch2-owner", "phone");
    let mut reader = s.login(far, "ch2-reader", "phone");
    let mut leaver = s.login(far, "ch2-leaver", "phone");
    let settings = pb::ChannelSettings {
        public: false,
        admins_only_post: true,
    };
    let channel = create_channel(&mut owner, &["ch2-reader", "ch2-leaver"], settings, t);
    open_channel(&mut reader, &channel, pb::ChannelMode::Live, t).expect("LIVE");
    open_channel(&mut leaver, &channel, pb::ChannelMode::Live, t).expect("LIVE");
    // An announcement channel: members do not post.
    let id = reader
        .request(crate::client::text_send(&channel, "may I?"))
        .expect("send");
    let f = reader
        .recv_until(t, "Error", |f| f.request_id == id)
        .expect("answer");
    assert!(
        matches!(&f.body, Some(Body::Error(e)) if e.code == pb::ErrorCode::Forbidden as u32),
        "{f:?}"
    );
    assert_eq!(send_reliably(&mut owner, &channel, "one", t).seq, 1);
    assert_eq!(next_deliver(&mut reader, t).seq, 1);
    assert_eq!(next_deliver(&mut leaver, t).seq, 1);

    // The reader closes the channel; the leaver is removed.
    let closed = open_channel(&mut reader, &channel, pb::ChannelMode::Closed, t).expect("CLOSED");
    assert_eq!(closed.mode, pb::ChannelMode::Closed as i32);
    let removed = change_members(&mut owner, &channel, &[], &["ch2-leaver"], t);
    assert_eq!(removed.removed_user_ids, vec!["ch2-leaver".to_string()]);
    let f = leaver
        .recv_until(t, "MembersChanged", |f| {
            matches!(f.body, Some(Body::MembersChanged(_)))
        })
        .expect("the removed member hears of it");
    let Some(Body::MembersChanged(m)) = f.body else {
        unreachable!()
    };
    assert_eq!(m.removed_user_ids, vec!["ch2-leaver".to_string()]);

    assert_eq!(send_reliably(&mut owner, &channel, "two", t).seq, 2);
    // A LIVE watcher that stays shows "two" went out before the checks.
    let mut witness = s.login(far, "ch2-owner", "tablet");
    open_channel(&mut witness, &channel, pb::ChannelMode::Live, t).expect("LIVE");
    assert_eq!(send_reliably(&mut owner, &channel, "three", t).seq, 3);
    assert_eq!(next_deliver(&mut witness, t).seq, 3);
    for (who, c) in [("closed", &mut reader), ("removed", &mut leaver)] {
        assert!(
            !drain(c, t).iter().any(|f| is_channel_traffic(f, &channel)),
            "the {who} connection got channel traffic"
        );
    }
    // Removed: refused from now on.
    let refused = open_channel(&mut leaver, &channel, pb::ChannelMode::Live, t)
        .expect_err("a removed member may not open it");
    assert_eq!(refused.code, pb::ErrorCode::Forbidden as u32);
}

/// ListMembers pages a channel; a READ receipt moves the reader's position,
/// which ChannelOpened reports on another connection; Sync lists the
/// channel with its messages.
pub fn members_page_and_read_positions_follow_the_reader(s: &impl ChatServer) {
    let t = s.patience();
    let mut owner = s.login(0, "ch3-owner", "phone");
    let members: Vec<String> = (0..30).map(|i| format!("ch3-m{i:02}")).collect();
    let names: Vec<&str> = members.iter().map(String::as_str).collect();
    let settings = pb::ChannelSettings {
        public: false,
        admins_only_post: false,
    };
    let channel = create_channel(&mut owner, &names, settings, t);
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let id = owner
            .request(Body::ListMembers(pb::ListMembers {
                conversation_id: channel.clone(),
                after_user_id: after.clone(),
                limit: 7,
            }))
            .expect("send ListMembers");
        let f = owner
            .recv_until(t, "MemberPage", |f| f.request_id == id)
            .expect("MemberPage");
        let Some(Body::MemberPage(page)) = f.body else {
            panic!("expected MemberPage, got {f:?}")
        };
        assert_eq!(page.member_count, 31);
        assert!(page.members.len() <= 7);
        seen.extend(page.members.iter().map(|m| m.user_id.clone()));
        match page.members.last() {
            Some(last) if page.has_more => after = last.user_id.clone(),
            _ => break,
        }
    }
    let mut expected = members.clone();
    expected.push("ch3-owner".into());
    expected.sort();
    assert_eq!(seen, expected, "every member once, ascending");

    for i in 1..=5 {
        send_reliably(&mut owner, &channel, &format!("m{i}"), t);
    }
    let mut phone = s.login(0, "ch3-m07", "phone");
    let mut laptop = s.login(s.far_gateway(), "ch3-m07", "laptop");
    phone
        .request(Body::Receipt(pb::Receipt {
            conversation_id: channel.clone(),
            kind: pb::ReceiptKind::Read as i32,
            up_to_seq: 4,
        }))
        .expect("send Receipt");
    let f = laptop
        .recv_until(t, "ReceiptUpdate", |f| {
            matches!(f.body, Some(Body::ReceiptUpdate(_)))
        })
        .expect("the reader's other device hears of it");
    let Some(Body::ReceiptUpdate(update)) = f.body else {
        unreachable!()
    };
    assert_eq!((update.user_id.as_str(), update.up_to_seq), ("ch3-m07", 4));
    let opened = open_channel(&mut laptop, &channel, pb::ChannelMode::Counts, t).expect("COUNTS");
    assert_eq!((opened.last_seq, opened.read_seq), (5, 4));
    // The channel's owner hears nothing of who read what.
    assert!(!drain(&mut owner, t)
        .iter()
        .any(|f| matches!(f.body, Some(Body::ReceiptUpdate(_)))));

    let id = laptop
        .request(Body::Sync(pb::Sync {
            cursors: Vec::new(),
            limit: 0,
        }))
        .expect("send Sync");
    let f = laptop
        .recv_until(t, "SyncBatch", |f| f.request_id == id)
        .expect("SyncBatch");
    let Some(Body::SyncBatch(batch)) = f.body else {
        panic!("expected SyncBatch, got {f:?}")
    };
    let listed = batch
        .conversations
        .iter()
        .find(|c| c.conversation_id == channel)
        .expect("Sync lists the channel");
    assert_eq!(
        (listed.kind, listed.member_count, listed.members.len()),
        (pb::ConversationKind::Channel as i32, 31, 0)
    );
    let seqs: Vec<u64> = batch
        .messages
        .iter()
        .filter(|m| m.conversation_id == channel)
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
}
