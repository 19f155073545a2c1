//! `one-hop`: the latency of one message with nothing else in flight.
//!
//! Users are paired into 1:1 conversations; in each pair the first user
//! sends and the second receives, one message at a time: the next Send is
//! written only after the previous message was delivered, at the pair's
//! pace (`rate` shared over the pairs) or at once if delivery took longer.
//! Latency is from the moment the Send is written to its Deliver. Unlike the
//! open-loop chat scenario (latency from the scheduled time, so that a stall
//! cannot hide queueing), a closed loop has no queue to hide, and the
//! worker's wake-up (epoll, millisecond resolution) would otherwise add up
//! to a millisecond of the bench's own lateness to every sample. A server
//! stall still shows: the message in flight waits for it. This is the figure to compare with a broker's one-hop
//! publish → subscriber latency (queueing excluded by construction).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use palaver_protocol::pb;
use palaver_protocol::pb::frame::Body;

use super::chat::error_name;
use super::scenario::{Outbox, Scenario, ScenarioReport};
use crate::hist::{self, names};
use crate::ipc::Counters;

/// Request ids of Sends start here (Hello is 1).
const FIRST_SEND_REQUEST: u32 = 2;

struct Pair {
    sender: u32,
    receiver: u32,
    conversation_id: String,
    /// The message in flight: its number and when it was written.
    in_flight: Option<(u64, Instant)>,
    /// When the next message may go (the pace), once the last one arrived.
    next_at: Instant,
    /// Highest seq delivered so far.
    last_seq: u64,
    acked: u64,
    delivered: u64,
}

pub struct OneHop {
    pairs: Vec<Pair>,
    /// Conversation id → pair.
    by_conversation: BTreeMap<String, usize>,
    /// First 8 bytes of every client_msg_id this worker sends.
    msg_id_prefix: [u8; 8],
    body_bytes: usize,
    interval: Duration,
    duration: Duration,
    end: Option<Instant>,
    next_number: u64,
    /// Sends not yet acked or refused: message number → (pair, written at).
    /// The ack and the delivery race (different connections), so this is
    /// apart from the pair's message in flight.
    unanswered: HashMap<u64, (usize, Instant)>,
    e2e: Histogram<u64>,
    ack: Histogram<u64>,
    interval_e2e: Histogram<u64>,
    send_errors: BTreeMap<String, u64>,
}

impl OneHop {
    /// `rate` is this worker's share of messages per second over all pairs.
    pub fn new(
        user_ids: &[String],
        worker_index: u32,
        body_bytes: usize,
        rate: f64,
        duration: Duration,
    ) -> OneHop {
        let now = Instant::now();
        let pairs: Vec<Pair> = (0..user_ids.len() as u32 / 2)
            .map(|p| Pair {
                sender: 2 * p,
                receiver: 2 * p + 1,
                conversation_id: palaver_protocol::direct_conversation_id(
                    &user_ids[2 * p as usize],
                    &user_ids[2 * p as usize + 1],
                ),
                in_flight: None,
                next_at: now,
                last_seq: 0,
                acked: 0,
                delivered: 0,
            })
            .collect();
        let by_conversation = pairs
            .iter()
            .enumerate()
            .map(|(i, p)| (p.conversation_id.clone(), i))
            .collect();
        let per_pair_rate = rate / pairs.len().max(1) as f64;
        let mut msg_id_prefix = [0u8; 8];
        msg_id_prefix[..4].copy_from_slice(b"1HOP");
        msg_id_prefix[4..].copy_from_slice(&worker_index.to_le_bytes());
        OneHop {
            pairs,
            by_conversation,
            msg_id_prefix,
            body_bytes,
            interval: Duration::from_secs_f64(1.0 / per_pair_rate.max(1e-3)),
            duration,
            end: None,
            next_number: 0,
            unanswered: HashMap::new(),
            e2e: hist::new(),
            ack: hist::new(),
            interval_e2e: hist::new(),
            send_errors: BTreeMap::new(),
        }
    }

