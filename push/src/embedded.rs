//! The push worker in-process, for the embedded engine (a gateway with no
//! Kafka/Redis): the same decide → coalesce → send → handle-result code as
//! `palaver-push` ([`crate::dispatch`]), driven by a thread of its own
//! instead of the Kafka consumer loop.
//!
//! ```text
//! engine thread (store)                         push thread ("palaver-push")
//!   turn: requests → commit → push events        recv a batch (what is queued)
//!   + each event's PushContext read here ──────► coalesce per (user, conversation)
//!     (tokens, mute, read mark, badge)  bounded   Dispatcher::submit → Sender (APNs/FCM)
//!     full → dropped, counted, warned   channel   Dispatcher::settle
//!   ◄── Job::InvalidatePushToken ──────────────── TokenInvalid (410 / UNREGISTERED)
//!       applied in a turn (committed)             transient failure → retried with backoff
//! ```
//!
//! [`EmbeddedPush`] is the engine's [`PushSink`]: on the engine's thread it
//! only moves events into the bounded channel (`try_send`: never blocks the
//! engine; when the push thread is behind, the event is dropped, counted in
//! [`PushStats::queue_full`] and warned about at most every 10 s). The push
//! thread owns the [`Sender`] (and the tokio runtime its HTTP/2 clients run
//! on) and the [`Dispatcher`]; a dead token goes back to the engine through
//! [`PushFeedback`] and is removed there, in a turn, unless it was
//! registered again since.
//!
//! **What is not guaranteed.** The queue is in memory: pushes not yet sent
//! when the process stops are lost (the engine's push-pending mark stays
//! set, so that conversation's next message does not push either, until the
//! user connects). A batch whose pushes fail transiently (provider down
//! past the sender's own retries) is retried [`EmbeddedPushConfig::max_attempts`]
//! times with backoff, then given up ([`PushStats::abandoned`]); the
//! contexts are those read when the messages were stored.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TrySendError};
use palaver_router::bus::PushEvent;
use palaver_router::store::PushContext;
use palaver_router::{PushFeedback, PushSink};

use crate::backoff::Backoff;
use crate::dispatch::{
    coalesce, ContentPolicy, Decidable, Dispatcher, PushStats, TokenInvalidator,
};
use crate::{ProvidersConfig, PushError, Sender, SenderConfig};

/// Settings of the in-process push driver.
#[derive(Clone, Debug)]
pub struct EmbeddedPushConfig {
    pub content: ContentPolicy,
    /// How long a provider keeps trying to reach the device.
    pub ttl: Duration,
    /// Events the engine may queue for the push thread; more are dropped
    /// and counted ([`PushStats::queue_full`]).
    pub queue_capacity: usize,
    /// Events the push thread takes at once (then merged per conversation).
    pub max_batch: usize,
    /// Attempts at a batch's pushes that failed transiently, at most.
    pub max_attempts: u32,
    /// Pause between those attempts (doubling, jittered).
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// The sender's queues, concurrency and per-push retries.
    pub sender: SenderConfig,
}

impl Default for EmbeddedPushConfig {
    fn default() -> Self {
        Self {
            content: ContentPolicy::IdOnly,
            ttl: Duration::from_secs(24 * 3600),
            queue_capacity: 10_000,
            max_batch: 500,
            max_attempts: 5,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            sender: SenderConfig::default(),
        }
    }
}

/// One event and its context, as the engine hands them over.
type Handed = (PushEvent, PushContext);

/// A view of the driver's counters (cloneable, any thread).
#[derive(Clone, Debug)]
pub struct EmbeddedPushHandle {
    stats: Arc<Mutex<PushStats>>,
    queue_full: Arc<AtomicU64>,
    serves: Vec<String>,
}

impl EmbeddedPushHandle {
    /// The counters as of the push thread's last batch, and the drops.
    pub fn stats(&self) -> PushStats {
        let mut stats = *self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.queue_full = self.queue_full.load(Ordering::Relaxed);
        stats
    }

    /// The provider endpoints it can send to (empty: it only counts).
    pub fn serves(&self) -> &[String] {
        &self.serves
    }
}

/// The embedded engine's push sink (see the module doc).
pub struct EmbeddedPush {
    queue: crossbeam_channel::Sender<Handed>,
    feedback: Arc<OnceLock<PushFeedback>>,
    queue_full: Arc<AtomicU64>,
    /// When a full queue was last warned about, and drops since.
    warned: Option<Instant>,
    dropped_since_warning: u64,
}

