//! The embedded engine: the [`Router`] over a [`MemoryStore`], fed by a
//! crossbeam channel (the in-process bus). Implements [`Backend`], so a
//! gateway with no Kafka/Redis configured is a complete single-node chat
//! server. Several gateways may attach to one engine.
//!
//! The worker drains whatever is queued (up to a batch), runs each request
//! through the router, then hands the frames to the gateways' sinks: one
//! `deliver` call per gateway per batch, in order per connection. Where the
//! worker runs is the only difference between the two modes, which share
//! every line of it (`Worker::turn`):
//!
//! - [`EmbeddedEngine::new`]: on a thread of its own, woken by the channel.
//! - [`EmbeddedEngine::hosted`]: on a gateway core thread's event loop
//!   ([`Backend::take_host`] → [`BackendHost::run_turn`]): the core's own
//!   requests are handled at the end of its turn with no thread hop; other
//!   threads' requests wake that core through the `wake` it gave. If that
//!   core exits before the engine is shut down, the worker moves to a
//!   thread of its own (other gateways may still be attached).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use palaver_protocol::pb;

use crate::api::{Backend, BackendError, BackendHost, DeliverySink, Inbound, Outbound, Session};
use crate::bus::{group_by_gateway, ChannelPost, Output, PushEvent};
use crate::disk::DiskStore;
use crate::logic::{Clock, Router, RouterConfig, SystemClock};
use crate::memory::MemoryStore;
use crate::store::{PushContext, SessionChange, Store, StoreResult};

/// Where the embedded engine sends push events: the in-process push driver
/// (`palaver_push::embedded`, when the gateway's `[push]` section names
/// provider credentials) or the default [`LoggingPushSink`]. Called on the
/// engine's thread at the end of a turn, after the turn's commit: it must
/// not block (hand the events over a bounded queue, drop and count when
/// full).
pub trait PushSink: Send + 'static {
    fn push(&mut self, events: Vec<PushEvent>);

    /// True for a sink that decides pushes itself: the engine then reads
    /// each event's [`PushContext`] (tokens, mute, read mark, badge) from
    /// its store, on its own thread where the store lives, and calls
    /// [`PushSink::push_with_context`] instead of [`PushSink::push`].
    fn wants_context(&self) -> bool {
        false
    }

    /// The events with their contexts, read at the end of the turn (an
    /// event whose context could not be read is logged and left out).
    fn push_with_context(&mut self, events: Vec<(PushEvent, PushContext)>) {
        self.push(events.into_iter().map(|(e, _)| e).collect());
    }

    /// Called once when the engine is built, with the way back into its
    /// store (a provider reporting a token dead).
    fn attach(&mut self, _engine: PushFeedback) {}
}

/// A push sink's way back into the embedded engine's store: queued to the
/// engine's thread like a request and applied there, in order with the
/// requests, inside a turn (so the durable store commits it). Cloneable;
/// harmless once the engine is gone.
#[derive(Clone)]
pub struct PushFeedback {
    jobs: Sender<Job>,
    wake: Arc<OnceLock<Arc<dyn Fn() + Send + Sync>>>,
}

impl PushFeedback {
    /// A provider said `token` of `user_id`'s `device_id` is dead since
    /// `invalidated_ms`: the engine removes the registration unless it
    /// changed or was renewed since ([`crate::store::PushStore::invalidate_push_token`]).
    /// False when the engine is gone.
    pub fn invalidate_push_token(
        &self,
        user_id: &str,
        device_id: &str,
        token: &str,
        invalidated_ms: i64,
    ) -> bool {
        let job = Job::InvalidatePushToken {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            token: token.to_owned(),
            invalidated_ms,
        };
        if self.jobs.send(job).is_err() {
            return false;
        }
        if let Some(wake) = self.wake.get() {
            wake();
        }
        true
    }
}

/// Default push sink: counts push events and logs them at debug level.
#[derive(Clone, Debug, Default)]
pub struct LoggingPushSink {
    count: Arc<AtomicU64>,
}

