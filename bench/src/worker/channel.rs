//! `channel`: one channel of `channel_members` members shared by every
//! worker, opened LIVE (or COUNTS) by every connected member, a few posters.
//!
//! Setup: worker 0 creates the channel from its first connected user (a
//! public, non-announcement channel) and adds every other member, connected
//! or not, with paced `ChangeMembers` of [`ADD_CHUNK`] ids (retrying
//! `RATE_LIMITED`). Then it hands the id to the coordinator
//! ([`crate::ipc::WorkerMsg::ChannelCreated`]), which passes it to every
//! worker ([`crate::ipc::Command::OpenChannel`]); each opens it on all its
//! connections. None of this is measured: the send schedule starts after.
//!
//! Sends follow one global schedule (message `k` due at start + k / rate,
//! sent by sender `k % senders`); each worker sends the messages of its own
//! senders. A message's sender and receivers are in different processes, so
//! the body carries the scheduled time as wall-clock nanoseconds (one
//! machine's clock: all workers must run on one machine) and losses are
//! counted by the coordinator from each worker's per-seq tallies
//! ([`ChannelTally`]).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use palaver_protocol::pb;
use palaver_protocol::pb::frame::Body;

use super::chat::error_name;
use super::scenario::{MsgIds, Outbox, Scenario, ScenarioReport};
use crate::hist::{self, names};
use crate::ipc::{ChannelTally, Counters};

/// Request ids: Hello is 1; ChangeMembers are `FIRST_ADD_REQUEST + chunk`;
/// Sends `FIRST_SEND_REQUEST + k` (wrapping inside their range).
const CREATE_REQUEST: u32 = 2;
const OPEN_REQUEST: u32 = 3;
const FIRST_ADD_REQUEST: u32 = 1 << 16;
const FIRST_SEND_REQUEST: u32 = 1 << 24;
/// Ids per ChangeMembers: ~16 KiB of ids, well under the 64 KiB frame limit.
const ADD_CHUNK: u64 = 1000;
/// ChangeMembers costs 10 of the creator's 100 request units per second:
/// one every 110 ms stays under the budget.
const ADD_INTERVAL: Duration = Duration::from_millis(110);
/// Wait before sending a request refused with RATE_LIMITED again.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Seqs above this are not tracked (guards the per-receiver bitmaps).
const MAX_TRACKED_SEQ: u64 = 1 << 30;
/// Body header: scheduled time (ns since the Unix epoch), message number, magic.
const MAGIC: &[u8; 4] = b"PLVC";
const HEADER_BYTES: usize = 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Live,
    Counts,
}

/// One connection's view of the channel.
struct Receiver {
    /// The mode it asks for; `opened` once ChannelOpened confirmed it.
    mode: Mode,
    opened: bool,
    max_seq: u64,
    /// Seqs delivered (LIVE), a bitmap.
    seen: Vec<u64>,
    /// Distinct seqs delivered plus its own acked messages: the channel's
    /// messages it has accounted for.
    accounted: u64,
    /// COUNTS: the highest last_seq shown to it.
    counts_last_seq: u64,
}

impl Receiver {
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

    fn live(&self) -> bool {
        self.opened && self.mode == Mode::Live
    }
}

/// What the worker tells [`Channel::new`].
pub struct ChannelPlan {
    pub worker_index: u32,
    pub epoch: Instant,
    pub run_id: String,
    /// Global index of this worker's first user, and its user count.
    pub user_start: u64,
    pub users: u32,
    /// Connected users of the whole run (global indexes `0..connections`).
    pub connections: u64,
    pub channel_members: u64,
    pub counts_share: f64,
    pub senders: u32,
    /// Messages per second of the whole run (every worker's senders).
    pub rate: f64,
    pub duration: Duration,
    pub body_bytes: usize,
}

