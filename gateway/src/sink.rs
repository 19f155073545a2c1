//! The path from the backend to the core threads: one bounded crossbeam
//! channel per core plus its `mio::Waker`, woken at most once per drain
//! (a "wake pending" flag the core clears before draining). A push made on
//! the core's own thread (a backend hosted on that core, or an answer the
//! backend gives inside `submit_batch`) does not wake it: the core drains
//! its channel at the end of every turn anyway.
//!
//! Connection keys (`Outbound.conn`, `SessionAddr.conn`) are
//! `core:8 | slot:24 | generation:32`, so the sink routes without a lookup
//! and a core drops frames for a slot that has since been reused.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use palaver_router::api::{DeliverySink, Outbound};
use palaver_router::ChannelPost;

use crate::metrics::CoreMetrics;

/// Batches a core's delivery queue holds before the sink drops (and counts).
pub const DELIVERY_QUEUE_BATCHES: usize = 64 * 1024;

/// Batches of channel posts a core's queue holds before the sink drops (and
/// counts) them: live copies are lost, never the messages (stored; the
/// clients' next Sync has them).
pub const CHANNEL_QUEUE_BATCHES: usize = 4 * 1024;

/// A batch of channel posts, shared by every core.
pub type ChannelPosts = Vec<Arc<ChannelPost>>;

pub fn conn_key(core: usize, slot: usize, generation: u32) -> u64 {
    ((core as u64 & 0xff) << 56) | ((slot as u64 & 0xff_ffff) << 32) | u64::from(generation)
}

/// `(core, slot, generation)` of a connection key.
pub fn split_key(key: u64) -> (usize, usize, u32) {
    (
        (key >> 56) as usize,
        ((key >> 32) & 0xff_ffff) as usize,
        key as u32,
    )
}

/// Commands from the process to a core thread.
#[derive(Debug)]
pub enum Control {
    /// Stop accepting, send GoAway(SHUTDOWN) to every session, close what is
    /// left when `deadline_ms` (core clock) passes, then exit.
    Drain {
        reconnect_delay_ms: u32,
        reconnect_jitter_ms: u32,
        deadline_ms: u32,
    },
    /// Close everything now and exit.
    Stop,
    /// Tell the backend about every open session again
    /// ([`DeliverySink::reopen_sessions`]).
    ReopenSessions,
}

thread_local! {
    /// The mailbox of the core running on this thread (its address), 0 on
    /// other threads.
    static OWN_MAILBOX: Cell<usize> = const { Cell::new(0) };
}

/// A core thread's inbox.
pub struct Mailbox {
    deliveries: Sender<Vec<Outbound>>,
    channel_posts: Sender<ChannelPosts>,
    control: Sender<Control>,
    waker: mio::Waker,
    wake_pending: AtomicBool,
    pub(crate) metrics: Arc<CoreMetrics>,
}

/// The receiving half, owned by the core thread.
pub struct MailboxRx {
    pub deliveries: Receiver<Vec<Outbound>>,
    pub channel_posts: Receiver<ChannelPosts>,
    pub control: Receiver<Control>,
}

impl Mailbox {
    pub fn new(waker: mio::Waker, metrics: Arc<CoreMetrics>) -> (Arc<Mailbox>, MailboxRx) {
        let (dtx, drx) = crossbeam_channel::bounded(DELIVERY_QUEUE_BATCHES);
        let (ptx, prx) = crossbeam_channel::bounded(CHANNEL_QUEUE_BATCHES);
        let (ctx, crx) = crossbeam_channel::unbounded();
        let mailbox = Arc::new(Mailbox {
            deliveries: dtx,
            channel_posts: ptx,
            control: ctx,
            waker,
            wake_pending: AtomicBool::new(false),
            metrics,
        });
        (
            mailbox,
            MailboxRx {
                deliveries: drx,
                channel_posts: prx,
                control: crx,
            },
        )
    }

    /// Marks the calling thread as the one that owns and drains this
    /// mailbox (the core thread, at its start).
    pub fn enter(&self) {
        OWN_MAILBOX.with(|own| own.set(self as *const Mailbox as usize));
    }

    fn on_own_thread(&self) -> bool {
        OWN_MAILBOX.with(|own| own.get() == self as *const Mailbox as usize)
    }

    /// Wakes the core unless called on the core's own thread (which drains
    /// its channel and runs its hosted backend before it next waits).
    pub fn nudge(&self) {
        if !self.on_own_thread() {
            self.wake();
        }
    }

    fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            // A failed wake means the core's poll is gone: the core has exited.
            let _ = self.waker.wake();
        }
    }

    /// Called by the core before draining its channels, so anything sent
    /// after the drain started wakes it again.
    pub fn clear_wake(&self) {
        self.wake_pending.store(false, Ordering::Release);
    }

    pub fn send_control(&self, control: Control) {
        if self.control.send(control).is_ok() {
            self.wake();
        }
    }

    fn push_channel_posts(&self, posts: ChannelPosts) {
        let n = posts.len() as u64;
        match self.channel_posts.try_send(posts) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics
                    .channel_posts_dropped
                    .fetch_add(n, Ordering::Relaxed);
            }
        }
        self.nudge();
    }

    fn push(&self, batch: Vec<Outbound>) {
        let n = batch.len() as u64;
        match self.deliveries.try_send(batch) {
            Ok(()) => self.nudge(),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics
                    .delivery_queue_drops
                    .fetch_add(n, Ordering::Relaxed);
                self.nudge();
            }
        }
    }
}

/// The gateway's [`DeliverySink`]: routes each frame to its core's mailbox.
pub struct GatewaySink {
    mailboxes: Vec<Arc<Mailbox>>,
}

impl GatewaySink {
    pub fn new(mailboxes: Vec<Arc<Mailbox>>) -> Self {
        GatewaySink { mailboxes }
    }
}

impl DeliverySink for GatewaySink {
    fn deliver(&self, batch: Vec<Outbound>) {
        let Some(first) = batch.first() else { return };
        let core = split_key(first.conn).0;
        // Common case: the whole batch is for one core; hand it over as is.
        if batch.iter().all(|o| split_key(o.conn).0 == core) {
            match self.mailboxes.get(core) {
                Some(mb) => mb.push(batch),
                None => self.count_stale(batch.len()),
            }
            return;
        }
        let mut per_core: Vec<Vec<Outbound>> =
            (0..self.mailboxes.len()).map(|_| Vec::new()).collect();
        for o in batch {
            match per_core.get_mut(split_key(o.conn).0) {
                Some(v) => v.push(o),
                None => self.count_stale(1),
            }
        }
        for (mb, part) in self.mailboxes.iter().zip(per_core) {
            if !part.is_empty() {
                mb.push(part);
            }
        }
    }

    fn deliver_channel(&self, posts: ChannelPosts) {
        // Every core: any may hold a connection with the channel open.
        for mb in &self.mailboxes {
            mb.push_channel_posts(posts.clone());
        }
    }

    fn reopen_sessions(&self) {
        for mb in &self.mailboxes {
            mb.send_control(Control::ReopenSessions);
        }
    }
}

impl GatewaySink {
    fn count_stale(&self, n: usize) {
        if let Some(mb) = self.mailboxes.first() {
            mb.metrics
                .stale_deliveries
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_roundtrip() {
        let k = conn_key(3, 0x12_3456, 0xdead_beef);
        assert_eq!(split_key(k), (3, 0x12_3456, 0xdead_beef));
        assert_eq!(
            split_key(conn_key(255, 0xff_ffff, u32::MAX)),
            (255, 0xff_ffff, u32::MAX)
        );
    }
}
