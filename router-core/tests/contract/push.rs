//! `PushStore` checks: registrations (replace, a token moving to another
//! device, the per-user cap), invalidation that a re-registration wins,
//! mutes (expiry, cap), the fan-out's recipients read and the push worker's
//! read. User ids are distinct per check: Redis Cluster runs them all on
//! one cluster.

use std::time::Duration;

use palaver_protocol::pb;
use palaver_router_core::store::{
    ApnsEnvironment, DeviceToken, Mute, PushPlatform, PushToken, SessionChange, Store,
    BADGE_CONVERSATIONS, MAX_BADGE,
};

use super::*;

fn apns(token: &str, registered_ms: i64) -> PushToken {
    PushToken {
        platform: PushPlatform::Apns,
        token: token.into(),
        apns_environment: Some(ApnsEnvironment::Production),
        apns_topic: "com.example.chat".into(),
        locale: "de-CH".into(),
        registered_ms,
    }
}

fn fcm(token: &str, registered_ms: i64) -> PushToken {
    PushToken {
        platform: PushPlatform::Fcm,
        token: token.into(),
        apns_environment: None,
        apns_topic: String::new(),
        locale: String::new(),
        registered_ms,
    }
}

fn devices<S: Store>(s: &mut S, user: &str) -> Vec<(String, String)> {
    s.push_tokens(user)
        .unwrap()
        .into_iter()
        .map(|DeviceToken { device_id, token }| (device_id, token.token))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(d, t)| (d.to_string(), t.to_string()))
        .collect()
}

pub fn push_tokens_register_replace_and_cap<S: Store>(mut s: S) {
    let u = "pt-user";
    assert!(s.push_tokens(u).unwrap().is_empty());
    let phone = apns(&"ab".repeat(32), 100);
    let r = s.register_push_token(u, "phone", &phone, 3).unwrap();
    assert!(r.dropped_devices.is_empty());
    // Every field survives the store.
    assert_eq!(
        s.push_tokens(u).unwrap(),
        vec![DeviceToken {
            device_id: "phone".into(),
            token: phone.clone(),
        }]
    );
    // A device's second registration replaces its first (also across
    // platforms).
    s.register_push_token(u, "phone", &fcm("fcm:1", 110), 3)
        .unwrap();
    s.register_push_token(u, "tablet", &fcm("fcm:2", 120), 3)
        .unwrap();
    assert_eq!(
        devices(&mut s, u),
        pairs(&[("phone", "fcm:1"), ("tablet", "fcm:2")])
    );
    // The same token registered by another device moves there (the app was
    // reinstalled under a new device id).
    let r = s
        .register_push_token(u, "phone-2", &fcm("fcm:1", 130), 3)
        .unwrap();
    assert_eq!(r.dropped_devices, ["phone"]);
    assert_eq!(
        devices(&mut s, u),
        pairs(&[("phone-2", "fcm:1"), ("tablet", "fcm:2")])
    );
    // ... but the same token string on another platform is another token.
    s.register_push_token(u, "watch", &apns("fcm:1", 135), 3)
        .unwrap();
    assert_eq!(devices(&mut s, u).len(), 3);
    // Past the cap the oldest registration goes, never the registering one.
    let r = s
        .register_push_token(u, "laptop", &fcm("fcm:4", 140), 3)
        .unwrap();
    assert_eq!(
        r.dropped_devices,
        ["tablet"],
        "registered at 120: the oldest"
    );
    assert_eq!(
        devices(&mut s, u),
        pairs(&[
            ("laptop", "fcm:4"),
            ("phone-2", "fcm:1"),
            ("watch", "fcm:1")
        ])
    );
    // A registration older than every other still stays when it is the one
    // being made.
    let r = s
        .register_push_token(u, "old-clock", &fcm("fcm:5", 1), 3)
        .unwrap();
    assert_eq!(r.dropped_devices, ["phone-2"]);
    assert_eq!(devices(&mut s, u).len(), 3);
    assert!(devices(&mut s, u).iter().any(|(d, _)| d == "old-clock"));

    assert!(s.unregister_push_token(u, "laptop").unwrap());
    assert!(
        !s.unregister_push_token(u, "laptop").unwrap(),
        "already gone"
    );
    assert!(!s.unregister_push_token("pt-nobody", "x").unwrap());
    assert_eq!(
        devices(&mut s, u),
        pairs(&[("old-clock", "fcm:5"), ("watch", "fcm:1")])
    );
    // Other users are untouched by all of it.
    s.register_push_token("pt-other", "phone", &fcm("fcm:1", 1), 3)
        .unwrap();
    assert_eq!(devices(&mut s, u).len(), 2);
    assert_eq!(devices(&mut s, "pt-other"), pairs(&[("phone", "fcm:1")]));
}