pub struct Channel {
    plan: ChannelPlan,
    /// Wall-clock nanoseconds at `plan.epoch`: bodies carry wall-clock times.
    epoch_unix_ns: u64,
    id: Option<String>,
    // ---- worker 0: creation and adds ----
    creator_slot: Option<u32>,
    create_at: Option<Instant>,
    /// Chunks of global user indexes still to add, and those in flight.
    adds: VecDeque<u64>,
    adds_in_flight: Vec<u64>,
    next_add_at: Instant,
    /// The id is ready for the coordinator (members all added) / was taken.
    announce: bool,
    announced: bool,
    /// Creation failed: this worker waits for nothing more.
    setup_broken: bool,
    // ---- every worker: opening ----
    opened_id_known: bool,
    pending_opens: usize,
    open_retries: Vec<(Instant, u32)>,
    receivers: Vec<Receiver>,
    /// Sender index (`k % senders`) → this worker's slot, for its senders.
    sender_slots: Vec<Option<u32>>,
    // ---- the measured phase ----
    start: Option<Instant>,
    total: u64,
    next: u64,
    pending_acks: u64,
    /// Live receivers that accounted for every scheduled message.
    complete_receivers: usize,
    /// First 8 bytes of every client_msg_id of this worker in this run.
    msg_ids: MsgIds,
    tally: ChannelTally,
    delivered_by_seq: Vec<u64>,
    e2e: Histogram<u64>,
    ack: Histogram<u64>,
    interval_e2e: Histogram<u64>,
    send_errors: BTreeMap<String, u64>,
    setup_failures: BTreeMap<String, u64>,
}

impl Channel {
    pub fn new(plan: ChannelPlan) -> Channel {
        let epoch_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            .saturating_sub(plan.epoch.elapsed().as_nanos() as u64);
        let senders = u64::from(plan.senders);
        let mine = plan.user_start..plan.user_start + u64::from(plan.users);
        let sender_global = |j: u64| j * plan.connections / senders;
        let sender_slots = (0..senders)
            .map(|j| {
                let g = sender_global(j);
                mine.contains(&g).then(|| (g - plan.user_start) as u32)
            })
            .collect::<Vec<_>>();
        let is_sender = |g: u64| {
            // Senders are spread evenly: g is one if some j maps to it.
            let j = (g * senders).div_ceil(plan.connections);
            j < senders && sender_global(j) == g
        };
        let share = plan.counts_share;
        let receivers = (0..u64::from(plan.users))
            .map(|slot| {
                let g = plan.user_start + slot;
                // Every 1/share-th connected member, senders excepted.
                let counts = ((g + 1) as f64 * share).floor() > (g as f64 * share).floor();
                Receiver {
                    mode: if counts && !is_sender(g) {
                        Mode::Counts
                    } else {
                        Mode::Live
                    },
                    opened: false,
                    max_seq: 0,
                    seen: Vec::new(),
                    accounted: 0,
                    counts_last_seq: 0,
                }
            })
            .collect();
        let adds = if plan.worker_index == 0 {
            (0..plan.channel_members.div_ceil(ADD_CHUNK)).collect()
        } else {
            VecDeque::new()
        };
        Channel {
            epoch_unix_ns,
            id: None,
            creator_slot: None,
            create_at: (plan.worker_index == 0).then_some(plan.epoch),
            adds,
            adds_in_flight: Vec::new(),
            next_add_at: plan.epoch,
            announce: false,
            announced: false,
            setup_broken: false,
            opened_id_known: false,
            pending_opens: 0,
            open_retries: Vec::new(),
            receivers,
            sender_slots,
            start: None,
            total: 0,
            next: 0,
            pending_acks: 0,
            complete_receivers: 0,
            msg_ids: MsgIds::new(plan.worker_index),
            tally: ChannelTally::default(),
            delivered_by_seq: Vec::new(),
            e2e: hist::new(),
            ack: hist::new(),
            interval_e2e: hist::new(),
            send_errors: BTreeMap::new(),
            setup_failures: BTreeMap::new(),
            plan,
        }
    }

    fn unix_ns(&self, t: Instant) -> u64 {
        self.epoch_unix_ns + t.saturating_duration_since(self.plan.epoch).as_nanos() as u64
    }

    fn due_at(&self, k: u64) -> Option<Instant> {
        let start = self.start?;
        Some(start + Duration::from_nanos((k as f64 * 1e9 / self.plan.rate) as u64))
    }

