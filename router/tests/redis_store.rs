//! RedisStore against a real redis-server and a real 3-master Redis Cluster
//! (started by palaver_testkit::stack on free loopback ports). Every check runs
//! on both.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use palaver_protocol::pb::{self, frame::Body};
use palaver_router::api::Inbound;
use palaver_router::bus::Output;
use palaver_router::logic::{ManualClock, Router, RouterConfig};
use palaver_router::redis_store::{RedisConfig, RedisStore};
use palaver_router::store::{
    Appended, ConversationStore, GatewayRegistry, PushPlatform, PushStore, PushToken, RangeRead,
    SessionChange, SessionStore,
};
use palaver_testkit::stack::{Redis, RedisCluster};

// The store contract lives beside the core's traits (and runs on the
// memory store there).
#[path = "../../router-core/tests/contract/mod.rs"]
mod contract;
use contract::*;

/// Runs every check against one store configuration, one after another on
/// one server (Redis Cluster: three masters are started once).
fn all_checks(config: RedisConfig) {
    append_dedup_window(RedisStore::connect(config.clone()).unwrap(), &config);
    append_batch_in_order(RedisStore::connect(config.clone()).unwrap());
    dedup_follows_the_window(RedisStore::connect(config.clone()).unwrap());
    ranges_and_senders(RedisStore::connect(config.clone()).unwrap());
    quotas_count_per_owner_and_day(RedisStore::connect(config.clone()).unwrap());
    dedup_is_per_sender(RedisStore::connect(config.clone()).unwrap());
    reads_stay_within_their_byte_budget(RedisStore::connect(config.clone()).unwrap());
    receipts_and_groups(RedisStore::connect(config.clone()).unwrap());
    users_and_push(RedisStore::connect(config.clone()).unwrap());
    presence_links_and_consent(RedisStore::connect(config.clone()).unwrap());
    group_add_counts(RedisStore::connect(config.clone()).unwrap());
    push_tokens_register_replace_and_cap(RedisStore::connect(config.clone()).unwrap());
    a_push_token_has_one_owner_across_users(RedisStore::connect(config.clone()).unwrap());
    push_token_invalidation_loses_to_a_reregistration(RedisStore::connect(config.clone()).unwrap());
    mutes_expire_and_are_capped(RedisStore::connect(config.clone()).unwrap());
    recipients_say_whose_registered_devices_are_offline(
        RedisStore::connect(config.clone()).unwrap(),
    );
    push_context_for_the_worker(RedisStore::connect(config.clone()).unwrap());
    the_history_epoch_is_announced_and_stable(RedisStore::connect(config.clone()).unwrap());
    channels_are_created_once_with_their_counts(RedisStore::connect(config.clone()).unwrap());
    channel_member_changes_keep_their_counts(RedisStore::connect(config.clone()).unwrap());
    channel_members_page_in_order(RedisStore::connect(config.clone()).unwrap());
    a_large_channel_pages_without_gaps(RedisStore::connect(config.clone()).unwrap());
    channel_read_positions_rise_only(RedisStore::connect(config.clone()).unwrap());
    calls_on_a_missing_channel_change_nothing(RedisStore::connect(config.clone()).unwrap());
    sessions_and_registry(
        RedisStore::connect(config.clone()).unwrap(),
        wait_for_lease_expiry,
    );
    presence_events_ignore_dead_gateways(
        RedisStore::connect(config.clone()).unwrap(),
        wait_for_lease_expiry,
    );
    a_gateway_reaped_while_stalled_rejoins(
        RedisStore::connect(config.clone()).unwrap(),
        wait_for_lease_expiry,
    );
    router_over_redis(RedisStore::connect(config).unwrap());
}