/// A token has one owner: registered by another user's device (another
/// account signed in on the same app install), it leaves the first user,
/// whose pushes must not reach the new one's screen. Registrations that
/// ended (replaced, unregistered, invalidated) no longer own their tokens.
pub fn a_push_token_has_one_owner_across_users<S: Store>(mut s: S) {
    let (a, b, c) = ("po-a", "po-b", "po-c");
    let r = s
        .register_push_token(a, "phone", &fcm("po-x", 1), 5)
        .unwrap();
    assert!(r.dropped_elsewhere.is_empty());
    let r = s.register_push_token(b, "tab", &fcm("po-x", 2), 5).unwrap();
    assert_eq!(r.dropped_elsewhere, [(a.to_string(), "phone".to_string())]);
    assert!(r.dropped_devices.is_empty());
    assert!(devices(&mut s, a).is_empty());
    assert_eq!(devices(&mut s, b), pairs(&[("tab", "po-x")]));
    // b's tab moves to another token: po-x has no owner any more, so a
    // registering it again takes nothing from b.
    s.register_push_token(b, "tab", &fcm("po-y", 3), 5).unwrap();
    let r = s
        .register_push_token(a, "phone", &fcm("po-x", 4), 5)
        .unwrap();
    assert!(r.dropped_elsewhere.is_empty());
    assert_eq!(devices(&mut s, b), pairs(&[("tab", "po-y")]));
    // Unregistered and invalidated registrations release their tokens too.
    assert!(s.unregister_push_token(b, "tab").unwrap());
    let r = s
        .register_push_token(c, "phone", &fcm("po-y", 5), 5)
        .unwrap();
    assert!(r.dropped_elsewhere.is_empty());
    assert!(s.invalidate_push_token(a, "phone", "po-x", 10).unwrap());
    let r = s
        .register_push_token(c, "tablet", &fcm("po-x", 11), 5)
        .unwrap();
    assert!(r.dropped_elsewhere.is_empty());
    assert_eq!(
        devices(&mut s, c),
        pairs(&[("phone", "po-y"), ("tablet", "po-x")])
    );
    // The same string on another platform is another token.
    let r = s
        .register_push_token(a, "phone", &apns("po-x", 12), 5)
        .unwrap();
    assert!(r.dropped_elsewhere.is_empty());
    assert_eq!(devices(&mut s, c).len(), 2);
    // And the cap's evictions release theirs: c (cap 1) registers a third
    // token; the two it dropped can be taken without touching c.
    let r = s
        .register_push_token(c, "watch", &fcm("po-z", 13), 1)
        .unwrap();
    assert_eq!(r.dropped_devices, ["phone", "tablet"]);
    let r = s
        .register_push_token(b, "tab", &fcm("po-y", 14), 5)
        .unwrap();
    assert!(r.dropped_elsewhere.is_empty());
    assert_eq!(devices(&mut s, c), pairs(&[("watch", "po-z")]));
}

/// A provider's "this token is dead" removes a registration only while it
/// is unchanged and older than the provider's time.
pub fn push_token_invalidation_loses_to_a_reregistration<S: Store>(mut s: S) {
    let u = "pi-user";
    s.register_push_token(u, "phone", &fcm("old", 100), 5)
        .unwrap();
    // Another token than the stored one: nothing happens.
    assert!(!s.invalidate_push_token(u, "phone", "other", 500).unwrap());
    // The provider's time is not after the registration: the device
    // registered (again) after the provider judged, so it wins.
    assert!(!s.invalidate_push_token(u, "phone", "old", 100).unwrap());
    assert!(!s.invalidate_push_token(u, "phone", "old", 50).unwrap());
    assert_eq!(devices(&mut s, u), pairs(&[("phone", "old")]));
    // Unchanged and older: removed.
    assert!(s.invalidate_push_token(u, "phone", "old", 101).unwrap());
    assert!(devices(&mut s, u).is_empty());
    assert!(!s.invalidate_push_token(u, "phone", "old", 102).unwrap());

    // Re-registered with a new token after the failure: the late
    // invalidation of the old one does not touch it.
    s.register_push_token(u, "phone", &fcm("old", 200), 5)
        .unwrap();
    s.register_push_token(u, "phone", &fcm("new", 300), 5)
        .unwrap();
    assert!(!s.invalidate_push_token(u, "phone", "old", 400).unwrap());
    // The same token registered again after the provider's time wins too.
    s.register_push_token(u, "tablet", &fcm("same", 900), 5)
        .unwrap();
    assert!(!s.invalidate_push_token(u, "tablet", "same", 800).unwrap());
    assert_eq!(
        devices(&mut s, u),
        pairs(&[("phone", "new"), ("tablet", "same")])
    );
    // Invalidation names its device.
    assert!(!s.invalidate_push_token(u, "watch", "same", 1000).unwrap());
    assert!(s.invalidate_push_token(u, "tablet", "same", 1000).unwrap());
    assert_eq!(devices(&mut s, u), pairs(&[("phone", "new")]));
}

