//! Presence: queries, subscriptions, sessions, visibility and consent, and
//! the work a presence answer or change costs.

use super::*;

#[test]
fn presence_query_reflects_sessions_and_last_seen() {
    // The mechanics, with visibility out of the way (see presence_privacy_*).
    let mut h = Harness::with_config(RouterConfig {
        presence_visibility: PresenceVisibility::Everyone,
        ..RouterConfig::default()
    });
    let watcher = h.open("watcher", "phone", 1);
    let query = |ids: &[&str]| {
        Body::PresenceQuery(pb::PresenceQuery {
            user_ids: ids.iter().map(|s| s.to_string()).collect(),
        })
    };
    let out = h.req(&watcher, 1, query(&["bob", "never"]));
    assert_eq!(
        presence_result(reply_to(&out, &watcher, 1)),
        [("bob".into(), false, 0), ("never".into(), false, 0)]
    );
    let phone = h.open("bob", "phone", 2);
    let tablet = h.open("bob", "tablet", 3);
    let out = h.req(&watcher, 2, query(&["bob"]));
    assert_eq!(
        presence_result(reply_to(&out, &watcher, 2)),
        [("bob".into(), true, 0)]
    );
    h.close(&phone, T0 + 10);
    let out = h.req(&watcher, 3, query(&["bob"]));
    assert_eq!(
        presence_result(reply_to(&out, &watcher, 3)),
        [("bob".into(), true, 0)]
    );
    h.close(&tablet, T0 + 20);
    let out = h.req(&watcher, 4, query(&["bob", "bob"]));
    assert_eq!(
        presence_result(reply_to(&out, &watcher, 4)),
        [("bob".into(), false, T0 + 20)]
    );

    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let body = Body::PresenceQuery(pb::PresenceQuery { user_ids: too_many });
    assert_error(
        &h.req(&watcher, 5, body),
        &watcher,
        5,
        ErrorCode::InvalidArgument,
    );
}

#[test]
fn presence_subscriptions_get_transition_events_until_closed() {
    let mut h = Harness::with_config(RouterConfig {
        max_watches_per_connection: 2,
        presence_visibility: PresenceVisibility::Everyone,
        ..RouterConfig::default()
    });
    let watcher = h.open("watcher", "phone", 1);
    let other_watcher = h.open("watcher", "tablet", 9);
    let subscribe = |ids: &[&str], unsubscribe| {
        Body::PresenceSubscribe(pb::PresenceSubscribe {
            user_ids: ids.iter().map(|s| s.to_string()).collect(),
            unsubscribe,
        })
    };
    let bob_phone = h.open("bob", "phone", 2);
    let out = h.req(&watcher, 1, subscribe(&["bob", "carol"], false));
    assert_eq!(
        presence_result(reply_to(&out, &watcher, 1)),
        [("bob".into(), true, 0), ("carol".into(), false, 0)]
    );
    // Cap of 2: a third user is refused, re-subscribing a watched one is fine.
    let out = h.req(&watcher, 2, subscribe(&["dave"], false));
    assert_error(&out, &watcher, 2, ErrorCode::InvalidArgument);
    let out = h.req(&watcher, 3, subscribe(&["bob"], false));
    assert_eq!(presence_result(reply_to(&out, &watcher, 3)).len(), 1);

    // Carol comes online: one event, only to the subscribed connection.
    let carol = session("carol", "phone", "g1", 3);
    let out = h.opened(&carol);
    assert_eq!(out.frames.len(), 1);
    assert_eq!(
        presence_event(to(&out, &watcher.addr)[0]),
        ("carol".into(), true, 0)
    );
    let out = h.opened(&carol);
    assert!(
        out.frames.is_empty(),
        "re-opening the same addr is no transition"
    );
    let carol_tablet = session("carol", "tablet", "g1", 4);
    let out = h.opened(&carol_tablet);
    assert!(out.frames.is_empty(), "second device is no transition");
    assert!(
        h.close(&carol_tablet, T0 + 1).frames.is_empty(),
        "carol still has her phone"
    );

    let out = h.close(&bob_phone, T0 + 5);
    assert_eq!(out.frames.len(), 1);
    assert_eq!(to(&out, &watcher.addr).len(), 1);
    assert_eq!(
        presence_event(to(&out, &watcher.addr)[0]),
        ("bob".into(), false, T0 + 5)
    );
    assert!(to(&out, &other_watcher.addr).is_empty());

    let out = h.opened(&bob_phone);
    assert_eq!(
        presence_event(to(&out, &watcher.addr)[0]),
        ("bob".into(), true, 0)
    );

    // Unsubscribe from carol: acknowledged with an empty result, no events.
    let out = h.req(&watcher, 4, subscribe(&["carol"], true));
    assert!(presence_result(reply_to(&out, &watcher, 4)).is_empty());
    assert!(h.close(&carol, T0 + 7).frames.is_empty());

    // The watching connection closes: its subscriptions are gone.
    h.close(&watcher, T0 + 8);
    assert!(h.close(&bob_phone, T0 + 9).frames.is_empty());
}

