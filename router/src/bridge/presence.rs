//! The bridge's presence threads, as DESIGN.md "Presence without a
//! heartbeat storm" asks: Redis sees churn plus gateways, never connections.
//! The presence logic itself is [`crate::presence`], shared with the
//! embedded engine; this file only hosts it for one gateway.
//!
//! - Core threads only enqueue [`SessionChange`]s (a channel send).
//! - The batcher thread applies them once per flush interval through
//!   [`presence::apply_session_changes`] (ONE Redis pipeline: sessions,
//!   last-seen, push-pending reset, lease renewal). Once per tick it
//!   checks that this gateway is still registered, which renews its lease
//!   (one that stalled past its lease and was reaped registers again and
//!   has the gateway open its live sessions again,
//!   [`DeliverySink::reopen_sessions`]), and checks (one script call) for
//!   gateways whose lease expired, reaping their sessions so their users go
//!   offline together.
//! - The account cap across gateways (SPEC §4): a flush that opened a
//!   session beside `max_connections_per_account` or more sessions of the
//!   user's other devices on live gateways sends that (newest) connection
//!   `Error{TOO_MANY_CONNECTIONS}` with request_id 0, which closes it. Each
//!   gateway counts its own connections at Hello; this catches the ones
//!   spread over several gateways, a flush interval later.
//! - Presence changes (came online / went offline, from a flush or a reap)
//!   are published once per flush on Redis pub/sub; every gateway's
//!   subscriber thread hands them to [`presence::fan_out`] with ITS local
//!   watches (one `SMEMBERS` plus one pipelined `SMISMEMBER` round trip per
//!   changed user that has local watchers, for the visibility rule).
//! - Watches ([`presence::Watches`]) are shared with the reader threads,
//!   whose `Router`s answer PresenceSubscribe.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::{DeliverySink, Outbound, Session, SessionAddr};
use crate::bus::Addressed;
use crate::kafka::records::PresenceChanges;
use crate::presence::{self, SharedWatches};

use super::unanswered::Unanswered;
use crate::redis_store::{RedisConfig, RedisStore, PRESENCE_CHANNEL};
use crate::store::{GatewayRegistry, SessionChange};
use crate::Clock;
use crate::PresenceVisibility;
use crate::SystemClock;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use palaver_protocol::pb;
use prost::Message as _;

/// Session changes per Redis pipeline at most: a gateway opening all of
/// its sessions again (or a reconnect storm) writes in bounded pipelines,
/// not one of hundreds of thousands of script calls.
const MAX_CHANGES_PER_FLUSH: usize = 10_000;

/// Presence timing.
#[derive(Clone, Copy, Debug)]
pub struct PresenceTiming {
    /// Session changes are written at most this long after they happen.
    pub flush_interval: Duration,
    /// Lease renewal and dead-gateway check period.
    pub tick: Duration,
    /// Lease lifetime: a gateway that stops renewing is dead after this.
    pub lease_ttl: Duration,
}

impl Default for PresenceTiming {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(100),
            tick: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(10),
        }
    }
}

/// Counts changes enqueued and written, so a reader can wait until a
/// session it depends on is registered (see [`Presence::wait_flushed`]).
#[derive(Default)]
struct FlushMark {
    flushed: Mutex<u64>,
    cond: Condvar,
}

/// Delivers a `GoAway(REPLACED)` to a connection on any gateway.
pub type ReplacedHandler = Box<dyn Fn(Addressed) + Send + Sync>;

/// The presence half of the bridge.
pub struct Presence {
    /// Closes wait for their connection's unanswered membership changes.
    unanswered: Arc<Unanswered>,
    gateway_id: String,
    changes: Sender<Job>,
    enqueued: AtomicU64,
    mark: Arc<FlushMark>,
    /// This gateway's connections' watches (the readers' `Router`s add to
    /// them, the subscriber fans out from them, the batcher drops those of
    /// closed and replaced connections).
    pub watches: SharedWatches,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    batcher_rx: Mutex<Option<Receiver<Job>>>,
}

