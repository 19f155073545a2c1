//! The raw librdkafka produce→consume RATE on one broker: the ceiling the
//! Kafka path's throughput is compared to (the issue-11 ratio). One
//! producer with the router's/gateway's settings (idempotent, acks=all,
//! linger 1 ms) sends RECORDS records of BYTES bytes as fast as librdkafka
//! takes them to a fresh topic with PARTITIONS partitions (keys spread over
//! the partitions like conversation ids); one consumer with the router's
//! fetch settings reads them concurrently. Reported: records/s from the
//! first produce to the last record consumed, and the CPU this process used
//! (client side) per record.
//!
//! `cargo run --release -p palaver-router --example kafka_rate -- [RECORDS] [BYTES] [PARTITIONS] [BROKERS]`
//!
//! Without BROKERS it starts its own single-node Kafka (the test kit's);
//! with BROKERS (the `kafka` port of `palaver cluster status`) it measures
//! that broker.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use palaver_router::kafka::{producer_config, FETCH_WAIT_MAX_MS};
use palaver_testkit::stack::{create_topic, Kafka};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

fn cpu_seconds() -> f64 {
    palaver_testkit::proc_stat::cpu_seconds("/proc/self/stat")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let records: usize = args.get(1).map_or(500_000, |a| a.parse().expect("RECORDS"));
    let bytes: usize = args.get(2).map_or(200, |a| a.parse().expect("BYTES"));
    let partitions: u32 = args.get(3).map_or(8, |a| a.parse().expect("PARTITIONS"));
    let own;
    let brokers = match args.get(4) {
        Some(b) => b.clone(),
        None => {
            own = Kafka::start().expect("start Kafka");
            own.bootstrap()
        }
    };
    let topic = format!("palaver.rate.{}", std::process::id());
    create_topic(&brokers, &topic, partitions).expect("create topic");

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "palaver-rate")
        .set("enable.auto.commit", "false")
        .set("fetch.min.bytes", "1")
        .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS)
        .set("socket.nagle.disable", "true")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");

    let payload = vec![b'x'; bytes];
    let producer: ThreadedProducer<DefaultProducerContext> =
        producer_config(&brokers, 1).create().expect("producer");
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let produce = std::thread::scope(|scope| {
        let producing = scope.spawn(|| {
            for i in 0..records {
                let key = format!("dm:u{:05}:v{:05}", i % 1000, i % 1000);
                loop {
                    match producer.send(BaseRecord::to(&topic).key(&key).payload(&payload)) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                            std::thread::sleep(Duration::from_micros(200))
                        }
                        Err((e, _)) => panic!("produce: {e}"),
                    }
                }
            }
            producer.flush(Duration::from_secs(60)).expect("flush");
            start.elapsed()
        });
        let mut consumed = 0;
        while consumed < records {
            match consumer.poll(Duration::from_secs(10)) {
                Some(Ok(_)) => consumed += 1,
                Some(Err(e)) => panic!("consume: {e}"),
                None => panic!("only {consumed} of {records} consumed"),
            }
        }
        producing.join().expect("producer thread")
    });
    let total = start.elapsed();
    let cpu = cpu_seconds() - cpu0;
    println!(
        "{records} records of {bytes} B, {partitions} partitions, on {brokers}: \
         produced in {:.2} s, produce→consume {:.2} s = {:.0} records/s; \
         client CPU {:.1} µs/record",
        produce.as_secs_f64(),
        total.as_secs_f64(),
        records as f64 / total.as_secs_f64(),
        cpu * 1e6 / records as f64
    );
}
