//! The fault matrix: chat traffic across two gateways on real Apache Kafka
//! and real Redis while one fault happens, then the checks of
//! `e2e::traffic` (every acknowledged message in history exactly once,
//! per-conversation seq gapless and in send order, Sync after reconnect
//! returns all of it, clients saw only UNAVAILABLE / GoAway / closes).
//! Each test prints a `FAULT` line with its recovery time: from the fault
//! to the moment every sender had an acknowledgement again.
//!
//! Nothing is restarted by the test unless the fault is a restart: gateways,
//! bridges and routers recover by themselves.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

mod e2e;

use std::time::{Duration, Instant};

use e2e::traffic::Traffic;
use e2e::{group_of, Stack};
use palaver_protocol::pb;
use palaver_router::kafka::INBOUND_TOPIC;
use palaver_testkit::client::Client;

const SENDERS: usize = 4;
const PER_SENDER: usize = 60;
/// Acknowledged messages before the fault: traffic is flowing.
const BEFORE_FAULT: usize = 30;

fn stack(kafka_nodes: usize, routers: usize) -> Stack {
    let mut s = Stack::start_with(false, kafka_nodes, routers);
    s.add_gateway("gw1");
    s.add_gateway("gw2");
    s
}

/// SIGKILL one of two routers mid-stream; no replacement is started: the
/// survivor takes the dead router's partitions over by a consumer-group
/// rebalance (after the group's session timeout, 6 s in these tests).
#[test]
fn sigkill_one_of_two_routers() {
    let mut s = stack(1, 2);
    let traffic = Traffic::start(&s, SENDERS, PER_SENDER);
    traffic.wait_acked(BEFORE_FAULT);
    let fault_at = Instant::now();
    s.routers[0].kill();
    traffic.finish("SIGKILL one of two routers", fault_at);
}

/// SIGKILL the single Kafka broker mid-stream and start it again from its
/// log dir once clients are being answered UNAVAILABLE.
#[test]
fn kafka_broker_restart() {
    let mut s = stack(1, 1);
    let traffic = Traffic::start(&s, SENDERS, PER_SENDER);
    traffic.wait_acked(BEFORE_FAULT);
    let fault_at = Instant::now();
    s.kafka.kill_node(0);
    // The outage as clients see it: sends are answered UNAVAILABLE.
    traffic.wait_unavailable();
    let down_for = fault_at.elapsed();
    s.kafka.restart_node(0).expect("restart the broker");
    eprintln!(
        "broker was down {:.1} s (until UNAVAILABLE was seen)",
        down_for.as_secs_f64()
    );
    let outcome = traffic.finish("Kafka broker SIGKILL + restart", fault_at);
    assert!(outcome.unavailable > 0);
}

/// SIGKILL Redis mid-stream and start it again at once from its AOF
/// (`appendfsync always`): no acknowledged message is lost and no seq is
/// given twice.
#[test]
fn redis_sigkill_restart_from_aof_loses_no_acknowledged_message() {
    let mut s = stack(1, 1);
    let traffic = Traffic::start(&s, SENDERS, PER_SENDER);
    traffic.wait_acked(BEFORE_FAULT);
    let fault_at = Instant::now();
    let redis = s.redis.as_mut().expect("standalone Redis");
    redis.kill();
    redis.start_again().expect("restart Redis from its AOF");
    traffic.finish("Redis SIGKILL + restart from AOF", fault_at);
}

/// SIGKILL a gateway process mid-stream: its clients reconnect to the
/// other gateway and resume with the same client_msg_ids.
#[test]
fn sigkill_a_gateway() {
    let mut s = Stack::start_with(false, 1, 1);
    s.add_gateway("gw1");
    s.add_gateway("gw2");
    // carol stays on gw2 and does not reconnect; alice watches her from gw1
    // (presence is visible to users who share a conversation that counts,
    // SPEC §10: here a group).
    let _carol = s.login(1, "carol", "phone");
    let mut watcher = s.login(0, "alice", "watcher");
    group_of(&mut watcher, &["carol"]);
    assert!(presence_of(&mut watcher, "carol").online);

    let traffic = Traffic::start(&s, SENDERS, PER_SENDER);
    traffic.wait_acked(BEFORE_FAULT);
    let fault_at = Instant::now();
    s.crash_gateway(1);
    let outcome = traffic.finish("SIGKILL a gateway", fault_at);
    assert!(
        outcome.reconnects > 0,
        "clients of the killed gateway moved"
    );

    // Nothing told Redis that gw2 died: its lease (3 s) runs out and its
    // users go offline together.
    let deadline = Instant::now() + Duration::from_secs(60);
    while presence_of(&mut watcher, "carol").online {
        assert!(Instant::now() < deadline, "carol stayed online");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "carol (on the killed gateway) offline {:.1} s after the kill (lease 3 s)",
        fault_at.elapsed().as_secs_f64()
    );
}

fn presence_of(c: &mut Client, user: &str) -> pb::Presence {
    c.presence(user, e2e::T).expect("PresenceResult")
}

/// SIGSTOP the Kafka broker for 10 s (a network stall: sockets stay open,
/// nothing answers), then SIGCONT.
#[test]
fn kafka_stalled_10s() {
    let s = stack(1, 1);
    let traffic = Traffic::start(&s, SENDERS, PER_SENDER);
    traffic.wait_acked(BEFORE_FAULT);
    let fault_at = Instant::now();
    s.kafka.pause_node(0).expect("SIGSTOP Kafka");
    // The fault is a 10 s stall: this sleep is its duration.
    std::thread::sleep(Duration::from_secs(10));
    s.kafka.resume_node(0).expect("SIGCONT Kafka");
    traffic.finish("Kafka SIGSTOP 10 s", fault_at);
}

/// SIGSTOP Redis for 10 s, then SIGCONT.
#[test]
fn redis_stalled_10s() {
    let s = stack(1, 1);
    let traffic = Traffic::start(&s, SENDERS, PER_SENDER);
    traffic.wait_acked(BEFORE_FAULT);
    let fault_at = Instant::now();
    let redis = s.redis.as_ref().expect("standalone Redis");
    redis.pause().expect("SIGSTOP Redis");
    // The fault is a 10 s stall: this sleep is its duration.
    std::thread::sleep(Duration::from_secs(10));
    redis.resume().expect("SIGCONT Redis");
    traffic.finish("Redis SIGSTOP 10 s", fault_at);
}

/// Three brokers (RF 3, min.insync.replicas 2): SIGKILL the leader of
/// `palaver.inbound` partition 0 mid-stream; it stays dead.
#[test]
fn sigkill_the_partition_leader_of_three_brokers() {
    let mut s = stack(3, 1);
    let traffic = Traffic::start(&s, SENDERS, PER_SENDER);
    traffic.wait_acked(BEFORE_FAULT);
    let leader = s.kafka.leader_of(INBOUND_TOPIC, 0).expect("leader");
    let fault_at = Instant::now();
    s.kafka.kill_node(leader);
    eprintln!(
        "killed node {}, leader of {INBOUND_TOPIC}/0",
        s.kafka.node_id(leader)
    );
    traffic.finish("SIGKILL the partition leader of 3 brokers", fault_at);
}
