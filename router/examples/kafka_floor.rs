//! The raw librdkafka produce→consume round trip: the floor every Palaver
//! latency figure is compared to. One message at a time: produce (the
//! router's producer settings: idempotent, acks=all, linger 1 ms), then
//! wait until a consumer (the router's long-poll fetch settings) reads it.
//!
//! `cargo run --release -p palaver-router --example kafka_floor -- [MESSAGES] [BROKERS]`
//!
//! Without BROKERS it starts its own single-node Kafka (tools' stack); with
//! BROKERS (e.g. the `kafka` port of `palaver cluster status`) it measures
//! that broker. Prints p50, p90, p99, max in µs.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use palaver_router::kafka::{producer_config, FETCH_WAIT_MAX_MS};
use palaver_testkit::stack::{create_topic, Kafka};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let messages: u64 = args.get(1).map_or(2_000, |a| a.parse().expect("MESSAGES"));
    let own;
    let brokers = match args.get(2) {
        Some(b) => b.clone(),
        None => {
            own = Kafka::start().expect("start Kafka");
            own.bootstrap()
        }
    };
    let topic = format!("palaver.floor.{}", std::process::id());
    create_topic(&brokers, &topic, 1).expect("create topic");

    let producer: ThreadedProducer<DefaultProducerContext> =
        producer_config(&brokers, 1).create().expect("producer");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "palaver-floor")
        .set("enable.auto.commit", "false")
        .set("fetch.min.bytes", "1")
        .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS)
        .set("socket.nagle.disable", "true")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::End).unwrap();
    consumer.assign(&tpl).expect("assign");
    // Warm up: the first record also waits for the assignment's first fetch.
    let mut hist = Histogram::<u64>::new(3).unwrap();
    for i in 0..(messages + 100) {
        let payload = i.to_string();
        let start = Instant::now();
        producer
            .send(BaseRecord::to(&topic).key("k").payload(&payload))
            .map_err(|(e, _)| e)
            .expect("enqueue");
        loop {
            match consumer.poll(Duration::from_secs(10)) {
                Some(Ok(m)) if m.payload() == Some(payload.as_bytes()) => break,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("consume: {e}"),
                None => panic!("record {i} not consumed within 10 s"),
            }
        }
        if i >= 100 {
            hist.record(start.elapsed().as_micros() as u64).unwrap();
        }
    }
    println!(
        "produce→consume, {messages} messages one at a time on {brokers}: \
         p50 {} µs, p90 {} µs, p99 {} µs, max {} µs",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.9),
        hist.value_at_quantile(0.99),
        hist.max()
    );
}
