//! The router tier on Kafka: topic names, client settings, the internal
//! record schema (`router/proto/palaver_internal.proto`) and its conversions,
//! and the router worker ([`worker`]).
//!
//! Topics:
//! - `palaver.inbound`: client writes from every gateway, keyed by
//!   [`Inbound::partition_key`] (conversation id, else user id), so one
//!   conversation is processed in order by one router.
//! - `palaver.deliver.<gateway_id>`: [`records::DeliveryBatch`]es for one
//!   gateway's connections (created by that gateway when it starts).
//! - `palaver.push`: [`records::PushRecord`]s for push workers, keyed by user.
//! - `palaver.stored`: [`records::StoredRecord`]s, the messages routers stored,
//!   keyed by conversation, for the history archiver ([`archiver`]); only
//!   with an archive configured.
//! - `palaver.dlq`: [`records::DeadLetter`]s, records a worker gave up on.
//!
//! Every worker on Kafka runs the one at-least-once loop of
//! [`consumer_loop`] with a handler of its own: the router worker
//! ([`worker`]) and the history archiver ([`archiver`]).

pub mod archiver;
pub mod consumer_loop;
pub mod worker;

use std::ffi::CString;
use std::time::Duration;

use palaver_protocol::pb;
use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{Client, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use crate::api::{Inbound, Outbound, Session, SessionAddr};
use crate::bus::ChannelPost;

/// Generated types of `palaver.internal.v1`.
pub mod records {
    include!(concat!(env!("OUT_DIR"), "/palaver.internal.v1.rs"));
}

impl From<records::PushEvent> for crate::bus::PushEvent {
    /// An event as a push worker reads it from `palaver.push`.
    fn from(e: records::PushEvent) -> Self {
        crate::bus::PushEvent {
            user_id: e.user_id,
            conversation_id: e.conversation_id,
            seq: e.seq,
            message_id: e.message_id,
            sender_user_id: e.sender_user_id,
            kind: e.kind,
            server_time_ms: e.server_time_ms,
            online_device_ids: e.online_device_ids,
        }
    }
}

impl From<crate::bus::PushEvent> for records::PushEvent {
    /// An event as the router writes it to `palaver.push`.
    fn from(e: crate::bus::PushEvent) -> Self {
        records::PushEvent {
            user_id: e.user_id,
            conversation_id: e.conversation_id,
            seq: e.seq,
            message_id: e.message_id,
            sender_user_id: e.sender_user_id,
            kind: e.kind,
            server_time_ms: e.server_time_ms,
            online_device_ids: e.online_device_ids,
        }
    }
}

pub const INBOUND_TOPIC: &str = "palaver.inbound";
pub const PUSH_TOPIC: &str = "palaver.push";
pub const DLQ_TOPIC: &str = "palaver.dlq";
pub const STORED_TOPIC: &str = "palaver.stored";
/// Channel posts (SPEC §21), read by every gateway.
pub const CHANNELS_TOPIC: &str = "palaver.channels";
pub(crate) const DELIVERY_TOPIC_PREFIX: &str = "palaver.deliver.";

/// Default partition count of `palaver.inbound` when the router creates it.
pub const DEFAULT_INBOUND_PARTITIONS: i32 = 8;

/// A DeliveryBatch record is split before it grows past this (Kafka's
/// default max message size is 1 MiB).
pub const MAX_DELIVERY_RECORD_BYTES: usize = 512 * 1024;

/// The delivery topic of one gateway.
pub fn delivery_topic(gateway_id: &str) -> String {
    format!("{DELIVERY_TOPIC_PREFIX}{gateway_id}")
}

/// Gateway ids become topic names: 1..=200 of `[A-Za-z0-9._-]`.
pub fn check_gateway_id(gateway_id: &str) -> Result<(), String> {
    let ok = !gateway_id.is_empty()
        && gateway_id.len() <= 200
        && gateway_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "gateway id {gateway_id:?} must be 1-200 characters of A-Z a-z 0-9 . _ - \
             (it names the Kafka topic palaver.deliver.<id>)"
        ))
    }
}

/// Consumers' `fetch.wait.max.ms`: how long the broker holds an empty fetch.
/// With `fetch.min.bytes` 1 a fetch returns as soon as data arrives, so
/// this is not added to latency; it only sets how often an idle consumer
/// asks again: twice a second per consumer and broker (Kafka's own default;
/// at 200 ms an idle `palaver cluster up` cost the broker ~2.5 % of a CPU).
pub const FETCH_WAIT_MAX_MS: &str = "2000";

