//! What flows into and out of the router.
//!
//! In: client requests ([`Inbound`], the router's unit of work), which a bus
//! carries from gateways to the router: a crossbeam channel in the embedded
//! engine, the `palaver.inbound` Kafka topic in production (keyed by
//! [`Inbound::partition_key`] so one conversation is processed in order).
//! Session changes do not travel as requests: they are batched per gateway
//! and applied through `crate::presence` (the embedded engine per engine
//! batch, the bridge per flush interval).
//!
//! Out: an [`Output`] per request — frames addressed to connections, push
//! events for offline users, and (with an archive) the messages stored —
//! shipped by an [`Outlet`]: the gateways' `DeliverySink`s in the embedded
//! engine, the per-gateway delivery topics, `palaver.push` and
//! `palaver.stored` in production.
//!
//! [`Inbound`]: crate::api::Inbound
//! [`Inbound::partition_key`]: crate::api::Inbound::partition_key

use std::collections::HashMap;
use std::sync::Arc;

use palaver_protocol::pb;

use crate::api::{Outbound, SessionAddr};

/// A frame for one connection, wherever it lives.
#[derive(Clone, Debug, PartialEq)]
pub struct Addressed {
    pub to: SessionAddr,
    pub frame: pb::Frame,
    /// The frame answers a request of `to` ([`Outbound::answers_request`]).
    pub answers_request: bool,
}

/// A user with a registered push device that is not online got a message
/// (SPEC §20): a push worker (APNs/FCM) should wake those devices.
/// Coalesced: at most one per (user, conversation) until the user connects
/// again or sends a Receipt for it. Which devices to push is the worker's
/// decision: the user's registrations minus `online_device_ids`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushEvent {
    pub user_id: String,
    pub conversation_id: String,
    pub seq: u64,
    pub message_id: String,
    pub sender_user_id: String,
    pub kind: i32,
    pub server_time_ms: i64,
    /// The user's devices with a live session when the message was stored
    /// (ascending; empty: none), which need no push. A phone asleep while a
    /// desktop is online is not among them.
    pub online_device_ids: Vec<String>,
}

/// A channel's message or Typing, stored once and published once (SPEC
/// §21): every gateway hands it to its own connections that have the
/// channel open (LIVE: the frame; COUNTS: the last seq, batched). The router
/// looks up no member and no session for it, whatever the member count.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelPost {
    pub conversation_id: String,
    /// A Deliver or a Typing (request_id 0).
    pub frame: pb::Frame,
    /// The channel's last seq after this message; 0 for a Typing (no count
    /// moves).
    pub last_seq: u64,
    /// The connection it came from: it has its SendAck and gets no copy.
    pub from: Option<SessionAddr>,
}

/// Everything the router produced for one or more requests, in order.
#[derive(Debug, Default)]
pub struct Output {
    pub frames: Vec<Addressed>,
    pub pushes: Vec<PushEvent>,
    /// For every gateway (channels, SPEC §21).
    pub channel_posts: Vec<ChannelPost>,
    /// Messages stored by these requests, for the archive (only with
    /// `RouterConfig::archive_stream`): each carries its conversation id
    /// and seq.
    pub stored: Vec<pb::Message>,
}

impl Output {
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
            && self.pushes.is_empty()
            && self.channel_posts.is_empty()
            && self.stored.is_empty()
    }

    /// Hand everything to `outlet`: the push events first (so whoever sees
    /// a frame knows the pushes of the same requests are out), then the
    /// frames grouped by gateway (one `deliver` call per gateway, order per
    /// connection preserved). Leaves `self` empty, also when the outlet
    /// fails part way.
    pub fn flush(&mut self, outlet: &mut dyn Outlet) -> Result<(), BusError> {
        let mut result = Ok(());
        if !self.stored.is_empty() {
            let stored = std::mem::take(&mut self.stored);
            if let Err(e) = outlet.archive(stored) {
                result = Err(e);
            }
        }
        if !self.pushes.is_empty() {
            let pushes = std::mem::take(&mut self.pushes);
            if let Err(e) = outlet.push(pushes) {
                result = Err(e);
            }
        }
        if !self.channel_posts.is_empty() {
            let posts = std::mem::take(&mut self.channel_posts);
            if let Err(e) = outlet.broadcast(posts) {
                result = Err(e);
            }
        }
        let mut by_gateway = Vec::new();
        group_by_gateway(&mut self.frames, &mut by_gateway);
        for (gateway_id, batch) in by_gateway {
            if let Err(e) = outlet.deliver(&gateway_id, batch) {
                result = Err(e);
            }
        }
        result
    }
}