impl EmbeddedPush {
    /// Builds the providers' clients from `providers` (none configured: the
    /// driver says so once and counts what it would have sent) and starts
    /// the push thread. Give the sink to the engine
    /// (`EmbeddedEngine::durable_with_push` or `with_store`); the handle
    /// reads the counters.
    pub fn start(
        providers: &ProvidersConfig,
        config: EmbeddedPushConfig,
    ) -> Result<(EmbeddedPush, EmbeddedPushHandle), PushError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("palaver-push-send")
            .enable_all()
            .build()
            .map_err(|e| PushError::Config(format!("cannot start the push runtime: {e}")))?;
        let (sender, routes) = if providers.is_empty() {
            tracing::warn!(
                "push: no provider configured ([apns] and/or [fcm] in the [push] providers \
                 file): nothing will be sent; the pushes that would have been are counted"
            );
            (
                Sender::builder(config.sender.clone()).start(runtime.handle()),
                Vec::new(),
            )
        } else {
            providers.build(config.sender.clone(), runtime.handle())?
        };
        let serves: Vec<String> = routes.iter().map(ToString::to_string).collect();
        if !serves.is_empty() {
            tracing::info!(
                "push: in-process push worker sending to {}",
                serves.join(", ")
            );
        }
        Ok(Self::spawn(runtime, sender, config, serves))
    }

    /// [`EmbeddedPush::start`] with a sender built by the caller (tests,
    /// benchmarks); `runtime` is where its tasks run, kept alive by the
    /// push thread.
    pub fn with_sender(
        runtime: tokio::runtime::Runtime,
        sender: Sender,
        config: EmbeddedPushConfig,
    ) -> (EmbeddedPush, EmbeddedPushHandle) {
        Self::spawn(runtime, sender, config, Vec::new())
    }

    fn spawn(
        runtime: tokio::runtime::Runtime,
        sender: Sender,
        config: EmbeddedPushConfig,
        serves: Vec<String>,
    ) -> (EmbeddedPush, EmbeddedPushHandle) {
        let (sink, inbox) = Self::sink(config.queue_capacity);
        let stats: Arc<Mutex<PushStats>> = Arc::default();
        let queue_full = sink.queue_full.clone();
        let mut driver = Driver {
            dispatcher: Dispatcher::new(sender, config.content, config.ttl, "embedded".into()),
            inbox,
            feedback: sink.feedback.clone(),
            published: stats.clone(),
            backoff: Backoff::new(config.retry_min, config.retry_max),
            config,
        };
        let spawned = std::thread::Builder::new()
            .name("palaver-push".into())
            .spawn(move || {
                driver.run();
                // The sender's tasks stop with their runtime, here and not
                // inside it.
                drop(driver);
                drop(runtime);
            });
        if let Err(e) = spawned {
            // The sink then finds the queue closed and counts drops.
            tracing::error!("push: cannot start the push thread: {e}");
        }
        (
            sink,
            EmbeddedPushHandle {
                stats,
                queue_full,
                serves,
            },
        )
    }

    /// The sink and the other end of its queue.
    fn sink(capacity: usize) -> (EmbeddedPush, Receiver<Handed>) {
        let (queue, inbox) = crossbeam_channel::bounded(capacity.max(1));
        (
            EmbeddedPush {
                queue,
                feedback: Arc::default(),
                queue_full: Arc::default(),
                warned: None,
                dropped_since_warning: 0,
            },
            inbox,
        )
    }

    fn dropped(&mut self, n: u64, why: &str) {
        self.queue_full.fetch_add(n, Ordering::Relaxed);
        self.dropped_since_warning += n;
        let now = Instant::now();
        if self
            .warned
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10))
        {
            tracing::warn!(
                dropped = self.dropped_since_warning,
                "push: {why}: push events dropped (the engine never waits for pushes)"
            );
            self.warned = Some(now);
            self.dropped_since_warning = 0;
        }
    }
}

impl PushSink for EmbeddedPush {
    fn push(&mut self, events: Vec<PushEvent>) {
        // Not called: this sink asks for contexts. Without one there is
        // nothing to decide from.
        self.dropped(events.len() as u64, "push events without their context");
    }

    fn wants_context(&self) -> bool {
        true
    }

    fn push_with_context(&mut self, events: Vec<(PushEvent, PushContext)>) {
        let mut dropped = 0;
        let mut why = "the push queue is full";
        for handed in events {
            match self.queue.try_send(handed) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => dropped += 1,
                Err(TrySendError::Disconnected(_)) => {
                    why = "the push thread is gone";
                    dropped += 1;
                }
            }
        }
        if dropped > 0 {
            self.dropped(dropped, why);
        }
    }

    fn attach(&mut self, engine: PushFeedback) {
        let _ = self.feedback.set(engine);
    }
}

/// The engine's store, through its thread, as the dispatcher's way to
/// remove dead tokens.
struct EngineTokens<'a>(Option<&'a PushFeedback>);

impl TokenInvalidator for EngineTokens<'_> {
    fn invalidate(
        &mut self,
        user_id: &str,
        device_id: &str,
        token: &str,
        since_ms: i64,
    ) -> Result<bool, String> {
        // Never an error: with the engine gone there is no store to fix.
        Ok(self
            .0
            .is_some_and(|f| f.invalidate_push_token(user_id, device_id, token, since_ms)))
    }
}