    fn client_msg_id(&self, k: u64) -> Vec<u8> {
        let mut id = self.msg_id_prefix.to_vec();
        id.extend_from_slice(&k.to_le_bytes());
        id
    }

    /// The message number in one of this worker's client_msg_ids.
    fn message_number(&self, client_msg_id: &[u8]) -> Option<u64> {
        (client_msg_id.get(..8)? == self.msg_id_prefix)
            .then(|| {
                Some(u64::from_le_bytes(
                    client_msg_id.get(8..16)?.try_into().ok()?,
                ))
            })
            .flatten()
    }
}

impl Scenario for OneHop {
    fn start(&mut self, now: Instant) {
        for p in &mut self.pairs {
            p.next_at = now;
        }
        self.end = Some(now + self.duration);
    }

    fn next_due(&self) -> Option<Instant> {
        let end = self.end?;
        let next = self
            .pairs
            .iter()
            .filter(|p| p.in_flight.is_none())
            .map(|p| p.next_at)
            .min();
        match next {
            Some(at) if at < end => Some(at),
            // Every pair has a message in flight: a delivery wakes the worker.
            None if self.pairs.iter().any(|p| p.in_flight.is_some()) => Some(end),
            _ => None,
        }
        .filter(|_| Instant::now() < end)
    }

    fn due(
        &mut self,
        now: Instant,
        ready: &dyn Fn(u32) -> bool,
        counters: &mut Counters,
        out: &mut Outbox,
    ) {
        let Some(end) = self.end else {
            return;
        };
        for i in 0..self.pairs.len() {
            let p = &self.pairs[i];
            if p.in_flight.is_some() || p.next_at > now || p.next_at >= end {
                continue;
            }
            let paced = p.next_at;
            if !ready(p.sender) || !ready(p.receiver) {
                counters.send_skipped += 1;
                self.pairs[i].next_at = paced + self.interval;
                continue;
            }
            let k = self.next_number;
            self.next_number += 1;
            let send = pb::Send {
                conversation_id: p.conversation_id.clone(),
                client_msg_id: self.client_msg_id(k),
                kind: pb::ContentKind::Text.into(),
                body: vec![0x5a; self.body_bytes],
                ..Default::default()
            };
            out.push((
                p.sender,
                palaver_protocol::frame(
                    FIRST_SEND_REQUEST + (k % u64::from(u32::MAX - FIRST_SEND_REQUEST)) as u32,
                    Body::Send(send),
                ),
            ));
            // Written now (the worker sends the outbox before it polls again).
            let written = Instant::now();
            self.pairs[i].in_flight = Some((k, written));
            self.pairs[i].next_at = paced + self.interval;
            self.unanswered.insert(k, (i, written));
            counters.sent += 1;
        }
    }

    fn on_frame(
        &mut self,
        slot: u32,
        _me: &str,
        frame: &pb::Frame,
        now: Instant,
        counters: &mut Counters,
    ) {
        match &frame.body {
            Some(Body::SendAck(ack)) => {
                let answered = self.message_number(&ack.client_msg_id);
                let Some((i, scheduled)) = answered.and_then(|k| self.unanswered.remove(&k)) else {
                    counters.unexpected += 1;
                    return;
                };
                hist::record(&mut self.ack, now.saturating_duration_since(scheduled));
                self.pairs[i].acked += 1;
                counters.acked += 1;
                counters.expected_deliveries += 1;
            }
            Some(Body::Deliver(pb::Deliver {
                message: Some(m), ..
            })) => {
                let Some(&i) = self.by_conversation.get(&m.conversation_id) else {
                    counters.unexpected += 1;
                    return;
                };
                let pair = &mut self.pairs[i];
                if slot != pair.receiver {
                    counters.echoes += 1;
                    return;
                }
                if m.seq <= pair.last_seq {
                    counters.duplicates += u64::from(m.seq == pair.last_seq);
                    counters.order_violations += u64::from(m.seq < pair.last_seq);
                    return;
                }
                pair.last_seq = m.seq;
                pair.delivered += 1;
                counters.delivered += 1;
                if let Some((_, scheduled)) = pair.in_flight.take() {
                    let latency = now.saturating_duration_since(scheduled);
                    hist::record(&mut self.e2e, latency);
                    hist::record(&mut self.interval_e2e, latency);
                    pair.next_at = pair.next_at.max(now);
                }
            }
            _ => {}
        }
    }