impl LoggingPushSink {
    /// Push events seen so far (shared with clones).
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl PushSink for LoggingPushSink {
    fn push(&mut self, events: Vec<PushEvent>) {
        self.count.fetch_add(events.len() as u64, Ordering::Relaxed);
        for e in events {
            tracing::debug!(
                user = %e.user_id,
                conversation = %e.conversation_id,
                seq = e.seq,
                "push notification (embedded mode: not sent)"
            );
        }
    }
}

/// A store the embedded engine runs on: the router's store traits, and the
/// end of a turn. Every answer of a turn (SendAck, deliveries, any reply
/// that reports a write) leaves only after [`EngineStore::end_turn`]
/// returned Ok; on an error the turn's requests are all answered
/// UNAVAILABLE instead and its other output is dropped.
pub trait EngineStore: Store + Send + 'static {
    /// Makes the turn's writes durable (group commit).
    fn end_turn(&mut self) -> StoreResult<()>;
}

/// Ephemeral: nothing outlives the process, nothing to commit.
impl EngineStore for MemoryStore {
    fn end_turn(&mut self) -> StoreResult<()> {
        Ok(())
    }
}

/// Durable: one fsync'd commit per turn ([`DiskStore::commit`]).
impl EngineStore for DiskStore {
    fn end_turn(&mut self) -> StoreResult<()> {
        self.commit()
    }
}

/// Settings of the embedded engine itself.
#[derive(Clone, Debug)]
pub struct EmbeddedConfig {
    pub router: RouterConfig,
    /// Requests queued for the worker beyond this are answered
    /// `Error(UNAVAILABLE)` at once instead of queued. Session events are
    /// always queued (dropping one would corrupt presence).
    pub max_queued_requests: usize,
    /// Requests and session changes processed before the worker flushes
    /// output to the sinks.
    pub max_commands_per_flush: usize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            router: RouterConfig::default(),
            max_queued_requests: 100_000,
            max_commands_per_flush: 512,
        }
    }
}

/// The gateways attached, by id. Written by `start` (rare); the worker keeps
/// its own copy and re-reads it only when `version` moved, so delivering
/// takes no lock.
#[derive(Default)]
struct Sinks {
    map: RwLock<HashMap<String, Arc<dyn DeliverySink>>>,
    version: AtomicU64,
}

impl Sinks {
    fn get(&self, gateway_id: &str) -> Option<Arc<dyn DeliverySink>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(gateway_id)
            .cloned()
    }
}

enum Job {
    /// A connection completed Hello or closed; applied with the others of
    /// the same engine batch, before any later request.
    Session(SessionChange),
    /// Requests of one gateway core thread's turn, in order.
    Requests(Vec<Inbound>),
    /// From the push sink ([`PushFeedback`]): a provider reported a token
    /// dead.
    InvalidatePushToken {
        user_id: String,
        device_id: String,
        token: String,
        invalidated_ms: i64,
    },
    Stop,
}

/// Where the worker runs.
enum Mode {
    /// On its own thread (`None` once stopped).
    Threaded(Option<JoinHandle<()>>),
    /// On a host's loop: the worker waits here until a gateway takes it
    /// (`None` once taken or stopped).
    Hosted(Option<Box<dyn Turns>>),
}

pub struct EmbeddedEngine {
    jobs: Sender<Job>,
    sinks: Arc<Sinks>,
    queued_requests: Arc<AtomicUsize>,
    max_queued_requests: usize,
    /// Shared with the host, which hands the worker back when it stops.
    mode: Arc<Mutex<Mode>>,
    /// Hosted mode: tells the host that work arrived (set by `take_host`;
    /// after the host stopped, a harmless call into its dead core's waker).
    /// Shared with the push sink's [`PushFeedback`].
    wake: Arc<OnceLock<Arc<dyn Fn() + Send + Sync>>>,
    /// `shutdown` was called: `start` refuses from now on. Set under `mode`'s
    /// lock, so a host handing the worker back sees it.
    stopped: Arc<AtomicBool>,
    /// Requests the worker gave up on (see [`EmbeddedEngine::dead_letters`]).
    dead_letters: Arc<AtomicU64>,
}

