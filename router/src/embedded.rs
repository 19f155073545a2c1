//! The embedded engine: the [`Router`] over a [`MemoryStore`] on one worker
//! thread, fed by a crossbeam channel (the in-process bus). Implements
//! [`Backend`], so a gateway with no Kafka/Redis configured is a complete
//! single-node chat server. Several gateways may attach to one engine.
//!
//! The worker drains whatever is queued (up to a batch), runs each command
//! through the router, then hands the frames to the gateways' sinks: one
//! `deliver` call per gateway per batch, in order per connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use palaver_protocol::pb;

use crate::api::{Backend, BackendError, DeliverySink, Inbound, Outbound, Session};
use crate::bus::{Command, Output, PushEvent};
use crate::logic::{Clock, Router, RouterConfig, SystemClock};
use crate::memory::MemoryStore;
use crate::store::SessionChange;

/// Where the embedded engine sends push events (there are no push workers
/// in embedded mode).
pub trait PushSink: Send + 'static {
    fn push(&mut self, events: Vec<PushEvent>);
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

/// Settings of the embedded engine itself.
#[derive(Clone, Debug)]
pub struct EmbeddedConfig {
    pub router: RouterConfig,
    /// Requests queued for the worker beyond this are answered
    /// `Error(UNAVAILABLE)` at once instead of queued. Session events are
    /// always queued (dropping one would corrupt presence).
    pub max_queued_requests: usize,
    /// Commands processed before the worker flushes output to the sinks.
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
    Stop,
}

pub struct EmbeddedEngine {
    jobs: Sender<Job>,
    sinks: Arc<Sinks>,
    queued_requests: Arc<AtomicUsize>,
    max_queued_requests: usize,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl EmbeddedEngine {
    /// An engine with the system clock and a logging push sink.
    pub fn new(config: EmbeddedConfig) -> Self {
        Self::with_parts(config, Arc::new(SystemClock), LoggingPushSink::default())
    }

    /// An engine with an injected clock and push sink (tests).
    pub fn with_parts(
        config: EmbeddedConfig,
        clock: Arc<dyn Clock>,
        push_sink: impl PushSink,
    ) -> Self {
        let (jobs, inbox) = crossbeam_channel::unbounded();
        let sinks: Arc<Sinks> = Arc::default();
        let queued_requests = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            router: Router::new(MemoryStore::new(), config.router, clock),
            outlet: EmbeddedOutlet {
                sinks: sinks.clone(),
                seen_version: 0,
                attached: Vec::new(),
                batches: Vec::new(),
                push_sink: Box::new(push_sink),
            },
            inbox,
            sessions: Vec::new(),
            queued_requests: queued_requests.clone(),
            max_commands_per_flush: config.max_commands_per_flush.max(1),
        };
        let handle = std::thread::Builder::new()
            .name("palaver-embedded-router".into())
            .spawn(move || worker.run())
            .expect("spawning the embedded router thread");
        Self {
            jobs,
            sinks,
            queued_requests,
            max_queued_requests: config.max_queued_requests,
            worker: Mutex::new(Some(handle)),
        }
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
        }]);
    }

    fn stop_worker(&self) {
        let handle = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            // Queued work before Stop is processed first (FIFO).
            let _ = self.jobs.send(Job::Stop);
            if handle.join().is_err() {
                tracing::error!("embedded router thread panicked");
            }
        }
    }
}

impl Backend for EmbeddedEngine {
    fn start(&self, gateway_id: &str, sink: Arc<dyn DeliverySink>) -> Result<(), BackendError> {
        if self
            .worker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
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
        let _ = self
            .jobs
            .send(Job::Session(SessionChange::Opened(session.clone())));
    }