/// Redis expires a lease key on its own clock: wait for it.
fn wait_for_lease_expiry(s: &mut RedisStore, gateway: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !s.dead_gateways().unwrap().iter().any(|g| g == gateway) {
        assert!(std::time::Instant::now() < deadline, "lease never expired");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh standalone Redis (kept alive with the check) and a store on it.
fn fresh() -> (Redis, RedisStore) {
    let redis = Redis::start().expect("start redis-server");
    let store = RedisStore::connect(RedisConfig::standalone(redis.url())).unwrap();
    (redis, store)
}

/// Redis expires leases on its own clock: the hook waits for it.
#[allow(clippy::type_complexity)]
fn expire(
    (redis, store): (Redis, RedisStore),
    _step_ms: i64,
) -> (Redis, RedisStore, Box<dyn FnMut(&mut RedisStore, &str)>) {
    (redis, store, Box::new(wait_for_lease_expiry))
}

// Every check of the contract, one test each, on standalone Redis.
crate::store_contract_tests!(fresh, expire);

/// The checks only Redis has, on standalone Redis.
#[test]
fn standalone_redis() {
    let redis = Redis::start().expect("start redis-server");
    let config = RedisConfig::standalone(redis.url());
    append_dedup_window(RedisStore::connect(config.clone()).unwrap(), &config);
    router_over_redis(RedisStore::connect(config).unwrap());
}

#[test]
fn redis_cluster_three_masters() {
    let cluster = RedisCluster::start(3).expect("start Redis Cluster");
    all_checks(RedisConfig::cluster(cluster.urls()));
    // The data really is spread over the masters.
    let with_keys = cluster
        .nodes()
        .iter()
        .filter(|n| {
            let reply = n.command("DBSIZE").unwrap();
            reply.trim_start_matches(':').trim() != "0"
        })
        .count();
    assert!(with_keys >= 2, "keys on {with_keys} of 3 masters");
}

fn append_dedup_window(mut s: RedisStore, config: &RedisConfig) {
    for i in 1..=5u8 {
        let m = stored(
            s.append_message("c1", message("c1", i, "u"), &retention(0, 3))
                .unwrap(),
        );
        assert_eq!(m.seq, i as u64);
        assert_eq!(m.body, vec![i; 3]);
    }
    // A replay (same client_msg_id within the TTL, original still in the
    // window), also from another connection (another router after a
    // rebalance): the original ack.
    let mut other = RedisStore::connect(config.clone()).unwrap();
    match other
        .append_message("c1", message("c1", 4, "u"), &retention(999, 3))
        .unwrap()
    {
        Appended::Duplicate(ack) => {
            assert_eq!(ack.seq, 4);
            assert_eq!(ack.message_id, "m4");
            assert_eq!(ack.server_time_ms, 1004);
            assert_eq!(ack.conversation_id, "c1");
            assert_eq!(ack.client_msg_id, vec![4u8; 16]);
        }
        other => panic!("expected duplicate, got {other:?}"),
    }
    assert_eq!(
        s.last_seqs(&["c1".into(), "none".into()]).unwrap(),
        vec![5, 0]
    );
    // After the TTL the same client_msg_id is a new message with the next seq.
    let m = stored(
        s.append_message("c1", message("c1", 4, "u"), &retention(1000, 3))
            .unwrap(),
    );
    assert_eq!(m.seq, 6);
    let all = s
        .messages_after(&[RangeRead {
            conversation_id: "c1".into(),
            after_seq: 0,
            limit: 100,
            max_bytes: usize::MAX,
        }])
        .unwrap();
    let seqs: Vec<u64> = all[0].iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![4, 5, 6], "window of 3");
}

/// The unchanged routing logic over RedisStore: a 300-member group with some
/// members online gets the message fanned out; members with a registered
/// device that is not online get a push event naming the devices online.
fn router_over_redis(store: RedisStore) {
    let clock = Arc::new(ManualClock::new(1_000));
    let mut router = Router::new(store, RouterConfig::default(), clock);
    let mut out = Output::default();
    let creator = session("r0", "d", "gR", 1000);
    router
        .store_mut()
        .register_gateway("gR", Duration::from_secs(30), 1)
        .unwrap();
    let online: Vec<SessionChange> = (0..300u64)
        .filter(|i| i % 2 == 0)
        .map(|i| SessionChange::Opened(session(&format!("r{i}"), "d", "gR", 1000 + i)))
        .collect();
    router
        .apply_session_changes(&online, Duration::from_secs(30), &mut out)
        .unwrap();
    out.frames.clear();
    // The offline members registered their device "d"; every fourth member
    // (online on "d") also has a registered "phone" that is asleep.
    for i in 1..300u64 {
        let device = match i % 4 {
            0 => "phone",
            1 | 3 => "d",
            _ => continue,
        };
        let token = PushToken {
            platform: PushPlatform::Fcm,
            token: format!("fcm-r{i}-{device}"),
            apns_environment: None,
            apns_topic: String::new(),
            locale: String::new(),
            registered_ms: 1,
        };
        router
            .store_mut()
            .register_push_token(&format!("r{i}"), device, &token, 20)
            .unwrap();
    }
    let request = |body| Inbound {
        from: creator.clone(),
        request_id: 1,
        body,
        received_ms: 1_000,
    };
    router
        .handle(
            &request(Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Group as i32,
                title: "big".into(),
                member_user_ids: (1..300).map(|i| format!("r{i}")).collect(),
                channel: None,
            })),
            &mut out,
        )
        .unwrap();
    let group_id = out
        .frames
        .iter()
        .find_map(|f| match &f.frame.body {
            Some(Body::ConversationCreated(c)) => {
                Some(c.conversation.as_ref().unwrap().conversation_id.clone())
            }
            _ => None,
        })
        .expect("ConversationCreated");
    out.frames.clear();
    router
        .handle(
            &request(Body::Send(pb::Send {
                conversation_id: group_id.clone(),
                client_msg_id: vec![9; 16],
                kind: pb::ContentKind::Text as i32,
                body: b"hello".to_vec(),
                ..Default::default()
            })),
            &mut out,
        )
        .unwrap();
    let acks = out
        .frames
        .iter()
        .filter(|f| matches!(f.frame.body, Some(Body::SendAck(_))))
        .count();
    let delivers = out
        .frames
        .iter()
        .filter(|f| matches!(f.frame.body, Some(Body::Deliver(_))))
        .count();
    assert_eq!(acks, 1);
    assert_eq!(
        delivers, 149,
        "online members except the sender's own connection"
    );
    let mut asleep = 0;
    for push in &out.pushes {
        let i: u64 = push.user_id[1..].parse().unwrap();
        if i % 2 == 1 {
            assert!(push.online_device_ids.is_empty(), "{push:?}");
        } else {
            assert_eq!(i % 4, 0, "{push:?}");
            assert_eq!(push.online_device_ids, ["d"], "{push:?}");
            asleep += 1;
        }
    }
    assert_eq!(
        out.pushes.len(),
        150 + 74,
        "one push per offline member and per member with an asleep phone"
    );
    assert_eq!(asleep, 74);
}

