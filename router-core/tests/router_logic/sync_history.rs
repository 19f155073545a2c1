//! Sync and History: listing, paging, limits, byte budgets.

use super::*;

#[test]
fn sync_with_cursors_lists_unknown_conversations_and_pages() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let bob = h.open("bob", "phone", 2);
    let group = h.create_group(&alice, &["bob"]);
    for n in 1..=5 {
        h.send(&alice, DM, n);
    }
    for n in 6..=8 {
        h.send(&alice, &group, n);
    }

    // Fresh device: everything, both conversations listed.
    let batch = sync(&mut h, &bob, &[], 0);
    assert!(!batch.has_more);
    let mut listed: Vec<(&str, u64)> = batch
        .conversations
        .iter()
        .map(|c| (c.conversation_id.as_str(), c.last_seq))
        .collect();
    listed.sort();
    let mut expected = vec![(DM, 5), (group.as_str(), 3)];
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(batch.messages.len(), 8);

    // With a cursor for the DM: only its newer messages, and only the group
    // is listed (it is absent from the cursors).
    let batch = sync(&mut h, &bob, &[(DM, 3)], 0);
    let dm: Vec<u64> = batch
        .messages
        .iter()
        .filter(|m| m.conversation_id == DM)
        .map(|m| m.seq)
        .collect();
    let grp: Vec<u64> = batch
        .messages
        .iter()
        .filter(|m| m.conversation_id == group)
        .map(|m| m.seq)
        .collect();
    assert_eq!(dm, [4, 5]);
    assert_eq!(grp, [1, 2, 3]);
    assert_eq!(batch.conversations.len(), 1);
    assert_eq!(batch.conversations[0].conversation_id, group);

    // Up to date: nothing.
    let batch = sync(&mut h, &bob, &[(DM, 5), (&group, 3)], 0);
    assert!(batch.messages.is_empty() && batch.conversations.is_empty() && !batch.has_more);

    // Paging with limit 3: advance cursors from what arrives until done.
    let mut cursors: HashMap<String, u64> = HashMap::new();
    let mut got: Vec<(String, u64)> = Vec::new();
    let mut rounds = 0;
    loop {
        let cs: Vec<(&str, u64)> = cursors.iter().map(|(c, s)| (c.as_str(), *s)).collect();
        let batch = sync(&mut h, &bob, &cs, 3);
        assert!(batch.messages.len() <= 3);
        for c in &batch.conversations {
            cursors.entry(c.conversation_id.clone()).or_insert(0);
        }
        for m in &batch.messages {
            let cursor = cursors
                .get_mut(&m.conversation_id)
                .expect("message of an unlisted conversation");
            assert_eq!(m.seq, *cursor + 1, "gap or reorder");
            *cursor = m.seq;
            got.push((m.conversation_id.clone(), m.seq));
        }
        rounds += 1;
        if !batch.has_more {
            break;
        }
        assert!(rounds < 10);
    }
    assert_eq!(got.len(), 8);
    assert_eq!(rounds, 3);
}

#[test]
fn sync_limit_is_capped_at_max_batch() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    for n in 1..=600 {
        h.send(&alice, DM, n);
    }
    let batch = sync(&mut h, &alice, &[], 10_000);
    assert_eq!(batch.messages.len(), 500);
    assert!(batch.has_more);
    assert_eq!(seqs(&batch.messages), (1..=500).collect::<Vec<_>>());
    let batch = sync(&mut h, &alice, &[(DM, 500)], 0);
    assert_eq!(seqs(&batch.messages), (501..=600).collect::<Vec<_>>());
    assert!(!batch.has_more);
}

#[test]
fn sync_batches_respect_the_byte_budget() {
    let mut h = Harness::with_config(RouterConfig {
        max_batch_bytes: 3000,
        ..RouterConfig::default()
    });
    let alice = h.open("alice", "phone", 1);
    let big = "x".repeat(1000);
    for n in 1..=10 {
        h.req(&alice, n, send_body(DM, n, &big));
    }
    let batch = sync(&mut h, &alice, &[(DM, 0)], 0);
    assert!(batch.has_more);
    assert!(
        !batch.messages.is_empty() && batch.messages.len() < 4,
        "{}",
        batch.messages.len()
    );
}

#[test]
fn history_pages_backwards_within_the_window() {
    let mut h = Harness::with_config(RouterConfig {
        history_window: 20,
        ..RouterConfig::default()
    });
    let alice = h.open("alice", "phone", 1);
    for n in 1..=25 {
        h.send(&alice, DM, n);
    }
    let page = history(&mut h, &alice, DM, 0, 10);
    assert_eq!(page.conversation_id, DM);
    assert_eq!(seqs(&page.messages), (16..=25).collect::<Vec<_>>());
    assert!(page.has_more);
    let page = history(&mut h, &alice, DM, 16, 10);
    assert_eq!(seqs(&page.messages), (6..=15).collect::<Vec<_>>());
    // Seqs 1..=5 left the 20-message window.
    assert!(!page.has_more);
    let page = history(&mut h, &alice, DM, 6, 10);
    assert!(page.messages.is_empty() && !page.has_more);
    // Limit 0 means the default; a group nobody created is not found.
    assert_eq!(history(&mut h, &alice, DM, 0, 0).messages.len(), 20);
    let out = h.req(
        &alice,
        3,
        Body::History(pb::History {
            conversation_id: "grp:none".into(),
            ..Default::default()
        }),
    );
    assert_error(&out, &alice, 3, ErrorCode::NotFound);
}

#[test]
fn sync_terminates_when_a_listed_group_record_is_missing() {
    use palaver_router_core::store::{ConversationStore, Retention, UserStore};
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    h.send(&alice, DM, 1);
    // A group with messages and a listing but no record (lost data).
    let store = &mut h.router.store_mut().inner;
    store
        .add_conversation_to_users("grp:ghost", &["alice".to_string()])
        .unwrap();
    let retention = Retention {
        now_ms: T0,
        dedup_ttl_ms: 1000,
        history_window: 10,
    };
    let message = pb::Message {
        client_msg_id: cmid(1),
        ..Default::default()
    };
    store
        .append_message("grp:ghost", message, &retention)
        .unwrap();
    let batch = sync(&mut h, &alice, &[], 0);
    assert!(!batch.has_more);
    assert_eq!(batch.conversations.len(), 1);
    assert_eq!(seqs(&batch.messages), [1]);
}
