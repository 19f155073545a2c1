//! rdkafka (bundled librdkafka) against a real Kafka broker: the settings the
//! router and gateway bridge rely on — idempotent producer with acks=all,
//! consumer group with manual commits, per-key order — work here.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use palaver_testkit::stack::Kafka;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

#[test]
fn idempotent_producer_and_committed_consumer_group_keep_per_key_order() {
    let kafka = Kafka::start().expect("start Kafka");
    kafka.create_topic("check", 3).expect("create topic");

    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .create()
        .expect("producer");
    let keys = ["a", "b", "c", "d"];
    let per_key = 50;
    for i in 0..per_key {
        for key in keys {
            let payload = format!("{key}:{i}");
            producer
                .send(BaseRecord::to("check").key(key).payload(&payload))
                .map_err(|(e, _)| e)
                .expect("enqueue");
        }
    }
    producer.flush(Duration::from_secs(30)).expect("flush");

    let consume = |expect: usize| -> Vec<(String, String)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap())
            .set("group.id", "check-group")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&["check"]).expect("subscribe");
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.len() < expect && Instant::now() < deadline {
            if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
                let msg = msg.expect("message");
                let key = String::from_utf8_lossy(msg.key().unwrap()).into_owned();
                let payload = String::from_utf8_lossy(msg.payload().unwrap()).into_owned();
                got.push((key, payload));
                consumer
                    .commit_message(&msg, CommitMode::Sync)
                    .expect("commit");
            }
        }
        got
    };

    let got = consume(keys.len() * per_key);
    assert_eq!(got.len(), keys.len() * per_key, "every record consumed");
    for key in keys {
        let seen: Vec<String> = got
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, p)| p.clone())
            .collect();
        let want: Vec<String> = (0..per_key).map(|i| format!("{key}:{i}")).collect();
        assert_eq!(seen, want, "order of key {key}");
    }

    // Everything was committed: the same group sees nothing more.
    producer
        .send(BaseRecord::to("check").key("a").payload("after"))
        .map_err(|(e, _)| e)
        .expect("enqueue");
    producer.flush(Duration::from_secs(30)).expect("flush");
    let again = consume(1);
    assert_eq!(again, vec![("a".to_string(), "after".to_string())]);
}

/// The 3-broker cluster (RF 3, min.insync.replicas 2): the partition's
/// leader is SIGKILLed between two acknowledged halves of a stream; the
/// idempotent producer moves to the new leader by itself and a consumer
/// reads every record exactly once, in order.
#[test]
fn three_brokers_survive_the_partition_leader_being_killed() {
    let mut kafka = Kafka::start_cluster(3).expect("start 3 Kafka brokers");
    kafka.create_topic("replicated", 1).expect("create topic");
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "60000")
        .create()
        .expect("producer");
    let send = |range: std::ops::Range<u32>| {
        for i in range {
            producer
                .send(
                    BaseRecord::to("replicated")
                        .key("k")
                        .payload(&i.to_string()),
                )
                .map_err(|(e, _)| e)
                .expect("enqueue");
        }
        producer.flush(Duration::from_secs(60)).expect("flush");
    };
    send(0..100);
    let leader = kafka.leader_of("replicated", 0).expect("leader");
    kafka.kill_node(leader);
    let killed = Instant::now();
    send(100..200);
    eprintln!(
        "leader node {} killed; the next 100 records were acknowledged {:.1} s later",
        kafka.node_id(leader),
        killed.elapsed().as_secs_f64()
    );
    let new_leader = kafka.leader_of("replicated", 0).expect("new leader");
    assert_ne!(new_leader, leader, "a surviving broker leads");

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("group.id", "replicated-check")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&["replicated"]).expect("subscribe");
    let mut got: Vec<u32> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < 200 && Instant::now() < deadline {
        if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
            // The dead broker is still in bootstrap.servers: librdkafka
            // reports its connection failures here; they are not fatal.
            let msg = match msg {
                Ok(msg) => msg,
                Err(e) => {
                    eprintln!("consumer: {e}");
                    continue;
                }
            };
            got.push(
                std::str::from_utf8(msg.payload().unwrap())
                    .unwrap()
                    .parse()
                    .unwrap(),
            );
        }
    }
    assert_eq!(got, (0..200).collect::<Vec<_>>(), "exactly once, in order");
}