/// A fresh Redis, the store on it, and a plain connection to look inside.
fn store_and_raw_connection() -> (Redis, RedisStore, redis::Connection) {
    let redis = Redis::start().expect("start redis-server");
    let store = RedisStore::connect(RedisConfig::standalone(redis.url())).unwrap();
    let raw = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    (redis, store, raw)
}

/// Every router on one Redis announces the same history epoch, and a
/// wiped dataset (FLUSHALL: a lost or replaced Redis) a new one, created by
/// the first read after it (SPEC §7).
#[test]
fn a_wiped_redis_announces_a_new_history_epoch() {
    let (redis, mut s, mut raw) = store_and_raw_connection();
    let mut other = RedisStore::connect(RedisConfig::standalone(redis.url())).unwrap();
    let first = s.history_epoch().unwrap();
    assert_eq!(
        other.history_epoch().unwrap(),
        first,
        "one epoch per dataset"
    );
    let _: () = redis::cmd("FLUSHALL").query(&mut raw).unwrap();
    let second = other.history_epoch().unwrap();
    assert_ne!(second, first);
    assert_eq!(s.history_epoch().unwrap(), second);
}

/// Dedup state in Redis is bounded by the history window, not by traffic:
/// after 1,000 messages with a window of 50 the conversation holds exactly
/// four keys (seq, history, dedup hash, dedup order list) with 50 entries
/// each; a retry inside the window is still a duplicate. A dedup key of the
/// previous layout (one key per message) is still honoured.
#[test]
fn redis_dedup_is_bounded_by_the_window_and_reads_legacy_keys() {
    let (_redis, mut s, mut raw) = store_and_raw_connection();
    let window = 50;
    let ret = |now| palaver_router::store::Retention {
        now_ms: now,
        dedup_ttl_ms: 86_400_000,
        history_window: window,
    };
    let msg = |i: u32| pb::Message {
        conversation_id: "c".into(),
        client_msg_id: [i.to_le_bytes(), [7; 4], [8; 4], [9; 4]].concat(),
        message_id: format!("m{i}"),
        sender_user_id: "u".into(),
        server_time_ms: 5_000,
        ..Default::default()
    };
    for chunk in 0..10u32 {
        let batch = (0..100u32)
            .map(|i| ("c".to_string(), msg(chunk * 100 + i)))
            .collect();
        let results = s.append_messages(batch, &ret(5_000)).unwrap();
        for (i, r) in results.into_iter().enumerate() {
            assert_eq!(stored(r).seq, (chunk * 100) as u64 + i as u64 + 1);
        }
    }
    let count = |raw: &mut redis::Connection, cmd: &str, key: &str| -> u64 {
        redis::cmd(cmd).arg(key).query(raw).unwrap()
    };
    assert_eq!(count(&mut raw, "HLEN", "c:{c}:dd"), window as u64);
    assert_eq!(count(&mut raw, "LLEN", "c:{c}:dq"), window as u64);
    assert_eq!(count(&mut raw, "ZCARD", "c:{c}:h"), window as u64);
    let keys: u64 = redis::cmd("DBSIZE").query(&mut raw).unwrap();
    assert_eq!(keys, 4);
    // In the window: a duplicate with the original ack; out of it: new.
    match s.append_message("c", msg(990), &ret(6_000)).unwrap() {
        Appended::Duplicate(a) => {
            assert_eq!((a.seq, a.message_id.as_str()), (991, "m990"));
            assert_eq!(a.server_time_ms, 5_000);
        }
        other => panic!("expected duplicate, got {other:?}"),
    }
    assert_eq!(
        stored(s.append_message("c", msg(5), &ret(6_000)).unwrap()).seq,
        1001
    );
    assert_eq!(count(&mut raw, "HLEN", "c:{c}:dd"), window as u64);
    // Past the TTL (appended 5,000 + 1 day), a retry is a new message.
    assert_eq!(
        stored(
            s.append_message("c", msg(999), &ret(5_000 + 86_400_000))
                .unwrap()
        )
        .seq,
        1002
    );
    // #999's field now names seq 1002; its old list entry (seq 1000) stays
    // until the trim passes it, and the trim then leaves the field alone.
    assert_eq!(count(&mut raw, "HLEN", "c:{c}:dd"), window as u64 - 1);
    assert_eq!(count(&mut raw, "LLEN", "c:{c}:dq"), window as u64);
    let batch = (2000..2100u32).map(|i| ("c".to_string(), msg(i))).collect();
    s.append_messages(batch, &ret(5_000 + 86_400_000)).unwrap();
    assert_eq!(count(&mut raw, "HLEN", "c:{c}:dd"), window as u64);
    assert_eq!(count(&mut raw, "LLEN", "c:{c}:dq"), window as u64);

    // The previous layout's per-message key, written before an upgrade.
    let legacy = msg(4242);
    let hex: String = legacy
        .client_msg_id
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let _: () = redis::cmd("SET")
        .arg(format!("c:{{c}}:d:{hex}"))
        .arg("90000 17 4000 legacy-id")
        .arg("PX")
        .arg(60_000)
        .query(&mut raw)
        .unwrap();
    match s.append_message("c", legacy, &ret(7_000)).unwrap() {
        Appended::Duplicate(a) => {
            assert_eq!(
                (a.seq, a.message_id.as_str(), a.server_time_ms),
                (17, "legacy-id", 4000)
            );
        }
        other => panic!("expected the legacy duplicate, got {other:?}"),
    }
    // A dedup entry of the layout before the sender joined the key (field =
    // the bare client_msg_id) still answers its sender's retry, and only his.
    let mut old = msg(4343);
    let appended = stored(s.append_message("c", old.clone(), &ret(7_000)).unwrap());
    let new_field = [b"u\0".as_slice(), &old.client_msg_id].concat();
    let removed: i64 = redis::cmd("HDEL")
        .arg("c:{c}:dd")
        .arg(&new_field)
        .query(&mut raw)
        .unwrap();
    assert_eq!(removed, 1, "the entry is keyed by sender and id");
    let _: () = redis::cmd("HSET")
        .arg("c:{c}:dd")
        .arg(&old.client_msg_id)
        .arg(format!("{} 7000", appended.seq))
        .query(&mut raw)
        .unwrap();
    match s.append_message("c", old.clone(), &ret(7_001)).unwrap() {
        Appended::Duplicate(a) => assert_eq!(a.seq, appended.seq),
        other => panic!("expected the legacy-field duplicate, got {other:?}"),
    }
    old.sender_user_id = "someone-else".into();
    assert_eq!(
        stored(s.append_message("c", old, &ret(7_002)).unwrap()).seq,
        appended.seq + 1,
        "another sender's message with that id is new"
    );
}