impl EmbeddedEngine {
    /// Requests given up on so far: answered INTERNAL because handling them
    /// panicked (a bug, logged with its message), or UNAVAILABLE.
    pub fn dead_letters(&self) -> u64 {
        self.dead_letters.load(Ordering::Relaxed)
    }

    /// An engine on a thread of its own, with the system clock and a
    /// logging push sink.
    pub fn new(config: EmbeddedConfig) -> Self {
        Self::with_parts(config, Arc::new(SystemClock), LoggingPushSink::default())
    }

    /// An engine with no thread of its own: the first gateway that calls
    /// [`Backend::take_host`] runs it on one of its core threads. Until then
    /// work only queues. Other gateways may attach as to any engine; their
    /// requests wake the host.
    pub fn hosted(config: EmbeddedConfig) -> Self {
        Self::build(
            config,
            Arc::new(SystemClock),
            Box::new(LoggingPushSink::default()),
            false,
        )
    }

    /// A threaded engine with an injected clock and push sink (tests).
    pub fn with_parts(
        config: EmbeddedConfig,
        clock: Arc<dyn Clock>,
        push_sink: impl PushSink,
    ) -> Self {
        Self::build(config, clock, Box::new(push_sink), true)
    }

    /// A hosted engine with an injected clock and push sink (tests).
    pub fn hosted_with_parts(
        config: EmbeddedConfig,
        clock: Arc<dyn Clock>,
        push_sink: impl PushSink,
    ) -> Self {
        Self::build(config, clock, Box::new(push_sink), false)
    }

    /// A threaded engine on the durable store (`palaver-gateway`'s
    /// default): its own thread, so the fsync of each turn never holds a
    /// gateway core's event loop.
    pub fn durable(config: EmbeddedConfig, store: DiskStore) -> Self {
        Self::on_store(
            store,
            config,
            Arc::new(SystemClock),
            Box::new(LoggingPushSink::default()),
            true,
        )
    }

    /// An engine on any [`EngineStore`] (`threaded`: on its own thread,
    /// else hosted), with an injected clock and push sink (tests).
    pub fn with_store<S: EngineStore>(
        store: S,
        config: EmbeddedConfig,
        clock: Arc<dyn Clock>,
        push_sink: impl PushSink,
        threaded: bool,
    ) -> Self {
        Self::on_store(store, config, clock, Box::new(push_sink), threaded)
    }

    fn build(
        config: EmbeddedConfig,
        clock: Arc<dyn Clock>,
        push_sink: Box<dyn PushSink>,
        threaded: bool,
    ) -> Self {
        Self::on_store(MemoryStore::new(), config, clock, push_sink, threaded)
    }