    /// The slot that sends message `k`, if it is this worker's.
    fn sender_of(&self, k: u64) -> Option<u32> {
        let j = (k % u64::from(self.plan.senders)) as usize;
        self.sender_slots.get(j).copied().flatten()
    }

    /// Moves `next` to the next message this worker sends (or `total`).
    fn skip_to_mine(&mut self) {
        while self.next < self.total && self.sender_of(self.next).is_none() {
            self.next += 1;
        }
    }

    fn body(&self, scheduled: Instant, k: u64) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.plan.body_bytes);
        body.extend_from_slice(&self.unix_ns(scheduled).to_le_bytes());
        body.extend_from_slice(&k.to_le_bytes());
        body.extend_from_slice(MAGIC);
        body.resize(self.plan.body_bytes.max(HEADER_BYTES), b'.');
        body
    }

    /// The scheduled wall-clock time (ns) a body of this run carries.
    fn scheduled_unix_ns(body: &[u8]) -> Option<u64> {
        if body.len() < HEADER_BYTES || &body[16..20] != MAGIC {
            return None;
        }
        Some(u64::from_le_bytes(body[..8].try_into().ok()?))
    }

    /// The ChangeMembers adding chunk `c` (global user indexes), the creator left out.
    fn add_request(&self, c: u64, creator: u64) -> Option<pb::Frame> {
        let from = c * ADD_CHUNK;
        let to = ((c + 1) * ADD_CHUNK).min(self.plan.channel_members);
        let ids: Vec<String> = (from..to)
            .filter(|&g| g != creator)
            .map(|g| crate::ipc::user_id(&self.plan.run_id, g))
            .collect();
        if ids.is_empty() {
            return None;
        }
        let change = pb::ChangeMembers {
            conversation_id: self.id.clone()?,
            add_user_ids: ids,
            ..Default::default()
        };
        Some(palaver_protocol::frame(
            FIRST_ADD_REQUEST + c as u32,
            Body::ChangeMembers(change),
        ))
    }

    fn open_request(&self, slot: u32) -> pb::Frame {
        let mode = match self.receivers[slot as usize].mode {
            Mode::Live => pb::ChannelMode::Live,
            Mode::Counts => pb::ChannelMode::Counts,
        };
        let open = pb::OpenChannel {
            conversation_id: self.id.clone().unwrap_or_default(),
            mode: mode.into(),
        };
        palaver_protocol::frame(OPEN_REQUEST, Body::OpenChannel(open))
    }

    fn fail_setup(&mut self, reason: String) {
        *self.setup_failures.entry(reason).or_default() += 1;
    }

    /// A receiver accounted for one more message: complete once it has all.
    fn account(&mut self, slot: u32) {
        let total = self.total;
        let r = &mut self.receivers[slot as usize];
        r.accounted += 1;
        if r.live() && total > 0 && r.accounted == total {
            self.complete_receivers += 1;
        }
    }

    fn on_ack(&mut self, slot: u32, ack: &pb::SendAck, now: Instant, counters: &mut Counters) {
        let Some(k) = self.msg_ids.number(&ack.client_msg_id) else {
            counters.unexpected += 1;
            return;
        };
        if let Some(due) = self.due_at(k) {
            hist::record(&mut self.ack, now.saturating_duration_since(due));
        }
        if Some(&ack.conversation_id) != self.id.as_ref() {
            counters.unexpected += 1;
            return;
        }
        let sender_live = self.receivers[slot as usize].live();
        self.tally.acked.push((ack.seq, sender_live));
        counters.acked += 1;
        self.pending_acks = self.pending_acks.saturating_sub(1);
        // A sender's own message never reaches its own connection.
        self.account(slot);
    }

    fn on_deliver(
        &mut self,
        slot: u32,
        me: &str,
        message: &pb::Message,
        now: Instant,
        counters: &mut Counters,
    ) {
        if Some(&message.conversation_id) != self.id.as_ref()
            || !self.receivers[slot as usize].live()
        {
            counters.unexpected += 1;
            return;
        }
        if message.sender_user_id == me {
            counters.echoes += 1;
            return;
        }
        let (Some(scheduled), true) = (
            Self::scheduled_unix_ns(&message.body),
            message.seq <= MAX_TRACKED_SEQ,
        ) else {
            counters.unexpected += 1;
            return;
        };
        let seq = message.seq;
        let r = &mut self.receivers[slot as usize];
        if r.has(seq) {
            counters.duplicates += 1;
            return;
        }
        if seq < r.max_seq {
            counters.order_violations += 1;
        }
        r.mark(seq);
        counters.delivered += 1;
        if self.delivered_by_seq.len() <= seq as usize {
            self.delivered_by_seq.resize(seq as usize + 1, 0);
        }
        self.delivered_by_seq[seq as usize] += 1;
        self.account(slot);
        let latency = Duration::from_nanos(self.unix_ns(now).saturating_sub(scheduled));
        hist::record(&mut self.e2e, latency);
        hist::record(&mut self.interval_e2e, latency);
    }

    fn on_activity(&mut self, slot: u32, activity: &pb::ChannelActivity, counters: &mut Counters) {
        let r = &mut self.receivers[slot as usize];
        if !(r.opened && r.mode == Mode::Counts) {
            counters.unexpected += 1;
            return;
        }
        self.tally.activity_frames += 1;
        for count in &activity.channels {
            if Some(&count.conversation_id) == self.id.as_ref() {
                r.counts_last_seq = r.counts_last_seq.max(count.last_seq);
            }
        }
    }

    fn on_opened(&mut self, slot: u32, opened: &pb::ChannelOpened) {
        if Some(&opened.conversation_id) != self.id.as_ref() {
            return;
        }
        let r = &mut self.receivers[slot as usize];
        if r.opened {
            return;
        }
        r.opened = true;
        r.counts_last_seq = opened.last_seq;
        self.pending_opens = self.pending_opens.saturating_sub(1);
    }

    /// An Error answering a setup request (create, add, open).
    fn on_setup_error(&mut self, slot: u32, request_id: u32, error: &pb::Error) -> bool {
        let rate_limited = error.code == pb::ErrorCode::RateLimited as u32;
        let now = Instant::now();
        let reason = |what: &str| format!("{what}: Error {}", error_name(error.code));
        if request_id == CREATE_REQUEST && Some(slot) == self.creator_slot {
            if rate_limited {
                self.create_at = Some(now + RETRY_DELAY);
            } else {
                self.fail_setup(reason("create channel"));
                self.setup_broken = true;
            }
            return true;
        }
        if request_id == OPEN_REQUEST {
            if rate_limited {
                self.open_retries.push((now + RETRY_DELAY, slot));
            } else {
                self.fail_setup(reason("open channel"));
                self.pending_opens = self.pending_opens.saturating_sub(1);
            }
            return true;
        }
        let chunk = u64::from(request_id.wrapping_sub(FIRST_ADD_REQUEST));
        if Some(slot) == self.creator_slot && self.adds_in_flight.contains(&chunk) {
            self.adds_in_flight.retain(|&c| c != chunk);
            if rate_limited {
                self.adds.push_front(chunk);
                self.next_add_at = now + RETRY_DELAY;
            } else {
                self.fail_setup(reason("add members"));
            }
            return true;
        }
        false
    }

    fn on_send_error(&mut self, error: &pb::Error, counters: &mut Counters) -> bool {
        if self.msg_ids.number(&error.client_msg_id).is_none() {
            return false;
        }
        self.pending_acks = self.pending_acks.saturating_sub(1);
        counters.send_errors += 1;
        *self.send_errors.entry(error_name(error.code)).or_default() += 1;
        true
    }

    fn live_receivers(&self) -> usize {
        self.receivers.iter().filter(|r| r.live()).count()
    }
}

