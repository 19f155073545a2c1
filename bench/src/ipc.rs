//! What the coordinator and its workers say to each other.
//!
//! A worker reads one JSON [`WorkerPlan`] line on stdin, then [`Command`]
//! lines; it writes [`WorkerMsg`] JSON lines on stdout (progress about once a
//! second, one final report at the end). Anything on its stderr is for humans.
//! Nothing here assumes the worker runs on the coordinator's machine.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::settings::Config;

/// A worker's share of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerPlan {
    pub index: usize,
    /// Distinguishes this run's user ids from earlier runs' on the same server.
    pub run_id: String,
    pub config: Config,
    /// Global indexes of this worker's users, `user_start..user_end`.
    pub user_start: u64,
    pub user_end: u64,
    /// Sizes of the groups this worker's users form.
    pub groups: Vec<u32>,
    /// Addresses client sockets bind to before connecting (round-robin).
    pub source_ips: Vec<IpAddr>,
    /// The CA certificate(s) to trust, PEM.
    pub ca_pem: String,
    /// The JWT signing key file's contents.
    pub jwt_key: String,
}

impl WorkerPlan {
    pub fn users(&self) -> u64 {
        self.user_end - self.user_start
    }

    /// This worker's part of a rate given for all workers together.
    pub fn share_of(&self, total: f64) -> f64 {
        total * self.users() as f64 / self.config.connections as f64
    }
}

/// The user id of global user `index` in run `run_id`.
pub fn user_id(run_id: &str, index: u64) -> String {
    format!("b{run_id}-{index}")
}

/// Coordinator → worker, one per line after the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Command {
    /// Create the chat conversations.
    Setup,
    /// The channel every worker shares exists with all its members (one
    /// worker created it, see [`WorkerMsg::ChannelCreated`]): open it.
    OpenChannel { conversation_id: String },
    /// Start sending on the schedule.
    Chat,
    /// Drop the configured share of connections and reconnect them.
    Storm,
    /// Close everything and send the final report.
    Finish,
}

/// Where a worker is. Ordered: the coordinator waits for all workers to
/// reach at least a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Connecting,
    /// Every planned connection was attempted and either holds or failed.
    Connected,
    SettingUp,
    /// Conversations exist; ready to chat.
    Ready,
    Chatting,
    /// Sending stopped; waiting for acks and deliveries (bounded by the grace).
    Draining,
    ChatDone,
    Storming,
    /// Every dropped connection is back.
    StormDone,
    Finished,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Connected => "connected",
            Phase::SettingUp => "setting up",
            Phase::Ready => "ready",
            Phase::Chatting => "chatting",
            Phase::Draining => "draining",
            Phase::ChatDone => "chat done",
            Phase::Storming => "storming",
            Phase::StormDone => "storm done",
            Phase::Finished => "finished",
        }
    }
}

/// Cumulative counts of one worker (summed over workers by the coordinator).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Connection attempts started (first connects and reconnects).
    pub attempts: u64,
    /// Attempts that ended without a Welcome.
    pub failed: u64,
    /// Welcomes received.
    pub welcomed: u64,
    /// Connections holding a session right now.
    pub open: u64,
    /// Sessions closed by the server or the network (not by the bench).
    pub disconnected: u64,
    pub handshakes_full: u64,
    pub handshakes_resumed: u64,
    pub pings: u64,
    pub pongs: u64,
    /// Pings still unanswered when the next one was due.
    pub pongs_missed: u64,
    pub groups_created: u64,
    /// Messages sent (Send frames written).
    pub sent: u64,
    /// Scheduled sends skipped because the sender had no session.
    pub send_skipped: u64,
    pub acked: u64,
    /// Sends answered with an Error.
    pub send_errors: u64,
    /// First deliveries of a message to a member.
    pub delivered: u64,
    /// Deliveries that the bench expects: (members - 1) per acked message.
    pub expected_deliveries: u64,
    /// The same seq delivered again to the same member.
    pub duplicates: u64,
    /// A seq delivered after a higher seq of the same conversation.
    pub order_violations: u64,
    /// Deliveries of a sender's own message to its own device.
    pub echoes: u64,
    /// Deliveries in conversations the bench does not know, or with a body it did not write.
    pub unexpected: u64,
    /// Acked messages some member never received (final report only).
    pub losses: u64,
    /// Sent messages neither acked nor refused by the end (final report only).
    pub unacked: u64,
    pub storm_dropped: u64,
    pub storm_reconnected: u64,
    pub storm_resumed: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        macro_rules! add {
            ($($f:ident),*) => { $(self.$f += o.$f;)* };
        }
        add!(
            attempts,
            failed,
            welcomed,
            open,
            disconnected,
            handshakes_full,
            handshakes_resumed,
            pings,
            pongs,
            pongs_missed,
            groups_created,
            sent,
            send_skipped,
            acked,
            send_errors,
            delivered,
            expected_deliveries,
            duplicates,
            order_violations,
            echoes,
            unexpected,
            losses,
            unacked,
            storm_dropped,
            storm_reconnected,
            storm_resumed
        );
    }
}