/// The push thread.
struct Driver {
    dispatcher: Dispatcher,
    inbox: Receiver<Handed>,
    feedback: Arc<OnceLock<PushFeedback>>,
    published: Arc<Mutex<PushStats>>,
    backoff: Backoff,
    config: EmbeddedPushConfig,
}

impl Driver {
    /// Batches until the engine (the sink) is gone.
    fn run(&mut self) {
        let mut last_report = Instant::now();
        let mut reported = PushStats::default();
        while let Ok(first) = self.inbox.recv() {
            let mut batch = vec![first];
            while batch.len() < self.config.max_batch.max(1) {
                match self.inbox.try_recv() {
                    Ok(handed) => batch.push(handed),
                    Err(_) => break,
                }
            }
            self.batch(batch);
            self.publish();
            let stats = self.dispatcher.stats;
            if stats != reported && last_report.elapsed() >= Duration::from_secs(60) {
                tracing::info!(stats = ?stats, "push: in-process push worker");
                reported = stats;
                last_report = Instant::now();
            }
        }
        tracing::info!(stats = ?self.dispatcher.stats, "push: in-process push worker stopped");
    }

    fn publish(&self) {
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) = self.dispatcher.stats;
    }

    /// One batch: merged, decided, sent; what failed transiently is tried
    /// again (what was delivered is not sent twice: the dispatcher
    /// remembers it).
    fn batch(&mut self, batch: Vec<Handed>) {
        let stats = &mut self.dispatcher.stats;
        stats.events += batch.len() as u64;
        let items = batch
            .into_iter()
            .enumerate()
            .map(|(origin, (event, context))| Decidable {
                origin,
                event,
                context: Some(context),
            })
            .collect();
        let (mut pending, merged) = coalesce(items);
        self.dispatcher.stats.coalesced += merged;
        let mut attempt = 0;
        while !pending.is_empty() {
            attempt += 1;
            let mut in_flight = Vec::new();
            let mut failure = None;
            let mut unsent_from = pending.len();
            for (i, item) in pending.iter().enumerate() {
                let Some(context) = &item.context else {
                    continue;
                };
                if let Err(e) =
                    self.dispatcher
                        .submit(item.origin, &item.event, context, &mut in_flight)
                {
                    failure = Some(format!("push sender: {e}"));
                    unsent_from = i;
                    break;
                }
            }
            let settled = self
                .dispatcher
                .settle(in_flight, &mut EngineTokens(self.feedback.get()));
            for (_, reason) in &settled.dead {
                self.dispatcher.stats.dead_lettered += 1;
                tracing::warn!("push: dropped for good: {reason}");
            }
            if let Some(e) = settled.failure {
                failure.get_or_insert(e);
            }
            let again: HashSet<usize> = settled.transient.into_iter().collect();
            pending = pending
                .into_iter()
                .enumerate()
                .filter(|(i, item)| *i >= unsent_from || again.contains(&item.origin))
                .map(|(_, item)| item)
                .collect();
            if pending.is_empty() {
                break;
            }
            let reason = failure.unwrap_or_default();
            if attempt >= self.config.max_attempts.max(1) {
                self.dispatcher.stats.abandoned += pending.len() as u64;
                tracing::error!(
                    events = pending.len(),
                    attempts = attempt,
                    "push: given up on these pushes: {reason}"
                );
                break;
            }
            self.dispatcher.stats.replays += 1;
            let pause = self.backoff.delay(attempt);
            tracing::warn!(
                events = pending.len(),
                "push: pushes not sent, trying again in {pause:?}: {reason}"
            );
            self.publish();
            std::thread::sleep(pause);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64) -> Handed {
        (
            PushEvent {
                user_id: format!("u{n}"),
                conversation_id: "c".into(),
                seq: n,
                message_id: String::new(),
                sender_user_id: String::new(),
                kind: 0,
                server_time_ms: 0,
                online_device_ids: Vec::new(),
            },
            PushContext::default(),
        )
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_never_blocks_the_engine() {
        let (mut sink, inbox) = EmbeddedPush::sink(2);
        assert!(sink.wants_context());
        sink.push_with_context((0..5).map(event).collect());
        assert_eq!(sink.queue_full.load(Ordering::Relaxed), 3);
        assert_eq!(inbox.len(), 2);
        // Room again: the next ones are queued.
        let _ = inbox.try_recv();
        sink.push_with_context(vec![event(5)]);
        assert_eq!(sink.queue_full.load(Ordering::Relaxed), 3);
        // The push thread gone: dropped and counted, not blocked.
        drop(inbox);
        sink.push_with_context(vec![event(6)]);
        assert_eq!(sink.queue_full.load(Ordering::Relaxed), 4);
    }
}