    fn on_store<S: EngineStore>(
        store: S,
        config: EmbeddedConfig,
        clock: Arc<dyn Clock>,
        mut push_sink: Box<dyn PushSink>,
        threaded: bool,
    ) -> Self {
        let (jobs, inbox) = crossbeam_channel::unbounded();
        let wake: Arc<OnceLock<Arc<dyn Fn() + Send + Sync>>> = Arc::default();
        push_sink.attach(PushFeedback {
            jobs: jobs.clone(),
            wake: wake.clone(),
        });
        let sinks: Arc<Sinks> = Arc::default();
        let queued_requests = Arc::new(AtomicUsize::new(0));
        let dead_letters = Arc::new(AtomicU64::new(0));
        let worker = Worker {
            router: Router::new(store, config.router, clock),
            outlet: EmbeddedOutlet {
                sinks: sinks.clone(),
                seen_version: 0,
                attached: Vec::new(),
                batches: Vec::new(),
                push_sink,
            },
            requests: Vec::new(),
            ran: 0,
            out: Output::default(),
            inbox,
            sessions: Vec::new(),
            queued_requests: queued_requests.clone(),
            dead_letters: dead_letters.clone(),
            max_commands_per_flush: config.max_commands_per_flush.max(1),
        };
        let worker: Box<dyn Turns> = Box::new(worker);
        let mode = if threaded {
            Mode::Threaded(Some(
                spawn_worker(worker).expect("spawning the embedded router thread"),
            ))
        } else {
            Mode::Hosted(Some(worker))
        };
        Self {
            jobs,
            sinks,
            queued_requests,
            max_queued_requests: config.max_queued_requests,
            dead_letters,
            mode: Arc::new(Mutex::new(mode)),
            wake,
            stopped: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Queues a job for the worker and, hosted, tells the host. Gives the
    /// job back when the worker is gone.
    // Large only on the shutdown path (the job comes back once the worker is gone).
    #[allow(clippy::result_large_err)]
    fn send(&self, job: Job) -> Result<(), Job> {
        self.jobs.send(job).map_err(|e| e.0)?;
        if let Some(wake) = self.wake.get() {
            wake();
        }
        Ok(())
    }

    /// Answer a request right here (overload or after shutdown).
    fn refuse(&self, request: &Inbound, message: &str) {
        let Some(sink) = self.sinks.get(&request.from.addr.gateway_id) else {
            return;
        };
        sink.deliver(vec![Outbound {
            conn: request.from.addr.conn,
            frame: palaver_protocol::error_reply_to(
                request.request_id,
                &request.body,
                pb::ErrorCode::Unavailable,
                message,
            ),
            answers_request: true,
        }]);
    }

    fn stop_worker(&self) {
        let mut mode = self.mode.lock().unwrap_or_else(|e| e.into_inner());
        self.stopped.store(true, Ordering::Release);
        match &mut *mode {
            Mode::Threaded(handle) => {
                if let Some(handle) = handle.take() {
                    drop(mode);
                    // Queued work before Stop is processed first (FIFO).
                    let _ = self.jobs.send(Job::Stop);
                    if handle.join().is_err() {
                        tracing::error!("embedded router thread panicked");
                    }
                }
            }
            Mode::Hosted(untaken) => {
                // Never hosted: nothing ran, nothing to finish.
                untaken.take();
                drop(mode);
                // A host finishes what is queued before Stop, then stops.
                let _ = self.send(Job::Stop);
            }
        }
    }
}

impl Backend for EmbeddedEngine {
    fn start(&self, gateway_id: &str, sink: Arc<dyn DeliverySink>) -> Result<(), BackendError> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(BackendError::Unavailable(
                "the embedded engine was shut down".into(),
            ));
        }
        self.sinks
            .map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(gateway_id.to_owned(), sink);
        self.sinks.version.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn session_opened(&self, session: &Session) {
        let _ = self.send(Job::Session(SessionChange::Opened(session.clone())));
    }

    fn session_closed(&self, session: &Session, at_ms: i64) {
        let _ = self.send(Job::Session(SessionChange::Closed {
            session: session.clone(),
            at_ms,
        }));
    }

    fn submit_batch(&self, mut requests: Vec<Inbound>) {
        let n = requests.len();
        if n == 0 {
            return;
        }
        let queued = self.queued_requests.fetch_add(n, Ordering::AcqRel);
        let room = self.max_queued_requests.saturating_sub(queued);
        if room < n {
            // Over the limit: the tail is refused, the head still queued.
            self.queued_requests.fetch_sub(n - room, Ordering::AcqRel);
            for request in requests.drain(room..) {
                self.refuse(&request, "server busy, retry later");
            }
            if requests.is_empty() {
                return;
            }
        }
        let n = requests.len();
        if let Err(job) = self.send(Job::Requests(requests)) {
            self.queued_requests.fetch_sub(n, Ordering::AcqRel);
            if let Job::Requests(requests) = job {
                for request in &requests {
                    self.refuse(request, "server shutting down");
                }
            }
        }
    }

    fn submit(&self, request: Inbound) {
        // One admission path: a single request is a batch of one.
        self.submit_batch(vec![request]);
    }

    fn shutdown(&self) {
        self.stop_worker();
    }

    fn take_host(&self, wake: Arc<dyn Fn() + Send + Sync>) -> Option<Box<dyn BackendHost>> {
        let mut mode = self.mode.lock().unwrap_or_else(|e| e.into_inner());
        let Mode::Hosted(untaken) = &mut *mode else {
            return None;
        };
        let worker = untaken.take()?;
        let _ = self.wake.set(wake.clone());
        drop(mode);
        // Work queued before there was a host.
        wake();
        Some(Box::new(Host {
            worker: Some(worker),
            mode: self.mode.clone(),
            stopped: self.stopped.clone(),
        }))
    }
}

fn spawn_worker(mut worker: Box<dyn Turns>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("palaver-embedded-router".into())
        // The threaded mode: a turn whenever a job arrives.
        .spawn(move || {
            while let Ok(job) = worker.inbox().recv() {
                if !worker.turn(job) {
                    return;
                }
            }
        })
}

/// A [`Worker`] on whichever store, as the modes hold it.
trait Turns: Send {
    /// One turn starting with `first`; false when the worker must stop.
    fn turn(&mut self, first: Job) -> bool;
    fn inbox(&self) -> &Receiver<Job>;
}

impl<S: EngineStore> Turns for Worker<S> {
    fn turn(&mut self, first: Job) -> bool {
        Worker::turn(self, first)
    }