/// Worker → coordinator, one per line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum WorkerMsg {
    Progress {
        phase: Phase,
        counters: Counters,
        /// p99 of end-to-end delivery latency over the last interval, µs.
        interval_e2e_p99_us: u64,
    },
    Final(Box<WorkerFinal>),
    /// This worker created the run's channel and added its members; the
    /// coordinator passes the id on to every worker ([`Command::OpenChannel`]).
    ChannelCreated {
        conversation_id: String,
    },
    /// The worker could not run its plan (bad key, bad CA, no sockets...).
    Fatal {
        message: String,
    },
}

/// A worker's final report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerFinal {
    pub counters: Counters,
    /// Failed attempts by reason.
    pub failures: BTreeMap<String, u64>,
    /// Sessions lost by reason.
    pub disconnects: BTreeMap<String, u64>,
    /// Send errors by error code name.
    pub send_errors: BTreeMap<String, u64>,
    /// Latency histograms (µs), HdrHistogram V2 serialized, base64.
    pub histograms: BTreeMap<String, String>,
    /// From the storm command until every dropped connection was back, ms.
    pub storm_recovery_ms: Option<f64>,
    /// Heartbeat interval the server announced (ms).
    pub heartbeat_ms: Option<u32>,
    /// Worker's own RSS when it held the most sessions.
    pub peak_rss_bytes: u64,
    pub peak_open: u64,
    /// The channel scenario's per-seq tallies, merged by the coordinator.
    #[serde(default)]
    pub channel: Option<ChannelTally>,
}

/// What one worker saw of the shared channel. Losses need every worker's
/// view (a message's sender and its receivers are in different workers),
/// so each reports per-seq counts and the coordinator adds them up.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelTally {
    /// Connections that got ChannelOpened LIVE / COUNTS.
    pub live_receivers: u64,
    pub counts_receivers: u64,
    /// Messages this worker's senders got SendAcks for: (seq, whether the
    /// sending connection had the channel open LIVE, so is not a receiver
    /// of its own message).
    pub acked: Vec<(u64, bool)>,
    /// First deliveries to this worker's LIVE receivers: (seq, count).
    /// Pairs, not a map: an internally tagged message cannot carry a map
    /// with integer keys through JSON.
    pub delivered_by_seq: Vec<(u64, u64)>,
    /// ChannelActivity frames received by COUNTS connections.
    pub activity_frames: u64,
    /// (highest last_seq its ChannelActivity or ChannelOpened showed,
    /// COUNTS connections).
    pub counts_last_seq: Vec<(u64, u64)>,
}

impl ChannelTally {
    pub fn add(&mut self, o: &ChannelTally) {
        self.live_receivers += o.live_receivers;
        self.counts_receivers += o.counts_receivers;
        self.acked.extend_from_slice(&o.acked);
        self.delivered_by_seq.extend_from_slice(&o.delivered_by_seq);
        self.activity_frames += o.activity_frames;
        self.counts_last_seq.extend_from_slice(&o.counts_last_seq);
    }

    /// (expected deliveries, losses): every acked message is due to every
    /// LIVE receiver but its sender.
    pub fn expected_and_losses(&self) -> (u64, u64) {
        let mut delivered = BTreeMap::<u64, u64>::new();
        for &(seq, n) in &self.delivered_by_seq {
            *delivered.entry(seq).or_default() += n;
        }
        let (mut expected, mut losses) = (0, 0);
        for &(seq, sender_live) in &self.acked {
            let due = self.live_receivers - u64::from(sender_live && self.live_receivers > 0);
            let got = delivered.get(&seq).copied().unwrap_or(0);
            expected += due;
            losses += due.saturating_sub(got);
        }
        (expected, losses)
    }

    /// The channel's last seq as its senders saw it.
    pub fn last_seq(&self) -> u64 {
        self.acked.iter().map(|a| a.0).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_losses_count_every_live_receiver_but_the_sender() {
        let mut a = ChannelTally {
            live_receivers: 3,
            acked: vec![(1, true), (2, false)],
            delivered_by_seq: vec![(1, 2), (2, 1)],
            ..Default::default()
        };
        let b = ChannelTally {
            live_receivers: 1,
            delivered_by_seq: vec![(1, 1), (2, 1)],
            counts_receivers: 1,
            counts_last_seq: vec![(2, 1)],
            ..Default::default()
        };
        a.add(&b);
        // seq 1: 3 due (its sender is LIVE), 3 got; seq 2: 4 due, 2 got.
        assert_eq!(a.expected_and_losses(), (7, 2));
        assert_eq!(a.last_seq(), 2);
    }
}
