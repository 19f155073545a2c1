//! Membership changes this gateway's connections sent that the router has
//! not answered yet, so that a connection's close waits for them.
//!
//! A client that removes a member and closes at once (one write: the
//! ChangeMembers, then close_notify + FIN) sends the two down different
//! paths: the ChangeMembers through Kafka to a router, the close to the
//! presence batcher, which writes it to Redis within a flush interval and
//! publishes who went offline. Without a rule the close usually wins, and
//! the member being removed still gets the offline event with the
//! remover's last seen (issue 18). The embedded engine applies requests and
//! session changes in queue order; here the batcher holds such a close
//! (only it) until the router's answer to the connection's earlier
//! ChangeMembers has come back, or [`CLOSE_HOLD`] has passed. The router
//! answers only after its store work, so the removal is in Redis before the
//! close is, and the fan-out's visibility check (at event time) leaves the
//! removed member out.
//!
//! Only ChangeMembers with a non-zero request_id is tracked: an answer is
//! recognised by its request_id (a frame that answers a request,
//! `Outbound::answers_request`: its `MembersChanged` or `Error`), and a
//! connection's answers with request_id 0 cannot be told apart. At most `max_requests_in_flight`
//! per connection are in flight, and an entry goes with its answer or, for
//! a closed connection, once its close is written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::{DeliverySink, Outbound};

/// The longest a close waits for its connection's unanswered membership
/// changes (a router that is down or slow delays presence, not forever).
pub const CLOSE_HOLD: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Waiting {
    /// Request ids of unanswered ChangeMembers.
    requests: Vec<u32>,
    /// When the connection closed, if it did.
    closed_at: Option<Instant>,
}

/// See the module doc.
pub struct Unanswered {
    /// Entries in `conns`: the delivery path looks no further when 0.
    count: AtomicUsize,
    conns: Mutex<HashMap<u64, Waiting>>,
    hold: Duration,
}

impl Default for Unanswered {
    fn default() -> Self {
        Self::new(CLOSE_HOLD)
    }
}

impl Unanswered {
    pub fn new(hold: Duration) -> Self {
        Self {
            count: AtomicUsize::new(0),
            conns: Mutex::new(HashMap::new()),
            hold,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiting>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn recount(&self, conns: &HashMap<u64, Waiting>) {
        self.count.store(conns.len(), Ordering::Release);
    }

    /// A ChangeMembers of `conn` goes to the router (before it is
    /// produced, so an immediate UNAVAILABLE finds it).
    pub fn sent(&self, conn: u64, request_id: u32) {
        if request_id == 0 {
            return;
        }
        let mut conns = self.lock();
        conns.entry(conn).or_default().requests.push(request_id);
        self.recount(&conns);
    }

    /// Frames about to be delivered: answers of tracked requests (frames
    /// that answer a request, [`Outbound::answers_request`], echoing their
    /// request_id) settle them.
    pub fn delivered(&self, frames: &[Outbound]) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut conns = self.lock();
        for out in frames {
            if !out.answers_request || out.frame.request_id == 0 {
                continue;
            }
            if let Some(waiting) = conns.get_mut(&out.conn) {
                if let Some(i) = waiting
                    .requests
                    .iter()
                    .position(|r| *r == out.frame.request_id)
                {
                    waiting.requests.swap_remove(i);
                }
                if waiting.requests.is_empty() {
                    conns.remove(&out.conn);
                }
            }
        }
        self.recount(&conns);
    }

    /// `conn` closed (its close is about to be queued for the batcher).
    pub fn closed(&self, conn: u64) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some(waiting) = self.lock().get_mut(&conn) {
            waiting.closed_at.get_or_insert_with(Instant::now);
        }
    }

    /// Whether the close of `conn` waits now: it has unanswered membership
    /// changes and closed less than the hold ago.
    pub fn holds(&self, conn: u64) -> bool {
        self.holds_at(conn, Instant::now())
    }

    fn holds_at(&self, conn: u64, now: Instant) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.lock().get(&conn).is_some_and(|w| {
            !w.requests.is_empty()
                && w.closed_at
                    .is_none_or(|at| now.saturating_duration_since(at) < self.hold)
        })
    }

    /// The close of `conn` was written: whatever was still unanswered is
    /// forgotten.
    pub fn applied(&self, conn: u64) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut conns = self.lock();
        conns.remove(&conn);
        self.recount(&conns);
    }
}

/// The gateway's sink, seeing the answers go by first.
pub struct AnswerSink {
    pub inner: Arc<dyn DeliverySink>,
    pub unanswered: Arc<Unanswered>,
}

impl DeliverySink for AnswerSink {
    fn deliver(&self, batch: Vec<Outbound>) {
        self.unanswered.delivered(&batch);
        self.inner.deliver(batch);
    }

    fn deliver_channel(&self, posts: Vec<Arc<crate::bus::ChannelPost>>) {
        self.inner.deliver_channel(posts);
    }

    fn reopen_sessions(&self) {
        self.inner.reopen_sessions();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palaver_protocol::pb::{self, frame::Body};

    fn answer(conn: u64, request_id: u32) -> Outbound {
        Outbound {
            conn,
            frame: pb::Frame {
                request_id,
                body: Some(Body::MembersChanged(pb::MembersChanged::default())),
            },
            answers_request: request_id != 0,
        }
    }

    #[test]
    fn a_close_is_held_until_its_membership_changes_are_answered_or_the_hold_passes() {
        let u = Unanswered::new(Duration::from_secs(5));
        assert!(!u.holds(1), "nothing sent");
        u.sent(1, 7);
        u.sent(1, 8);
        u.sent(2, 0);
        u.closed(1);
        assert!(u.holds(1));
        assert!(!u.holds(2), "request_id 0 is not tracked");
        // An event (request_id 0) and another connection's answer settle
        // nothing; the answers to 7 and 8 do.
        u.delivered(&[answer(1, 0), answer(3, 7), answer(1, 7)]);
        assert!(u.holds(1));
        u.delivered(&[answer(1, 8)]);
        assert!(!u.holds(1));
        assert_eq!(u.count.load(Ordering::Relaxed), 0, "nothing left behind");

        // Never answered: held for the hold only, then forgotten when the
        // close is written.
        u.sent(4, 1);
        u.closed(4);
        assert!(u.holds(4));
        assert!(!u.holds_at(4, Instant::now() + Duration::from_secs(5)));
        u.applied(4);
        assert_eq!(u.count.load(Ordering::Relaxed), 0);
    }
}
