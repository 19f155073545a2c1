//! The sending machinery the push worker calls: a [`Notification`] in, a
//! [`SendResult`] out, with everything between here — a bounded queue per
//! provider endpoint, concurrency as streams of the one HTTP/2 connection,
//! retries with backoff and jitter that honour `Retry-After`, up to a
//! deadline derived from the notification's time to live.
//!
//! Nothing here knows Kafka or the token store: the worker submits, waits
//! for the tickets of its batch, invalidates tokens on
//! [`SendResult::TokenInvalid`] and dead-letters [`SendResult::Failed`].

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use crate::apns::{ApnsClient, ApnsRequest};
use crate::backoff::Backoff;
use crate::fcm::FcmClient;
use crate::notification::{ApnsEnvironment, Notification, Platform};
use crate::Attempt;

/// Limits and retry policy, per provider endpoint.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// Notifications waiting for a sending slot; a submit beyond it is
    /// refused with [`SubmitError::QueueFull`].
    pub queue_capacity: usize,
    /// Notifications being sent or waiting to retry at once (their streams
    /// share the one connection, within the server's stream limit).
    pub max_in_flight: usize,
    /// First retry pause, doubling with jitter up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Attempts at most (the first included).
    pub max_attempts: u32,
    /// Retries stop at the notification's TTL after submission, but not
    /// before `min_retry_window` (a TTL of 0 still gets a few tries) and not
    /// after `max_retry_window` (the worker waits for the result).
    pub min_retry_window: Duration,
    pub max_retry_window: Duration,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 10_000,
            max_in_flight: 1_000,
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            max_attempts: 12,
            min_retry_window: Duration::from_secs(10),
            max_retry_window: Duration::from_secs(120),
        }
    }
}

/// What became of one notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendResult {
    /// The provider accepted it (its id for it, if any), after `attempts`.
    Delivered { id: Option<String>, attempts: u32 },
    /// The device token is dead since `since_ms` (Unix ms; APNs' 410
    /// timestamp, else the time of the answer): remove it unless it was
    /// registered again later.
    TokenInvalid { since_ms: i64, reason: String },
    /// Not delivered. `permanent`: sending it again cannot help (bad
    /// request, credentials refused); otherwise the retries ran out.
    Failed { reason: String, permanent: bool },
}

/// A provider endpoint, as the sender routes to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    Apns(ApnsEnvironment),
    Fcm,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Apns(ApnsEnvironment::Production) => f.write_str("apns"),
            Route::Apns(ApnsEnvironment::Sandbox) => f.write_str("apns-sandbox"),
            Route::Fcm => f.write_str("fcm"),
        }
    }
}

impl Route {
    pub fn of(n: &Notification) -> Self {
        match n.platform {
            Platform::Apns => Route::Apns(n.apns_environment),
            Platform::Fcm => Route::Fcm,
        }
    }
}

/// The provider's queue is full: the notification was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{route} push queue full ({capacity} waiting)")]
pub struct QueueFull {
    pub route: Route,
    pub capacity: usize,
}

/// Why a notification was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    QueueFull(#[from] QueueFull),
    /// No client for its provider (no credentials configured for it).
    #[error("no {0} credentials configured")]
    NoProvider(Route),
    #[error("the sender has shut down")]
    Closed,
}

/// The result of a submitted notification, when it is known.
pub struct Ticket {
    inner: TicketInner,
}

enum TicketInner {
    Ready(SendResult),
    Pending(oneshot::Receiver<SendResult>),
}

impl Ticket {
    pub async fn result(self) -> SendResult {
        match self.inner {
            TicketInner::Ready(r) => r,
            TicketInner::Pending(rx) => rx.await.unwrap_or_else(|_| shut_down()),
        }
    }

    /// Blocks the calling thread until the result is known: for the worker's
    /// synchronous handler. Must not be called on the sender's runtime.
    pub fn wait(self) -> SendResult {
        match self.inner {
            TicketInner::Ready(r) => r,
            TicketInner::Pending(rx) => rx.blocking_recv().unwrap_or_else(|_| shut_down()),
        }
    }
}

fn shut_down() -> SendResult {
    SendResult::Failed {
        reason: "the sender shut down before sending".into(),
        permanent: false,
    }
}

/// Counters of one provider endpoint.
#[derive(Debug, Default)]
struct Counters {
    submitted: AtomicU64,
    queue_full: AtomicU64,
    delivered: AtomicU64,
    token_invalid: AtomicU64,
    failed_permanent: AtomicU64,
    failed_gave_up: AtomicU64,
    retries: AtomicU64,
}

