//! `SessionStore` and `GatewayRegistry` checks: sessions, presence, leases,
//! dead gateways, reaping and rejoining.

use std::time::Duration;

use palaver_protocol::pb;
use palaver_router_core::api::Session;
use palaver_router_core::store::{SessionChange, SessionsApplied, Store, UserPresence};

use super::*;

/// A came-online event.
fn online(user: &str) -> pb::Presence {
    pb::Presence {
        user_id: user.into(),
        online: true,
        last_seen_ms: 0,
    }
}

/// A went-offline event, last seen `at_ms`.
fn offline(user: &str, at_ms: i64) -> pb::Presence {
    pb::Presence {
        user_id: user.into(),
        online: false,
        last_seen_ms: at_ms,
    }
}

/// Sessions and the gateway registry: what both backends' presence rests
/// on. `expire_lease(store, gateway)` returns once that gateway's lease has
/// run out (a manual clock moves on for the memory store; Redis is waited
/// on).
pub fn sessions_and_registry<S: Store>(mut s: S, mut expire_lease: impl FnMut(&mut S, &str)) {
    const LEASE: Duration = Duration::from_secs(30);
    let opened = |s: &Session| SessionChange::Opened(s.clone());
    let closed = |s: &Session, at_ms| SessionChange::Closed {
        session: s.clone(),
        at_ms,
    };
    let nothing = SessionsApplied::default();
    assert!(s.register_gateway("gA", LEASE, 1).unwrap().is_empty());
    assert!(s.register_gateway("gB", LEASE, 1).unwrap().is_empty());

    // The first device: came online.
    let a1 = session("s1", "phone", "gA", 1);
    let applied = s.apply_sessions("gA", LEASE, 10, &[opened(&a1)]).unwrap();
    assert_eq!(applied.presence, vec![online("s1")]);
    assert!(applied.replaced.is_empty());
    // The same device again elsewhere: the old address is replaced, and the
    // user does not come online a second time.
    let b7 = session("s1", "phone", "gB", 7);
    let applied = s.apply_sessions("gB", LEASE, 20, &[opened(&b7)]).unwrap();
    assert_eq!(applied.replaced, vec![(b7.clone(), addr("gA", 1))]);
    assert!(applied.presence.is_empty());
    // Registered at the same address again: nothing to replace.
    assert_eq!(
        s.apply_sessions("gB", LEASE, 21, &[opened(&b7)]).unwrap(),
        nothing
    );
    // The replaced connection closing late removes nothing.
    assert_eq!(
        s.apply_sessions("gA", LEASE, 30, &[closed(&a1, 30)])
            .unwrap(),
        nothing
    );
    assert_eq!(
        s.sessions_of_users(&["s1", "s2"]).unwrap(),
        [vec![addr("gB", 7)], vec![]].into_iter().collect()
    );
    // A second device: no change; the user goes offline only with the last
    // device, last seen at its close.
    let tablet = session("s1", "tablet", "gA", 2);
    let mut applied = s
        .apply_sessions("gA", LEASE, 40, &[opened(&tablet)])
        .unwrap();
    // Opened beside the phone on gB: a store may report it, for the
    // account cap across gateways (the memory store, one node, does not).
    let beside = std::mem::take(&mut applied.opened_beside);
    assert!(
        beside.is_empty() || beside == vec![(addr("gA", 2), vec!["gB".into()])],
        "{beside:?}"
    );
    assert_eq!(applied, nothing);
    assert_eq!(
        s.apply_sessions("gB", LEASE, 50, &[closed(&b7, 50)])
            .unwrap(),
        nothing
    );
    assert!(s.presence_of_users(&["s1".into()]).unwrap()[0].online);
    let applied = s
        .apply_sessions("gA", LEASE, 77, &[closed(&tablet, 77)])
        .unwrap();
    assert_eq!(applied.presence, vec![offline("s1", 77)]);
    assert_eq!(
        s.presence_of_users(&["s1".into(), "never".into()]).unwrap(),
        vec![
            UserPresence {
                online: false,
                last_seen_ms: 77
            },
            UserPresence::default()
        ]
    );

    // One batch, applied in order.
    let (t1, t2d, t2e) = (
        session("t1", "d", "gA", 10),
        session("t2", "d", "gA", 11),
        session("t2", "e", "gA", 12),
    );
    let applied = s
        .apply_sessions(
            "gA",
            LEASE,
            100,
            &[opened(&t1), opened(&t2d), opened(&t2e), closed(&t2e, 150)],
        )
        .unwrap();
    assert_eq!(applied.presence, vec![online("t1"), online("t2")]);

    // Connecting clears the user's pending push marks.
    assert_eq!(s.mark_push_pending("pc", &["p1"]).unwrap(), [true]);
    assert_eq!(s.mark_push_pending("pc", &["p1"]).unwrap(), [false]);
    let p1 = session("p1", "d", "gA", 20);
    s.apply_sessions("gA", LEASE, 160, &[opened(&p1)]).unwrap();
    assert_eq!(s.mark_push_pending("pc", &["p1"]).unwrap(), [true]);

    // A gateway whose lease ran out: its sessions stop counting at once,
    // and reaping it takes its users offline for good.
    assert!(s
        .register_gateway("gDead", Duration::from_millis(200), 200)
        .unwrap()
        .is_empty());
    let (t3, t4, t4_elsewhere) = (
        session("t3", "d", "gDead", 1),
        session("t4", "d", "gDead", 2),
        session("t4", "x", "gA", 3),
    );
    s.apply_sessions(
        "gDead",
        Duration::from_millis(200),
        200,
        &[opened(&t3), opened(&t4)],
    )
    .unwrap();
    s.apply_sessions("gA", LEASE, 200, &[opened(&t4_elsewhere)])
        .unwrap();
    assert!(s.dead_gateways().unwrap().is_empty());
    assert!(s.presence_of_users(&["t3".into()]).unwrap()[0].online);
    expire_lease(&mut s, "gDead");
    assert_eq!(s.dead_gateways().unwrap(), ["gDead"]);
    let p = s.presence_of_users(&["t3".into(), "t4".into()]).unwrap();
    assert!(!p[0].online, "t3 only on the dead gateway");
    assert!(p[1].online, "t4 also on gA");
    assert_eq!(
        s.sessions_of_users(&["t3", "t4"]).unwrap(),
        [vec![], vec![addr("gA", 3)]].into_iter().collect()
    );
    assert_eq!(
        s.reap_gateway("gDead", "gA", 999).unwrap(),
        Some(vec![offline("t3", 999)])
    );
    assert_eq!(s.reap_gateway("gDead", "gB", 1000).unwrap(), None);
    assert!(s.dead_gateways().unwrap().is_empty());
    assert_eq!(
        s.presence_of_users(&["t3".into()]).unwrap()[0],
        UserPresence {
            online: false,
            last_seen_ms: 999
        }
    );

    // A clean shutdown: the gateway's users go offline, it is not dead.
    let u1 = session("u1", "d", "gB", 5);
    s.apply_sessions("gB", LEASE, 1100, &[opened(&u1)]).unwrap();
    assert_eq!(
        s.deregister_gateway("gB", 1234).unwrap(),
        vec![offline("u1", 1234)]
    );
    assert!(s.dead_gateways().unwrap().is_empty());
    assert!(!s.presence_of_users(&["u1".into()]).unwrap()[0].online);

    // A gateway id registering again inside its lease (a fast restart):
    // what the previous run left behind is removed first.
    let mut left: Vec<String> = s
        .register_gateway("gA", LEASE, 2000)
        .unwrap()
        .into_iter()
        .map(|p| {
            assert_eq!((p.online, p.last_seen_ms), (false, 2000));
            p.user_id
        })
        .collect();
    left.sort();
    assert_eq!(left, ["p1", "t1", "t2", "t4"]);
    assert!(!s.presence_of_users(&["t4".into()]).unwrap()[0].online);
}