pub fn mutes_expire_and_are_capped<S: Store>(mut s: S) {
    let u = "pm-user";
    let now = 1_000_000;
    assert_eq!(s.mute_of(u, "dm:pm-a:pm-user", now).unwrap(), None);
    assert!(s
        .set_mute(u, "dm:pm-a:pm-user", Some(Mute::Forever), now, 2)
        .unwrap());
    assert!(s
        .set_mute(u, "grp:pm1", Some(Mute::Until(now + 100)), now, 2)
        .unwrap());
    assert_eq!(
        s.mute_of(u, "dm:pm-a:pm-user", now + 1_000_000_000)
            .unwrap(),
        Some(Mute::Forever)
    );
    assert_eq!(
        s.mute_of(u, "grp:pm1", now + 99).unwrap(),
        Some(Mute::Until(now + 100))
    );
    assert_eq!(s.mute_of(u, "grp:pm1", now + 100).unwrap(), None, "ran out");
    // At the cap: a third conversation is refused and not muted...
    assert!(!s
        .set_mute(u, "grp:pm2", Some(Mute::Forever), now + 50, 2)
        .unwrap());
    assert_eq!(s.mute_of(u, "grp:pm2", now + 50).unwrap(), None);
    // ... changing a muted one is not one more...
    assert!(s
        .set_mute(u, "grp:pm1", Some(Mute::Until(now + 200)), now + 50, 2)
        .unwrap());
    assert_eq!(
        s.mute_of(u, "grp:pm1", now + 150).unwrap(),
        Some(Mute::Until(now + 200))
    );
    // ... and a mute that ran out frees its place.
    assert!(s
        .set_mute(u, "grp:pm2", Some(Mute::Forever), now + 200, 2)
        .unwrap());
    assert_eq!(
        s.mute_of(u, "grp:pm2", now + 200).unwrap(),
        Some(Mute::Forever)
    );
    // Unmuting always works, also what is not muted.
    assert!(s.set_mute(u, "grp:pm2", None, now + 201, 2).unwrap());
    assert!(s.set_mute(u, "grp:pm9", None, now + 201, 2).unwrap());
    assert_eq!(s.mute_of(u, "grp:pm2", now + 201).unwrap(), None);
    assert_eq!(
        s.mute_of(u, "dm:pm-a:pm-user", now + 201).unwrap(),
        Some(Mute::Forever)
    );
    // Mutes are per user.
    assert_eq!(s.mute_of("pm-other", "dm:pm-a:pm-user", now).unwrap(), None);
}

/// The fan-out read: sessions exactly as `sessions_of_users`, and a push
/// due for users with a registered device that is not online, with the
/// devices that are.
pub fn recipients_say_whose_registered_devices_are_offline<S: Store>(mut s: S) {
    const LEASE: Duration = Duration::from_secs(30);
    let opened = |u: &str, d: &str, conn| SessionChange::Opened(session(u, d, "g-push", conn));
    s.apply_sessions(
        "g-push",
        LEASE,
        10,
        &[
            opened("pr-desk", "desktop", 1),
            opened("pr-both", "phone", 2),
            opened("pr-both", "desktop", 3),
            opened("pr-none", "phone", 4),
        ],
    )
    .unwrap();
    // pr-desk: phone registered, asleep; desktop online (not registered).
    s.register_push_token("pr-desk", "phone", &fcm("t1", 1), 5)
        .unwrap();
    // pr-both: both registered devices online.
    s.register_push_token("pr-both", "phone", &fcm("t2", 1), 5)
        .unwrap();
    s.register_push_token("pr-both", "desktop", &fcm("t3", 1), 5)
        .unwrap();
    // pr-off: registered, nothing online.
    s.register_push_token("pr-off", "phone", &fcm("t4", 1), 5)
        .unwrap();
    // pr-none: online, nothing registered; pr-gone: nothing at all.
    let users = ["pr-desk", "pr-both", "pr-off", "pr-none", "pr-gone"];
    let r = s.recipients(&users).unwrap();
    assert_eq!(r.sessions, s.sessions_of_users(&users).unwrap());
    assert_eq!(r.sessions.of(1), [addr("g-push", 3), addr("g-push", 2)]);
    assert_eq!(
        r.push_due,
        vec![
            Some(vec!["desktop".to_string()]),
            None,
            Some(vec![]),
            None,
            None
        ]
    );
    // The phone of pr-both closes: now a push is due, naming the desktop.
    s.apply_sessions(
        "g-push",
        LEASE,
        20,
        &[SessionChange::Closed {
            session: session("pr-both", "phone", "g-push", 2),
            at_ms: 20,
        }],
    )
    .unwrap();
    let r = s.recipients(&["pr-both"]).unwrap();
    assert_eq!(r.push_due, vec![Some(vec!["desktop".to_string()])]);
    assert_eq!(r.sessions.of(0), [addr("g-push", 3)]);
    assert!(s.recipients(&[] as &[&str]).unwrap().push_due.is_empty());
}