impl Scenario for Channel {
    /// Worker 0 waits for its members to be added, every worker for the
    /// channel id and then for its opens to be answered.
    fn pending_setup(&self) -> usize {
        if self.setup_broken {
            return 0;
        }
        usize::from(!self.opened_id_known) + self.pending_opens
    }

    fn setup_due(
        &mut self,
        now: Instant,
        ready: &dyn Fn(u32) -> bool,
        out: &mut Outbox,
    ) -> Option<Instant> {
        let mut wake: Option<Instant> = None;
        let mut later = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        if let Some(at) = self.create_at {
            if self.id.is_none() && now >= at {
                self.create_at = None;
                match (0..self.plan.users).find(|&s| ready(s)) {
                    Some(slot) => {
                        self.creator_slot = Some(slot);
                        let create = pb::CreateConversation {
                            kind: pb::ConversationKind::Channel.into(),
                            title: format!("bench channel {}", self.plan.run_id),
                            member_user_ids: Vec::new(),
                            channel: Some(pb::ChannelSettings {
                                public: true,
                                admins_only_post: false,
                            }),
                        };
                        let frame = palaver_protocol::frame(
                            CREATE_REQUEST,
                            Body::CreateConversation(create),
                        );
                        out.push((slot, frame));
                    }
                    None => {
                        self.fail_setup("create channel: no connected user".into());
                        self.setup_broken = true;
                    }
                }
            } else if self.id.is_none() {
                later(at);
            }
        }
        if let (Some(creator), Some(_)) = (self.creator_slot, &self.id) {
            let creator_global = self.plan.user_start + u64::from(creator);
            while now >= self.next_add_at {
                let Some(c) = self.adds.pop_front() else {
                    break;
                };
                if let Some(frame) = self.add_request(c, creator_global) {
                    out.push((creator, frame));
                    self.adds_in_flight.push(c);
                    self.next_add_at = now + ADD_INTERVAL;
                }
            }
            if !self.adds.is_empty() {
                later(self.next_add_at);
            } else if self.adds_in_flight.is_empty() && !self.announced {
                self.announce = true;
            }
        }
        let mut retries = std::mem::take(&mut self.open_retries);
        retries.retain(|&(at, slot)| {
            if now >= at {
                out.push((slot, self.open_request(slot)));
                false
            } else {
                later(at);
                true
            }
        });
        // A retried open stays in `pending_opens` until it is answered.
        self.open_retries = retries;
        wake
    }

