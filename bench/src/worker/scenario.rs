//! The seam between a worker and its workload.
//!
//! The worker owns connections: sockets, TLS, Hello, heartbeats, reconnects
//! and storms. A [`Scenario`] owns what is sent over the sessions it is
//! given and what is measured from the answers. The `connect` and
//! `reconnect-storm` scenarios need none (connections are their workload);
//! every scenario that sends messages is one implementation of this trait.
//!
//! A new message scenario touches three files: its own module here, its
//! [`ScenarioKind`] variant in `settings.rs`, and [`build`] below.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use palaver_protocol::pb;

use super::channel::{Channel, ChannelPlan};
use super::chat::{Chat, ChatPlan};
use super::one_hop::OneHop;
use crate::ipc::{ChannelTally, Counters, WorkerPlan};
use crate::settings::ScenarioKind;

/// Requests to write, as (user slot, frame).
pub type Outbox = Vec<(u32, pb::Frame)>;

/// A worker's client_msg_ids: 6 random bytes and the worker's index, then
/// the message number, so an answer names the message it is about and
/// another worker's or run's ids are not taken for ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsgIds([u8; 8]);

impl MsgIds {
    pub fn new(worker_index: u32) -> Self {
        let mut prefix = [0u8; 8];
        prefix[..6].copy_from_slice(&rand::random::<[u8; 6]>());
        prefix[6..].copy_from_slice(&(worker_index as u16).to_be_bytes());
        MsgIds(prefix)
    }

    /// The id of message `k`.
    pub fn id(&self, k: u64) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.0);
        id[8..].copy_from_slice(&k.to_be_bytes());
        id
    }

    /// The message number inside one of our ids.
    pub fn number(&self, client_msg_id: &[u8]) -> Option<u64> {
        if client_msg_id.len() != 16 || client_msg_id[..8] != self.0 {
            return None;
        }
        Some(u64::from_be_bytes(client_msg_id[8..].try_into().ok()?))
    }
}

pub trait Scenario {
    /// The coordinator's `Setup`: requests to send before the measured phase
    /// (e.g. creating groups). `user_id(slot)` names a user.
    fn setup(&mut self, user_id: &dyn Fn(u32) -> String) -> Outbox {
        let _ = user_id;
        Vec::new()
    }

    /// Setup requests not yet answered; the worker is ready at 0.
    fn pending_setup(&self) -> usize {
        0
    }

    /// A setup request failed or could not be sent; false if `request_id`
    /// on `slot` was not one of them.
    fn setup_failed(&mut self, slot: u32, request_id: u32, reason: String) -> bool {
        let _ = (slot, request_id, reason);
        false
    }

    /// While setting up: appends requests due by `now` (paced setup,
    /// retries) to `out`; returns when to be called again.
    fn setup_due(
        &mut self,
        now: Instant,
        ready: &dyn Fn(u32) -> bool,
        out: &mut Outbox,
    ) -> Option<Instant> {
        let _ = (now, ready, out);
        None
    }

    /// A channel this worker created for every worker, once it is ready to
    /// be opened; returned once.
    fn take_channel_id(&mut self) -> Option<String> {
        None
    }

    /// The coordinator's `OpenChannel`: the shared channel's id; returns
    /// the requests to send.
    fn open_channel(&mut self, conversation_id: &str, ready: &dyn Fn(u32) -> bool) -> Outbox {
        let _ = (conversation_id, ready);
        Vec::new()
    }

    /// The coordinator's `Chat`: the measured phase starts.
    fn start(&mut self, now: Instant);

    /// When [`Scenario::due`] next has something to send; `None` once the
    /// measured phase has sent everything it will.
    fn next_due(&self) -> Option<Instant>;

    /// Appends what is due by `now` to `out`; `ready(slot)` says whether a
    /// slot holds a session that may send.
    fn due(
        &mut self,
        now: Instant,
        ready: &dyn Fn(u32) -> bool,
        counters: &mut Counters,
        out: &mut Outbox,
    );

    /// A frame from the server on `slot` (whose user is `me`), after the
    /// worker's own handling (Welcome, Ping/Pong, GoAway are the worker's).
    fn on_frame(
        &mut self,
        slot: u32,
        me: &str,
        frame: &pb::Frame,
        now: Instant,
        counters: &mut Counters,
    );

    /// An Error answering one of this scenario's requests; false if it
    /// answered none of them.
    fn on_error(&mut self, slot: u32, request_id: u32, error: &pb::Error, c: &mut Counters)
        -> bool;

    /// After sending stopped: true once nothing more is awaited, or once
    /// `grace` has passed since the end of the schedule.
    fn drained(&self, counters: &Counters, now: Instant, grace: Duration) -> bool;

    /// Final accounting into `counters` (losses, unanswered sends).
    fn finish(&self, counters: &mut Counters);

    /// The end-to-end p99 since the last call, in µs (progress lines).
    fn take_interval_p99_us(&mut self) -> u64;

    /// Histograms and error tallies for the final report.
    fn report(self: Box<Self>) -> ScenarioReport;
}

/// What a scenario adds to a worker's final report.
pub struct ScenarioReport {
    /// By histogram name ([`crate::hist::names`]).
    pub histograms: Vec<(&'static str, Histogram<u64>)>,
    pub send_errors: BTreeMap<String, u64>,
    pub setup_failures: BTreeMap<String, u64>,
    /// The channel scenario's tallies (losses are counted over all workers).
    pub channel: Option<ChannelTally>,
}

/// The scenario a worker runs for `plan`, with `user_ids` by slot; `None`
/// when connections are the whole workload.
pub fn build(plan: &WorkerPlan, epoch: Instant, user_ids: &[String]) -> Option<Box<dyn Scenario>> {
    let config = &plan.config;
    match config.scenario {
        ScenarioKind::Connect | ScenarioKind::ReconnectStorm => None,
        ScenarioKind::Chat | ScenarioKind::Fanout => Some(Box::new(Chat::new(
            ChatPlan {
                worker_index: plan.index as u32,
                epoch,
                users: user_ids.len() as u32,
                group_sizes: plan.groups.clone(),
                direct_share: config.direct_share,
                group_senders: (config.scenario == ScenarioKind::Fanout).then_some(config.senders),
                body_bytes: config.body_bytes as usize,
                rate: plan.share_of(config.rate),
                duration: config.duration.0,
                seed: config.seed ^ plan.index as u64,
            },
            |slot| user_ids[slot as usize].clone(),
        ))),
        ScenarioKind::OneHop => Some(Box::new(OneHop::new(
            user_ids,
            plan.index as u32,
            config.body_bytes as usize,
            plan.share_of(config.rate),
            config.duration.0,
        ))),
        ScenarioKind::Channel => Some(Box::new(Channel::new(ChannelPlan {
            worker_index: plan.index as u32,
            epoch,
            run_id: plan.run_id.clone(),
            user_start: plan.user_start,
            users: user_ids.len() as u32,
            connections: config.connections,
            channel_members: config.channel_members,
            counts_share: config.channel_counts_share,
            senders: config.senders,
            rate: config.rate,
            duration: config.duration.0,
            body_bytes: config.body_bytes as usize,
        }))),
    }
}