/// The session-change path: a reconnect of the same device replaces the old
/// connection (one GoAway(REPLACED), wherever the changes fall in batches),
/// the replaced and closed connections' watches go, and the new
/// connection's own subscription keeps working whatever the order of the
/// old connection's late close.
#[test]
fn a_reconnect_replaces_the_old_connection_and_only_the_new_one_watches() {
    let mut h = Harness::with_config(RouterConfig {
        presence_visibility: PresenceVisibility::Everyone,
        ..RouterConfig::default()
    });
    let carol = h.open("carol", "phone", 9);
    let old = h.open("alice", "phone", 1);
    h.req(&old, 1, presence_subscribe(&["carol"], false));
    let new = session("alice", "phone", "g1", 2);
    let out = h.opened(&new);
    assert_eq!(out.frames.len(), 1, "only the GoAway: {out:?}");
    assert!(matches!(
        &to(&out, &old.addr)[0].body,
        Some(Body::GoAway(g)) if g.reason == pb::GoAwayReason::Replaced as i32
    ));
    // Replaced: the old connection watches nothing any more.
    let out = h.close(&carol, T0 + 1);
    assert!(out.frames.is_empty(), "to the replaced connection: {out:?}");
    h.opened(&carol);
    let out = h.req(&new, 1, presence_subscribe(&["carol"], false));
    assert_eq!(
        presence_result(reply_to(&out, &new, 1)),
        [("carol".into(), true, 0)]
    );
    // The old connection's close comes after the new one subscribed: it
    // neither takes alice offline nor touches the new connection's watches.
    let out = h.close(&old, T0 + 2);
    assert!(out.frames.is_empty(), "{out:?}");
    let out = h.close(&carol, T0 + 3);
    assert_eq!(to(&out, &new.addr).len(), 1);
    assert_eq!(
        presence_event(to(&out, &new.addr)[0]),
        ("carol".into(), false, T0 + 3)
    );

    // All in one batch: the old connection closes, its device reconnects,
    // carol comes online. No GoAway (already closed), one event each.
    let newer = session("alice", "phone", "g2", 3);
    h.req(&new, 2, presence_subscribe(&["carol"], false));
    let out = h.sessions(&[
        SessionChange::Closed {
            session: new.clone(),
            at_ms: T0 + 4,
        },
        SessionChange::Opened(newer.clone()),
        SessionChange::Opened(carol.clone()),
    ]);
    assert!(out.frames.is_empty(), "closed watches get nothing: {out:?}");
    h.req(&newer, 1, presence_subscribe(&["carol"], false));
    let out = h.close(&carol, T0 + 5);
    assert_eq!(
        presence_event(to(&out, &newer.addr)[0]),
        ("carol".into(), false, T0 + 5)
    );
    assert_eq!(out.frames.len(), 1);
}

