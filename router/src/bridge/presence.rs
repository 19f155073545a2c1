//! Batched presence for one gateway, as DESIGN.md "Presence without a
//! heartbeat storm" asks: Redis sees churn plus gateways, never connections.
//!
//! - Core threads only enqueue [`SessionChange`]s (a channel send).
//! - The batcher thread writes them in ONE pipeline per flush interval
//!   (session registry, last-seen, push-pending reset), renews the gateway's
//!   lease once per tick (`SET gw:{gw}:lease:<id> … PX`), and once per tick
//!   checks (one script call) for gateways whose lease expired, reaping their
//!   sessions so their users go offline together.
//! - Presence changes (came online / went offline, from the tick's replies or
//!   from a reap) are published once per flush on Redis pub/sub; every
//!   gateway's subscriber thread fans them out to ITS local watchers.
//! - Watches (PresenceSubscribe) live in memory here, per gateway, with the
//!   user of each watching connection: the subscriber thread applies the
//!   presence visibility rule (`crate::logic::presence_visible`,
//!   SPEC §10) when it fans an event out, one `SMEMBERS` plus one pipelined
//!   `SMISMEMBER` round trip per changed user that has local watchers.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::{DeliverySink, Outbound, Session, SessionAddr};
use crate::kafka::records::PresenceChanges;
use crate::logic::presence_visible;
use crate::redis_store::{RedisConfig, RedisStore, SessionChange, PRESENCE_CHANNEL};
use crate::Clock;
use crate::PresenceVisibility;
use crate::SystemClock;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use palaver_protocol::pb::{self, frame::Body};
use prost::Message as _;

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

/// Which local connections watch which users.
#[derive(Default)]
pub struct Watches {
    by_user: HashMap<String, HashSet<u64>>,
    by_conn: HashMap<u64, HashSet<String>>,
    /// The user of each watching connection (for the visibility rule).
    users: HashMap<u64, String>,
}

impl Watches {
    /// Adds watches, all or nothing; `Err(current count)` if the connection
    /// would watch more than `max` users. Returns the users newly added.
    pub fn add(&mut self, conn: u64, users: &[String], max: usize) -> Result<Vec<String>, usize> {
        let current = self.by_conn.get(&conn);
        let count = current.map_or(0, HashSet::len);
        let mut new: Vec<String> = users
            .iter()
            .filter(|u| !current.is_some_and(|c| c.contains(*u)))
            .cloned()
            .collect();
        new.sort();
        new.dedup();
        if count + new.len() > max {
            return Err(count);
        }
        for user in &new {
            self.by_user.entry(user.clone()).or_default().insert(conn);
        }
        self.by_conn
            .entry(conn)
            .or_default()
            .extend(new.iter().cloned());
        Ok(new)
    }

    /// Records which user `conn` belongs to (kept while it watches anyone).
    pub fn set_user(&mut self, conn: u64, user_id: &str) {
        if self.by_conn.contains_key(&conn) {
            self.users.insert(conn, user_id.to_owned());
        }
    }

    /// The user of a watching connection, if known.
    pub fn user_of(&self, conn: u64) -> Option<&str> {
        self.users.get(&conn).map(String::as_str)
    }

    pub fn remove(&mut self, conn: u64, users: &[String]) {
        if let Some(set) = self.by_conn.get_mut(&conn) {
            for user in users {
                if set.remove(user) {
                    unlink(&mut self.by_user, user, conn);
                }
            }
            if set.is_empty() {
                self.by_conn.remove(&conn);
                self.users.remove(&conn);
            }
        }
    }

    pub fn drop_conn(&mut self, conn: u64) {
        self.users.remove(&conn);
        if let Some(set) = self.by_conn.remove(&conn) {
            for user in &set {
                unlink(&mut self.by_user, user, conn);
            }
        }
    }

    pub fn watchers_of(&self, user: &str) -> impl Iterator<Item = u64> + '_ {
        self.by_user.get(user).into_iter().flatten().copied()
    }
}

