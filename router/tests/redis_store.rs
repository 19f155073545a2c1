//! RedisStore against a real redis-server and a real 3-master Redis Cluster
//! (started by palaver_testkit::stack on free loopback ports). Every check runs
//! on both.

use std::sync::Arc;
use std::time::Duration;

use palaver_protocol::pb::{self, frame::Body};
use palaver_router::api::Inbound;
use palaver_router::bus::Output;
use palaver_router::logic::{ManualClock, Router, RouterConfig};
use palaver_router::redis_store::{RedisConfig, RedisStore};
use palaver_router::store::{
    Appended, ConversationStore, GatewayRegistry, RangeRead, SessionChange, SessionStore,
};
use palaver_testkit::stack::{Redis, RedisCluster};

mod contract;
use contract::*;

/// Runs every check against one store configuration.
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
    shared_conversations(RedisStore::connect(config.clone()).unwrap());
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

#[test]
fn standalone_redis() {
    let redis = Redis::start().expect("start redis-server");
    all_checks(RedisConfig::standalone(redis.url()));
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
/// members online gets the message fanned out; offline members get a push.
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
    assert_eq!(out.pushes.len(), 150, "one push per offline member");
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
