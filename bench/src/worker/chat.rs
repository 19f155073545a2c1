//! The chat workload of one worker: which of its users share which
//! conversations, the send schedule, and the delivery bookkeeping that finds
//! losses, duplicates and order violations.
//!
//! Every conversation lives inside one worker (all its members are this
//! worker's users). The gateway does not care, and it keeps the accounting
//! exact and local: the senders' acks and the members' deliveries meet here,
//! on one clock, so no cross-process merging of per-message state is needed.
//!
//! Sends follow a fixed schedule (message `k` is due at `start + k / rate`)
//! and every latency is measured from the scheduled time, not from when the
//! frame was written: if the bench or the server stalls, the stall shows in
//! the numbers instead of silently lowering the offered load (wrk2's fix for
//! coordinated omission).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use palaver_protocol::pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::scenario::{MsgIds, Outbox, Scenario, ScenarioReport};
use crate::hist::{self, names};
use crate::ipc::Counters;
use palaver_protocol::pb::frame::Body;

/// Request ids of CreateConversation are `FIRST_SETUP_REQUEST + conversation
/// index`; Hello uses 1 and Sends use ids above the setup range.
const FIRST_SETUP_REQUEST: u32 = 2;
/// Seqs above this are not tracked (a fresh conversation never gets there in
/// a run; it guards the per-member bitmaps).
const MAX_TRACKED_SEQ: u64 = 1 << 30;
/// Body header: scheduled time (ns since the worker's epoch), message number,
/// worker index, magic.
const MAGIC: &[u8; 4] = b"PLVB";

/// One member's view of one conversation: which seqs it has received.
#[derive(Default)]
struct Received {
    max_seq: u64,
    seen: Vec<u64>,
}

impl Received {
    fn has(&self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        self.seen.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    fn mark(&mut self, seq: u64) {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        self.seen[word] |= 1 << bit;
        self.max_seq = self.max_seq.max(seq);
    }
}

struct Conv {
    /// Known from the start for 1:1 conversations; from ConversationCreated for groups.
    id: Option<String>,
    /// Worker-local user slots; for groups `members[0]` is the creator.
    members: Vec<u32>,
    /// Acked messages: (seq, sender's member position).
    acked: Vec<(u64, u32)>,
    /// Per member position.
    received: Vec<Received>,
}

struct Schedule {
    start: Instant,
    nanos_per_message: f64,
    total: u64,
    next: u64,
}

impl Schedule {
    fn due(&self, k: u64) -> Instant {
        self.start + Duration::from_nanos((k as f64 * self.nanos_per_message) as u64)
    }

    fn end(&self) -> Instant {
        self.due(self.total)
    }
}

pub struct Chat {
    worker_index: u32,
    /// Times in message bodies count from here.
    epoch: Instant,
    convs: Vec<Conv>,
    by_id: HashMap<String, u32>,
    /// Per user slot: (conversation, member position).
    memberships: Vec<Vec<(u32, u32)>>,
    directs: Vec<u32>,
    groups: Vec<u32>,
    direct_share: f64,
    /// Fanout: only the first members of a group send.
    group_senders: Option<u32>,
    body_bytes: usize,
    rate: f64,
    duration: Duration,
    rng: StdRng,
    schedule: Option<Schedule>,
    /// First 8 bytes of every client_msg_id of this worker in this run.
    msg_ids: MsgIds,
    pending_creates: usize,
    pending_acks: u64,
    e2e: Histogram<u64>,
    ack: Histogram<u64>,
    /// e2e over the current progress interval (reset by the worker).
    interval_e2e: Histogram<u64>,
    send_errors: BTreeMap<String, u64>,
    setup_failures: BTreeMap<String, u64>,
}

/// What the worker tells [`Chat::new`].
pub struct ChatPlan {
    pub worker_index: u32,
    pub epoch: Instant,
    pub users: u32,
    pub group_sizes: Vec<u32>,
    pub direct_share: f64,
    pub group_senders: Option<u32>,
    pub body_bytes: usize,
    pub rate: f64,
    pub duration: Duration,
    pub seed: u64,
}

impl Chat {
    /// Pairs consecutive users into 1:1 conversations (when any 1:1 traffic
    /// is wanted) and lays the groups over the users evenly spaced, wrapping.
    /// `user_id(slot)` names a user.
    pub fn new(plan: ChatPlan, user_id: impl Fn(u32) -> String) -> Chat {
        let n = plan.users;
        let mut convs = Vec::new();
        let mut directs = Vec::new();
        let mut groups = Vec::new();
        if plan.direct_share > 0.0 {
            for a in (0..n.saturating_sub(1)).step_by(2) {
                directs.push(convs.len() as u32);
                convs.push(Conv {
                    id: Some(palaver_protocol::direct_conversation_id(
                        &user_id(a),
                        &user_id(a + 1),
                    )),
                    members: vec![a, a + 1],
                    acked: Vec::new(),
                    received: Vec::new(),
                });
            }
        }
        let group_count = plan.group_sizes.len() as u64;
        for (g, &size) in plan.group_sizes.iter().enumerate() {
            let start = (g as u64 * u64::from(n) / group_count.max(1)) as u32;
            groups.push(convs.len() as u32);
            convs.push(Conv {
                id: None,
                members: (0..size.min(n)).map(|i| (start + i) % n).collect(),
                acked: Vec::new(),
                received: Vec::new(),
            });
        }
        let mut memberships = vec![Vec::new(); n as usize];
        let mut by_id = HashMap::new();
        for (c, conv) in convs.iter_mut().enumerate() {
            conv.received = conv.members.iter().map(|_| Received::default()).collect();
            for (pos, &slot) in conv.members.iter().enumerate() {
                memberships[slot as usize].push((c as u32, pos as u32));
            }
            if let Some(id) = &conv.id {
                by_id.insert(id.clone(), c as u32);
            }
        }
        Chat {
            worker_index: plan.worker_index,
            epoch: plan.epoch,
            convs,
            by_id,
            memberships,
            directs,
            groups,
            direct_share: plan.direct_share,
            group_senders: plan.group_senders,
            body_bytes: plan.body_bytes,
            rate: plan.rate,
            duration: plan.duration,
            rng: StdRng::seed_from_u64(plan.seed),
            schedule: None,
            msg_ids: MsgIds::new(plan.worker_index),
            pending_creates: 0,
            pending_acks: 0,
            e2e: hist::new(),
            ack: hist::new(),
            interval_e2e: hist::new(),
            send_errors: BTreeMap::new(),
            setup_failures: BTreeMap::new(),
        }
    }