    fn take_channel_id(&mut self) -> Option<String> {
        if !self.announce || self.announced {
            return None;
        }
        self.announced = true;
        self.id.clone()
    }

    fn open_channel(&mut self, conversation_id: &str, ready: &dyn Fn(u32) -> bool) -> Outbox {
        self.id = Some(conversation_id.to_string());
        self.opened_id_known = true;
        let mut out = Vec::new();
        for slot in 0..self.plan.users {
            if ready(slot) {
                out.push((slot, self.open_request(slot)));
            }
        }
        self.pending_opens = out.len();
        out
    }

    fn setup_failed(&mut self, slot: u32, request_id: u32, reason: String) -> bool {
        let _ = slot;
        match request_id {
            CREATE_REQUEST => self.setup_broken = true,
            OPEN_REQUEST => self.pending_opens = self.pending_opens.saturating_sub(1),
            _ => {
                let chunk = u64::from(request_id.wrapping_sub(FIRST_ADD_REQUEST));
                if !self.adds_in_flight.contains(&chunk) {
                    return false;
                }
                self.adds_in_flight.retain(|&c| c != chunk);
            }
        }
        self.fail_setup(reason);
        true
    }

    fn start(&mut self, now: Instant) {
        self.total = (self.plan.rate * self.plan.duration.as_secs_f64()).round() as u64;
        self.start = Some(now);
        self.next = 0;
        self.skip_to_mine();
    }

    fn next_due(&self) -> Option<Instant> {
        (self.next < self.total)
            .then(|| self.due_at(self.next))
            .flatten()
    }

