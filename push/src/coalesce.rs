//! The burst window, sans-io: per key (the worker's is (user,
//! conversation)) the first event opens a window of `window`; events inside
//! it merge into the one pending push (the latest seq wins, with its badge);
//! when the window closes the push is due. A conversation that never falls
//! quiet still gets one push per window, not none.
//!
//! Time is whatever the caller passes (`now`), so tests drive it by hand and
//! the worker drives it from its loop: `offer` on each event, `pop_due` when
//! `next_due` has passed.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// What the coalescer needs of an event: its order in the conversation.
pub trait Sequenced {
    fn seq(&self) -> u64;
}

/// One push's worth of events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Burst<K, V> {
    pub key: K,
    /// The event with the highest seq (its badge is the newest unread count).
    pub latest: V,
    /// Events merged into it.
    pub events: u32,
    /// When its window opened.
    pub opened: Instant,
}

struct Pending<V> {
    latest: V,
    events: u32,
    opened: Instant,
    due: (Instant, u64),
}

/// Bounded: at `capacity` open windows, offering a new key closes the
/// window due soonest early (returned to the caller to send now) rather
/// than dropping anything.
pub struct Coalescer<K, V> {
    window: Duration,
    capacity: usize,
    pending: HashMap<K, Pending<V>>,
    /// Due time (and a tie-breaker) → key, to find the next due in order.
    due: BTreeMap<(Instant, u64), K>,
    counter: u64,
}

impl<K: Hash + Eq + Clone, V: Sequenced> Coalescer<K, V> {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity: capacity.max(1),
            pending: HashMap::new(),
            due: BTreeMap::new(),
            counter: 0,
        }
    }

    /// Adds `event` under `key` at `now`. Returns a burst closed early to
    /// make room (only when `capacity` windows are open and `key` is new).
    pub fn offer(&mut self, now: Instant, key: K, event: V) -> Option<Burst<K, V>> {
        if let Some(p) = self.pending.get_mut(&key) {
            p.events += 1;
            if event.seq() > p.latest.seq() {
                p.latest = event;
            }
            return None;
        }
        let evicted = if self.pending.len() >= self.capacity {
            self.pop_first()
        } else {
            None
        };
        self.counter += 1;
        let due = (now + self.window, self.counter);
        self.due.insert(due, key.clone());
        self.pending.insert(
            key,
            Pending {
                latest: event,
                events: 1,
                opened: now,
                due,
            },
        );
        evicted
    }

    /// When the next window closes, if any is open.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.keys().next().map(|(at, _)| *at)
    }

    /// The next burst whose window has closed by `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Burst<K, V>> {
        match self.next_due() {
            Some(at) if at <= now => self.pop_first(),
            _ => None,
        }
    }

    /// Drops `key`'s open window (e.g. the conversation was read on another
    /// device): its push is no longer wanted.
    pub fn cancel(&mut self, key: &K) -> Option<Burst<K, V>> {
        let p = self.pending.remove(key)?;
        self.due.remove(&p.due);
        Some(Burst {
            key: key.clone(),
            latest: p.latest,
            events: p.events,
            opened: p.opened,
        })
    }

    /// Closes every window now (shutdown, partitions revoked).
    pub fn drain(&mut self) -> Vec<Burst<K, V>> {
        let mut out = Vec::with_capacity(self.pending.len());
        while let Some(b) = self.pop_first() {
            out.push(b);
        }
        out
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn pop_first(&mut self) -> Option<Burst<K, V>> {
        let (_, key) = self.due.pop_first()?;
        let p = self.pending.remove(&key)?;
        Some(Burst {
            key,
            latest: p.latest,
            events: p.events,
            opened: p.opened,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Ev {
        seq: u64,
        badge: u32,
    }
    impl Sequenced for Ev {
        fn seq(&self) -> u64 {
            self.seq
        }
    }

    const W: Duration = Duration::from_millis(1500);

    fn ev(seq: u64, badge: u32) -> Ev {
        Ev { seq, badge }
    }

    #[test]
    fn a_burst_is_one_push_with_the_latest_seq_and_badge() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(W, 100);
        for i in 1..=20u64 {
            assert!(c
                .offer(
                    t0 + Duration::from_millis(i * 10),
                    ("bob", "c1"),
                    ev(i, i as u32)
                )
                .is_none());
        }
        assert_eq!(c.len(), 1);
        assert_eq!(c.next_due(), Some(t0 + Duration::from_millis(10) + W));
        assert!(c.pop_due(t0 + W).is_none(), "not before the window closes");
        let b = c.pop_due(t0 + Duration::from_millis(10) + W).unwrap();
        assert_eq!((b.key, b.latest, b.events), (("bob", "c1"), ev(20, 20), 20));
        assert!(c.is_empty() && c.next_due().is_none());
    }

    #[test]
    fn keys_are_separate_and_due_in_order() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(W, 100);
        c.offer(t0, ("bob", "c1"), ev(1, 1));
        c.offer(t0 + Duration::from_millis(100), ("bob", "c2"), ev(7, 2));
        c.offer(t0 + Duration::from_millis(200), ("ann", "c1"), ev(2, 5));
        c.offer(t0 + Duration::from_millis(300), ("bob", "c1"), ev(3, 3));
        let late = t0 + Duration::from_secs(10);
        let order: Vec<_> = std::iter::from_fn(|| c.pop_due(late))
            .map(|b| (b.key, b.latest.seq))
            .collect();
        assert_eq!(
            order,
            vec![(("bob", "c1"), 3), (("bob", "c2"), 7), (("ann", "c1"), 2)]
        );
    }

    #[test]
    fn an_older_event_does_not_replace_a_newer_one() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(W, 10);
        c.offer(t0, 1, ev(5, 9));
        c.offer(t0, 1, ev(4, 8));
        let b = c.drain().pop().unwrap();
        assert_eq!((b.latest, b.events), (ev(5, 9), 2));
    }

    #[test]
    fn a_steady_stream_gets_one_push_per_window() {
        let t0 = Instant::now();
        let mut c: Coalescer<&str, Ev> = Coalescer::new(W, 10);
        let mut pushes = Vec::new();
        // One event every 100 ms for 6 s.
        for i in 0..60u64 {
            let now = t0 + Duration::from_millis(i * 100);
            while let Some(b) = c.pop_due(now) {
                pushes.push(b.latest.seq);
            }
            c.offer(now, "k", ev(i, 0));
        }
        pushes.extend(c.drain().into_iter().map(|b| b.latest.seq));
        assert_eq!(pushes, vec![14, 29, 44, 59]);
    }

    #[test]
    fn full_closes_the_soonest_window_early_and_cancel_drops() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(W, 2);
        assert!(c.offer(t0, "a", ev(1, 1)).is_none());
        assert!(c
            .offer(t0 + Duration::from_millis(1), "b", ev(1, 1))
            .is_none());
        assert!(
            c.offer(t0, "a", ev(2, 2)).is_none(),
            "merging needs no room"
        );
        let early = c
            .offer(t0 + Duration::from_millis(2), "c", ev(1, 1))
            .unwrap();
        assert_eq!((early.key, early.latest.seq), ("a", 2));
        assert_eq!(c.len(), 2);
        assert_eq!(c.cancel(&"b").map(|b| b.events), Some(1));
        assert!(c.cancel(&"b").is_none());
        assert_eq!(c.next_due(), Some(t0 + Duration::from_millis(2) + W));
    }
}