    fn setup_request_conv(&self, slot: u32, request_id: u32) -> Option<u32> {
        let c = request_id.checked_sub(FIRST_SETUP_REQUEST)?;
        let conv = self.convs.get(c as usize)?;
        (self.groups.contains(&c) && conv.members[0] == slot).then_some(c)
    }

    /// A ConversationCreated frame arrived on `slot`. Only the answer to the
    /// creator's request counts; members may also be told about the group.
    fn on_created(
        &mut self,
        slot: u32,
        request_id: u32,
        created: &pb::ConversationCreated,
        counters: &mut Counters,
    ) {
        let Some(c) = self.setup_request_conv(slot, request_id) else {
            return;
        };
        let conv = &mut self.convs[c as usize];
        let Some(info) = &created.conversation else {
            return;
        };
        if conv.id.is_none() {
            self.by_id.insert(info.conversation_id.clone(), c);
            conv.id = Some(info.conversation_id.clone());
            self.pending_creates -= 1;
            counters.groups_created += 1;
        }
    }

    /// A conversation and sender position for the next message.
    fn pick(&mut self) -> Option<(u32, u32)> {
        let direct = !self.directs.is_empty()
            && (self.groups.is_empty() || self.rng.random::<f64>() < self.direct_share);
        if direct {
            let c = self.directs[self.rng.random_range(0..self.directs.len())];
            Some((c, self.rng.random_range(0..2)))
        } else if !self.groups.is_empty() {
            let c = self.groups[self.rng.random_range(0..self.groups.len())];
            let members = self.convs[c as usize].members.len() as u32;
            let senders = self.group_senders.unwrap_or(members).min(members);
            Some((c, self.rng.random_range(0..senders)))
        } else {
            None
        }
    }