    fn inbox(&self) -> &Receiver<Job> {
        &self.inbox
    }
}

/// The worker of a hosted engine, run by a gateway core thread.
struct Host {
    /// `None` once `Job::Stop` was handled.
    worker: Option<Box<dyn Turns>>,
    mode: Arc<Mutex<Mode>>,
    stopped: Arc<AtomicBool>,
}

impl Drop for Host {
    /// The host stopped (its gateway drained or stopped) but the engine was
    /// not shut down: other gateways may still be attached, so the worker
    /// goes on on a thread of its own, with what is queued.
    fn drop(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        let mut mode = self.mode.lock().unwrap_or_else(|e| e.into_inner());
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        match spawn_worker(worker) {
            Ok(handle) => *mode = Mode::Threaded(Some(handle)),
            Err(e) => tracing::error!("embedded engine: cannot continue without its host: {e}"),
        }
    }
}

impl BackendHost for Host {
    fn run_turn(&mut self) -> bool {
        let Some(worker) = &mut self.worker else {
            return false;
        };
        let Ok(job) = worker.inbox().try_recv() else {
            return false;
        };
        if !worker.turn(job) {
            // Dropping the worker drops the queue's receiver: later
            // requests are answered UNAVAILABLE by `submit_batch`.
            self.worker = None;
            return false;
        }
        !worker.inbox().is_empty()
    }
}

impl Drop for EmbeddedEngine {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

struct EmbeddedOutlet {
    sinks: Arc<Sinks>,
    /// `sinks.version` when `attached` was copied.
    seen_version: u64,
    /// The worker's copy of the attached gateways (few: a linear search).
    attached: Vec<(String, Arc<dyn DeliverySink>)>,
    /// Frames of one flush, per gateway, in order (kept: reused).
    batches: Vec<(Arc<str>, Vec<Outbound>)>,
    push_sink: Box<dyn PushSink>,
}

impl EmbeddedOutlet {
    /// Hands `out` to the sinks: the push events first, then the channel
    /// posts (to every gateway: each hands them to its connections that
    /// have the channel open, SPEC §21), then the frames, one `deliver`
    /// call per gateway, in order per connection (what `Output::flush`
    /// does, without a map or a lock per flush).
    fn flush(&mut self, out: &mut Output) {
        if !out.pushes.is_empty() {
            self.push_sink.push(std::mem::take(&mut out.pushes));
        }
        if out.frames.is_empty() && out.channel_posts.is_empty() {
            return;
        }
        let version = self.sinks.version.load(Ordering::Acquire);
        if version != self.seen_version {
            let map = self.sinks.map.read().unwrap_or_else(|e| e.into_inner());
            self.attached = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            self.seen_version = version;
        }
        if !out.channel_posts.is_empty() {
            let posts: Vec<Arc<ChannelPost>> = out.channel_posts.drain(..).map(Arc::new).collect();
            for (_, sink) in &self.attached {
                sink.deliver_channel(posts.clone());
            }
        }
        group_by_gateway(&mut out.frames, &mut self.batches);
        for (gateway_id, frames) in self.batches.drain(..) {
            match self.attached.iter().find(|(g, _)| **g == *gateway_id) {
                Some((_, sink)) => sink.deliver(frames),
                None => tracing::debug!(
                    gateway_id = &*gateway_id,
                    frames = frames.len(),
                    "dropping frames for a gateway that is not attached"
                ),
            }
        }
    }
}

/// The lease the embedded engine's session batches renew. Its gateways
/// never register (they live and die with the engine), so no lease of
/// theirs ever counts as expired; the value only has to be valid.
const EMBEDDED_LEASE: Duration = Duration::from_secs(3600);

struct Worker<S> {
    router: Router<S>,
    outlet: EmbeddedOutlet,
    /// Requests of the turn, in queue order (kept: reused). They stay
    /// until the turn ends: a failed commit answers every one of them.
    requests: Vec<Inbound>,
    /// How many of `requests` have run.
    ran: usize,
    /// Output of the turn being run (kept: its buffers are reused).
    out: Output,
    inbox: Receiver<Job>,
    /// Session changes of this batch not yet applied.
    sessions: Vec<SessionChange>,
    queued_requests: Arc<AtomicUsize>,
    max_commands_per_flush: usize,
    /// Requests given up on (answered UNAVAILABLE or INTERNAL).
    dead_letters: Arc<AtomicU64>,
}

impl<S: EngineStore> Worker<S> {
    /// One turn: `first`, then whatever is queued up to
    /// `max_commands_per_flush` requests and session changes, run in queue
    /// order (requests in batches, session changes in batches between
    /// them), then the store ends the turn (the durable store commits:
    /// one fsync for the whole turn), and only then the output goes to
    /// the sinks. False when the worker must stop.
    fn turn(&mut self, first: Job) -> bool {
        let mut taken = 0;
        let mut go_on = self.take(first, &mut taken);
        while go_on && taken < self.max_commands_per_flush {
            match self.inbox.try_recv() {
                Ok(job) => go_on = self.take(job, &mut taken),
                Err(_) => break,
            }
        }
        // At most one of the two holds anything (each flushes the other).
        self.run_requests();
        self.apply_sessions();
        if let Err(e) = self.router.store_mut().end_turn() {
            self.answer_unavailable(&e);
        }
        self.requests.clear();
        self.ran = 0;
        self.hand_pushes();
        self.outlet.flush(&mut self.out);
        go_on
    }