    fn due(
        &mut self,
        now: Instant,
        ready: &dyn Fn(u32) -> bool,
        counters: &mut Counters,
        out: &mut Outbox,
    ) {
        while let Some(due) = self.next_due().filter(|&d| d <= now) {
            let k = self.next;
            self.next += 1;
            self.skip_to_mine();
            let Some(slot) = self.sender_of(k) else {
                continue;
            };
            if !ready(slot) {
                counters.send_skipped += 1;
                continue;
            }
            let send = pb::Send {
                conversation_id: self.id.clone().unwrap_or_default(),
                client_msg_id: self.msg_ids.id(k).to_vec(),
                kind: pb::ContentKind::Text.into(),
                body: self.body(due, k),
                ..Default::default()
            };
            let request_id = FIRST_SEND_REQUEST + (k % u64::from(FIRST_SEND_REQUEST)) as u32;
            out.push((slot, palaver_protocol::frame(request_id, Body::Send(send))));
            counters.sent += 1;
            self.pending_acks += 1;
        }
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
            Some(Body::ChannelActivity(activity)) => self.on_activity(slot, activity, counters),
            Some(Body::ChannelOpened(opened)) if frame.request_id == OPEN_REQUEST => {
                self.on_opened(slot, opened)
            }
            Some(Body::ConversationCreated(created))
                if frame.request_id == CREATE_REQUEST && Some(slot) == self.creator_slot =>
            {
                if let (None, Some(info)) = (&self.id, &created.conversation) {
                    self.id = Some(info.conversation_id.clone());
                    self.next_add_at = now;
                    counters.groups_created += 1;
                }
            }
            Some(Body::MembersChanged(_)) if Some(slot) == self.creator_slot => {
                let chunk = u64::from(frame.request_id.wrapping_sub(FIRST_ADD_REQUEST));
                self.adds_in_flight.retain(|&c| c != chunk);
            }
            // Being added (MembersChanged with request_id 0), typing: not measured.
            _ => {}
        }
    }

    fn on_error(
        &mut self,
        slot: u32,
        request_id: u32,
        error: &pb::Error,
        c: &mut Counters,
    ) -> bool {
        if !error.client_msg_id.is_empty() {
            self.on_send_error(error, c)
        } else {
            self.on_setup_error(slot, request_id, error)
        }
    }

    /// Done once every send is answered, every LIVE receiver here has every
    /// scheduled message and every COUNTS one was shown the last of them
    /// (seqs 1..=total: a refused or skipped send anywhere means waiting
    /// out the grace), or once the grace has passed.
    fn drained(&self, _counters: &Counters, now: Instant, grace: Duration) -> bool {
        let end = self.due_at(self.total).unwrap_or(now) + grace;
        let complete = || {
            self.next_due().is_none()
                && self.pending_acks == 0
                && self.complete_receivers >= self.live_receivers()
                && self
                    .receivers
                    .iter()
                    .filter(|r| r.opened && r.mode == Mode::Counts)
                    .all(|r| r.counts_last_seq >= self.total)
        };
        now >= end || complete()
    }

    /// Losses need every worker's tallies: the coordinator counts them.
    fn finish(&self, counters: &mut Counters) {
        counters.unacked = self.pending_acks;
    }

    fn take_interval_p99_us(&mut self) -> u64 {
        let p99 = self.interval_e2e.value_at_quantile(0.99);
        self.interval_e2e.reset();
        p99
    }

    fn report(self: Box<Self>) -> ScenarioReport {
        let mut tally = self.tally;
        let mut counts_last_seq = BTreeMap::<u64, u64>::new();
        for r in &self.receivers {
            match (r.opened, r.mode) {
                (true, Mode::Live) => tally.live_receivers += 1,
                (true, Mode::Counts) => {
                    tally.counts_receivers += 1;
                    *counts_last_seq.entry(r.counts_last_seq).or_default() += 1;
                }
                _ => {}
            }
        }
        tally.counts_last_seq = counts_last_seq.into_iter().collect();
        tally.delivered_by_seq = self
            .delivered_by_seq
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(seq, &n)| (seq as u64, n))
            .collect();
        ScenarioReport {
            histograms: vec![(names::E2E, self.e2e), (names::ACK, self.ack)],
            send_errors: self.send_errors,
            setup_failures: self.setup_failures,
            channel: Some(tally),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(worker_index: u32, user_start: u64, users: u32) -> Channel {
        Channel::new(ChannelPlan {
            worker_index,
            epoch: Instant::now(),
            run_id: "r".into(),
            user_start,
            users,
            connections: 10,
            channel_members: 2500,
            counts_share: 0.2,
            senders: 2,
            rate: 20.0,
            duration: Duration::from_secs(1),
            body_bytes: 32,
        })
    }

    #[test]
    fn senders_spread_over_workers_and_stay_live() {
        let (a, b) = (channel(0, 0, 5), channel(1, 5, 5));
        assert_eq!(a.sender_slots, vec![Some(0), None]);
        assert_eq!(b.sender_slots, vec![None, Some(0)]);
        let counts: Vec<u64> = [&a, &b]
            .iter()
            .flat_map(|c| {
                c.receivers
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.mode == Mode::Counts)
                    .map(|(s, _)| c.plan.user_start + s as u64)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(counts, vec![4, 9]);
        // Worker 0 adds 2,500 members in 3 chunks, the creator left out.
        assert_eq!(a.adds.len(), 3);
        assert!(b.adds.is_empty());
    }

    #[test]
    fn setup_creates_adds_then_announces_and_opens() {
        let mut c = channel(0, 0, 5);
        let mut counters = Counters::default();
        let now = Instant::now();
        let mut out = Vec::new();
        c.setup_due(now, &|_| true, &mut out);
        assert!(matches!(out[0].1.body, Some(Body::CreateConversation(_))));
        let created = pb::ConversationCreated {
            conversation: Some(pb::Conversation {
                conversation_id: "chn:x".into(),
                ..Default::default()
            }),
        };
        let frame = palaver_protocol::frame(CREATE_REQUEST, Body::ConversationCreated(created));
        c.on_frame(0, "b", &frame, now, &mut counters);
        let mut t = now;
        let mut adds = Vec::new();
        while adds.len() < 3 {
            out.clear();
            c.setup_due(t, &|_| true, &mut out);
            adds.append(&mut out);
            t += ADD_INTERVAL;
        }
        let Some(Body::ChangeMembers(first)) = &adds[0].1.body else {
            panic!("not a ChangeMembers")
        };
        assert_eq!(first.add_user_ids.len(), 999);
        assert_eq!(c.take_channel_id(), None, "adds still unanswered");
        // The second add is refused once, then retried.
        let limited = pb::Error {
            code: pb::ErrorCode::RateLimited as u32,
            ..Default::default()
        };
        assert!(c.on_error(0, adds[1].1.request_id, &limited, &mut counters));
        for (_, f) in [&adds[0], &adds[2]] {
            let changed = palaver_protocol::frame(
                f.request_id,
                Body::MembersChanged(pb::MembersChanged::default()),
            );
            c.on_frame(0, "b", &changed, t, &mut counters);
        }
        out.clear();
        c.setup_due(t + RETRY_DELAY, &|_| true, &mut out);
        assert_eq!(out[0].1.request_id, adds[1].1.request_id);
        let changed = palaver_protocol::frame(
            out[0].1.request_id,
            Body::MembersChanged(pb::MembersChanged::default()),
        );
        c.on_frame(0, "b", &changed, t, &mut counters);
        c.setup_due(t + RETRY_DELAY, &|_| true, &mut Vec::new());
        assert_eq!(c.take_channel_id().as_deref(), Some("chn:x"));
        assert_eq!(c.take_channel_id(), None, "announced once");
        assert_eq!(c.pending_setup(), 1);
        let opens = c.open_channel("chn:x", &|s| s != 3);
        assert_eq!(opens.len(), 4);
        assert_eq!(c.pending_setup(), 4);
        for (slot, _) in &opens {
            let opened = pb::ChannelOpened {
                conversation_id: "chn:x".into(),
                ..Default::default()
            };
            let frame = palaver_protocol::frame(OPEN_REQUEST, Body::ChannelOpened(opened));
            c.on_frame(*slot, "b", &frame, t, &mut counters);
        }
        assert_eq!(c.pending_setup(), 0);
        assert_eq!(c.live_receivers(), 3);
    }
}