    fn session_closed(&self, session: &Session, at_ms: i64) {
        let _ = self.jobs.send(Job::Session(SessionChange::Closed {
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
        if let Err(e) = self.jobs.send(Job::Requests(requests)) {
            self.queued_requests.fetch_sub(n, Ordering::AcqRel);
            if let Job::Requests(requests) = e.0 {
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
    /// Frames of one flush, per gateway, in order.
    batches: Vec<(String, Vec<Outbound>)>,
    push_sink: Box<dyn PushSink>,
}

impl EmbeddedOutlet {
    /// Hands `out` to the sinks: the push events first, then the frames,
    /// one `deliver` call per gateway, in order per connection (what
    /// `Output::flush` does, without a map or a lock per flush).
    fn flush(&mut self, out: &mut Output) {
        if !out.pushes.is_empty() {
            self.push_sink.push(std::mem::take(&mut out.pushes));
        }
        if out.frames.is_empty() {
            return;
        }
        let version = self.sinks.version.load(Ordering::Acquire);
        if version != self.seen_version {
            let map = self.sinks.map.read().unwrap_or_else(|e| e.into_inner());
            self.attached = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            self.seen_version = version;
        }
        for crate::bus::Addressed { to, frame } in out.frames.drain(..) {
            let outbound = Outbound {
                conn: to.conn,
                frame,
            };
            match self.batches.iter_mut().find(|(g, _)| *g == to.gateway_id) {
                Some((_, batch)) => batch.push(outbound),
                None => self.batches.push((to.gateway_id, vec![outbound])),
            }
        }
        for (gateway_id, frames) in self.batches.drain(..) {
            match self.attached.iter().find(|(g, _)| *g == gateway_id) {
                Some((_, sink)) => sink.deliver(frames),
                None => tracing::debug!(
                    gateway_id,
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

struct Worker {
    router: Router<MemoryStore>,
    outlet: EmbeddedOutlet,
    inbox: Receiver<Job>,
    /// Session changes of this batch not yet applied.
    sessions: Vec<SessionChange>,
    queued_requests: Arc<AtomicUsize>,
    max_commands_per_flush: usize,
}

impl Worker {
    fn run(mut self) {
        let mut out = Output::default();
        while let Ok(job) = self.inbox.recv() {
            let mut processed = 0;
            let mut stop = !self.process(job, &mut out, &mut processed);
            while !stop && processed < self.max_commands_per_flush {
                match self.inbox.try_recv() {
                    Ok(job) => stop = !self.process(job, &mut out, &mut processed),
                    Err(_) => break,
                }
            }
            self.apply_sessions(&mut out);
            self.outlet.flush(&mut out);
            if stop {
                return;
            }
        }
    }

    /// Run one job, counting the commands run; false when the worker must stop.
    fn process(&mut self, job: Job, out: &mut Output, processed: &mut usize) -> bool {
        match job {
            Job::Stop => return false,
            Job::Session(change) => {
                self.sessions.push(change);
                *processed += 1;
            }
            Job::Requests(requests) => {
                // A request sees every session change queued before it
                // (a Sync after Hello needs its session registered).
                self.apply_sessions(out);
                self.queued_requests
                    .fetch_sub(requests.len(), Ordering::AcqRel);
                *processed += requests.len();
                for request in requests {
                    self.handle(Command::Request(request), out);
                }
            }
        }
        true
    }

    /// The session changes queued so far, through the one session-change
    /// path (`crate::presence`, shared with the Kafka/Redis bridge).
    fn apply_sessions(&mut self, out: &mut Output) {
        if self.sessions.is_empty() {
            return;
        }
        // The memory store does not fail.
        if let Err(e) = self
            .router
            .apply_session_changes(&self.sessions, EMBEDDED_LEASE, out)
        {
            tracing::error!("session changes: {e}");
        }
        self.sessions.clear();
    }

    fn handle(&mut self, command: Command, out: &mut Output) {
        // The memory store does not fail; keep the generic path anyway.
        if let Err(e) = self.router.handle(&command, out) {
            tracing::error!("router: {e}");
            out.frames
                .extend(Router::<MemoryStore>::unavailable_reply(&command, &e));
        }
    }
}
