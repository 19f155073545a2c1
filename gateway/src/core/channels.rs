//! Fan-out on read (SPEC §21): the channels this core's connections have
//! open, and what a channel post becomes here. A channel message is stored
//! once and published once; every core of every gateway gets the post and
//! hands it to its own connections with the channel open: LIVE ones get the
//! frame (Deliver or Typing, as an event: the slow-consumer rules apply),
//! COUNTS ones the channel's last seq in one batched `ChannelActivity` per
//! `channel_activity_interval_ms`. The backend looks up no member and no
//! session for it.
//!
//! Subscriptions change when an answer passes: a `ChannelOpened` (the
//! backend checked membership) sets the connection's mode, a
//! `MembersChanged` that removes the connection's user from a channel drops
//! it, and a closed connection's go with it. Bounded: a connection holds at
//! most `max_open_channels_per_connection`; a channel's Typing passes at
//! most `channel_typing_per_second` per core; the pending counts are one
//! entry per (connection, channel) open.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use palaver_protocol::error_reply;
use palaver_protocol::pb::{self, frame::Body};
use palaver_router::api::Outbound;

use crate::metrics::CoreMetrics;
use crate::policy::TokenBucket;
use crate::sink::{conn_key, ChannelPosts};

use super::{Conn, Core, Ctx};

impl Core {
    /// Channel posts from the backend: each to this core's connections
    /// with the channel open (not the one it came from), LIVE ones now,
    /// COUNTS ones at the next flush.
    pub(super) fn deliver_channel_posts(&mut self, posts: ChannelPosts) {
        let now = self.ctx.now_ms;
        let per_second = self.ctx.shared.config.limits.channel_typing_per_second;
        let mut batch: Vec<Outbound> = Vec::new();
        let mut targets: Vec<Subscriber> = Vec::new();
        for post in posts {
            CoreMetrics::inc(&self.ctx.metrics.channel_posts);
            let Some((channel, subscribers)) = self.ctx.channels.subscribers(&post.conversation_id)
            else {
                continue;
            };
            let channel = channel.clone();
            targets.clear();
            targets.extend_from_slice(subscribers);
            if matches!(post.frame.body, Some(Body::Typing(_)))
                && !self.ctx.channels.typing_allowed(&channel, per_second, now)
            {
                CoreMetrics::inc(&self.ctx.metrics.channel_typing_dropped);
                continue;
            }
            let from = post
                .from
                .as_ref()
                .filter(|addr| *addr.gateway_id == *self.ctx.shared.gateway_id)
                .map(|addr| addr.conn);
            for &subscriber in &targets {
                let key = conn_key(
                    self.ctx.index,
                    subscriber.slot as usize,
                    subscriber.generation,
                );
                if Some(key) == from {
                    continue;
                }
                if subscriber.live {
                    batch.push(Outbound {
                        conn: key,
                        frame: post.frame.clone(),
                        answers_request: false,
                    });
                } else if post.last_seq > 0 {
                    self.ctx.channels.count(subscriber, &channel, post.last_seq);
                }
            }
        }
        if !batch.is_empty() {
            // One write per connection: its frames together, in order.
            batch.sort_by_key(|o| o.conn);
            self.deliver(batch);
        }
    }

    /// Every `channel_activity_interval_ms`: one `ChannelActivity` to each
    /// connection whose COUNTS channels moved.
    pub(super) fn flush_channel_counts(&mut self) {
        let now = self.ctx.now_ms;
        let interval = u64::from(self.ctx.shared.config.limits.channel_activity_interval_ms);
        if now < self.ctx.channels.flushed_ms + interval {
            return;
        }
        self.ctx.channels.flushed_ms = now;
        let index = self.ctx.index;
        let batch: Vec<Outbound> = self
            .ctx
            .channels
            .take_counts()
            .into_iter()
            .map(|(slot, generation, activity)| Outbound {
                conn: conn_key(index, slot as usize, generation),
                frame: pb::Frame {
                    request_id: 0,
                    body: Some(Body::ChannelActivity(activity)),
                },
                answers_request: false,
            })
            .collect();
        if !batch.is_empty() {
            self.deliver(batch);
        }
    }
}