/// The push worker's read: registrations, mute, whether the event's
/// message was read, and the badge (unread messages over the conversations
/// with a pending push, capped).
pub fn push_context_for_the_worker<S: Store>(mut s: S) {
    let u = "pc-user";
    let dm = "dm:pc-a:pc-user";
    let grp = "grp:pc1";
    for i in 1..=5u8 {
        s.append_message(dm, message(dm, i, "pc-a"), &retention(0, 100))
            .unwrap();
    }
    for i in 1..=3u8 {
        s.append_message(grp, message(grp, i, "pc-b"), &retention(0, 100))
            .unwrap();
    }
    s.register_push_token(u, "phone", &fcm("tok", 1), 5)
        .unwrap();
    // A push is pending for both; the user read 2 of the direct messages.
    s.mark_push_pending(dm, &[u]).unwrap();
    s.mark_push_pending(grp, &[u]).unwrap();
    s.advance_receipt(dm, u, pb::ReceiptKind::Read, 2).unwrap();
    let c = s.push_context(u, dm, 5, 1000).unwrap();
    assert_eq!(c.tokens.len(), 1);
    assert_eq!(c.tokens[0].device_id, "phone");
    assert_eq!(c.tokens[0].token.token, "tok");
    assert!(!c.muted);
    assert!(!c.already_read);
    assert_eq!(c.badge, 3 + 3, "dm: 5 - 2, group: 3 - 0");
    // Read up to the event's seq on another device: already read.
    assert!(s.push_context(u, dm, 2, 1000).unwrap().already_read);
    // DELIVERED is not READ.
    s.advance_receipt(grp, u, pb::ReceiptKind::Delivered, 3)
        .unwrap();
    assert!(!s.push_context(u, grp, 3, 1000).unwrap().already_read);
    // A receipt clears the group's pending mark: it leaves the badge,
    // except as the event's own conversation.
    s.clear_push_pending(u, Some(grp)).unwrap();
    assert_eq!(s.push_context(u, dm, 5, 1000).unwrap().badge, 3);
    assert_eq!(s.push_context(u, grp, 3, 1000).unwrap().badge, 6);
    // Muted until 2000: muted at 1000, not at 2000.
    s.set_mute(u, dm, Some(Mute::Until(2000)), 1000, 10)
        .unwrap();
    assert!(s.push_context(u, dm, 5, 1000).unwrap().muted);
    assert!(!s.push_context(u, dm, 5, 2000).unwrap().muted);
    assert!(!s.push_context(u, grp, 3, 1000).unwrap().muted);
    // A user with nothing: empty, not an error.
    let none = s
        .push_context("pc-nobody", "dm:pc-a:pc-nobody", 1, 1000)
        .unwrap();
    assert!(none.tokens.is_empty() && !none.muted && !none.already_read);
    assert_eq!(none.badge, 0);
    // The event's own conversation counts even without a pending mark.
    assert_eq!(s.push_context("pc-nobody", dm, 1, 1000).unwrap().badge, 5);
    // The badge is capped.
    let big = "dm:pc-big:pc-user";
    let mut batch = Vec::new();
    for i in 0..(MAX_BADGE as usize + 5) {
        let mut m = message(big, 0, "pc-big");
        m.client_msg_id = (i as u128).to_le_bytes().to_vec();
        batch.push((big.to_string(), m));
    }
    s.append_messages(batch, &retention(0, 2000)).unwrap();
    assert_eq!(s.push_context(u, big, 1, 1000).unwrap().badge, MAX_BADGE);

    // The work is bounded: of 70 conversations with a pending push and one
    // unread message each, at most BADGE_CONVERSATIONS are read.
    let v = "pc-many";
    let mut batch = Vec::new();
    for i in 0..70u8 {
        let conv = format!("dm:pc-m{i:02}:pc-many");
        batch.push((conv.clone(), message(&conv, 1, "x")));
        s.mark_push_pending(&conv, &[v]).unwrap();
    }
    s.append_messages(batch, &retention(0, 10)).unwrap();
    let badge = s
        .push_context(v, "dm:pc-m00:pc-many", 1, 1000)
        .unwrap()
        .badge;
    assert_eq!(badge as usize, BADGE_CONVERSATIONS);
}
