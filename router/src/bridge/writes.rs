//! The gateway's producer of client writes to `palaver.inbound`, and its
//! replacement when it fails for good.
//!
//! An idempotent producer raises a fatal error when a broker answers out of
//! sequence (possible after a stall or a leader change it could not follow),
//! and from then on fails every write: the gateway would answer every
//! client write UNAVAILABLE until it was restarted. librdkafka's remedy is
//! a new instance with a new producer id. [`Writes::keep`] runs on a thread
//! of its own, woken by the failing producer's error callback: it makes the
//! new producer, swaps it in, and drops the old one, whose unacknowledged
//! writes are answered UNAVAILABLE through their delivery reports (clients
//! resend with the same client_msg_id; the router deduplicates).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use palaver_protocol::pb::ErrorCode;
use palaver_protocol::send_error_reply;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use crate::api::{DeliverySink, Outbound};
use crate::kafka;

/// Who to answer if a produced record is not acknowledged.
pub(super) struct PendingWrite {
    pub conn: u64,
    pub request_id: u32,
    pub client_msg_id: Vec<u8>,
}

/// Turns failed deliveries of client writes into `Error(UNAVAILABLE)`, and
/// wakes the keeper when the producer fails for good.
pub(super) struct ProduceContext {
    sink: Arc<dyn DeliverySink>,
    fatal: Sender<()>,
}

impl ClientContext for ProduceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::error!("librdkafka: {error}: {reason}");
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            let _ = self.fatal.try_send(());
        }
    }
}

impl ProducerContext for ProduceContext {
    type DeliveryOpaque = Box<Option<PendingWrite>>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Self::DeliveryOpaque) {
        if let (Err((error, _)), Some(pending)) = (result, *pending) {
            self.sink.deliver(vec![unavailable(
                pending,
                format!("the message bus did not accept the request ({error}); retry"),
            )]);
        }
    }
}

fn unavailable(pending: PendingWrite, message: String) -> Outbound {
    Outbound {
        conn: pending.conn,
        frame: send_error_reply(
            pending.request_id,
            pending.client_msg_id,
            ErrorCode::Unavailable,
            message,
        ),
        answers_request: true,
    }
}

/// The current producer of client writes (read by core threads on every
/// write, replaced by [`Writes::keep`]).
pub(super) struct Writes {
    current: RwLock<ThreadedProducer<ProduceContext>>,
    config: ClientConfig,
    sink: Arc<dyn DeliverySink>,
    fatal_tx: Sender<()>,
    fatal_rx: Receiver<()>,
    replaced: AtomicU64,
}

impl Writes {
    /// A producer made from `config`; failed writes are answered through `sink`.
    pub fn new(config: ClientConfig, sink: Arc<dyn DeliverySink>) -> Result<Self, String> {
        // One slot: a wake-up, not a queue of errors.
        let (fatal_tx, fatal_rx) = crossbeam_channel::bounded(1);
        let producer = Self::create(&config, &sink, &fatal_tx)?;
        Ok(Self {
            current: RwLock::new(producer),
            config,
            sink,
            fatal_tx,
            fatal_rx,
            replaced: AtomicU64::new(0),
        })
    }

    fn create(
        config: &ClientConfig,
        sink: &Arc<dyn DeliverySink>,
        fatal: &Sender<()>,
    ) -> Result<ThreadedProducer<ProduceContext>, String> {
        config
            .create_with_context(ProduceContext {
                sink: sink.clone(),
                fatal: fatal.clone(),
            })
            .map_err(|e| format!("Kafka producer: {e}"))
    }

    fn producer(&self) -> std::sync::RwLockReadGuard<'_, ThreadedProducer<ProduceContext>> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `value` for `topic`; `pending` is answered UNAVAILABLE if Kafka
    /// does not take it (now, or when its delivery report says so).
    pub fn send(&self, topic: &str, key: &[u8], value: &[u8], pending: Option<PendingWrite>) {
        let producer = self.producer();
        let record = BaseRecord::with_opaque_to(topic, Box::new(pending))
            .key(key)
            .payload(value);
        if let Err((e, record)) = producer.send(record) {
            if e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
                let _ = self.fatal_tx.try_send(());
            }
            match *record.delivery_opaque {
                // Not even queued (queue full, or the producer failed).
                Some(pending) => self.sink.deliver(vec![unavailable(
                    pending,
                    format!("the message bus is not accepting requests ({e}); retry"),
                )]),
                None => tracing::warn!(topic, "record not produced: {e}"),
            }
        }
    }

    /// Waits up to `timeout` for every queued write to be acknowledged.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer().flush(timeout);
    }

    /// Producers replaced so far.
    pub fn replaced(&self) -> u64 {
        self.replaced.load(Ordering::Relaxed)
    }

    /// Raises a fatal error on the current producer (see
    /// [`kafka::raise_fatal_error`]): for fault tests.
    pub fn raise_fatal_error(&self, reason: &str) {
        kafka::raise_fatal_error(self.producer().client(), reason);
    }

    /// The keeper: replaces the producer whenever it has failed for good,
    /// until `stop` (then [`Writes::wake`]). Also looks once a second, in
    /// case a wake-up was missed.
    pub fn keep(&self, stop: &AtomicBool) {
        while !stop.load(Ordering::Acquire) {
            let _ = self.fatal_rx.recv_timeout(Duration::from_secs(1));
            if stop.load(Ordering::Acquire) {
                return;
            }
            let Some(fatal) = kafka::fatal_error(self.producer().client()) else {
                continue;
            };
            let fresh = match Self::create(&self.config, &self.sink, &self.fatal_tx) {
                Ok(fresh) => fresh,
                Err(e) => {
                    tracing::error!(
                        "Kafka producer failed for good ({fatal}); a new one could not be made ({e}); trying again"
                    );
                    continue;
                }
            };
            let old = std::mem::replace(
                &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
                fresh,
            );
            self.replaced.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "Kafka producer failed for good ({fatal}); replaced by a new one, \
                 writes the old one held are answered UNAVAILABLE"
            );
            // Outside the lock: dropping purges the old producer's queue and
            // serves its delivery reports (UNAVAILABLE to those clients).
            drop(old);
        }
    }

    /// Wakes the keeper (to see `stop`).
    pub fn wake(&self) {
        let _ = self.fatal_tx.try_send(());
    }
}