    /// The turn's writes did not reach the disk: nothing it produced may
    /// leave (an ack would promise a message that is not stored, a
    /// delivery would show a seq that will be given again). Every request
    /// of the turn is answered UNAVAILABLE (a retried Send is deduplicated
    /// as usual); presence events of the turn's session changes are lost.
    fn answer_unavailable(&mut self, error: &crate::store::StoreError) {
        tracing::error!(
            requests = self.requests.len(),
            "the turn could not be made durable, answering UNAVAILABLE: {error}"
        );
        self.out.frames.clear();
        self.out.pushes.clear();
        self.out.channel_posts.clear();
        for request in &self.requests {
            self.out
                .frames
                .push(Router::<S>::unavailable_reply(request, error));
        }
        self.dead_letters
            .fetch_add(self.requests.len() as u64, Ordering::Relaxed);
    }

    /// Adds a job to the turn, counting what it holds; false when the
    /// worker must stop.
    fn take(&mut self, job: Job, taken: &mut usize) -> bool {
        match job {
            Job::Stop => return false,
            Job::Session(change) => {
                // Applied after the requests queued before it, before any
                // queued after it.
                self.run_requests();
                self.sessions.push(change);
                *taken += 1;
            }
            Job::InvalidatePushToken {
                user_id,
                device_id,
                token,
                invalidated_ms,
            } => {
                // In order with the requests queued before it.
                self.run_requests();
                self.apply_sessions();
                match self.router.store_mut().invalidate_push_token(
                    &user_id,
                    &device_id,
                    &token,
                    invalidated_ms,
                ) {
                    Ok(removed) => tracing::info!(
                        user = %user_id, device = %device_id, removed,
                        "push token reported dead since {invalidated_ms}"
                    ),
                    Err(e) => tracing::warn!(
                        user = %user_id, device = %device_id,
                        "push token reported dead, not removed: {e}"
                    ),
                }
                *taken += 1;
            }
            Job::Requests(requests) => {
                // A request sees every session change queued before it
                // (a Sync after Hello needs its session registered).
                self.apply_sessions();
                self.queued_requests
                    .fetch_sub(requests.len(), Ordering::AcqRel);
                *taken += requests.len();
                self.requests.extend(requests);
            }
        }
        true
    }