/// One batch: a user coming online and going offline again in it produces
/// both events, in order; changes of several gateways in one batch are
/// written as one store call per gateway run.
#[test]
fn a_session_batch_applies_in_order() {
    let mut h = Harness::with_config(RouterConfig {
        presence_visibility: PresenceVisibility::Everyone,
        ..RouterConfig::default()
    });
    let watcher = h.open("watcher", "phone", 1);
    h.req(&watcher, 1, presence_subscribe(&["bob"], false));
    let on_g1 = session("bob", "phone", "g1", 2);
    let on_g2 = session("bob", "tablet", "g2", 3);
    let writes = h.calls().count("apply_sessions");
    let out = h.sessions(&[
        SessionChange::Opened(on_g1.clone()),
        SessionChange::Closed {
            session: on_g1,
            at_ms: T0 + 1,
        },
        SessionChange::Opened(on_g2),
    ]);
    let events: Vec<_> = to(&out, &watcher.addr)
        .into_iter()
        .map(presence_event)
        .collect();
    assert_eq!(
        events,
        [
            ("bob".into(), true, 0),
            ("bob".into(), false, T0 + 1),
            ("bob".into(), true, 0)
        ]
    );
    assert_eq!(
        h.calls().count("apply_sessions"),
        writes + 2,
        "g1 run, g2 run"
    );
}

#[test]
fn presence_privacy_strangers_look_never_seen_members_and_self_are_visible() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let stranger = h.open("stranger", "phone", 2);
    let bob = h.open("bob", "phone", 3);
    // Bob shares a DM both have written in with alice; carol shares a
    // group with alice; dave shares nothing with anyone.
    h.send(&alice, DM, 1);
    h.send(&bob, DM, 2);
    h.create_group(&alice, &["carol"]);
    let carol = h.open("carol", "phone", 4);
    let dave = h.open("dave", "phone", 5);
    h.close(&carol, T0 + 30);
    h.close(&dave, T0 + 40);

    let out = h.req(
        &alice,
        1,
        presence_query(&["bob", "carol", "dave", "alice"]),
    );
    assert_eq!(
        presence_result(reply_to(&out, &alice, 1)),
        [
            ("bob".into(), true, 0),
            ("carol".into(), false, T0 + 30),
            ("dave".into(), false, 0),
            ("alice".into(), true, 0),
        ],
        "DM peer and group member visible, self visible, stranger never seen"
    );
    // The stranger sees nobody: online alice and bob, last-seen carol, all
    // exactly like a user who was never seen; only themself.
    let out = h.req(
        &stranger,
        2,
        presence_query(&["alice", "bob", "carol", "never", "stranger"]),
    );
    assert_eq!(
        presence_result(reply_to(&out, &stranger, 2)),
        [
            ("alice".into(), false, 0),
            ("bob".into(), false, 0),
            ("carol".into(), false, 0),
            ("never".into(), false, 0),
            ("stranger".into(), true, 0),
        ]
    );
    // A subscription answers the same way.
    let out = h.req(&stranger, 3, presence_subscribe(&["alice", "carol"], false));
    assert_eq!(
        presence_result(reply_to(&out, &stranger, 3)),
        [("alice".into(), false, 0), ("carol".into(), false, 0)]
    );
    let _ = bob;

    // `everyone` turns the rule off.
    let mut open = Harness::with_config(RouterConfig {
        presence_visibility: PresenceVisibility::Everyone,
        ..RouterConfig::default()
    });
    let stranger = open.open("stranger", "phone", 2);
    let alice = open.open("alice", "phone", 1);
    let out = open.req(&stranger, 1, presence_query(&["alice"]));
    assert_eq!(
        presence_result(reply_to(&out, &stranger, 1)),
        [("alice".into(), true, 0)]
    );
    open.close(&alice, T0 + 5);
    let out = open.req(&stranger, 2, presence_query(&["alice"]));
    assert_eq!(
        presence_result(reply_to(&out, &stranger, 2)),
        [("alice".into(), false, T0 + 5)]
    );
}