    fn body(&self, scheduled: Instant, k: u64) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.body_bytes);
        let ns = scheduled.saturating_duration_since(self.epoch).as_nanos() as u64;
        body.extend_from_slice(&ns.to_le_bytes());
        body.extend_from_slice(&k.to_le_bytes());
        body.extend_from_slice(&self.worker_index.to_le_bytes());
        body.extend_from_slice(MAGIC);
        body.resize(self.body_bytes, b'.');
        body
    }

    /// The scheduled send time a body of ours carries.
    fn scheduled_time(&self, body: &[u8]) -> Option<Instant> {
        if body.len() < 24 || &body[20..24] != MAGIC {
            return None;
        }
        let worker = u32::from_le_bytes(body[16..20].try_into().ok()?);
        if worker != self.worker_index {
            return None;
        }
        let ns = u64::from_le_bytes(body[..8].try_into().ok()?);
        Some(self.epoch + Duration::from_nanos(ns))
    }

    fn on_ack(&mut self, slot: u32, ack: &pb::SendAck, now: Instant, counters: &mut Counters) {
        let (Some(k), Some(s)) = (self.msg_ids.number(&ack.client_msg_id), &self.schedule) else {
            counters.unexpected += 1;
            return;
        };
        hist::record(&mut self.ack, now.saturating_duration_since(s.due(k)));
        let Some(&c) = self.by_id.get(&ack.conversation_id) else {
            counters.unexpected += 1;
            return;
        };
        let Some(&(_, pos)) = self.memberships[slot as usize].iter().find(|m| m.0 == c) else {
            counters.unexpected += 1;
            return;
        };
        let conv = &mut self.convs[c as usize];
        conv.acked.push((ack.seq, pos));
        counters.acked += 1;
        counters.expected_deliveries += conv.members.len() as u64 - 1;
        self.pending_acks = self.pending_acks.saturating_sub(1);
    }

    /// An Error frame answering one of our Sends.
    fn on_send_error(&mut self, error: &pb::Error, counters: &mut Counters) -> bool {
        if self.msg_ids.number(&error.client_msg_id).is_none() {
            return false;
        }
        self.pending_acks = self.pending_acks.saturating_sub(1);
        counters.send_errors += 1;
        *self.send_errors.entry(error_name(error.code)).or_default() += 1;
        true
    }

    fn on_deliver(
        &mut self,
        slot: u32,
        own_user_id: &str,
        message: &pb::Message,
        now: Instant,
        counters: &mut Counters,
    ) {
        let Some(&c) = self.by_id.get(&message.conversation_id) else {
            counters.unexpected += 1;
            return;
        };
        let Some(&(_, pos)) = self.memberships[slot as usize].iter().find(|m| m.0 == c) else {
            counters.unexpected += 1;
            return;
        };
        if message.sender_user_id == own_user_id {
            counters.echoes += 1;
            return;
        }
        let (Some(scheduled), true) = (
            self.scheduled_time(&message.body),
            message.seq <= MAX_TRACKED_SEQ,
        ) else {
            counters.unexpected += 1;
            return;
        };
        let received = &mut self.convs[c as usize].received[pos as usize];
        if received.has(message.seq) {
            counters.duplicates += 1;
            return;
        }
        if message.seq < received.max_seq {
            counters.order_violations += 1;
        }
        received.mark(message.seq);
        counters.delivered += 1;
        let latency = now.saturating_duration_since(scheduled);
        hist::record(&mut self.e2e, latency);
        hist::record(&mut self.interval_e2e, latency);
    }

    /// True once the schedule has run out, every send is answered and every
    /// expected delivery has arrived.
    fn complete(&self, counters: &Counters) -> bool {
        self.next_due().is_none()
            && self.schedule.is_some()
            && self.pending_acks == 0
            && counters.delivered >= counters.expected_deliveries
    }
}

impl Scenario for Chat {
    /// CreateConversation requests for every group, from its creator.
    fn setup(&mut self, user_id: &dyn Fn(u32) -> String) -> Outbox {
        let mut out = Vec::new();
        for &c in &self.groups {
            let conv = &self.convs[c as usize];
            let create = pb::CreateConversation {
                kind: pb::ConversationKind::Group.into(),
                title: format!("bench group {c}"),
                member_user_ids: conv.members[1..].iter().map(|&m| user_id(m)).collect(),
                channel: Default::default(),
            };
            out.push((
                conv.members[0],
                palaver_protocol::frame(
                    FIRST_SETUP_REQUEST + c,
                    pb::frame::Body::CreateConversation(create),
                ),
            ));
        }
        self.pending_creates = out.len();
        out
    }

    /// Groups whose creation is still unanswered.
    fn pending_setup(&self) -> usize {
        self.pending_creates
    }

    /// A setup request could not be sent or failed: the group stays unused.
    fn setup_failed(&mut self, slot: u32, request_id: u32, reason: String) -> bool {
        let Some(c) = self.setup_request_conv(slot, request_id) else {
            return false;
        };
        if self.convs[c as usize].id.is_none() {
            self.pending_creates -= 1;
            *self.setup_failures.entry(reason).or_default() += 1;
            self.groups.retain(|&g| g != c);
            // Never counted again, even if an answer turns up later.
            self.convs[c as usize].id = Some(String::new());
        }
        true
    }

    /// Starts the send schedule.
    fn start(&mut self, now: Instant) {
        let total = (self.rate * self.duration.as_secs_f64()).round() as u64;
        self.schedule = Some(Schedule {
            start: now,
            nanos_per_message: 1e9 / self.rate,
            total,
            next: 0,
        });
    }