    /// The turn's push events to the push sink (before the frames: whoever
    /// sees a frame knows its pushes are out), with their contexts read
    /// here, where the store lives, when the sink decides pushes itself.
    fn hand_pushes(&mut self) {
        if self.out.pushes.is_empty() {
            return;
        }
        let events = std::mem::take(&mut self.out.pushes);
        let sink = &mut self.outlet.push_sink;
        if !sink.wants_context() {
            sink.push(events);
            return;
        }
        let now_ms = self.router.now_ms();
        let store = self.router.store_mut();
        let mut with = Vec::with_capacity(events.len());
        for event in events {
            match store.push_context(&event.user_id, &event.conversation_id, event.seq, now_ms) {
                Ok(context) => with.push((event, context)),
                Err(e) => tracing::warn!(
                    user = %event.user_id, conversation = %event.conversation_id,
                    "push context unreadable, no push: {e}"
                ),
            }
        }
        sink.push_with_context(with);
    }

    /// The session changes queued so far, through the one session-change
    /// path (`crate::presence`, shared with the Kafka/Redis bridge).
    fn apply_sessions(&mut self) {
        if self.sessions.is_empty() {
            return;
        }
        // The memory store does not fail. A panic (a bug) loses this batch
        // of presence changes, not the thread and its connections.
        let frames = self.out.frames.len();
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.router
                .apply_session_changes(&self.sessions, EMBEDDED_LEASE, &mut self.out)
        }));
        match applied {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("session changes: {e}"),
            Err(_) => {
                self.out.frames.truncate(frames);
                tracing::error!(
                    changes = self.sessions.len(),
                    "applying session changes panicked; they are dropped"
                );
            }
        }
        self.sessions.clear();
    }

    /// The turn's requests in order through the one runner
    /// ([`crate::runner::run`]: runs of Sends, from any connection, share
    /// one session lookup), as the Kafka router worker does. A request whose
    /// handling panics is answered INTERNAL and logged with its reason (the
    /// embedded engine's dead-letter path), and the turn goes on: the engine
    /// runs on a gateway's core 0, whose connections must not go with it.
    fn run_requests(&mut self) {
        let pending = &self.requests[self.ran..];
        if pending.is_empty() {
            return;
        }
        let gave_up = crate::runner::run(
            &mut self.router,
            pending,
            &mut self.out,
            &mut crate::runner::NoRetry,
        );
        for g in gave_up {
            let request = &pending[g.index];
            self.dead_letters.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                user = %request.from.user_id,
                request_id = request.request_id,
                attempts = g.attempts,
                "request given up on, answered with an error: {}",
                g.failure
            );
        }
        self.ran = self.requests.len();
    }
}