#[test]
fn presence_privacy_is_checked_when_events_are_sent() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let watcher = h.open("watcher", "phone", 2);
    let out = h.req(&watcher, 1, presence_subscribe(&["carol"], false));
    assert_eq!(
        presence_result(reply_to(&out, &watcher, 1)),
        [("carol".into(), false, 0)]
    );
    // Carol connects and leaves: the stranger gets no event.
    let carol = h.open("carol", "phone", 3);
    h.close(&carol, T0 + 1);
    let out = h.opened(&carol);
    assert!(to(&out, &watcher.addr).is_empty(), "stranger got {out:?}");

    // Alice puts watcher and carol in a group: the existing subscription now
    // produces events.
    let group = h.create_group(&alice, &["watcher", "carol"]);
    let out = h.close(&carol, T0 + 10);
    assert_eq!(to(&out, &watcher.addr).len(), 1);
    assert_eq!(
        presence_event(to(&out, &watcher.addr)[0]),
        ("carol".into(), false, T0 + 10)
    );
    let out = h.opened(&carol);
    assert_eq!(
        presence_event(to(&out, &watcher.addr)[0]),
        ("carol".into(), true, 0)
    );

    // Carol is removed from the last shared group: events stop, and a query
    // answers "never seen" again.
    let out = h.req(
        &alice,
        2,
        Body::ChangeMembers(pb::ChangeMembers {
            conversation_id: group.clone(),
            remove_user_ids: vec!["carol".into()],
            ..Default::default()
        }),
    );
    assert!(
        to(&out, &alice.addr).iter().all(|f| error(f).is_none()),
        "{out:?}"
    );
    let out = h.close(&carol, T0 + 20);
    assert!(
        to(&out, &watcher.addr).is_empty(),
        "removed member: {out:?}"
    );
    let out = h.req(&watcher, 3, presence_query(&["carol"]));
    assert_eq!(
        presence_result(reply_to(&out, &watcher, 3)),
        [("carol".into(), false, 0)]
    );
}

#[test]
fn same_device_reconnecting_replaces_the_old_connection() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let old = h.open("bob", "phone", 2);
    let new = session("bob", "phone", "g2", 3);
    let out = h.opened(&new);
    let frames = to(&out, &old.addr);
    assert_eq!(frames.len(), 1);
    match &frames[0].body {
        Some(Body::GoAway(g)) => assert_eq!(g.reason, pb::GoAwayReason::Replaced as i32),
        other => panic!("expected GoAway, got {other:?}"),
    }
    // The old connection closing late leaves bob online at the new address.
    h.close(&old, T0 + 1);
    let out = h.send(&alice, DM, 1);
    assert_eq!(to(&out, &new.addr).len(), 1);
    assert!(to(&out, &old.addr).is_empty());
    assert!(out.pushes.is_empty());
}

/// Presence privacy bypass: creating a DIRECT conversation (nothing the
/// victim sees or accepts), or writing into it alone, does not make the
/// victim's presence visible; it counts once both have written (SPEC §10).
#[test]
fn consent_a_direct_conversation_counts_for_presence_once_both_have_written() {
    let mut h = Harness::new();
    let victim = h.open("victim", "phone", 1);
    let mallory = h.open("mallory", "phone", 2);
    let dm = direct_conversation_id("mallory", "victim");
    let out = h.req(&mallory, 1, direct_create("victim"));
    assert!(error(reply_to(&out, &mallory, 1)).is_none());
    h.close(&victim, T0 + 5);

    let hidden = [("victim".to_string(), false, 0)];
    let out = h.req(&mallory, 2, presence_query(&["victim"]));
    assert_eq!(presence_result(reply_to(&out, &mallory, 2)), hidden);
    let out = h.req(&mallory, 3, presence_subscribe(&["victim"], false));
    assert_eq!(presence_result(reply_to(&out, &mallory, 3)), hidden);
    // Writing alone does not count either, however much.
    for n in 10..15 {
        h.send(&mallory, &dm, n);
    }
    let victim = h.open("victim", "phone", 3);
    let out = h.close(&victim, T0 + 20);
    assert!(to(&out, &mallory.addr).is_empty(), "{out:?}");
    let out = h.req(&mallory, 4, presence_query(&["victim"]));
    assert_eq!(presence_result(reply_to(&out, &mallory, 4)), hidden);

    // The victim answers: now both see each other, and the existing
    // subscription produces events from the next change on.
    let victim = h.open("victim", "phone", 4);
    h.send(&victim, &dm, 20);
    let out = h.req(&mallory, 5, presence_query(&["victim"]));
    assert_eq!(
        presence_result(reply_to(&out, &mallory, 5)),
        [("victim".to_string(), true, 0)]
    );
    let out = h.req(&victim, 6, presence_query(&["mallory"]));
    assert_eq!(
        presence_result(reply_to(&out, &victim, 6)),
        [("mallory".to_string(), true, 0)]
    );
    let out = h.close(&victim, T0 + 30);
    assert_eq!(
        presence_event(to(&out, &mallory.addr)[0]),
        ("victim".into(), false, T0 + 30)
    );
}