fn unlink(by_user: &mut HashMap<String, HashSet<u64>>, user: &str, conn: u64) {
    if let Some(set) = by_user.get_mut(user) {
        set.remove(&conn);
        if set.is_empty() {
            by_user.remove(user);
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

/// A replaced connection somewhere: the bridge sends it GoAway(REPLACED).
pub type ReplacedHandler = Box<dyn Fn(SessionAddr) + Send + Sync>;

/// The presence half of the bridge.
pub struct Presence {
    gateway_id: String,
    changes: Sender<Job>,
    enqueued: AtomicU64,
    mark: Arc<FlushMark>,
    pub watches: Arc<Mutex<Watches>>,
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

/// Local watchers of one presence change, with their users ("" when
/// unknown: such a watcher gets nothing).
fn watchers_with_users(watches: &Watches, user_id: &str) -> (Vec<u64>, Vec<String>) {
    watches
        .watchers_of(user_id)
        .map(|conn| (conn, watches.user_of(conn).unwrap_or_default().to_owned()))
        .unzip()
}

/// Frames for the local watchers of one presence change that may see it.
fn presence_frames(
    presence: &pb::Presence,
    conns: &[u64],
    visible: &[bool],
    out: &mut Vec<Outbound>,
) {
    let frame = pb::Frame {
        request_id: 0,
        body: Some(Body::PresenceEvent(pb::PresenceEvent {
            presence: Some(presence.clone()),
        })),
    };
    for (&conn, _) in conns.iter().zip(visible).filter(|(_, v)| **v) {
        out.push(Outbound {
            conn,
            frame: frame.clone(),
        });
    }
}

fn encode_changes(gateway_id: &str, changes: &[(String, bool, i64)]) -> Vec<u8> {
    PresenceChanges {
        gateway_id: gateway_id.to_owned(),
        presences: changes
            .iter()
            .map(|(user_id, online, last_seen_ms)| pb::Presence {
                user_id: user_id.clone(),
                online: *online,
                last_seen_ms: *last_seen_ms,
            })
            .collect(),
    }
    .encode_to_vec()
}

impl Presence {
    pub fn new(gateway_id: &str) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Self {
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
            rx,
            timing,
            mark: self.mark.clone(),
            stop: self.stop.clone(),
            on_replaced,
            pending: Vec::new(),
            last_lease: Instant::now(),
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
        let n = self.enqueued.fetch_add(1, Ordering::AcqRel) + 1;
        let _ = self
            .changes
            .send(Job::Change(n, SessionChange::Opened(session.clone())));
    }

    pub fn session_closed(&self, session: &Session, at_ms: i64) {
        if let Ok(mut w) = self.watches.lock() {
            w.drop_conn(session.addr.conn);
        }
        let n = self.enqueued.fetch_add(1, Ordering::AcqRel) + 1;
        let _ = self.changes.send(Job::Change(
            n,
            SessionChange::Closed {
                session: session.clone(),
                at_ms,
            },
        ));
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
    rx: Receiver<Job>,
    timing: PresenceTiming,
    mark: Arc<FlushMark>,
    stop: Arc<AtomicBool>,
    on_replaced: ReplacedHandler,
    /// Changes not yet written (kept across a failed flush, in order).
    pending: Vec<(u64, SessionChange)>,
    last_lease: Instant,
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
            let lease_due = self.last_lease.elapsed() >= self.timing.tick;
            if !self.pending.is_empty() || lease_due || deregister {
                self.flush(clock.now_ms());
            }
            if deregister && self.pending.is_empty() {
                self.deregister(clock.now_ms());
                return;
            }
            if last_check.elapsed() >= self.timing.tick {
                last_check = Instant::now();
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

    /// One pipeline: lease + every pending change; then one PUBLISH of the
    /// presence changes, and GoAway for replaced connections.
    fn flush(&mut self, now_ms: i64) {
        let changes: Vec<SessionChange> = self.pending.iter().map(|(_, c)| c.clone()).collect();
        match self
            .store
            .presence_tick(&self.gateway_id, self.timing.lease_ttl, now_ms, &changes)
        {
            Ok(result) => {
                self.last_lease = Instant::now();
                let newest = self.pending.last().map(|(n, _)| *n);
                self.pending.clear();
                if let Some(n) = newest {
                    let mut flushed = self.mark.flushed.lock().expect("flush mark");
                    *flushed = (*flushed).max(n);
                    self.mark.cond.notify_all();
                }
                for (_, old) in result.replaced {
                    (self.on_replaced)(old);
                }
                if !result.changes.is_empty() {
                    let payload = encode_changes(&self.gateway_id, &result.changes);
                    if let Err(e) = self.store.publish_presence(&payload) {
                        tracing::warn!(gateway = %self.gateway_id, "presence publish failed: {e}");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(gateway = %self.gateway_id, pending = self.pending.len(), "presence flush failed, will retry: {e}")
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
    /// Frames for the local watchers allowed to see each change.
    fn fan_out(&mut self, changes: &PresenceChanges) -> Vec<Outbound> {
        let watched: Vec<(&pb::Presence, Vec<u64>, Vec<String>)> = match self.watches.lock() {
            Ok(watches) => changes
                .presences
                .iter()
                .map(|p| {
                    let (conns, users) = watchers_with_users(&watches, &p.user_id);
                    (p, conns, users)
                })
                .filter(|(_, conns, _)| !conns.is_empty())
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut frames = Vec::new();
        for (presence, conns, users) in watched {
            match self.visible(&presence.user_id, &users) {
                Ok(visible) => presence_frames(presence, &conns, &visible, &mut frames),
                // Fail closed: an event nobody may be allowed to see is
                // dropped; the watcher can query again.
                Err(e) => tracing::warn!(
                    "presence event for {} dropped, visibility check failed: {e}",
                    presence.user_id
                ),
            }
        }
        frames
    }

    /// The visibility rule for one changed user and its local watchers'
    /// users (symmetric, so asked once from the changed user's side).
    fn visible(&mut self, user_id: &str, watchers: &[String]) -> Result<Vec<bool>, String> {
        if self.visibility == PresenceVisibility::Everyone {
            return Ok(vec![true; watchers.len()]);
        }
        if self.store.is_none() {
            self.store = Some(RedisStore::connect(self.redis.clone()).map_err(|e| e.to_string())?);
        }
        let store = self.store.as_mut().expect("connected above");
        let result = presence_visible(store, self.visibility, user_id, watchers);
        if result.is_err() {
            self.store = None;
        }
        Ok(result
            .map_err(|e| e.to_string())?
            .into_iter()
            .zip(watchers)
            .map(|(v, w)| v && !w.is_empty())
            .collect())
    }
}

/// Receives every gateway's presence changes and fans them out to local
/// watchers.
struct Subscriber {
    url: String,
    /// For the visibility checks (connected on first use).
    redis: RedisConfig,
    visibility: PresenceVisibility,
    store: Option<RedisStore>,
    watches: Arc<Mutex<Watches>>,
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
    use crate::store::UserStore;

    struct NoSink;
    impl DeliverySink for NoSink {
        fn deliver(&self, _: Vec<Outbound>) {}
    }

    fn subscriber(redis: &RedisConfig, visibility: PresenceVisibility) -> Subscriber {
        Subscriber {
            url: String::new(),
            redis: redis.clone(),
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

    fn conns(frames: &[Outbound]) -> Vec<u64> {
        let mut c: Vec<u64> = frames.iter().map(|o| o.conn).collect();
        c.sort();
        c
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
            let mut w = sub.watches.lock().unwrap();
            for (conn, user) in [(1, "alice"), (2, "mallory"), (3, "bob")] {
                w.add(conn, &bob, 10).unwrap();
                w.set_user(conn, user);
            }
            // Watching, but whose user is unknown: fail closed.
            w.add(4, &bob, 10).unwrap();
        }
        assert_eq!(conns(&sub.fan_out(&change("bob", true))), [3], "only self");

        store
            .add_conversation_to_users("g1", &["alice".into(), "bob".into()])
            .unwrap();
        let frames = sub.fan_out(&change("bob", false));
        assert_eq!(conns(&frames), [1, 3]);
        assert!(matches!(
            &frames[0].frame.body,
            Some(Body::PresenceEvent(pb::PresenceEvent { presence: Some(p) }))
                if p.user_id == "bob" && !p.online
        ));

        store
            .remove_conversation_from_users("g1", &["bob".into()])
            .unwrap();
        assert_eq!(conns(&sub.fan_out(&change("bob", true))), [3]);

        let mut open = subscriber(&redis, PresenceVisibility::Everyone);
        open.watches = sub.watches.clone();
        assert_eq!(conns(&open.fan_out(&change("bob", true))), [1, 2, 3, 4]);
    }
}