/// Cap of librdkafka's exponential reconnect back-off (default 10 s): after
/// a broker restart, clients are back within a second of it listening.
pub const RECONNECT_BACKOFF_MAX_MS: &str = "1000";

/// Consumer settings of a consumer-group member (the workers on
/// [`consumer_loop`]): offsets committed by the loop after its output is
/// acknowledged, a group session of `session_timeout` (a dead member's
/// partitions move after it; at least the broker's
/// group.min.session.timeout.ms, 6 s by default), long polls.
pub fn consumer_config(brokers: &str, group_id: &str, session_timeout: Duration) -> ClientConfig {
    let mut config = ClientConfig::new();
    // librdkafka debug contexts (e.g. "cgrp,topic"), logged through `log`.
    if let Ok(debug) = std::env::var("PALAVER_KAFKA_DEBUG") {
        config.set("debug", debug);
    }
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (session_timeout.as_millis() / 3).max(500).to_string(),
        )
        // Long poll: the broker answers a fetch as soon as one byte is
        // there (fetch.min.bytes 1), else after fetch.wait.max.ms. The wait
        // bounds only how often an idle consumer asks, not latency.
        .set("fetch.min.bytes", "1")
        .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS)
        .set("reconnect.backoff.max.ms", RECONNECT_BACKOFF_MAX_MS)
        .set("socket.nagle.disable", "true");
    config
}

/// Producer settings shared by routers and gateways: idempotent, acks=all
/// (the durability gate), a short linger so records produced together
/// (a router batch's output, many clients' sends) share a request.
pub fn producer_config(brokers: &str, linger_ms: u32) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger_ms.to_string())
        .set("message.timeout.ms", "10000")
        .set("reconnect.backoff.max.ms", RECONNECT_BACKOFF_MAX_MS)
        .set("socket.nagle.disable", "true");
    config
}

/// The fatal error of a client, if it has one. An idempotent producer
/// raises one when it can no longer keep its promise (a broker answered out
/// of sequence, typically after a stall or a leader change it could not
/// follow); from then on it fails every write, and librdkafka's remedy is a
/// new instance (a new producer id). Gateways and routers replace theirs.
pub fn fatal_error<C: ClientContext>(client: &Client<C>) -> Option<String> {
    client
        .fatal_error()
        .map(|(code, reason)| format!("{code}: {reason}"))
}

/// Raises a fatal error on `client` the way librdkafka does when a broker
/// answers out of sequence (`rd_kafka_test_fatal_error`, librdkafka's own
/// fault-injection call): for the tests of the recovery.
#[allow(unsafe_code)]
pub fn raise_fatal_error<C: ClientContext>(client: &Client<C>, reason: &str) {
    let reason = CString::new(reason.replace('\0', " ")).unwrap_or_default();
    // SAFETY: `native_ptr` is the live handle `client` owns for the whole
    // call, and `reason` is a NUL-terminated string librdkafka copies.
    unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            client.native_ptr(),
            rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        );
    }
}