    /// When the next send is due, while the schedule runs.
    fn next_due(&self) -> Option<Instant> {
        let s = self.schedule.as_ref()?;
        (s.next < s.total).then(|| s.due(s.next))
    }

    /// Every send due by `now`, as (sender slot, frame). Sends whose sender
    /// has no session (`ready` says) are skipped and counted.
    fn due(
        &mut self,
        now: Instant,
        ready: &dyn Fn(u32) -> bool,
        counters: &mut Counters,
        out: &mut Vec<(u32, pb::Frame)>,
    ) {
        loop {
            let Some(s) = self.schedule.as_mut() else {
                return;
            };
            if s.next >= s.total || s.due(s.next) > now {
                return;
            }
            let k = s.next;
            s.next += 1;
            let scheduled = s.due(k);
            let Some((c, pos)) = self.pick() else {
                counters.send_skipped += 1;
                continue;
            };
            let conv = &self.convs[c as usize];
            let slot = conv.members[pos as usize];
            if !ready(slot) {
                counters.send_skipped += 1;
                continue;
            }
            let send = pb::Send {
                conversation_id: conv.id.clone().unwrap_or_default(),
                client_msg_id: self.msg_ids.id(k).to_vec(),
                kind: pb::ContentKind::Text.into(),
                body: self.body(scheduled, k),
                ..Default::default()
            };
            // Request ids above the setup range, never 0.
            let request_id = (FIRST_SETUP_REQUEST + self.convs.len() as u32)
                .wrapping_add(k as u32)
                .max(FIRST_SETUP_REQUEST + self.convs.len() as u32);
            out.push((
                slot,
                palaver_protocol::frame(request_id, pb::frame::Body::Send(send)),
            ));
            counters.sent += 1;
            self.pending_acks += 1;
        }
    }

    /// Final accounting: acked messages some member never received, and
    /// sends never answered.
    fn finish(&self, counters: &mut Counters) {
        let mut losses = 0;
        for conv in &self.convs {
            for &(seq, sender) in &conv.acked {
                losses += conv
                    .received
                    .iter()
                    .enumerate()
                    .filter(|&(pos, r)| pos as u32 != sender && !r.has(seq))
                    .count() as u64;
            }
        }
        counters.losses = losses;
        counters.unacked = self.pending_acks;
    }

    fn on_frame(
        &mut self,
        slot: u32,
        me: &str,
        frame: &pb::Frame,
        now: Instant,
        counters: &mut Counters,
    ) {
        match &frame.body {
            Some(Body::SendAck(ack)) => self.on_ack(slot, ack, now, counters),
            Some(Body::Deliver(pb::Deliver {
                message: Some(message),
                ..
            })) => self.on_deliver(slot, me, message, now, counters),
            Some(Body::ConversationCreated(created)) => {
                self.on_created(slot, frame.request_id, created, counters)
            }
            // Membership, receipts, typing and presence are not measured.
            _ => {}
        }
    }

    fn on_error(
        &mut self,
        slot: u32,
        request_id: u32,
        error: &pb::Error,
        counters: &mut Counters,
    ) -> bool {
        if !error.client_msg_id.is_empty() {
            self.on_send_error(error, counters)
        } else {
            self.setup_failed(
                slot,
                request_id,
                format!("Error {}", error_name(error.code)),
            )
        }
    }

    fn drained(&self, counters: &Counters, now: Instant, grace: Duration) -> bool {
        let end = self.schedule.as_ref().map_or(now, Schedule::end) + grace;
        self.complete(counters) || now >= end
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
            setup_failures: self.setup_failures,
            channel: None,
        }
    }
}