/// What the batcher thread is told.
enum Job {
    /// The n-th session change of this gateway.
    Change(u64, SessionChange),
    /// Flush, then deregister the gateway (clean shutdown).
    Deregister,
}

fn encode_changes(gateway_id: &str, changes: &[pb::Presence]) -> Vec<u8> {
    PresenceChanges {
        gateway_id: gateway_id.to_owned(),
        presences: changes.to_vec(),
    }
    .encode_to_vec()
}

impl Presence {
    pub fn new(gateway_id: &str) -> Self {
        Self::waiting_for(gateway_id, Arc::default())
    }

    /// As [`Presence::new`], with closes waiting for `unanswered`
    /// membership changes of their connection (`unanswered.rs`).
    pub(super) fn waiting_for(gateway_id: &str, unanswered: Arc<Unanswered>) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Self {
            unanswered,
            gateway_id: gateway_id.to_owned(),
            changes: tx,
            enqueued: AtomicU64::new(0),
            mark: Arc::default(),
            watches: Arc::default(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
            batcher_rx: Mutex::new(Some(rx)),
        }
    }

    /// Registers the gateway (reaping what a previous run with the same id
    /// left behind), subscribes to presence events, then starts the batcher
    /// and subscriber threads. Returns once both are running.
    pub fn start(
        &self,
        redis: &RedisConfig,
        timing: PresenceTiming,
        visibility: PresenceVisibility,
        max_connections_per_account: Option<u32>,
        sink: Arc<dyn DeliverySink>,
        on_replaced: ReplacedHandler,
    ) -> Result<(), String> {
        let clock = SystemClock;
        let mut store = RedisStore::connect(redis.clone()).map_err(|e| format!("Redis: {e}"))?;
        let stale = store
            .register_gateway(&self.gateway_id, timing.lease_ttl, clock.now_ms())
            .map_err(|e| format!("register gateway in Redis: {e}"))?;
        if !stale.is_empty() {
            store
                .publish_presence(&encode_changes(&self.gateway_id, &stale))
                .map_err(|e| format!("publish presence: {e}"))?;
        }

        // Subscriber first, so this gateway's own first events reach it.
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let sub = Subscriber {
            url: redis.urls.first().cloned().unwrap_or_default(),
            redis: redis.clone(),
            gateway_id: self.gateway_id.clone(),
            visibility,
            store: None,
            watches: self.watches.clone(),
            sink: sink.clone(),
            stop: self.stop.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("palaver-presence-sub".into())
            .spawn(move || sub.run(ready_tx))
            .map_err(|e| format!("spawn presence subscriber: {e}"))?;
        self.threads.lock().expect("threads").push(handle);
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("presence subscriber: {e}")),
            Err(_) => return Err("presence subscriber did not start within 10 s".into()),
        }

        let rx = self
            .batcher_rx
            .lock()
            .expect("batcher rx")
            .take()
            .ok_or("presence already started")?;
        let batcher = Batcher {
            gateway_id: self.gateway_id.clone(),
            store,
            watches: self.watches.clone(),
            rx,
            timing,
            mark: self.mark.clone(),
            stop: self.stop.clone(),
            on_replaced,
            sink,
            max_connections_per_account,
            pending: Vec::new(),
            last_lease: Instant::now(),
            unanswered: self.unanswered.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("palaver-presence".into())
            .spawn(move || batcher.run())
            .map_err(|e| format!("spawn presence batcher: {e}"))?;
        self.threads.lock().expect("threads").push(handle);
        Ok(())
    }

    /// Called on core threads: just a counter and a channel send.
    pub fn session_opened(&self, session: &Session) {
        self.enqueue(SessionChange::Opened(session.clone()));
    }

    pub fn session_reopened(&self, session: &Session) {
        self.enqueue(SessionChange::Reopened(session.clone()));
    }