/// Creates the topics that do not exist yet (existing ones are left alone).
pub fn ensure_topics(
    brokers: &str,
    topics: &[(&str, i32)],
    timeout: Duration,
) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| format!("Kafka admin client for {brokers}: {e}"))?;
    let new_topics: Vec<NewTopic> = topics
        .iter()
        // -1: the cluster's default.replication.factor (1 on a single
        // node, 3 on the 3-broker test cluster).
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(-1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(timeout));
    let results = futures_executor::block_on(admin.create_topics(&new_topics, &options))
        .map_err(|e| format!("create topics on {brokers}: {e}"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(format!("create topic {name}: {code}")),
        }
    }
    // The controller has the topics now; on a multi-broker cluster the
    // broker a client asks next may not know them yet. Wait until metadata
    // shows every partition with a leader.
    let deadline = std::time::Instant::now() + timeout;
    for (name, _) in topics {
        loop {
            let led = admin
                .inner()
                .fetch_metadata(Some(name), Duration::from_secs(2))
                .map(|md| {
                    md.topics().iter().any(|t| {
                        t.name() == *name
                            && t.error().is_none()
                            && !t.partitions().is_empty()
                            && t.partitions().iter().all(|p| p.leader() >= 0)
                    })
                })
                .unwrap_or(false);
            if led {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("topic {name} has no leader for every partition"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// The record a gateway writes to `palaver.inbound` for a client request.
pub fn inbound_record(request: &Inbound) -> records::InboundRecord {
    records::InboundRecord {
        user_id: request.from.user_id.clone(),
        device_id: request.from.device_id.clone(),
        gateway_id: request.from.addr.gateway_id.to_string(),
        conn: request.from.addr.conn,
        request_id: request.request_id,
        received_ms: request.received_ms,
        frame: Some(pb::Frame {
            request_id: request.request_id,
            body: Some(request.body.clone()),
        }),
    }
}

/// Decodes an inbound record value into the client request it carries.
pub fn decode_inbound(value: &[u8]) -> Result<Inbound, String> {
    let record = records::InboundRecord::decode(value)
        .map_err(|e| format!("inbound record is not an InboundRecord: {e}"))?;
    let body = record
        .frame
        .and_then(|f| f.body)
        .ok_or("inbound record without a request body")?;
    if record.user_id.is_empty() || record.gateway_id.is_empty() {
        return Err("inbound record without user or gateway id".into());
    }
    Ok(Inbound {
        from: Session {
            user_id: record.user_id,
            device_id: record.device_id,
            addr: SessionAddr {
                gateway_id: record.gateway_id.into(),
                conn: record.conn,
            },
        },
        request_id: record.request_id,
        body,
        received_ms: record.received_ms,
    })
}

/// Encodes frames for one gateway as DeliveryBatch record values, split so
/// no record exceeds [`MAX_DELIVERY_RECORD_BYTES`] (a single larger frame
/// gets a record of its own). Order is kept.
pub fn encode_delivery_batches(frames: Vec<Outbound>) -> Vec<Vec<u8>> {
    let mut values = Vec::new();
    let mut batch = records::DeliveryBatch::default();
    let mut size = 0;
    for Outbound {
        conn,
        frame,
        answers_request,
    } in frames
    {
        let delivery = records::Delivery {
            conn,
            frame: Some(frame),
            answers_request: Some(answers_request),
        };
        let len = delivery.encoded_len() + 8;
        if size + len > MAX_DELIVERY_RECORD_BYTES && !batch.deliveries.is_empty() {
            values.push(std::mem::take(&mut batch).encode_to_vec());
            size = 0;
        }
        size += len;
        batch.deliveries.push(delivery);
    }
    if !batch.deliveries.is_empty() {
        values.push(batch.encode_to_vec());
    }
    values
}

/// A channel post as a `palaver.channels` record value.
pub fn encode_channel_post(post: ChannelPost) -> Vec<u8> {
    let (from_gateway_id, from_conn) = match post.from {
        Some(addr) => (addr.gateway_id.to_string(), addr.conn),
        None => (String::new(), 0),
    };
    records::ChannelPostRecord {
        conversation_id: post.conversation_id,
        frame: Some(post.frame),
        last_seq: post.last_seq,
        from_gateway_id,
        from_conn,
    }
    .encode_to_vec()
}

/// Decodes a `palaver.channels` record value.
pub fn decode_channel_post(value: &[u8]) -> Result<ChannelPost, String> {
    let record = records::ChannelPostRecord::decode(value)
        .map_err(|e| format!("channel record is not a ChannelPostRecord: {e}"))?;
    let frame = record
        .frame
        .ok_or_else(|| "channel post without a frame".to_string())?;
    let from = (!record.from_gateway_id.is_empty()).then(|| SessionAddr {
        gateway_id: record.from_gateway_id.into(),
        conn: record.from_conn,
    });
    Ok(ChannelPost {
        conversation_id: record.conversation_id,
        frame,
        last_seq: record.last_seq,
        from,
    })
}

/// Decodes a DeliveryBatch record value.
pub fn decode_delivery_batch(value: &[u8]) -> Result<Vec<Outbound>, String> {
    let batch = records::DeliveryBatch::decode(value)
        .map_err(|e| format!("delivery record is not a DeliveryBatch: {e}"))?;
    batch
        .deliveries
        .into_iter()
        .map(|d| {
            d.frame
                .map(|frame| Outbound {
                    conn: d.conn,
                    answers_request: d
                        .answers_request
                        .unwrap_or_else(|| palaver_protocol::bodies::answers_request(&frame)),
                    frame,
                })
                .ok_or_else(|| "delivery without a frame".to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::frame::Body;

    #[test]
    fn push_events_round_trip_through_their_record() {
        let event = crate::bus::PushEvent {
            user_id: "bob".into(),
            conversation_id: "dm:alice:bob".into(),
            seq: 7,
            message_id: "m-7".into(),
            sender_user_id: "alice".into(),
            kind: pb::ContentKind::Text as i32,
            server_time_ms: 1_767_225_600_000,
            online_device_ids: vec!["desktop".into()],
        };
        let value = records::PushRecord {
            user_id: "bob".into(),
            events: vec![records::PushEvent::from(event.clone())],
        }
        .encode_to_vec();
        let decoded = records::PushRecord::decode(value.as_slice()).unwrap();
        assert_eq!(
            decoded
                .events
                .into_iter()
                .map(crate::bus::PushEvent::from)
                .collect::<Vec<_>>(),
            [event]
        );
    }

    #[test]
    fn inbound_round_trip() {
        let inbound = Inbound {
            from: Session {
                user_id: "alice".into(),
                device_id: "phone".into(),
                addr: SessionAddr {
                    gateway_id: "gw-1".into(),
                    conn: 77,
                },
            },
            request_id: 9,
            body: Body::Typing(pb::Typing {
                conversation_id: "dm:a:b".into(),
                active: true,
                user_id: String::new(),
            }),
            received_ms: 123,
        };
        let value = inbound_record(&inbound).encode_to_vec();
        assert_eq!(decode_inbound(&value).unwrap(), inbound);
        assert!(decode_inbound(b"\xff\xff").is_err());
        assert!(decode_inbound(&[]).is_err(), "no body");
    }

    #[test]
    fn delivery_batches_split_and_keep_order() {
        let frames: Vec<Outbound> = (0..300u64)
            .map(|i| Outbound {
                conn: i,
                frame: pb::Frame {
                    request_id: 0,
                    body: Some(Body::Pong(pb::Pong { nonce: i })),
                },
                // A Pong never answers by itself: the flag is carried.
                answers_request: i % 3 == 0,
            })
            .collect();
        let one = encode_delivery_batches(frames.clone());
        assert_eq!(one.len(), 1);
        assert_eq!(decode_delivery_batch(&one[0]).unwrap(), frames);

        let big: Vec<Outbound> = (0..3u64)
            .map(|i| Outbound {
                conn: i,
                frame: pb::Frame {
                    request_id: 0,
                    body: Some(Body::Error(pb::Error {
                        code: 1,
                        message: "x".repeat(300 * 1024),
                        client_msg_id: vec![],
                    })),
                },
                answers_request: false,
            })
            .collect();
        let split = encode_delivery_batches(big.clone());
        assert_eq!(split.len(), 3);
        let back: Vec<Outbound> = split
            .iter()
            .flat_map(|v| decode_delivery_batch(v).unwrap())
            .collect();
        assert_eq!(back, big);
    }

    #[test]
    fn a_delivery_from_a_router_without_the_answers_flag_is_judged_by_its_frame() {
        let old = |request_id, body| records::DeliveryBatch {
            deliveries: vec![records::Delivery {
                conn: 1,
                frame: Some(pb::Frame {
                    request_id,
                    body: Some(body),
                }),
                answers_request: None,
            }],
        };
        let answers = |batch: records::DeliveryBatch| {
            decode_delivery_batch(&batch.encode_to_vec()).unwrap()[0].answers_request
        };
        assert!(answers(old(0, Body::SendAck(Default::default()))));
        assert!(answers(old(4, Body::MembersChanged(Default::default()))));
        assert!(!answers(old(0, Body::MembersChanged(Default::default()))));
        assert!(!answers(old(0, Body::Deliver(Default::default()))));
    }

    #[test]
    fn gateway_ids_are_topic_safe() {
        assert!(check_gateway_id("gw-1.a_b").is_ok());
        assert!(check_gateway_id("").is_err());
        assert!(check_gateway_id("gw/1").is_err());
        assert!(check_gateway_id(&"a".repeat(201)).is_err());
    }
}
