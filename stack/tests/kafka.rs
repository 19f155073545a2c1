//! A real single-node Kafka through the stack's own wire requests: the
//! readiness wait (metadata + probe topic), topic creation with a partition
//! count, and partition leaders.
// A test: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used)]

use palaver_stack::Kafka;

#[test]
fn a_started_kafka_creates_topics_and_names_their_leaders() {
    let kafka = Kafka::start().unwrap();
    kafka.create_topic("palaver.test", 3).unwrap();
    // Existing: left alone, no error.
    kafka.create_topic("palaver.test", 3).unwrap();
    for partition in 0..3 {
        assert_eq!(kafka.leader_of("palaver.test", partition).unwrap(), 0);
    }
    assert!(kafka.leader_of("palaver.test", 3).is_err());
    assert!(kafka.leader_of("palaver.no-such-topic", 0).is_err());
}