/// A session flush reads gateway leases (the `SMISMEMBER` of the liveness
/// check) only when a changed user has a session on another gateway, and
/// then once for the whole batch: users with no other session, or only
/// sessions on the flushing gateway, cost the one pipeline.
#[test]
fn session_flush_reads_leases_only_for_users_on_other_gateways() {
    let (_redis, mut s, mut raw) = store_and_raw_connection();
    let mut lease_reads = || -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut raw)
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_smismember:calls="))
            .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
    };
    const LEASE: Duration = Duration::from_secs(30);
    for gateway in ["g1", "g2"] {
        s.register_gateway(gateway, LEASE, 1).unwrap();
    }
    let opened = |user: &str, device: &str, gw: &str, conn| {
        SessionChange::Opened(session(user, device, gw, conn))
    };
    let closed = |user: &str, device: &str, gw: &str, conn| SessionChange::Closed {
        session: session(user, device, gw, conn),
        at_ms: 50,
    };
    let start = lease_reads();
    let batch: Vec<SessionChange> = (0..100)
        .map(|i| opened(&format!("n{i}"), "phone", "g1", i))
        .chain([
            opened("n0", "tablet", "g1", 200),
            closed("n0", "phone", "g1", 0),
            closed("n1", "phone", "g1", 1),
        ])
        .collect();
    let applied = s.apply_sessions("g1", LEASE, 10, &batch).unwrap();
    assert_eq!(applied.presence.len(), 101, "100 online, n1 offline");
    assert_eq!(lease_reads(), start, "no other gateway involved");

    let batch = [
        opened("n2", "laptop", "g2", 300),
        opened("n3", "laptop", "g2", 301),
        closed("n0", "tablet", "g1", 200),
    ];
    s.apply_sessions("g2", LEASE, 20, &batch[..2]).unwrap();
    assert_eq!(lease_reads(), start + 1, "one read for both users");
    let applied = s.apply_sessions("g1", LEASE, 30, &batch[2..]).unwrap();
    assert_eq!(applied.presence.len(), 1, "n0 had nothing elsewhere");
    assert_eq!(lease_reads(), start + 1);
}