/// A snapshot of one provider endpoint's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteStats {
    pub submitted: u64,
    /// Submits refused because the queue was full (the metric to alert on).
    pub queue_full: u64,
    pub delivered: u64,
    pub token_invalid: u64,
    pub failed_permanent: u64,
    /// Failed after running out of attempts or time.
    pub failed_gave_up: u64,
    /// Attempts after the first, all notifications together.
    pub retries: u64,
    /// Waiting in the queue now.
    pub queued: u64,
}

#[derive(Clone)]
enum Client {
    Apns(ApnsClient),
    Fcm(FcmClient),
}

struct Job {
    prepared: Prepared,
    deadline: Instant,
    reply: oneshot::Sender<SendResult>,
}

enum Prepared {
    Apns(ApnsRequest),
    Fcm(Bytes),
}

struct RouteHandle {
    tx: mpsc::Sender<Job>,
    capacity: usize,
    counters: Arc<Counters>,
}

/// Builds a [`Sender`] from the provider clients that have credentials.
pub struct SenderBuilder {
    config: SenderConfig,
    clients: Vec<(Route, Client)>,
}

impl SenderBuilder {
    /// The APNs client for one environment's endpoint.
    pub fn apns(mut self, environment: ApnsEnvironment, client: ApnsClient) -> Self {
        self.clients
            .push((Route::Apns(environment), Client::Apns(client)));
        self
    }

    pub fn fcm(mut self, client: FcmClient) -> Self {
        self.clients.push((Route::Fcm, Client::Fcm(client)));
        self
    }

    /// Starts one dispatcher task per provider on `runtime`.
    pub fn start(self, runtime: &Handle) -> Sender {
        let config = Arc::new(self.config);
        let mut routes = HashMap::new();
        for (route, client) in self.clients {
            let capacity = config.queue_capacity.max(1);
            let (tx, rx) = mpsc::channel(capacity);
            let counters = Arc::new(Counters::default());
            runtime.spawn(dispatch(rx, client, config.clone(), counters.clone()));
            routes.insert(
                route,
                RouteHandle {
                    tx,
                    capacity,
                    counters,
                },
            );
        }
        Sender { routes, config }
    }
}

/// Sends notifications through the configured providers. Submitting never
/// blocks: it queues, or says why not.
pub struct Sender {
    routes: HashMap<Route, RouteHandle>,
    config: Arc<SenderConfig>,
}

impl Sender {
    pub fn builder(config: SenderConfig) -> SenderBuilder {
        SenderBuilder {
            config,
            clients: Vec::new(),
        }
    }

    /// True if notifications for `route` can be sent (credentials given).
    pub fn serves(&self, route: Route) -> bool {
        self.routes.contains_key(&route)
    }

    /// Queues `n` for sending. A notification that cannot be rendered (no
    /// APNs topic, a payload that cannot fit) gets its permanent failure in
    /// the ticket at once.
    pub fn submit(&self, n: Notification) -> Result<Ticket, SubmitError> {
        let route = Route::of(&n);
        let handle = self
            .routes
            .get(&route)
            .ok_or(SubmitError::NoProvider(route))?;
        let prepared = match prepare(&n) {
            Ok(p) => p,
            Err(reason) => {
                handle.counters.submitted.fetch_add(1, Ordering::Relaxed);
                handle
                    .counters
                    .failed_permanent
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(Ticket {
                    inner: TicketInner::Ready(SendResult::Failed {
                        reason,
                        permanent: true,
                    }),
                });
            }
        };
        let window = n.ttl.clamp(
            self.config.min_retry_window,
            self.config
                .max_retry_window
                .max(self.config.min_retry_window),
        );
        let (reply, rx) = oneshot::channel();
        let job = Job {
            prepared,
            deadline: Instant::now() + window,
            reply,
        };
        match handle.tx.try_send(job) {
            Ok(()) => {
                handle.counters.submitted.fetch_add(1, Ordering::Relaxed);
                Ok(Ticket {
                    inner: TicketInner::Pending(rx),
                })
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                handle.counters.queue_full.fetch_add(1, Ordering::Relaxed);
                Err(QueueFull {
                    route,
                    capacity: handle.capacity,
                }
                .into())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SubmitError::Closed),
        }
    }