/// `CODE NAME` for an error code (the name when the code is known).
pub fn error_name(code: u32) -> String {
    match i32::try_from(code)
        .ok()
        .and_then(|c| pb::ErrorCode::try_from(c).ok())
    {
        Some(known) => format!("{code} {}", known.as_str_name()),
        None => format!("{code}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::scenario::Scenario;

    fn chat(users: u32, groups: Vec<u32>, direct_share: f64) -> Chat {
        Chat::new(
            ChatPlan {
                worker_index: 3,
                epoch: Instant::now(),
                users,
                group_sizes: groups,
                direct_share,
                group_senders: None,
                body_bytes: 40,
                rate: 1000.0,
                duration: Duration::from_millis(10),
                seed: 7,
            },
            |slot| format!("u{slot}"),
        )
    }

    fn deliver(conv: &str, seq: u64, sender: &str, body: Vec<u8>) -> pb::Message {
        pb::Message {
            conversation_id: conv.into(),
            seq,
            sender_user_id: sender.into(),
            body,
            ..Default::default()
        }
    }

    #[test]
    fn population_pairs_users_and_spreads_groups() {
        let c = chat(5, vec![3, 3], 0.5);
        assert_eq!(c.directs.len(), 2);
        assert_eq!(c.convs[0].id.as_deref(), Some("dm:u0:u1"));
        assert_eq!(c.convs[2].members, vec![0, 1, 2]);
        assert_eq!(c.convs[3].members, vec![2, 3, 4]);
        assert_eq!(c.memberships[2].len(), 3); // dm with u3 and both groups
        let none = chat(4, vec![4], 0.0);
        assert!(none.directs.is_empty());
    }

    #[test]
    fn accounting_finds_losses_duplicates_and_reordering() {
        let mut c = chat(3, vec![3], 0.0);
        let mut counters = Counters::default();
        let setup = c.setup(&|s| format!("u{s}"));
        assert_eq!(setup.len(), 1);
        let (creator, frame) = &setup[0];
        c.on_created(
            *creator,
            frame.request_id,
            &pb::ConversationCreated {
                conversation: Some(pb::Conversation {
                    conversation_id: "grp:x".into(),
                    ..Default::default()
                }),
            },
            &mut counters,
        );
        assert_eq!(c.pending_setup(), 0);
        let t0 = Instant::now();
        c.start(t0);
        let mut out = Vec::new();
        c.due(
            t0 + Duration::from_secs(1),
            &|_| true,
            &mut counters,
            &mut out,
        );
        assert_eq!(out.len(), 10);
        assert_eq!(counters.sent, 10);
        // Ack the first three sends with seqs 1..=3.
        for (i, (slot, frame)) in out.iter().take(3).enumerate() {
            let Some(pb::frame::Body::Send(send)) = &frame.body else {
                panic!()
            };
            let ack = pb::SendAck {
                client_msg_id: send.client_msg_id.clone(),
                conversation_id: "grp:x".into(),
                seq: i as u64 + 1,
                ..Default::default()
            };
            c.on_ack(*slot, &ack, t0, &mut counters);
        }
        assert_eq!(counters.acked, 3);
        assert_eq!(counters.expected_deliveries, 6);
        let body = |k: usize| match &out[k].1.body {
            Some(pb::frame::Body::Send(s)) => s.body.clone(),
            _ => unreachable!(),
        };
        let sender = |k: usize| format!("u{}", out[k].0);
        // Deliver everything to every non-sender, except seq 2 to one member,
        // seq 3 before seq 1 to another, and seq 1 twice.
        let mut skipped_one = false;
        for member in 0..3u32 {
            let me = format!("u{member}");
            for &k in &[2usize, 0, 1, 0] {
                let seq = k as u64 + 1;
                if sender(k) == me {
                    continue;
                }
                if seq == 2 && !skipped_one {
                    skipped_one = true;
                    continue;
                }
                c.on_deliver(
                    member,
                    &me,
                    &deliver("grp:x", seq, &sender(k), body(k)),
                    t0,
                    &mut counters,
                );
            }
        }
        c.finish(&mut counters);
        assert_eq!(counters.losses, 1);
        assert!(counters.duplicates >= 1);
        assert!(counters.order_violations >= 1);
        assert_eq!(counters.unacked, 7);
        assert_eq!(c.e2e.len(), counters.delivered);
        // Foreign bodies and conversations are flagged, not counted.
        c.on_deliver(
            0,
            "u0",
            &deliver("grp:y", 9, "u1", body(0)),
            t0,
            &mut counters,
        );
        c.on_deliver(
            0,
            "u0",
            &deliver("grp:x", 9, "u1", vec![0; 30]),
            t0,
            &mut counters,
        );
        assert_eq!(counters.unexpected, 2);
    }

    #[test]
    fn skipped_sends_when_sender_offline_and_schedule_ends() {
        let mut c = chat(2, vec![], 1.0);
        let mut counters = Counters::default();
        let t0 = Instant::now();
        c.start(t0);
        let mut out = Vec::new();
        c.due(
            t0 + Duration::from_secs(5),
            &|_| false,
            &mut counters,
            &mut out,
        );
        assert!(out.is_empty());
        assert_eq!(counters.send_skipped, 10);
        assert!(c.next_due().is_none());
        assert!(c.complete(&counters));
    }

    #[test]
    fn error_names() {
        assert_eq!(error_name(2001), "2001 RATE_LIMITED");
        assert_eq!(error_name(4242), "4242");
    }
}
