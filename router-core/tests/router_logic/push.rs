//! Push requests (SPEC §20) and the push events of stored messages.

use palaver_router_core::store::{ApnsEnvironment, Mute, PushPlatform, PushStore};

use super::*;

fn apns_body(token: &str, topic: &str) -> Body {
    Body::RegisterPushToken(pb::RegisterPushToken {
        platform: pb::PushPlatform::Apns.into(),
        token: token.into(),
        apns_environment: pb::ApnsEnvironment::Sandbox.into(),
        apns_topic: topic.into(),
        locale: "fr-CA".into(),
    })
}

fn mute_body(conversation_id: &str, muted_until_ms: i64, forever: bool) -> Body {
    Body::MuteConversation(pb::MuteConversation {
        conversation_id: conversation_id.into(),
        muted_until_ms,
        forever,
    })
}

fn muted(frame: &pb::Frame) -> &pb::ConversationMuted {
    match &frame.body {
        Some(Body::ConversationMuted(m)) => m,
        other => panic!("expected ConversationMuted, got {other:?}"),
    }
}

#[test]
fn a_device_registers_and_unregisters_its_token() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let token = "0f".repeat(32);
    let out = h.req(&alice, 4, apns_body(&token, "com.example.chat"));
    match &reply_to(&out, &alice, 4).body {
        Some(Body::PushTokenRegistered(r)) => assert_eq!(r.registered_ms, T0),
        other => panic!("expected PushTokenRegistered, got {other:?}"),
    }
    assert!(out.frames[0].answers_request);
    // Stored for the requesting device, every field as sent.
    let tokens = h.router.store_mut().push_tokens("alice").unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].device_id, "phone");
    let t = &tokens[0].token;
    assert_eq!(t.platform, PushPlatform::Apns);
    assert_eq!(t.token, token);
    assert_eq!(t.apns_environment, Some(ApnsEnvironment::Sandbox));
    assert_eq!(t.apns_topic, "com.example.chat");
    assert_eq!(t.locale, "fr-CA");
    assert_eq!(t.registered_ms, T0);

    let unregister = || Body::UnregisterPushToken(pb::UnregisterPushToken {});
    for was_registered in [true, false] {
        let out = h.req(&alice, 5, unregister());
        match &reply_to(&out, &alice, 5).body {
            Some(Body::PushTokenUnregistered(u)) => {
                assert_eq!(u.was_registered, was_registered)
            }
            other => panic!("expected PushTokenUnregistered, got {other:?}"),
        }
    }
    assert!(h
        .router
        .store_mut()
        .push_tokens("alice")
        .unwrap()
        .is_empty());
}

#[test]
fn bad_registrations_are_invalid_arguments_and_store_nothing() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let good = "ab".repeat(32);
    let too_long = "a".repeat(palaver_protocol::push::MAX_PUSH_TOKEN_BYTES + 1);
    let bad = [
        Body::RegisterPushToken(pb::RegisterPushToken {
            platform: 0,
            token: good.clone(),
            ..Default::default()
        }),
        Body::RegisterPushToken(pb::RegisterPushToken {
            platform: 7,
            token: good.clone(),
            ..Default::default()
        }),
        apns_body(&good, ""),
        apns_body("not-hex", "com.example.chat"),
        Body::RegisterPushToken(pb::RegisterPushToken {
            platform: pb::PushPlatform::Fcm.into(),
            token: too_long,
            ..Default::default()
        }),
        Body::RegisterPushToken(pb::RegisterPushToken {
            platform: pb::PushPlatform::Fcm.into(),
            token: String::new(),
            ..Default::default()
        }),
    ];
    for (i, body) in bad.into_iter().enumerate() {
        let out = h.req(&alice, i as u32 + 1, body);
        assert_error(&out, &alice, i as u32 + 1, ErrorCode::InvalidArgument);
    }
    assert!(h
        .router
        .store_mut()
        .push_tokens("alice")
        .unwrap()
        .is_empty());
}

#[test]
fn mutes_are_answered_with_the_state_after_them() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    let until = T0 + 3_600_000;
    let out = h.req(&alice, 1, mute_body(DM, until, false));
    let m = muted(reply_to(&out, &alice, 1));
    assert_eq!(
        (m.conversation_id.as_str(), m.muted_until_ms, m.forever),
        (DM, until, false)
    );
    assert_eq!(
        h.router.store_mut().mute_of("alice", DM, T0).unwrap(),
        Some(Mute::Until(until))
    );
    // Bob's mute of the same conversation is his own.
    assert_eq!(h.router.store_mut().mute_of("bob", DM, T0).unwrap(), None);

    let out = h.req(&alice, 2, mute_body(DM, 0, true));
    let m = muted(reply_to(&out, &alice, 2));
    assert_eq!((m.muted_until_ms, m.forever), (0, true));
    assert_eq!(
        h.router.store_mut().mute_of("alice", DM, T0).unwrap(),
        Some(Mute::Forever)
    );

    let out = h.req(&alice, 3, mute_body(DM, 0, false));
    let m = muted(reply_to(&out, &alice, 3));
    assert_eq!((m.muted_until_ms, m.forever), (0, false));
    assert_eq!(h.router.store_mut().mute_of("alice", DM, T0).unwrap(), None);
}

