//! rdkafka (bundled librdkafka) against a real Kafka broker: the settings the
//! router and gateway bridge rely on — idempotent producer with acks=all,
//! consumer group with manual commits, per-key order — work here.

use std::time::{Duration, Instant};

use palaver_tools::stack::Kafka;
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