/// Presence events count only sessions on live gateways, as the reads do:
/// a user whose other sessions sit on a dead (lease run out, not yet reaped)
/// gateway comes online with a session elsewhere and goes offline when the
/// last live one closes, whether it closes in a batch, a clean shutdown or
/// a restart. `expire_lease(store, gateway)` returns once that gateway's
/// lease (500 ms) has run out.
pub fn presence_events_ignore_dead_gateways<S: Store>(
    mut s: S,
    mut expire_lease: impl FnMut(&mut S, &str),
) {
    const LEASE: Duration = Duration::from_secs(30);
    const SHORT: Duration = Duration::from_millis(500);
    let gone = |at_ms| UserPresence {
        online: false,
        last_seen_ms: at_ms,
    };
    let here = UserPresence {
        online: true,
        last_seen_ms: 0,
    };
    let opened = |s: &Session| SessionChange::Opened(s.clone());
    let closed = |s: &Session, at_ms| SessionChange::Closed {
        session: s.clone(),
        at_ms,
    };
    let users = |ids: &[&str]| ids.iter().map(|u| u.to_string()).collect::<Vec<_>>();
    for gateway in ["gL", "gX", "gR"] {
        assert!(s.register_gateway(gateway, LEASE, 1).unwrap().is_empty());
    }
    assert!(s.register_gateway("gD", SHORT, 1).unwrap().is_empty());

    // One device each on gD, the gateway that is going to die.
    let on_dead: Vec<Session> = (1..=7u64)
        .map(|i| session(&format!("q{i}"), "tablet", "gD", i))
        .collect();
    let changes: Vec<SessionChange> = on_dead.iter().map(opened).collect();
    let applied = s.apply_sessions("gD", SHORT, 10, &changes).unwrap();
    let firsts: Vec<pb::Presence> = (1..=7).map(|i| online(&format!("q{i}"))).collect();
    assert_eq!(applied.presence, firsts);
    // Second devices on live gateways while gD lives: nobody comes online.
    let (q2_phone, q4_phone, q5_phone, q6_phone) = (
        session("q2", "phone", "gL", 12),
        session("q4", "phone", "gL", 14),
        session("q5", "phone", "gX", 15),
        session("q6", "phone", "gR", 16),
    );
    let applied = s
        .apply_sessions(
            "gL",
            LEASE,
            20,
            &[opened(&q2_phone), opened(&q4_phone), closed(&q4_phone, 25)],
        )
        .unwrap();
    // Opened beside the first devices on gD (dead ones are not judged here:
    // the account cap reads leases only at the cap); a store may report it.
    let mut applied = applied;
    let beside = std::mem::take(&mut applied.opened_beside);
    assert!(
        beside.is_empty()
            || beside
                == vec![
                    (addr("gL", 12), vec!["gD".into()]),
                    (addr("gL", 14), vec!["gD".into()]),
                ],
        "{beside:?}"
    );
    assert_eq!(applied, SessionsApplied::default(), "q4 still on gD");
    assert!(s
        .apply_sessions("gX", LEASE, 30, &[opened(&q5_phone)])
        .unwrap()
        .presence
        .is_empty());
    assert!(s
        .apply_sessions("gR", LEASE, 30, &[opened(&q6_phone)])
        .unwrap()
        .presence
        .is_empty());

    expire_lease(&mut s, "gD");
    assert_eq!(s.dead_gateways().unwrap(), ["gD"]);
    let before = s
        .presence_of_users(&users(&["q1", "q2", "q3", "q5", "q6", "q7"]))
        .unwrap();
    assert_eq!(before, vec![gone(0), here, gone(0), here, here, gone(0)]);

    // q1 reconnects the same device through gL (its old address, on gD, is
    // replaced), q3 connects another device: both came online, as the
    // reads already say.
    let (q1_phone, q3_phone) = (
        session("q1", "tablet", "gL", 21),
        session("q3", "phone", "gL", 23),
    );
    let applied = s
        .apply_sessions("gL", LEASE, 100, &[opened(&q1_phone), opened(&q3_phone)])
        .unwrap();
    assert_eq!(applied.replaced, vec![(q1_phone.clone(), addr("gD", 1))]);
    assert_eq!(applied.presence, vec![online("q1"), online("q3")]);
    assert_eq!(
        s.presence_of_users(&users(&["q1", "q3"])).unwrap(),
        vec![here, here]
    );

    // q2's last live session closes: offline, last seen at the close. In
    // the same batch q7 comes online and goes again (batch order holds),
    // next to a user with no session anywhere else.
    let q7_phone = session("q7", "phone", "gL", 27);
    let fresh = session("q8", "phone", "gL", 28);
    let applied = s
        .apply_sessions(
            "gL",
            LEASE,
            200,
            &[
                closed(&q2_phone, 200),
                opened(&q7_phone),
                opened(&fresh),
                closed(&q7_phone, 210),
            ],
        )
        .unwrap();
    assert!(applied.replaced.is_empty());
    assert_eq!(
        applied.presence,
        vec![
            offline("q2", 200),
            online("q7"),
            online("q8"),
            offline("q7", 210)
        ]
    );
    assert_eq!(
        s.presence_of_users(&users(&["q2", "q7", "q8"])).unwrap(),
        vec![gone(200), gone(210), here]
    );
    assert_eq!(
        s.sessions_of_users(&users(&["q2"])).unwrap(),
        [vec![]].into_iter().collect()
    );

    // A clean shutdown of gX takes q5's last live session: offline.
    assert_eq!(
        s.deregister_gateway("gX", 300).unwrap(),
        vec![offline("q5", 300)]
    );
    // gR restarting inside its lease removes what its previous run left:
    // q6's last live session, offline.
    assert_eq!(
        s.register_gateway("gR", LEASE, 400).unwrap(),
        vec![offline("q6", 400)]
    );
    assert_eq!(
        s.presence_of_users(&users(&["q5", "q6"])).unwrap(),
        vec![gone(300), gone(400)]
    );

    // Reaping gD: q4 (whose other device closed while gD lived) goes
    // offline now; q1's old address was replaced and q3 is on gL, so they
    // stay online. Users already reported offline whose last session was on
    // gD (q2, q5, q6, q7) are reported again, last seen moving to the reap:
    // the store does not record which offline was already announced.
    let mut reaped = s.reap_gateway("gD", "gL", 999).unwrap().unwrap();
    reaped.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    let expected: Vec<pb::Presence> = ["q2", "q4", "q5", "q6", "q7"]
        .iter()
        .map(|u| offline(u, 999))
        .collect();
    assert_eq!(reaped, expected);
    assert_eq!(
        s.presence_of_users(&users(&["q1", "q3", "q4"])).unwrap(),
        vec![here, here, gone(999)]
    );
}