/// What Redis did since the last call: calls per command (`INFO
/// commandstats`) and the bytes it read and wrote (`INFO stats`), after
/// which the counters are reset (`CONFIG RESETSTAT`). The INFO and CONFIG
/// commands themselves are left out; their own bytes are the same every
/// time.
fn redis_work(raw: &mut redis::Connection) -> (Vec<String>, u64, u64) {
    // Bytes first: the replies of the INFO commands (whose length varies
    // with the numbers in them) are written after they are counted.
    let stats: String = redis::cmd("INFO").arg("stats").query(raw).unwrap();
    let stat = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    let (read, written) = (
        stat("total_net_input_bytes:"),
        stat("total_net_output_bytes:"),
    );
    let commands: String = redis::cmd("INFO").arg("commandstats").query(raw).unwrap();
    let mut calls: Vec<String> = commands
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter(|l| !l.starts_with("info:") && !l.starts_with("config|"))
        .map(|l| l.split(",usec").next().unwrap().to_string())
        .collect();
    calls.sort();
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(raw).unwrap();
    (calls, read, written)
}

/// Issue 18 through Redis: a direct conversation counts for presence once
/// both have written; a presence answer about a hidden user with 2,000
/// conversations makes Redis do exactly what one about an unknown id does
/// (same commands, same bytes in and out); a presence change's fan-out to a
/// user watching from 50 connections is one check and costs Redis the same
/// whatever the watched user's conversations; strangers' group adds are
/// limited; a removed member gets no receipt updates.
#[test]
fn consent_before_reach_over_redis() {
    let (_redis, store, mut raw) = store_and_raw_connection();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let mut router = Router::new(store, RouterConfig::default(), clock);
    let run = |router: &mut Router<RedisStore>, from: &palaver_router::Session, id, body| {
        let mut out = Output::default();
        router
            .handle(
                &Inbound {
                    from: from.clone(),
                    request_id: id,
                    body,
                    received_ms: 1,
                },
                &mut out,
            )
            .unwrap();
        out
    };
    let presence = |out: &Output| -> Vec<(String, bool, i64)> {
        out.frames
            .iter()
            .find_map(|f| match &f.frame.body {
                Some(Body::PresenceResult(r)) => Some(
                    r.presences
                        .iter()
                        .map(|p| (p.user_id.clone(), p.online, p.last_seen_ms))
                        .collect(),
                ),
                _ => None,
            })
            .expect("PresenceResult")
    };
    let sessions = |router: &mut Router<RedisStore>, changes: &[SessionChange]| {
        let mut out = Output::default();
        router
            .apply_session_changes(changes, Duration::from_secs(60), &mut out)
            .unwrap();
        out
    };
    let query = |ids: &[&str]| {
        Body::PresenceQuery(pb::PresenceQuery {
            user_ids: ids.iter().map(|s| s.to_string()).collect(),
        })
    };
    let send = |conv: &str, n: u8| {
        Body::Send(pb::Send {
            conversation_id: conv.into(),
            client_msg_id: vec![n; 16],
            kind: pb::ContentKind::Text as i32,
            body: b"hi".to_vec(),
            ..Default::default()
        })
    };
    let create = |kind: pb::ConversationKind, members: &[&str]| {
        Body::CreateConversation(pb::CreateConversation {
            kind: kind as i32,
            title: String::new(),
            member_user_ids: members.iter().map(|s| s.to_string()).collect(),
            channel: None,
        })
    };
    let victim = session("victim01", "phone", "gX", 1);
    let mallory = session("mallory1", "phone", "gX", 2);
    sessions(&mut router, &[SessionChange::Opened(victim.clone())]);
    let dm = palaver_router::direct_conversation_id("mallory1", "victim01");

    // Created, then written by mallory alone: hidden. Answered: visible.
    run(
        &mut router,
        &mallory,
        1,
        create(pb::ConversationKind::Direct, &["victim01"]),
    );
    run(&mut router, &mallory, 2, send(&dm, 1));
    let hidden = vec![("victim01".to_string(), false, 0)];
    assert_eq!(
        presence(&run(&mut router, &mallory, 3, query(&["victim01"]))),
        hidden
    );

    // The victim's 2,000 conversations and 20 groups; mallory's 3 groups.
    for i in 0..2000u64 {
        let peer = session(&format!("peer{i:04}"), "d", "gX", 100 + i);
        run(
            &mut router,
            &peer,
            1,
            create(pb::ConversationKind::Direct, &["victim01"]),
        );
    }
    for i in 0..20 {
        run(
            &mut router,
            &victim,
            10 + i,
            create(pb::ConversationKind::Group, &[&format!("peer{i:04}")]),
        );
    }
    for i in 0..3 {
        run(
            &mut router,
            &mallory,
            10 + i,
            create(pb::ConversationKind::Group, &[&format!("side{i:04}")]),
        );
    }
    redis_work(&mut raw);
    let a = presence(&run(&mut router, &mallory, 4, query(&["victim01"])));
    let hidden_work = redis_work(&mut raw);
    let b = presence(&run(&mut router, &mallory, 5, query(&["nobody01"])));
    let unknown_work = redis_work(&mut raw);
    println!("hidden: {hidden_work:?}\nunknown: {unknown_work:?}");
    assert_eq!(a, hidden);
    assert_eq!(b, vec![("nobody01".to_string(), false, 0)]);
    assert_eq!(hidden_work, unknown_work, "the same Redis work for both");

    // Fan-out: a watcher sharing a group with the target, on 50
    // connections.
    let target = session("target01", "phone", "gX", 5000);
    sessions(&mut router, &[SessionChange::Opened(target.clone())]);
    run(
        &mut router,
        &target,
        1,
        create(pb::ConversationKind::Group, &["watcher1"]),
    );
    let watchers: Vec<palaver_router::Session> = (0..50u64)
        .map(|i| session("watcher1", &format!("d{i}"), "gX", 6000 + i))
        .collect();
    let opened: Vec<SessionChange> = watchers
        .iter()
        .cloned()
        .map(SessionChange::Opened)
        .collect();
    sessions(&mut router, &opened);
    for w in &watchers {
        let body = Body::PresenceSubscribe(pb::PresenceSubscribe {
            user_ids: vec!["target01".into()],
            unsubscribe: false,
        });
        run(&mut router, w, 1, body);
    }
    let change = |router: &mut Router<RedisStore>, raw: &mut redis::Connection, at| {
        sessions(router, &[SessionChange::Opened(target.clone())]);
        redis_work(raw);
        let out = sessions(
            router,
            &[SessionChange::Closed {
                session: target.clone(),
                at_ms: at,
            }],
        );
        let events = out
            .frames
            .iter()
            .filter(|f| matches!(f.frame.body, Some(Body::PresenceEvent(_))))
            .count();
        (events, redis_work(raw))
    };
    let few = change(&mut router, &mut raw, 1_700_000_000_001);
    for i in 0..2000u64 {
        let peer = session(&format!("tpeer{i:04}"), "d", "gX", 9000 + i);
        run(
            &mut router,
            &peer,
            1,
            create(pb::ConversationKind::Direct, &["target01"]),
        );
    }
    for i in 0..20 {
        run(
            &mut router,
            &target,
            10 + i,
            create(pb::ConversationKind::Group, &[&format!("tpeer{i:04}")]),
        );
    }
    let many = change(&mut router, &mut raw, 1_700_000_000_002);
    println!("fan-out, 1 group: {few:?}\nfan-out, 2,020 more conversations: {many:?}");
    assert_eq!(few.0, 50);
    assert_eq!(few, many, "the same events and Redis work");

    // Strangers' adds are limited per day, all strangers together (one
    // adder also to 10 a day): the 21st is refused.
    let eve = session("eve00001", "phone", "gX", 3);
    for i in 0..20 {
        let adder = if i % 2 == 0 { &mallory } else { &eve };
        let out = run(
            &mut router,
            adder,
            100 + i,
            create(
                pb::ConversationKind::Group,
                &["victim01", &format!("fill{i:04}")],
            ),
        );
        assert!(
            out.frames
                .iter()
                .all(|f| !matches!(f.frame.body, Some(Body::Error(_)))),
            "add {i}: {:?}",
            out.frames
        );
    }
    let out = run(
        &mut router,
        &mallory,
        200,
        create(pb::ConversationKind::Group, &["victim01"]),
    );
    match &out.frames[0].frame.body {
        Some(Body::Error(e)) => assert_eq!(e.code, pb::ErrorCode::QuotaExceeded as u32, "{e:?}"),
        other => panic!("expected QUOTA_EXCEEDED, got {other:?}"),
    }

    // A removed member gets no receipt updates for what it sent.
    let alice = session("alice001", "phone", "gX", 20_000);
    let carol = session("carol001", "phone", "gX", 20_001);
    let bob = session("bob00001", "phone", "gX", 20_002);
    sessions(
        &mut router,
        &[
            SessionChange::Opened(alice.clone()),
            SessionChange::Opened(carol.clone()),
            SessionChange::Opened(bob.clone()),
        ],
    );
    let out = run(
        &mut router,
        &alice,
        1,
        create(pb::ConversationKind::Group, &["carol001", "bob00001"]),
    );
    let group = out
        .frames
        .iter()
        .find_map(|f| match &f.frame.body {
            Some(Body::ConversationCreated(c)) => {
                Some(c.conversation.clone().unwrap().conversation_id)
            }
            _ => None,
        })
        .unwrap();
    run(&mut router, &carol, 2, send(&group, 2));
    let remove = Body::ChangeMembers(pb::ChangeMembers {
        conversation_id: group.clone(),
        remove_user_ids: vec!["carol001".into()],
        ..Default::default()
    });
    run(&mut router, &alice, 3, remove);
    let read = Body::Receipt(pb::Receipt {
        conversation_id: group.clone(),
        kind: pb::ReceiptKind::Read as i32,
        up_to_seq: 1,
    });
    let out = run(&mut router, &bob, 4, read);
    assert!(
        out.frames.iter().all(|f| f.to != carol.addr),
        "{:?}",
        out.frames
    );
}