    fn on_error(
        &mut self,
        _slot: u32,
        _request_id: u32,
        error: &pb::Error,
        c: &mut Counters,
    ) -> bool {
        let refused = self.message_number(&error.client_msg_id);
        let Some((i, _)) = refused.and_then(|k| self.unanswered.remove(&k)) else {
            return false;
        };
        // The message will never arrive: the pair moves on.
        self.pairs[i].in_flight = None;
        c.send_errors += 1;
        *self.send_errors.entry(error_name(error.code)).or_default() += 1;
        true
    }

    fn drained(&self, counters: &Counters, now: Instant, grace: Duration) -> bool {
        let end = self.end.unwrap_or(now) + grace;
        (self.unanswered.is_empty() && counters.delivered >= counters.expected_deliveries)
            || now >= end
    }

    fn finish(&self, counters: &mut Counters) {
        counters.losses = self
            .pairs
            .iter()
            .map(|p| p.acked.saturating_sub(p.delivered))
            .sum();
        counters.unacked = self.unanswered.len() as u64;
    }

    fn take_interval_p99_us(&mut self) -> u64 {
        let p99 = self.interval_e2e.value_at_quantile(0.99);
        self.interval_e2e.reset();
        p99
    }

    fn report(self: Box<Self>) -> ScenarioReport {
        ScenarioReport {
            histograms: vec![(names::E2E, self.e2e), (names::ACK, self.ack)],
            send_errors: self.send_errors,
            setup_failures: BTreeMap::new(),
            channel: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(conversation_id: &str, seq: u64) -> pb::Frame {
        palaver_protocol::frame(
            0,
            Body::Deliver(pb::Deliver {
                message: Some(pb::Message {
                    conversation_id: conversation_id.into(),
                    seq,
                    ..Default::default()
                }),
            }),
        )
    }

    #[test]
    fn one_message_in_flight_per_pair_whatever_the_pace() {
        let ids: Vec<String> = (0..4).map(|i| format!("u{i}")).collect();
        let mut s = OneHop::new(&ids, 0, 16, 1000.0, Duration::from_secs(10));
        let mut counters = Counters::default();
        let t0 = Instant::now();
        s.start(t0);
        let mut out = Vec::new();
        // A second of pace is due (500 per pair), but each pair sends one.
        s.due(
            t0 + Duration::from_secs(1),
            &|_| true,
            &mut counters,
            &mut out,
        );
        assert_eq!(
            out.iter().map(|(slot, _)| *slot).collect::<Vec<_>>(),
            [0, 2]
        );
        out.clear();
        s.due(
            t0 + Duration::from_secs(2),
            &|_| true,
            &mut counters,
            &mut out,
        );
        assert!(out.is_empty(), "nothing until a delivery");
        // Pair 0's message arrives at its receiver: pair 0 may send again.
        let conv = s.pairs[0].conversation_id.clone();
        let t = t0 + Duration::from_secs(2);
        s.on_frame(1, "u1", &deliver(&conv, 1), t, &mut counters);
        assert_eq!(counters.delivered, 1);
        s.due(t, &|_| true, &mut counters, &mut out);
        assert_eq!(out.iter().map(|(slot, _)| *slot).collect::<Vec<_>>(), [0]);
        // The same seq again is a duplicate, an older one out of order.
        s.on_frame(1, "u1", &deliver(&conv, 1), t, &mut counters);
        assert_eq!(counters.duplicates, 1);
        s.on_frame(1, "u1", &deliver(&conv, 2), t, &mut counters);
        s.on_frame(1, "u1", &deliver(&conv, 1), t, &mut counters);
        assert_eq!(counters.order_violations, 1);
    }
}