impl Ctx {
    /// A frame from the backend passing to its connection: a
    /// `ChannelOpened` sets the connection's mode (or, with as many open
    /// as it may have, becomes QUOTA_EXCEEDED), a `MembersChanged` that
    /// removes the connection's user from a channel closes it.
    pub(super) fn channel_answer(
        &mut self,
        slot: usize,
        conn: &Conn,
        frame: pb::Frame,
    ) -> pb::Frame {
        let before = self.channels.len();
        let frame = match &frame.body {
            Some(Body::ChannelOpened(opened)) => {
                let mode =
                    pb::ChannelMode::try_from(opened.mode).unwrap_or(pb::ChannelMode::Closed);
                let max = self.shared.config.limits.max_open_channels_per_connection as usize;
                match self.channels.open(
                    slot as u32,
                    conn.generation,
                    &opened.conversation_id,
                    mode,
                    max,
                ) {
                    Opened::Set => frame,
                    Opened::Full => error_reply(
                        frame.request_id,
                        pb::ErrorCode::QuotaExceeded,
                        format!(
                            "this connection has {max} channels open, the most it may \
                             (limits.max_open_channels_per_connection); close one first"
                        ),
                    ),
                }
            }
            Some(Body::MembersChanged(changed)) => {
                let user = conn.ids.as_ref().map(|ids| ids.user_id());
                if let (Some(conversation), Some(user)) = (&changed.conversation, user) {
                    if palaver_protocol::is_channel_id(&conversation.conversation_id)
                        && changed.removed_user_ids.iter().any(|u| u == user)
                    {
                        self.channels
                            .close(slot as u32, &conversation.conversation_id);
                    }
                }
                frame
            }
            _ => frame,
        };
        self.count_subscriptions(before);
        frame
    }

    /// The connection at `slot` is gone: its channels close.
    pub(super) fn close_channels(&mut self, slot: usize) {
        let before = self.channels.len();
        self.channels.drop_conn(slot as u32);
        self.count_subscriptions(before);
    }

    fn count_subscriptions(&self, before: usize) {
        let after = self.channels.len();
        if after != before {
            self.metrics
                .channel_subscriptions
                .fetch_add(after as i64 - before as i64, Relaxed);
        }
    }
}

/// One connection with a channel open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Subscriber {
    pub slot: u32,
    pub generation: u32,
    pub live: bool,
}

/// What a `ChannelOpened` did to the table.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Opened {
    /// The mode is set (or the channel closed).
    Set,
    /// The connection has as many channels open as it may.
    Full,
}

/// A connection's channels that moved, with their newest seq.
type PendingCounts = Vec<(Arc<str>, u64)>;

#[derive(Default)]
pub(super) struct ChannelTable {
    subscribers: HashMap<Arc<str>, Vec<Subscriber>>,
    /// Each connection's open channels (by slot; the generation is checked
    /// against the subscriber entries).
    by_conn: HashMap<u32, Vec<Arc<str>>>,
    /// COUNTS subscribers whose channel moved since the last flush: slot →
    /// (generation, channel → last seq).
    counts: HashMap<u32, (u32, PendingCounts)>,
    /// Each open channel's Typing budget on this core.
    typing: HashMap<Arc<str>, TokenBucket>,
    /// When the counts were last flushed (core clock).
    pub flushed_ms: u64,
    /// Open (connection, channel) pairs.
    open: usize,
}

impl ChannelTable {
    /// Open channels on this core, summed over connections.
    pub fn len(&self) -> usize {
        self.open
    }

    /// The connection at `slot` opened `channel` in `mode` (CLOSED: closes
    /// it); at most `max` channels per connection.
    pub fn open(
        &mut self,
        slot: u32,
        generation: u32,
        channel: &str,
        mode: pb::ChannelMode,
        max: usize,
    ) -> Opened {
        if mode == pb::ChannelMode::Closed {
            self.close(slot, channel);
            return Opened::Set;
        }
        let live = mode == pb::ChannelMode::Live;
        let (key, subscribers) = match self.subscribers.get_key_value(channel) {
            Some((key, _)) => (key.clone(), self.subscribers.get_mut(channel)),
            None => (Arc::<str>::from(channel), None),
        };
        if let Some(existing) = subscribers.and_then(|s| s.iter_mut().find(|s| s.slot == slot)) {
            existing.live = live;
            existing.generation = generation;
            return Opened::Set;
        }
        let open = self.by_conn.entry(slot).or_default();
        if open.len() >= max {
            if open.is_empty() {
                self.by_conn.remove(&slot);
            }
            return Opened::Full;
        }
        open.push(key.clone());
        self.open += 1;
        self.subscribers.entry(key).or_default().push(Subscriber {
            slot,
            generation,
            live,
        });
        Opened::Set
    }

    /// The connection at `slot` no longer has `channel` open.
    pub fn close(&mut self, slot: u32, channel: &str) {
        if let Some(open) = self.by_conn.get_mut(&slot) {
            let before = open.len();
            open.retain(|c| &**c != channel);
            self.open -= before - open.len();
            if open.is_empty() {
                self.by_conn.remove(&slot);
            }
        }
        self.unsubscribe(slot, channel);
        if let Some((_, pending)) = self.counts.get_mut(&slot) {
            pending.retain(|(c, _)| &**c != channel);
        }
    }

    /// The connection at `slot` is gone: all its channels close.
    pub fn drop_conn(&mut self, slot: u32) {
        self.counts.remove(&slot);
        let open = self.by_conn.remove(&slot).unwrap_or_default();
        self.open -= open.len();
        for channel in open {
            self.unsubscribe(slot, &channel);
        }
    }

    fn unsubscribe(&mut self, slot: u32, channel: &str) {
        if let Some(subscribers) = self.subscribers.get_mut(channel) {
            subscribers.retain(|s| s.slot != slot);
            if subscribers.is_empty() {
                self.subscribers.remove(channel);
                self.typing.remove(channel);
            }
        }
    }