/// Timing oracle: a PresenceQuery for a hidden user with 10,000
/// conversations does exactly the store work of one for an id never seen
/// (same calls, same items read, same lookups inside the store), and the
/// answers are the same; the asker's own groups are walked, never the
/// target's data.
#[test]
fn a_presence_query_costs_the_same_for_a_hidden_busy_user_and_an_unknown_id() {
    let mut h = Harness::new();
    busy_user(&mut h, "victim", 10_000, 50);
    let _victim = h.open("victim", "phone", 1);
    let mallory = h.open("mallory", "phone", 2);
    // Mallory has groups of her own, none with the victim.
    for i in 0..3 {
        new_group(&mut h, &mallory, 500 + i, &[&format!("sidekick{i}")]);
    }

    let answer = |h: &mut Harness, id: &str, request_id| {
        let before = h.router.store_mut().reset_counts();
        let out = h.req(&mallory, request_id, presence_query(&[id]));
        let (calls, items, lookups) = h.calls().work();
        let result = presence_result(reply_to(&out, &mallory, request_id));
        (result[0].1, result[0].2, calls, items, lookups - before)
    };
    let hidden = answer(&mut h, "victim", 10);
    let unknown = answer(&mut h, "never-seen", 11);
    println!("hidden: {hidden:?}\nunknown: {unknown:?}");
    assert_eq!(
        (&hidden.2, &hidden.3, hidden.4),
        (&unknown.2, &unknown.3, unknown.4),
        "the same work for a hidden user with 10,000 conversations and an unknown id"
    );
    assert_eq!((hidden.0, hidden.1), (false, 0));
    assert_eq!((unknown.0, unknown.1), (false, 0));
    // One direct-conversation lookup plus one probe per group of mallory.
    assert_eq!(hidden.4, 1 + 3);
}

/// Presence fan-out cost: one user watching another from 1,000
/// connections; each change of the watched user checks visibility once (one
/// pair: the watching user), and that check's work does not grow with the
/// watched user's conversations.
#[test]
fn a_presence_change_checks_each_watching_user_once_whatever_the_watched_users_conversations() {
    let mut h = Harness::new();
    let target = h.open("target", "phone", 1);
    let watcher_conns: Vec<Session> = (0..1000)
        .map(|i| h.open("watcher", &format!("d{i}"), 10 + i))
        .collect();
    let group = h.create_group(&target, &["watcher"]);
    for (i, w) in watcher_conns.iter().enumerate() {
        h.req(w, 2000 + i as u32, presence_subscribe(&["target"], false));
    }
    let change = |h: &mut Harness, at_ms| {
        let before = h.router.store_mut().reset_counts();
        let out = h.close(&target, at_ms);
        let (calls, items, lookups) = h.calls().work();
        let events = watcher_conns
            .iter()
            .filter(|w| to(&out, &w.addr).len() == 1)
            .count();
        (events, calls, items, lookups - before)
    };
    let few = change(&mut h, T0 + 1);
    h.opened(&target);
    busy_user(&mut h, "target", 10_000, 100);
    let many = change(&mut h, T0 + 2);
    println!("10 conversations: {few:?}\n10,000 more: {many:?}");
    assert_eq!(few.0, 1000, "every watching connection gets the event");
    assert_eq!(many.0, 1000);
    assert_eq!((&few.1, &few.2, few.3), (&many.1, &many.2, many.3));
    assert_eq!(h.calls().count("presence_links"), 1);
    assert!(
        few.2.contains(&("presence_links", 1)),
        "one pair for 1,000 connections of one user: {:?}",
        few.2
    );
    let _ = group;
}