    pub fn session_closed(&self, session: &Session, at_ms: i64) {
        self.enqueue(SessionChange::Closed {
            session: session.clone(),
            at_ms,
        });
    }

    fn enqueue(&self, change: SessionChange) {
        let n = self.enqueued.fetch_add(1, Ordering::AcqRel) + 1;
        let _ = self.changes.send(Job::Change(n, change));
    }

    /// The number of changes enqueued so far (a later `wait_flushed` with it
    /// waits for all of them).
    pub fn enqueued(&self) -> u64 {
        self.enqueued.load(Ordering::Acquire)
    }

    /// Waits until every change numbered up to `target` is in Redis, or the
    /// timeout passes (then the caller goes on; Redis is having trouble).
    pub fn wait_flushed(&self, target: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut flushed = self.mark.flushed.lock().expect("flush mark");
        while *flushed < target {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            flushed = self
                .mark
                .cond
                .wait_timeout(flushed, deadline - now)
                .expect("flush mark")
                .0;
        }
        true
    }

    /// Stops the threads. With `flush`, pending changes are written first and
    /// the gateway deregisters (lease deleted, sessions removed); without,
    /// the threads just stop — what a crash looks like to other gateways.
    pub fn stop(&self, flush: bool) {
        if flush {
            let _ = self.changes.send(Job::Deregister);
        }
        self.stop.store(true, Ordering::Release);
        let threads: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.threads.lock().expect("threads"));
        for t in threads {
            let _ = t.join();
        }
    }
}

struct Batcher {
    gateway_id: String,
    store: RedisStore,
    watches: SharedWatches,
    rx: Receiver<Job>,
    timing: PresenceTiming,
    mark: Arc<FlushMark>,
    stop: Arc<AtomicBool>,
    on_replaced: ReplacedHandler,
    /// Asked to reopen every session when this gateway was reaped while alive;
    /// given `TOO_MANY_CONNECTIONS` for connections over the account cap.
    sink: Arc<dyn DeliverySink>,
    /// The account cap across gateways, if any (SPEC §4).
    max_connections_per_account: Option<u32>,
    /// Changes not yet written (kept across a failed flush, in order).
    pending: Vec<(u64, SessionChange)>,
    last_lease: Instant,
    /// Closes wait for their connection's unanswered membership changes.
    unanswered: Arc<Unanswered>,
}