    /// The connections with `channel` open, and the channel's shared name.
    pub fn subscribers(&self, channel: &str) -> Option<(&Arc<str>, &[Subscriber])> {
        self.subscribers
            .get_key_value(channel)
            .map(|(k, v)| (k, v.as_slice()))
    }

    /// A COUNTS subscriber's channel reached `last_seq`.
    pub fn count(&mut self, subscriber: Subscriber, channel: &Arc<str>, last_seq: u64) {
        let (generation, pending) = self
            .counts
            .entry(subscriber.slot)
            .or_insert_with(|| (subscriber.generation, Vec::new()));
        if *generation != subscriber.generation {
            // The slot's earlier connection left counts behind: not its.
            *generation = subscriber.generation;
            pending.clear();
        }
        match pending.iter_mut().find(|(c, _)| c == channel) {
            Some((_, seq)) => *seq = (*seq).max(last_seq),
            None => pending.push((channel.clone(), last_seq)),
        }
    }

    /// The counts to send, one `ChannelActivity` per connection, emptied.
    pub fn take_counts(&mut self) -> Vec<(u32, u32, pb::ChannelActivity)> {
        self.counts
            .drain()
            .filter(|(_, (_, pending))| !pending.is_empty())
            .map(|(slot, (generation, pending))| {
                let channels = pending
                    .into_iter()
                    .map(|(channel, last_seq)| pb::ChannelCount {
                        conversation_id: channel.to_string(),
                        last_seq,
                    })
                    .collect();
                (slot, generation, pb::ChannelActivity { channels })
            })
            .collect()
    }

    /// May one more Typing of `channel` pass on this core now?
    pub fn typing_allowed(&mut self, channel: &Arc<str>, per_second: u32, now_ms: u64) -> bool {
        self.typing
            .entry(channel.clone())
            .or_insert_with(|| TokenBucket::full(per_second, now_ms))
            .take(per_second, 1, now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: pb::ChannelMode = pb::ChannelMode::Live;
    const COUNTS: pb::ChannelMode = pb::ChannelMode::Counts;

    #[test]
    fn modes_change_close_and_go_with_the_connection() {
        let mut t = ChannelTable::default();
        assert_eq!(t.open(1, 7, "chn:a", LIVE, 2), Opened::Set);
        assert_eq!(t.open(1, 7, "chn:b", COUNTS, 2), Opened::Set);
        assert_eq!(t.open(1, 7, "chn:c", LIVE, 2), Opened::Full);
        // A mode change is not one more.
        assert_eq!(t.open(1, 7, "chn:a", COUNTS, 2), Opened::Set);
        assert!(!t.subscribers("chn:a").unwrap().1[0].live);
        assert_eq!(t.open(2, 3, "chn:a", LIVE, 2), Opened::Set);
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.open(1, 7, "chn:b", pb::ChannelMode::Closed, 2),
            Opened::Set
        );
        assert!(t.subscribers("chn:b").is_none());
        assert_eq!(t.open(1, 7, "chn:c", LIVE, 2), Opened::Set);
        t.drop_conn(1);
        assert_eq!(t.len(), 1);
        let (_, subs) = t.subscribers("chn:a").unwrap();
        assert_eq!(subs.len(), 1);
        assert_eq!(subs[0].slot, 2);
        assert!(t.subscribers("chn:c").is_none());
    }

    #[test]
    fn counts_are_batched_per_connection_keeping_the_highest_seq() {
        let mut t = ChannelTable::default();
        t.open(1, 7, "chn:a", COUNTS, 10);
        t.open(1, 7, "chn:b", COUNTS, 10);
        let (a, sub) = {
            let (k, s) = t.subscribers("chn:a").unwrap();
            (k.clone(), s[0])
        };
        let b = t.subscribers("chn:b").unwrap().0.clone();
        for seq in 1..=100 {
            t.count(sub, &a, seq);
        }
        t.count(sub, &b, 4);
        let taken = t.take_counts();
        assert_eq!(taken.len(), 1, "one frame for the connection");
        let (slot, generation, activity) = &taken[0];
        assert_eq!((*slot, *generation), (1, 7));
        let got: Vec<(&str, u64)> = activity
            .channels
            .iter()
            .map(|c| (c.conversation_id.as_str(), c.last_seq))
            .collect();
        assert_eq!(got, vec![("chn:a", 100), ("chn:b", 4)]);
        assert!(t.take_counts().is_empty());
    }

    #[test]
    fn typing_per_channel_is_bounded() {
        let mut t = ChannelTable::default();
        t.open(1, 7, "chn:a", LIVE, 10);
        let a = t.subscribers("chn:a").unwrap().0.clone();
        let passed = (0..100).filter(|_| t.typing_allowed(&a, 5, 1_000)).count();
        assert_eq!(passed, 5);
        assert!(t.typing_allowed(&a, 5, 1_200), "a token per 200 ms");
    }
}