/// A gateway taken for dead while it was only stalled (a paused VM): its
/// lease ran out, another gateway reaped it (its sessions removed, the
/// registry forgot it), then it renews. `rejoin_if_forgotten` says so, once;
/// the gateway is known again, so a real death later is seen and reaped;
/// and the sessions it reopens count, except one whose device reconnected
/// elsewhere meanwhile: that newer connection stays, the old one is replaced.
pub fn a_gateway_reaped_while_stalled_rejoins<S: Store>(
    mut s: S,
    mut expire_lease: impl FnMut(&mut S, &str),
) {
    const LEASE: Duration = Duration::from_secs(30);
    const SHORT: Duration = Duration::from_millis(500);
    // Names of their own: a Redis server is shared by every check.
    let (live, stalled) = ("gw-rejoin-live", "gw-rejoin-stalled");
    s.register_gateway(live, LEASE, 1).unwrap();
    s.register_gateway(stalled, SHORT, 1).unwrap();
    assert!(
        !s.rejoin_if_forgotten(live, LEASE, 2).unwrap(),
        "a registered gateway was not forgotten"
    );
    let (rita, rex) = (
        session("rita", "phone", stalled, 1),
        session("rex", "phone", stalled, 2),
    );
    let opened = [rita.clone(), rex.clone()].map(SessionChange::Opened);
    let applied = s.apply_sessions(stalled, SHORT, 10, &opened).unwrap();
    assert_eq!(applied.presence, vec![online("rita"), online("rex")]);

    expire_lease(&mut s, stalled);
    assert!(s.dead_gateways().unwrap().iter().any(|g| g == stalled));
    let mut reaped = s.reap_gateway(stalled, live, 20).unwrap().unwrap();
    reaped.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    assert_eq!(reaped, vec![offline("rex", 20), offline("rita", 20)]);
    assert_eq!(
        s.sessions_of_users(&["rita"]).unwrap(),
        [vec![]].into_iter().collect()
    );
    // Meanwhile rex's phone gave up on the stalled gateway and connected
    // through the live one.
    let rex_again = session("rex", "phone", live, 9);
    let applied = s
        .apply_sessions(live, LEASE, 25, &[SessionChange::Opened(rex_again.clone())])
        .unwrap();
    assert_eq!(applied.presence, vec![online("rex")]);

    // The stalled gateway runs again.
    assert!(s.rejoin_if_forgotten(stalled, LEASE, 30).unwrap());
    assert!(
        !s.rejoin_if_forgotten(stalled, LEASE, 31).unwrap(),
        "said once"
    );
    assert!(!s.dead_gateways().unwrap().iter().any(|g| g == stalled));
    // rita's connection is still open there: reopened, she is online. rex's
    // old connection is the older one: replaced, his new one stays.
    let reopened = [rita.clone(), rex.clone()].map(SessionChange::Reopened);
    let applied = s.apply_sessions(stalled, SHORT, 40, &reopened).unwrap();
    assert_eq!(applied.presence, vec![online("rita")]);
    assert_eq!(applied.replaced, vec![(rex_again, addr(stalled, 2))]);
    assert_eq!(
        s.sessions_of_users(&["rita", "rex"]).unwrap(),
        [vec![addr(stalled, 1)], vec![addr(live, 9)]]
            .into_iter()
            .collect()
    );
    // Reopened at the address it already has: nothing changes.
    let again = s
        .apply_sessions(stalled, SHORT, 45, &reopened[..1])
        .unwrap();
    assert_eq!(again, SessionsApplied::default());

    // Known again: when it dies for real, it is seen and reaped (rex stays
    // online through the live gateway).
    expire_lease(&mut s, stalled);
    assert!(s.dead_gateways().unwrap().iter().any(|g| g == stalled));
    assert_eq!(
        s.reap_gateway(stalled, live, 50).unwrap(),
        Some(vec![offline("rita", 50)])
    );
}