/// Moves `frames` into `batches`: one per gateway, in order of first
/// appearance, the frames of each in their order (so per connection).
/// A handful of gateways (the embedded engine has one) are found by a
/// linear search, with no map or key copy per call; past
/// [`LINEAR_GATEWAYS`] (a router fanning a group out over a large
/// cluster) an index keeps the cost per frame flat.
pub fn group_by_gateway(frames: &mut Vec<Addressed>, batches: &mut Vec<(Arc<str>, Vec<Outbound>)>) {
    // The batches are handed over (not reused): size the first one for all
    // the frames (usually one gateway has them all) instead of growing it
    // by doubling, a copy per doubling.
    let total = frames.len();
    let mut index: HashMap<Arc<str>, usize> = HashMap::new();
    for Addressed {
        to,
        frame,
        answers_request,
    } in frames.drain(..)
    {
        let outbound = Outbound {
            conn: to.conn,
            frame,
            answers_request,
        };
        let found = if batches.len() <= LINEAR_GATEWAYS {
            batches.iter().position(|(g, _)| *g == to.gateway_id)
        } else {
            if index.is_empty() {
                index.extend(batches.iter().enumerate().map(|(i, (g, _))| (g.clone(), i)));
            }
            index.get(&to.gateway_id).copied()
        };
        match found {
            Some(i) => batches[i].1.push(outbound),
            None => {
                let room = if batches.is_empty() { total } else { 1 };
                let mut batch = Vec::with_capacity(room);
                batch.push(outbound);
                if !index.is_empty() {
                    index.insert(to.gateway_id.clone(), batches.len());
                }
                batches.push((to.gateway_id, batch));
            }
        }
    }
}

/// Gateways [`group_by_gateway`] searches linearly before it builds an index.
const LINEAR_GATEWAYS: usize = 8;

#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// Ships router output to gateways and push workers.
pub trait Outlet {
    /// Frames for connections on gateway `gateway_id`, in the order they must
    /// be written. A gateway nobody knows is not an error (its connections
    /// are gone); the frames are dropped.
    fn deliver(&mut self, gateway_id: &str, frames: Vec<Outbound>) -> Result<(), BusError>;
    /// Push events for offline users.
    fn push(&mut self, events: Vec<PushEvent>) -> Result<(), BusError>;
    /// Messages just stored, for the archiver.
    fn archive(&mut self, stored: Vec<pb::Message>) -> Result<(), BusError>;
    /// Channel posts, for every gateway (SPEC §21).
    fn broadcast(&mut self, posts: Vec<ChannelPost>) -> Result<(), BusError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SessionAddr;

    /// Frames for `gateways` gateways, interleaved: gateway `i % gateways`,
    /// connection `i`.
    fn frames(n: u64, gateways: u64) -> Vec<Addressed> {
        (0..n)
            .map(|i| Addressed {
                to: SessionAddr {
                    gateway_id: format!("gw{}", i % gateways).into(),
                    conn: i,
                },
                frame: pb::Frame::default(),
                answers_request: i % 2 == 0,
            })
            .collect()
    }

    #[test]
    fn grouping_keeps_first_seen_gateway_order_and_frame_order_with_and_without_the_index() {
        for gateways in [1, 3, LINEAR_GATEWAYS as u64, LINEAR_GATEWAYS as u64 + 1, 40] {
            let mut input = frames(gateways * 5, gateways);
            let mut batches = Vec::new();
            group_by_gateway(&mut input, &mut batches);
            assert!(input.is_empty());
            let names: Vec<String> = batches.iter().map(|(g, _)| g.to_string()).collect();
            let expected: Vec<String> = (0..gateways).map(|g| format!("gw{g}")).collect();
            assert_eq!(names, expected, "{gateways} gateways");
            for (g, (_, batch)) in batches.iter().enumerate() {
                let conns: Vec<u64> = batch.iter().map(|o| o.conn).collect();
                let expected: Vec<u64> = (0..5).map(|k| k * gateways + g as u64).collect();
                assert_eq!(conns, expected, "gateway {g} of {gateways}");
            }
        }
    }
}