impl Batcher {
    fn run(mut self) {
        let clock = SystemClock;
        let mut last_check = Instant::now();
        let mut deregister = false;
        loop {
            match self.rx.recv_timeout(self.timing.flush_interval) {
                Ok(change) => self.take(change, &mut deregister),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while let Ok(change) = self.rx.try_recv() {
                self.take(change, &mut deregister);
            }
            let stopping = self.stop.load(Ordering::Acquire);
            if stopping && !deregister {
                // Crash semantics: nothing more is written.
                return;
            }
            let tick_due = !deregister && last_check.elapsed() >= self.timing.tick;
            if tick_due {
                last_check = Instant::now();
                // Renews the lease too: no flush is needed for it.
                self.rejoin_if_forgotten(clock.now_ms());
            }
            let lease_due = self.last_lease.elapsed() >= self.timing.tick;
            if !self.pending.is_empty() || lease_due || deregister {
                self.flush(clock.now_ms());
            }
            if deregister && self.pending.is_empty() {
                self.deregister(clock.now_ms());
                return;
            }
            if tick_due {
                self.reap_dead(clock.now_ms());
            }
        }
    }

    fn take(&mut self, job: Job, deregister: &mut bool) {
        match job {
            Job::Change(n, change) => self.pending.push((n, change)),
            Job::Deregister => *deregister = true,
        }
    }

    /// One pipeline: lease + the pending changes (at most
    /// [`MAX_CHANGES_PER_FLUSH`] each; more take more pipelines); then one
    /// PUBLISH of the presence changes, and GoAway for replaced connections.
    /// A failed pipeline keeps its changes and those after it pending.
    ///
    /// A close whose connection sent membership changes the router has not
    /// answered yet stays pending (`unanswered.rs`, at most its hold). The
    /// flush mark passes it anyway: readers wait for the mark so that a
    /// session is registered before a Sync, which no close changes, and
    /// must not wait for another connection's held close.
    fn flush(&mut self, now_ms: i64) {
        let mut held = Vec::new();
        if self.pending.iter().any(|(_, c)| self.held(c)) {
            let (wait, ready): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
                .into_iter()
                .partition(|(_, c)| self.held(c));
            held = wait;
            self.pending = ready;
        }
        self.flush_ready(now_ms);
        if held.is_empty() {
            return;
        }
        if self.pending.is_empty() {
            if let Some(n) = held.iter().map(|(n, _)| *n).max() {
                self.mark_flushed(n);
            }
        }
        self.pending.extend(held);
        self.pending.sort_by_key(|(n, _)| *n);
    }

    fn mark_flushed(&self, n: u64) {
        let mut flushed = self.mark.flushed.lock().expect("flush mark");
        *flushed = (*flushed).max(n);
        self.mark.cond.notify_all();
    }

    /// A close that waits (not once the gateway is stopping: deregistering
    /// removes every session anyway).
    fn held(&self, change: &SessionChange) -> bool {
        !self.stop.load(Ordering::Acquire)
            && matches!(change, SessionChange::Closed { session, .. }
                if self.unanswered.holds(session.addr.conn))
    }

    fn flush_ready(&mut self, now_ms: i64) {
        loop {
            let take = self.pending.len().min(MAX_CHANGES_PER_FLUSH);
            let changes: Vec<SessionChange> = self.pending[..take]
                .iter()
                .map(|(_, c)| c.clone())
                .collect();
            let effects = match presence::apply_session_changes(
                &mut self.store,
                &self.watches,
                &self.gateway_id,
                self.timing.lease_ttl,
                now_ms,
                &changes,
            ) {
                Ok(effects) => effects,
                Err(e) => {
                    tracing::warn!(gateway = %self.gateway_id, pending = self.pending.len(), "presence flush failed, will retry: {e}");
                    return;
                }
            };
            self.last_lease = Instant::now();
            let newest = self.pending[..take].iter().map(|(n, _)| *n).max();
            for (_, change) in &self.pending[..take] {
                if let SessionChange::Closed { session, .. } = change {
                    self.unanswered.applied(session.addr.conn);
                }
            }
            self.pending.drain(..take);
            if let Some(n) = newest {
                self.mark_flushed(n);
            }
            for goaway in effects.goaways {
                (self.on_replaced)(goaway);
            }
            self.close_over_cap(&effects.opened_beside);
            if !effects.presence.is_empty() {
                let payload = encode_changes(&self.gateway_id, &effects.presence);
                if let Err(e) = self.store.publish_presence(&payload) {
                    tracing::warn!(gateway = %self.gateway_id, "presence publish failed: {e}");
                }
            }
            if self.pending.is_empty() {
                return;
            }
        }
    }

    /// Closes this gateway's connections just opened beside
    /// `max_connections_per_account` or more sessions of the user's other
    /// devices on live gateways: `Error{TOO_MANY_CONNECTIONS}` with
    /// request_id 0 through the sink (a 1xxx Error closes the connection,
    /// whose close then removes its session). Sessions on gateways whose
    /// lease ran out do not count; their leases are read only when a user
    /// is at the cap, so an ordinary flush costs nothing more.
    fn close_over_cap(&mut self, opened_beside: &[(SessionAddr, Vec<Arc<str>>)]) {
        let Some(cap) = self.max_connections_per_account else {
            return;
        };
        let cap = cap as usize;
        let at_cap: Vec<&(SessionAddr, Vec<Arc<str>>)> = opened_beside
            .iter()
            .filter(|(_, beside)| beside.len() >= cap)
            .collect();
        if at_cap.is_empty() {
            return;
        }
        let gateways: HashSet<Arc<str>> = at_cap
            .iter()
            .flat_map(|(_, beside)| beside.iter().cloned())
            .collect();
        let dead = match self.store.dead_gateways_among(&gateways) {
            Ok(dead) => dead,
            Err(e) => {
                // Counting every session errs toward closing; a Redis
                // failure here is rare and the client reconnects.
                tracing::warn!(gateway = %self.gateway_id, "lease check for the account cap failed: {e}");
                HashSet::new()
            }
        };
        let over: Vec<Outbound> = at_cap
            .into_iter()
            .filter(|(addr, beside)| {
                *addr.gateway_id == *self.gateway_id
                    && beside.iter().filter(|g| !dead.contains(*g)).count() >= cap
            })
            .map(|(addr, beside)| {
                tracing::info!(
                    gateway = %self.gateway_id,
                    conn = addr.conn,
                    others = beside.len(),
                    "a connection over the account cap across gateways: closing it"
                );
                Outbound {
                    conn: addr.conn,
                    frame: palaver_protocol::error_reply(
                        0,
                        pb::ErrorCode::TooManyConnections,
                        format!(
                            "the account already holds {cap} connections on this and other servers (max_connections_per_account)"
                        ),
                    ),
                    answers_request: false,
                }
            })
            .collect();
        if !over.is_empty() {
            self.sink.deliver(over);
        }
    }

    /// Still registered? A gateway that stalled past its lease (a paused
    /// VM) may have been reaped by another meanwhile: its sessions are gone
    /// from Redis (messages to its users would go to push) and nobody would
    /// reap it after a real crash. Then it registers again and the gateway
    /// opens every live session again.
    fn rejoin_if_forgotten(&mut self, now_ms: i64) {
        match self
            .store
            .rejoin_if_forgotten(&self.gateway_id, self.timing.lease_ttl, now_ms)
        {
            Ok(false) => self.last_lease = Instant::now(),
            Ok(true) => {
                self.last_lease = Instant::now();
                tracing::warn!(
                    gateway = %self.gateway_id,
                    "this gateway was taken for dead and reaped (its lease ran out while it stalled); \
                     registered again, opening its sessions again"
                );
                self.sink.reopen_sessions();
            }
            Err(e) => {
                tracing::warn!(gateway = %self.gateway_id, "registration check failed: {e}")
            }
        }
    }

    fn reap_dead(&mut self, now_ms: i64) {
        let dead = match self.store.dead_gateways() {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(gateway = %self.gateway_id, "dead gateway check failed: {e}");
                return;
            }
        };
        for dead_id in dead.iter().filter(|d| **d != self.gateway_id) {
            match self.store.reap_gateway(dead_id, &self.gateway_id, now_ms) {
                Ok(Some(changes)) => {
                    tracing::info!(gateway = %self.gateway_id, dead = %dead_id, offline = changes.len(), "reaped a dead gateway");
                    if !changes.is_empty() {
                        let payload = encode_changes(&self.gateway_id, &changes);
                        if let Err(e) = self.store.publish_presence(&payload) {
                            tracing::warn!("presence publish failed: {e}");
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(gateway = %self.gateway_id, dead = %dead_id, "reap failed: {e}")
                }
            }
        }
    }

    /// Clean shutdown: drop the lease and everything this gateway
    /// registered, publishing who went offline.
    fn deregister(&mut self, now_ms: i64) {
        match self.store.deregister_gateway(&self.gateway_id, now_ms) {
            Ok(changes) if !changes.is_empty() => {
                let payload = encode_changes(&self.gateway_id, &changes);
                let _ = self.store.publish_presence(&payload);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(gateway = %self.gateway_id, "deregister failed: {e}"),
        }
    }
}

impl Subscriber {
    /// Frames for this gateway's watchers allowed to see each change.
    fn fan_out(&mut self, changes: &PresenceChanges) -> Vec<Outbound> {
        if self.store.is_none() {
            match RedisStore::connect(self.redis.clone()) {
                Ok(store) => self.store = Some(store),
                Err(e) => {
                    // Fail closed: the visibility rule cannot be checked.
                    tracing::warn!("presence events dropped, Redis unreachable: {e}");
                    return Vec::new();
                }
            }
        }
        let store = self.store.as_mut().expect("connected above");
        presence::fan_out(store, self.visibility, &self.watches, &changes.presences)
            .into_iter()
            .filter(|a| *a.to.gateway_id == *self.gateway_id)
            .map(|a| Outbound {
                conn: a.to.conn,
                frame: a.frame,
                answers_request: a.answers_request,
            })
            .collect()
    }
}

/// Receives every gateway's presence changes and fans them out to local
/// watchers.
struct Subscriber {
    url: String,
    /// For the visibility checks (connected on first use).
    redis: RedisConfig,
    gateway_id: String,
    visibility: PresenceVisibility,
    store: Option<RedisStore>,
    watches: SharedWatches,
    sink: Arc<dyn DeliverySink>,
    stop: Arc<AtomicBool>,
}

impl Subscriber {
    fn run(mut self, ready: Sender<Result<(), String>>) {
        let mut ready = Some(ready);
        while !self.stop.load(Ordering::Acquire) {
            if let Err(e) = self.subscribe_and_listen(&mut ready) {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
                tracing::warn!("presence subscription lost, reconnecting: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }

    fn subscribe_and_listen(
        &mut self,
        ready: &mut Option<Sender<Result<(), String>>>,
    ) -> Result<(), String> {
        let client = redis::Client::open(self.url.as_str()).map_err(|e| e.to_string())?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .map_err(|e| e.to_string())?;
        let mut pubsub = conn.as_pubsub();
        pubsub
            .subscribe(PRESENCE_CHANNEL)
            .map_err(|e| e.to_string())?;
        pubsub
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        if let Some(tx) = ready.take() {
            let _ = tx.send(Ok(()));
        }
        while !self.stop.load(Ordering::Acquire) {
            let message = match pubsub.get_message() {
                Ok(m) => m,
                Err(e) if e.is_timeout() => continue,
                Err(e) => return Err(e.to_string()),
            };
            let Ok(changes) = PresenceChanges::decode(message.get_payload_bytes()) else {
                tracing::warn!("undecodable presence message ignored");
                continue;
            };
            let frames = self.fan_out(&changes);
            if !frames.is_empty() {
                self.sink.deliver(frames);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SessionAddr;
    use crate::store::UserStore;
    use palaver_protocol::pb::frame::Body;

    struct NoSink;
    impl DeliverySink for NoSink {
        fn deliver(&self, _: Vec<Outbound>) {}
        fn deliver_channel(&self, _: Vec<Arc<crate::bus::ChannelPost>>) {}
        fn reopen_sessions(&self) {}
    }

    fn subscriber(redis: &RedisConfig, visibility: PresenceVisibility) -> Subscriber {
        Subscriber {
            url: String::new(),
            redis: redis.clone(),
            gateway_id: "gw".into(),
            visibility,
            store: None,
            watches: Arc::default(),
            sink: Arc::new(NoSink),
            stop: Arc::default(),
        }
    }

    fn change(user: &str, online: bool) -> PresenceChanges {
        PresenceChanges {
            gateway_id: "gw".into(),
            presences: vec![pb::Presence {
                user_id: user.into(),
                online,
                last_seen_ms: 0,
            }],
        }
    }

    /// A batcher of gateway `gw` on `redis`, fed by nobody (the tests call
    /// its steps themselves).
    fn test_batcher(
        redis: RedisConfig,
        sink: Arc<dyn DeliverySink>,
        max_connections_per_account: Option<u32>,
    ) -> Batcher {
        let (_tx, rx) = crossbeam_channel::unbounded();
        Batcher {
            gateway_id: "gw".into(),
            store: RedisStore::connect(redis).unwrap(),
            watches: Arc::default(),
            rx,
            timing: PresenceTiming::default(),
            mark: Arc::default(),
            stop: Arc::default(),
            on_replaced: Box::new(|_| {}),
            sink,
            max_connections_per_account,
            pending: Vec::new(),
            last_lease: Instant::now(),
            unanswered: Arc::default(),
        }
    }

    fn conns(frames: &[Outbound]) -> Vec<u64> {
        let mut c: Vec<u64> = frames.iter().map(|o| o.conn).collect();
        c.sort();
        c
    }

    /// A flush of more changes than one pipeline takes (a gateway reopening
    /// all its sessions) writes them in pipelines of at most
    /// `MAX_CHANGES_PER_FLUSH`: every change lands, the flush mark reaches
    /// the last, and Redis saw one lease renewal per pipeline.
    #[test]
    fn a_large_flush_goes_out_in_bounded_pipelines() {
        let server = palaver_testkit::stack::Redis::start().expect("start redis-server");
        let redis = RedisConfig::standalone(server.url());
        let mut batcher = test_batcher(redis, Arc::new(NoSink), None);
        let n = 2 * MAX_CHANGES_PER_FLUSH + 1;
        for i in 0..n as u64 {
            let session = Session {
                user_id: format!("u{i}"),
                device_id: "phone".into(),
                addr: SessionAddr {
                    gateway_id: "gw".into(),
                    conn: i,
                },
            };
            batcher
                .pending
                .push((i + 1, SessionChange::Opened(session)));
        }
        batcher.flush(1);

        assert!(batcher.pending.is_empty());
        assert_eq!(*batcher.mark.flushed.lock().unwrap(), n as u64);
        let count = |command: &str| -> String { server.command(command).unwrap() };
        assert_eq!(count("HLEN gwc:{gw}").trim(), format!(":{n}"));
        let lease_sets: u64 = count("INFO commandstats")
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_set:calls="))
            .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap());
        assert_eq!(lease_sets, 3, "one lease renewal per pipeline");
    }

    /// The bridge's fan-out applies the visibility rule at event time, over
    /// Redis: a stranger's watch gets nothing, a member's gets the event, and
    /// removal from the last shared conversation stops it.
    #[test]
    fn fan_out_sends_events_only_to_watchers_who_may_see_them() {
        let server = palaver_testkit::stack::Redis::start().expect("start redis-server");
        let redis = RedisConfig::standalone(server.url());
        let mut store = RedisStore::connect(redis.clone()).unwrap();
        let bob = vec!["bob".to_string()];
        let mut sub = subscriber(&redis, PresenceVisibility::SharedConversation);
        {
            let mut w = presence::lock(&sub.watches);
            for (conn, user, gateway) in [
                (1, "alice", "gw"),
                (2, "mallory", "gw"),
                (3, "bob", "gw"),
                (1, "alice", "other"),
            ] {
                let watcher = Session {
                    user_id: user.into(),
                    device_id: "d".into(),
                    addr: SessionAddr {
                        gateway_id: gateway.into(),
                        conn,
                    },
                };
                w.add(&watcher, &bob, 10).unwrap();
            }
        }
        assert_eq!(conns(&sub.fan_out(&change("bob", true))), [3], "only self");

        store
            .add_conversation_to_users("grp:g1", &["alice".into(), "bob".into()])
            .unwrap();
        let frames = sub.fan_out(&change("bob", false));
        assert_eq!(conns(&frames), [1, 3], "this gateway's watchers only");
        assert!(matches!(
            &frames[0].frame.body,
            Some(Body::PresenceEvent(pb::PresenceEvent { presence: Some(p) }))
                if p.user_id == "bob" && !p.online
        ));

        store
            .remove_conversation_from_users("grp:g1", &["bob".into()])
            .unwrap();
        assert_eq!(conns(&sub.fan_out(&change("bob", true))), [3]);

        let mut open = subscriber(&redis, PresenceVisibility::Everyone);
        open.watches = sub.watches.clone();
        assert_eq!(conns(&open.fan_out(&change("bob", true))), [1, 2, 3]);
    }

    struct Collect(Mutex<Vec<Outbound>>);
    impl DeliverySink for Collect {
        fn deliver(&self, frames: Vec<Outbound>) {
            self.0.lock().unwrap().extend(frames);
        }
        fn deliver_channel(&self, _: Vec<Arc<crate::bus::ChannelPost>>) {}
        fn reopen_sessions(&self) {}
    }

    fn session(user: &str, device: &str, gateway: &str, conn: u64) -> Session {
        Session {
            user_id: user.into(),
            device_id: device.into(),
            addr: SessionAddr {
                gateway_id: gateway.into(),
                conn,
            },
        }
    }

    /// SPEC §4 across gateways: a connection opened beside the cap's worth
    /// of the user's other devices' sessions on live gateways gets
    /// `Error{TOO_MANY_CONNECTIONS}` (request_id 0) through the sink; a
    /// session on a gateway whose lease ran out does not count, and a
    /// device reconnecting is not one more.
    #[test]
    fn a_connection_over_the_account_cap_across_gateways_is_closed() {
        use crate::store::{GatewayRegistry, SessionStore};
        let server = palaver_testkit::stack::Redis::start().expect("start redis-server");
        let redis = RedisConfig::standalone(server.url());
        let mut elsewhere = RedisStore::connect(redis.clone()).unwrap();
        let now = SystemClock.now_ms();
        // d1 on a live gateway; d2 on one whose lease has run out.
        elsewhere
            .apply_sessions(
                "other",
                Duration::from_secs(60),
                now,
                &[SessionChange::Opened(session("u", "d1", "other", 1))],
            )
            .unwrap();
        elsewhere
            .register_gateway("gone", Duration::from_millis(1), now)
            .unwrap();
        elsewhere
            .apply_sessions(
                "gone",
                Duration::from_millis(1),
                now,
                &[SessionChange::Opened(session("u", "d2", "gone", 2))],
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));

        let sink = Arc::new(Collect(Mutex::new(Vec::new())));
        let mut batcher = test_batcher(redis, sink.clone(), Some(2));
        let mut n = 0;
        let mut apply = |batcher: &mut Batcher, change: SessionChange| -> Vec<Outbound> {
            n += 1;
            batcher.pending.push((n, change));
            batcher.flush(SystemClock.now_ms());
            std::mem::take(&mut *sink.0.lock().unwrap())
        };
        // d3 here: beside d1 (live) and d2 (dead): one, under the cap.
        assert_eq!(
            apply(
                &mut batcher,
                SessionChange::Opened(session("u", "d3", "gw", 3))
            ),
            vec![]
        );
        // d4 here: beside d1 and d3, both live: at the cap, so d4 goes.
        let closed = apply(
            &mut batcher,
            SessionChange::Opened(session("u", "d4", "gw", 4)),
        );
        assert_eq!(closed.len(), 1, "{closed:?}");
        assert_eq!(closed[0].conn, 4);
        assert_eq!(closed[0].frame.request_id, 0);
        assert!(closed[0].closes_connection());
        assert!(matches!(&closed[0].frame.body,
            Some(pb::frame::Body::Error(e)) if e.code == pb::ErrorCode::TooManyConnections as u32));
        // Its close removes it; d3 reconnecting replaces itself, not one more.
        assert_eq!(
            apply(
                &mut batcher,
                SessionChange::Closed {
                    session: session("u", "d4", "gw", 4),
                    at_ms: now,
                }
            ),
            vec![]
        );
        assert_eq!(
            apply(
                &mut batcher,
                SessionChange::Opened(session("u", "d3", "gw", 5))
            ),
            vec![]
        );
        // Another user is not affected.
        assert_eq!(
            apply(
                &mut batcher,
                SessionChange::Opened(session("v", "d1", "gw", 6))
            ),
            vec![]
        );
    }
}