    /// The counters of `route`'s provider (zero if it is not configured).
    pub fn stats(&self, route: Route) -> RouteStats {
        let Some(h) = self.routes.get(&route) else {
            return RouteStats::default();
        };
        let c = &h.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RouteStats {
            submitted: load(&c.submitted),
            queue_full: load(&c.queue_full),
            delivered: load(&c.delivered),
            token_invalid: load(&c.token_invalid),
            failed_permanent: load(&c.failed_permanent),
            failed_gave_up: load(&c.failed_gave_up),
            retries: load(&c.retries),
            queued: (h.tx.max_capacity() - h.tx.capacity()) as u64,
        }
    }
}

fn prepare(n: &Notification) -> Result<Prepared, String> {
    if n.device_token.is_empty() {
        return Err("empty device token".into());
    }
    match n.platform {
        Platform::Apns => {
            let topic = n
                .apns_topic
                .clone()
                .ok_or("APNs notification without apns_topic (the app's bundle id)")?;
            let expiration = if n.ttl.is_zero() {
                0
            } else {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    + n.ttl.as_secs()
            };
            Ok(Prepared::Apns(ApnsRequest {
                device_token: n.device_token.clone(),
                topic,
                push_type: n.apns_push_type(),
                priority: n.apns_priority(),
                expiration,
                collapse_id: n.collapse_id.clone(),
                apns_id: uuid_v4(),
                payload: n.apns_payload()?.into(),
            }))
        }
        Platform::Fcm => Ok(Prepared::Fcm(n.fcm_body()?.into())),
    }
}

/// A random (version 4) UUID, as `apns-id` wants it.
pub(crate) fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

/// Takes jobs off one provider's queue as sending slots free up: the queue
/// holds what waits, the semaphore bounds what is in flight.
async fn dispatch(
    mut rx: mpsc::Receiver<Job>,
    client: Client,
    config: Arc<SenderConfig>,
    counters: Arc<Counters>,
) {
    let slots = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    while let Some(job) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (client, config, counters) = (client.clone(), config.clone(), counters.clone());
        tokio::spawn(async move {
            let result = deliver(&client, &job.prepared, job.deadline, &config, &counters).await;
            drop(permit);
            let counter = match &result {
                SendResult::Delivered { .. } => &counters.delivered,
                SendResult::TokenInvalid { .. } => &counters.token_invalid,
                SendResult::Failed {
                    permanent: true, ..
                } => &counters.failed_permanent,
                SendResult::Failed {
                    permanent: false, ..
                } => &counters.failed_gave_up,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            // The caller may have stopped waiting; the result is counted.
            let _ = job.reply.send(result);
        });
    }
}

async fn deliver(
    client: &Client,
    prepared: &Prepared,
    deadline: Instant,
    config: &SenderConfig,
    counters: &Counters,
) -> SendResult {
    let backoff = Backoff::new(config.retry_min, config.retry_max);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let attempt = match (client, prepared) {
            (Client::Apns(c), Prepared::Apns(r)) => c.send(r).await,
            (Client::Fcm(c), Prepared::Fcm(body)) => c.send(body.clone()).await,
            _ => Attempt::Failed {
                reason: "notification routed to the wrong provider".into(),
            },
        };
        match attempt {
            Attempt::Delivered { id } => return SendResult::Delivered { id, attempts },
            Attempt::TokenInvalid { since_ms, reason } => {
                return SendResult::TokenInvalid { since_ms, reason }
            }
            Attempt::Failed { reason } => {
                return SendResult::Failed {
                    reason,
                    permanent: true,
                }
            }
            Attempt::Retry { after, reason } => {
                // Retry-After is the provider's floor; the jittered backoff
                // keeps retries of one outage from arriving together.
                let wait = after.map_or_else(
                    || backoff.delay(attempts),
                    |a| a.max(backoff.delay(attempts)),
                );
                if attempts >= config.max_attempts || Instant::now() + wait > deadline {
                    return SendResult::Failed {
                        reason: format!("{reason} (gave up after {attempts} attempts)"),
                        permanent: false,
                    };
                }
                tracing::debug!(attempts, ?wait, "push retry: {reason}");
                counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apns_ids_are_uuids() {
        let id = uuid_v4();
        assert_eq!(id.len(), 36);
        assert_eq!(id.as_bytes()[14], b'4');
        assert_eq!(id.matches('-').count(), 4);
        assert_ne!(id, uuid_v4());
    }
}