#[test]
fn mute_checks_follow_spec_order() {
    let mut h = Harness::with_config(RouterConfig {
        max_mutes_per_user: 1,
        ..RouterConfig::default()
    });
    let alice = h.open("alice", "phone", 1);
    let carol = h.open("carol", "phone", 2);
    let group = h.create_group(&carol, &["bob"]);
    let soon = T0 + 1000;
    let cases = [
        // m1: forever with a time.
        (mute_body(DM, soon, true), ErrorCode::InvalidArgument),
        // m2: past, now, seconds instead of ms, negative.
        (mute_body(DM, T0 - 1, false), ErrorCode::InvalidArgument),
        (mute_body(DM, T0, false), ErrorCode::InvalidArgument),
        (mute_body(DM, T0 / 1000, false), ErrorCode::InvalidArgument),
        (mute_body(DM, -1, false), ErrorCode::InvalidArgument),
        // m3: too far ahead.
        (
            mute_body(DM, T0 + 367 * 24 * 3_600_000, false),
            ErrorCode::InvalidArgument,
        ),
        // The time is checked before the conversation.
        (
            mute_body("dm:bob:carol", -1, false),
            ErrorCode::InvalidArgument,
        ),
        // c1-c4.
        (
            mute_body("dm:bob:alice", soon, false),
            ErrorCode::InvalidArgument,
        ),
        (mute_body("dm:bob:carol", soon, false), ErrorCode::Forbidden),
        (mute_body("grp:nope", soon, false), ErrorCode::NotFound),
        (mute_body(&group, soon, false), ErrorCode::Forbidden),
    ];
    for (i, (body, code)) in cases.into_iter().enumerate() {
        let rid = i as u32 + 1;
        let out = h.req(&alice, rid, body);
        assert_error(&out, &alice, rid, code);
    }
    // Within the cap of one: a first mute, changing it, then a second
    // conversation is QUOTA_EXCEEDED, and an unmute of it still works.
    let out = h.req(&alice, 50, mute_body(DM, 0, true));
    assert!(muted(reply_to(&out, &alice, 50)).forever);
    let out = h.req(&alice, 51, mute_body(DM, soon, false));
    assert_eq!(muted(reply_to(&out, &alice, 51)).muted_until_ms, soon);
    let out = h.req(&alice, 52, mute_body("dm:alice:carol", 0, true));
    let e = assert_error(&out, &alice, 52, ErrorCode::QuotaExceeded);
    assert!(e.message.contains("unmute"), "{e:?}");
    let out = h.req(&alice, 53, mute_body("dm:alice:carol", 0, false));
    assert!(!muted(reply_to(&out, &alice, 53)).forever);
    // Once the first mute runs out, its place is free.
    h.clock.set(soon);
    let out = h.req(&alice, 54, mute_body("dm:alice:carol", 0, true));
    assert!(muted(reply_to(&out, &alice, 54)).forever);
}

#[test]
fn a_push_event_is_made_for_a_registered_device_that_is_not_online() {
    let mut h = Harness::new();
    let alice = h.open("alice", "phone", 1);
    // Bob: desktop online, phone registered and asleep.
    h.open("bob", "desktop", 2);
    h.register_token("bob", "phone");
    // Carol: her only registered device is online.
    h.open("carol", "phone", 3);
    h.register_token("carol", "phone");
    // Dave: offline, nothing registered.
    let group = h.create_group(&alice, &["bob", "carol", "dave"]);
    let out = h.send(&alice, &group, 1);
    let pushed: Vec<(&str, Vec<String>)> = out
        .pushes
        .iter()
        .map(|p| (p.user_id.as_str(), p.online_device_ids.clone()))
        .collect();
    assert_eq!(pushed, vec![("bob", vec!["desktop".to_string()])]);
    let p = &out.pushes[0];
    assert_eq!((p.conversation_id.as_str(), p.seq), (group.as_str(), 1));
    assert_eq!(p.sender_user_id, "alice");
    // Bob's desktop still got the message live.
    let desktop = session("bob", "desktop", "g1", 2).addr;
    assert_eq!(to(&out, &desktop).len(), 1);

    // Coalesced until bob reads (a Receipt from his desktop)...
    assert!(h.send(&alice, &group, 2).pushes.is_empty());
    let bob_desktop = session("bob", "desktop", "g1", 2);
    h.req(
        &bob_desktop,
        9,
        Body::Receipt(pb::Receipt {
            conversation_id: group.clone(),
            kind: pb::ReceiptKind::Read as i32,
            up_to_seq: 2,
        }),
    );
    assert_eq!(h.send(&alice, &group, 3).pushes.len(), 1);
    // ... and no event at all once bob unregisters his phone.
    h.req(
        &bob_desktop,
        10,
        Body::Receipt(pb::Receipt {
            conversation_id: group.clone(),
            kind: pb::ReceiptKind::Read as i32,
            up_to_seq: 3,
        }),
    );
    let bob_phone = session("bob", "phone", "g1", 4);
    h.opened(&bob_phone);
    h.req(
        &bob_phone,
        11,
        Body::UnregisterPushToken(pb::UnregisterPushToken {}),
    );
    h.close(&bob_phone, T0 + 1);
    assert!(h.send(&alice, &group, 4).pushes.is_empty());
}
