//! Per-connection fairness rules, sans-io: fed a request and `now`, they say
//! whether it goes to the backend, is refused with an `Error`, or is dropped.
//! No sockets, no clocks: the core thread owns one [`RequestPolicy`] per
//! session and the tests drive it with a virtual clock.
//!
//! What one connection may make the backend (and so everyone else) do:
//! - `Send`: `max_sends_per_second` (token bucket, burst = one second's worth);
//! - every other request: a cost-weighted budget of
//!   `max_requests_per_second` units (same bucket shape), costs in
//!   [`request_cost`];
//! - requests that have a response: at most `max_requests_in_flight`
//!   awaiting it, so one connection cannot make the backend build replies
//!   faster than it reads them;
//! - `Typing`: identical repeats within `typing_coalesce_ms` are dropped
//!   free, and Typing over budget is dropped rather than answered (it is
//!   ephemeral, and an `Error` per dropped frame would be output the flooder
//!   makes us hold).
//!
//! And what one account (all of a user's connections on this gateway) may
//! make it do: every request that passes its connection's bucket is charged
//! to the account's [`AccountBudget`] too (`max_account_sends_per_second`,
//! `max_account_requests_per_second`, same bucket shape). Refused if either
//! is empty; a refused request costs nothing (the connection's bucket is
//! refunded when the account's refuses). The budget is shared by the
//! account's connections on every core thread, so the caller hands it in
//! through [`AccountAccess`] (the core: under a lock, taken only when a
//! request needs it; the tests: a plain `AccountBudget`).

use palaver_protocol::pb::{self, frame::Body};
use palaver_protocol::BodyKind;

/// The limits the policy enforces (a copy lives in each core thread).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyLimits {
    pub max_body_bytes: u32,
    pub max_sends_per_second: u32,
    pub max_requests_per_second: u32,
    pub max_requests_in_flight: u32,
    pub typing_coalesce_ms: u32,
    pub max_account_sends_per_second: u32,
    pub max_account_requests_per_second: u32,
}

/// Budget units per request kind (see SPEC §13). Typing and presence scale
/// with fan-out at the router, History/Sync with store reads and reply size.
pub fn request_cost(body: &Body) -> u32 {
    match body {
        Body::Receipt(_) => 1,
        Body::Typing(_) => 5,
        Body::PresenceQuery(q) => 1 + q.user_ids.len() as u32 / 50,
        Body::PresenceSubscribe(s) => 1 + s.user_ids.len() as u32 / 50,
        Body::Sync(_) | Body::History(_) | Body::ListMembers(_) => 5,
        Body::CreateConversation(_) | Body::ChangeMembers(_) => 10,
        // Stored writes a client makes rarely (SPEC §13, §20).
        Body::RegisterPushToken(_) | Body::UnregisterPushToken(_) | Body::MuteConversation(_) => 10,
        _ => 1,
    }
}

/// A token bucket in milli-tokens: `rate` tokens per second, burst `rate`.
/// 8 bytes; time is the core clock in ms, truncated to u32 (wraps after 49
/// days, which only shortens one refill). Core threads sample the shared
/// clock once per loop turn, so a bucket shared by several cores (an
/// account's) may see a `now` slightly before its last refill: that counts
/// as no time passed, never as a wrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    milli_tokens: u32,
    refilled_ms: u32,
}

impl TokenBucket {
    pub fn full(rate: u32, now_ms: u64) -> Self {
        TokenBucket {
            milli_tokens: rate.saturating_mul(1000),
            refilled_ms: now_ms as u32,
        }
    }

    /// Takes `cost` tokens if there are that many.
    pub fn take(&mut self, rate: u32, cost: u32, now_ms: u64) -> bool {
        let now = now_ms as u32;
        let mut elapsed = now.wrapping_sub(self.refilled_ms);
        if elapsed > u32::MAX - CLOCK_SKEW_MS {
            // `now` is a little behind the last refill (another core's
            // clock, sampled earlier): no time passed.
            elapsed = 0;
        } else {
            self.refilled_ms = now;
        }
        // `rate` tokens per second = `rate` milli-tokens per ms.
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(elapsed.saturating_mul(rate))
            .min(rate.saturating_mul(1000));
        let need = cost.saturating_mul(1000);
        if self.milli_tokens >= need {
            self.milli_tokens -= need;
            true
        } else {
            false
        }
    }

    /// Gives back `cost` tokens just taken (the request was refused
    /// elsewhere, and a refused request costs nothing).
    pub fn refund(&mut self, rate: u32, cost: u32) {
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(cost.saturating_mul(1000))
            .min(rate.saturating_mul(1000));
    }
}

/// How far behind its last refill a bucket's `now` may be and still count
/// as "no time passed" (core clocks are sampled per loop turn).
const CLOCK_SKEW_MS: u32 = 60_000;

/// The buckets all of one account's connections on this gateway share
/// (16 bytes, kept in the gateway's account registry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccountBudget {
    sends: TokenBucket,
    requests: TokenBucket,
}

impl AccountBudget {
    pub fn new(limits: &PolicyLimits, now_ms: u64) -> Self {
        AccountBudget {
            sends: TokenBucket::full(limits.max_account_sends_per_second, now_ms),
            requests: TokenBucket::full(limits.max_account_requests_per_second, now_ms),
        }
    }

    /// Charges one request (a Send, or `cost` units of anything else).
    fn take(&mut self, limits: &PolicyLimits, send: bool, cost: u32, now_ms: u64) -> bool {
        if send {
            self.sends
                .take(limits.max_account_sends_per_second, 1, now_ms)
        } else {
            self.requests
                .take(limits.max_account_requests_per_second, cost, now_ms)
        }
    }
}

/// Where a connection's [`AccountBudget`] is: the core thread looks it up in
/// the shared registry (under its shard's lock, only when a request is to
/// be charged); tests hand in a budget of their own.
pub trait AccountAccess {
    fn with_budget<R>(&mut self, f: impl FnOnce(&mut AccountBudget) -> R) -> R;
}

impl AccountAccess for AccountBudget {
    fn with_budget<R>(&mut self, f: impl FnOnce(&mut AccountBudget) -> R) -> R {
        f(self)
    }
}

/// What to do with one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Hand it to the backend.
    Forward,
    /// Answer with this error (request_id echoed; a Send's client_msg_id too).
    Refuse(pb::ErrorCode, String),
    /// Drop without an answer (Typing coalesced or over budget).
    Drop,
}

/// If a connection sits at its in-flight cap with no answer for this long,
/// the count is assumed lost (a backend fault) and reset rather than
/// refusing the connection's requests forever.
const IN_FLIGHT_RESET_MS: u32 = 60_000;

/// One session's budgets: 28 bytes.
#[derive(Clone, Copy, Debug)]
pub struct RequestPolicy {
    sends: TokenBucket,
    requests: TokenBucket,
    /// Hash of the last forwarded Typing (conversation and state), and when.
    typing_key: u32,
    typing_at_ms: u32,
    last_answer_ms: u32,
    in_flight: u16,
}

impl RequestPolicy {
    pub fn new(limits: &PolicyLimits, now_ms: u64) -> Self {
        RequestPolicy {
            sends: TokenBucket::full(limits.max_sends_per_second, now_ms),
            requests: TokenBucket::full(limits.max_requests_per_second, now_ms),
            typing_key: 0,
            typing_at_ms: 0,
            last_answer_ms: now_ms as u32,
            in_flight: 0,
        }
    }

    pub fn in_flight(&self) -> u32 {
        u32::from(self.in_flight)
    }

    /// Decides about one request from the client (not Hello/Ping/Pong),
    /// charging it to the connection's buckets and to its account's.
    pub fn admit(
        &mut self,
        limits: &PolicyLimits,
        body: &Body,
        now_ms: u64,
        account: &mut impl AccountAccess,
    ) -> Admit {
        if let Body::Send(send) = body {
            if send.body.len() > limits.max_body_bytes as usize {
                return Admit::Refuse(
                    pb::ErrorCode::BodyTooLarge,
                    format!(
                        "body of {} bytes exceeds {}",
                        send.body.len(),
                        limits.max_body_bytes
                    ),
                );
            }
        }
        if let Body::Typing(t) = body {
            let key = typing_key(t);
            let now = now_ms as u32;
            if key == self.typing_key
                && now.wrapping_sub(self.typing_at_ms) < limits.typing_coalesce_ms
            {
                return Admit::Drop;
            }
            let cost = request_cost(body);
            if !self
                .requests
                .take(limits.max_requests_per_second, cost, now_ms)
            {
                return Admit::Drop;
            }
            if !account.with_budget(|b| b.take(limits, false, cost, now_ms)) {
                self.requests.refund(limits.max_requests_per_second, cost);
                return Admit::Drop;
            }
            self.typing_key = key;
            self.typing_at_ms = now;
            return Admit::Forward;
        }
        let tracked = BodyKind::of(body).expects_response();
        if tracked && u32::from(self.in_flight) >= limits.max_requests_in_flight {
            if (now_ms as u32).wrapping_sub(self.last_answer_ms) < IN_FLIGHT_RESET_MS {
                return Admit::Refuse(
                    pb::ErrorCode::RateLimited,
                    format!(
                        "more than {} requests awaiting a response",
                        limits.max_requests_in_flight
                    ),
                );
            }
            tracing::warn!(
                in_flight = self.in_flight,
                "no answer for a minute at the in-flight cap; resetting the count"
            );
            self.in_flight = 0;
        }
        let send = matches!(body, Body::Send(_));
        let (cost, rate) = match send {
            true => (1, limits.max_sends_per_second),
            false => (request_cost(body), limits.max_requests_per_second),
        };
        let bucket = match send {
            true => &mut self.sends,
            false => &mut self.requests,
        };
        if !bucket.take(rate, cost, now_ms) {
            let what = match send {
                true => format!("more than {} sends per second", limits.max_sends_per_second),
                false => format!(
                    "request budget of {} units per second used up",
                    limits.max_requests_per_second
                ),
            };
            return Admit::Refuse(pb::ErrorCode::RateLimited, what);
        }
        if !account.with_budget(|b| b.take(limits, send, cost, now_ms)) {
            bucket.refund(rate, cost);
            let what = match send {
                true => format!(
                    "more than {} sends per second from this account's connections together",
                    limits.max_account_sends_per_second
                ),
                false => format!(
                    "this account's request budget of {} units per second (all its connections) used up",
                    limits.max_account_requests_per_second
                ),
            };
            return Admit::Refuse(pb::ErrorCode::RateLimited, what);
        }
        if tracked {
            self.in_flight = self.in_flight.saturating_add(1);
        }
        Admit::Forward
    }

    /// A request went to the backend outside [`admit`](Self::admit) (the Sync
    /// of a Hello with resume cursors).
    pub fn forwarded_untracked(&mut self) {
        self.in_flight = self.in_flight.saturating_add(1);
    }

    /// A frame from the backend for this connection; `answers`: it is the
    /// response (or Error) to one of its requests, whatever its request_id.
    pub fn on_delivery(&mut self, answers: bool, now_ms: u64) {
        if answers {
            self.in_flight = self.in_flight.saturating_sub(1);
            self.last_answer_ms = now_ms as u32;
        }
    }
}

/// FNV-1a over the conversation id and the active flag (only compared with
/// the previous Typing of the same connection; never stored).
fn typing_key(t: &pb::Typing) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in t
        .conversation_id
        .as_bytes()
        .iter()
        .chain([u8::from(t.active)].iter())
    {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: PolicyLimits = PolicyLimits {
        max_body_bytes: 100,
        max_sends_per_second: 10,
        max_requests_per_second: 20,
        max_requests_in_flight: 3,
        typing_coalesce_ms: 2_000,
        max_account_sends_per_second: 25,
        max_account_requests_per_second: 50,
    };

    impl RequestPolicy {
        /// `admit` for a connection alone in its account (a fresh, full
        /// account budget each time: only the connection's buckets bind).
        fn admit_alone(&mut self, limits: &PolicyLimits, body: &Body, now_ms: u64) -> Admit {
            self.admit(
                limits,
                body,
                now_ms,
                &mut AccountBudget::new(limits, now_ms),
            )
        }
    }

    fn typing(conv: &str, active: bool) -> Body {
        Body::Typing(pb::Typing {
            conversation_id: conv.into(),
            active,
            user_id: String::new(),
        })
    }

    fn history() -> Body {
        Body::History(pb::History {
            conversation_id: "c".into(),
            before_seq: 0,
            limit: 10,
        })
    }

    fn send(len: usize) -> Body {
        Body::Send(pb::Send {
            conversation_id: "c".into(),
            client_msg_id: vec![1; 16],
            body: vec![0; len],
            ..Default::default()
        })
    }

    #[test]
    fn bucket_refills_at_its_rate_and_caps_at_one_second() {
        let mut b = TokenBucket::full(10, 0);
        for _ in 0..10 {
            assert!(b.take(10, 1, 0));
        }
        assert!(!b.take(10, 1, 0));
        assert!(!b.take(10, 1, 99), "0.99 tokens after 99 ms");
        assert!(b.take(10, 1, 100), "one token per 100 ms");
        // A long idle period refills to the burst, not beyond.
        let mut taken = 0;
        while b.take(10, 1, 1_000_000) {
            taken += 1;
        }
        assert_eq!(taken, 10);
    }

    #[test]
    fn typing_repeats_are_coalesced_and_floods_dropped() {
        let mut p = RequestPolicy::new(&LIMITS, 0);
        assert_eq!(
            p.admit_alone(&LIMITS, &typing("a", true), 0),
            Admit::Forward
        );
        assert_eq!(
            p.admit_alone(&LIMITS, &typing("a", true), 1_999),
            Admit::Drop
        );
        assert_eq!(
            p.admit_alone(&LIMITS, &typing("a", false), 1_999),
            Admit::Forward
        );
        assert_eq!(
            p.admit_alone(&LIMITS, &typing("a", true), 1_999),
            Admit::Forward
        );
        // 20 units/s at 5 per Typing: a 5th distinct one in a burst is over.
        assert_eq!(
            p.admit_alone(&LIMITS, &typing("b", true), 1_999),
            Admit::Forward
        );
        assert_eq!(
            p.admit_alone(&LIMITS, &typing("c", true), 1_999),
            Admit::Forward
        );
        assert_eq!(
            p.admit_alone(&LIMITS, &typing("d", true), 1_999),
            Admit::Drop
        );
        // 250 ms later there are 5 units again.
        assert_eq!(
            p.admit_alone(&LIMITS, &typing("d", true), 2_249),
            Admit::Forward
        );
        // A flood forwards at most the budget, whatever its size.
        let mut forwarded = 0;
        for i in 0..100_000u64 {
            let now = 10_000 + i / 10; // 100,000 frames over 10 s
            if p.admit_alone(&LIMITS, &typing(&format!("c{}", i % 7), i % 2 == 0), now)
                == Admit::Forward
            {
                forwarded += 1;
            }
        }
        assert!(forwarded <= 4 + 10 * 20 / 5, "forwarded {forwarded}");
    }

    #[test]
    fn in_flight_cap_refuses_until_answered() {
        let mut p = RequestPolicy::new(&LIMITS, 0);
        for _ in 0..3 {
            assert_eq!(p.admit_alone(&LIMITS, &history(), 0), Admit::Forward);
        }
        assert!(matches!(
            p.admit_alone(&LIMITS, &history(), 0),
            Admit::Refuse(pb::ErrorCode::RateLimited, _)
        ));
        // Events and request-less errors do not free a slot.
        // Events do not free a slot.
        p.on_delivery(false, 1);
        assert_eq!(p.in_flight(), 3);
        p.on_delivery(true, 1);
        assert_eq!(p.in_flight(), 2);
        assert_eq!(p.admit_alone(&LIMITS, &history(), 1), Admit::Forward);
        // Typing and receipts are not tracked (they have no response).
        assert_eq!(
            p.admit_alone(&LIMITS, &typing("x", true), 1_000),
            Admit::Forward
        );
        assert_eq!(p.in_flight(), 3);
    }

    #[test]
    fn a_lost_answer_does_not_block_a_connection_forever() {
        let mut p = RequestPolicy::new(&LIMITS, 0);
        for _ in 0..3 {
            assert_eq!(p.admit_alone(&LIMITS, &history(), 0), Admit::Forward);
        }
        assert_ne!(p.admit_alone(&LIMITS, &history(), 59_999), Admit::Forward);
        assert_eq!(p.admit_alone(&LIMITS, &history(), 60_000), Admit::Forward);
        assert_eq!(p.in_flight(), 1);
    }

    #[test]
    fn sends_have_their_own_bucket_and_a_body_limit() {
        let mut p = RequestPolicy::new(&LIMITS, 0);
        assert!(matches!(
            p.admit_alone(&LIMITS, &send(101), 0),
            Admit::Refuse(pb::ErrorCode::BodyTooLarge, _)
        ));
        // The cap of 3 in flight binds before the 10/s send rate.
        for _ in 0..3 {
            assert_eq!(p.admit_alone(&LIMITS, &send(100), 0), Admit::Forward);
        }
        assert!(
            matches!(p.admit_alone(&LIMITS, &send(1), 0), Admit::Refuse(_, m) if m.contains("awaiting"))
        );
        let mut sent = 3;
        for t in 0..=1000 {
            p.on_delivery(true, t);
            if p.admit_alone(&LIMITS, &send(1), t) == Admit::Forward {
                sent += 1;
            }
        }
        assert_eq!(sent, 10 + 10, "burst of 10 plus 10/s over one second");
        // Sends did not spend the request budget.
        assert_eq!(p.admit_alone(&LIMITS, &history(), 1000), Admit::Forward);
    }

    #[test]
    fn costs_follow_fan_out_and_work() {
        assert_eq!(request_cost(&typing("a", true)), 5);
        let q = Body::PresenceQuery(pb::PresenceQuery {
            user_ids: vec!["u".into(); 1000],
        });
        assert_eq!(request_cost(&q), 21);
        assert!(BodyKind::of(&q).expects_response());
        let mute = Body::MuteConversation(pb::MuteConversation::default());
        assert_eq!(request_cost(&mute), 10);
        assert!(BodyKind::of(&mute).expects_response());
        assert!(!BodyKind::of(&typing("a", true)).expects_response());
    }

    #[test]
    fn connections_of_one_account_share_its_budget() {
        // 16 connections, each with 20 units/s of its own: 320 units between
        // them, but the account has 50. History costs 5.
        let mut account = AccountBudget::new(&LIMITS, 0);
        let mut conns: Vec<RequestPolicy> =
            (0..16).map(|_| RequestPolicy::new(&LIMITS, 0)).collect();
        let mut forwarded = 0;
        let mut refused = 0;
        for t in 0..=2_000u64 {
            for p in &mut conns {
                // Answer at once: the in-flight cap stays out of the way.
                p.on_delivery(true, t);
                match p.admit(&LIMITS, &history(), t, &mut account) {
                    Admit::Forward => forwarded += 1,
                    Admit::Refuse(pb::ErrorCode::RateLimited, m) => {
                        refused += usize::from(m.contains("account"));
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        // Burst of 50 units plus 50 units/s over 2 s: 150 units = 30 History.
        assert_eq!(forwarded, 30);
        assert!(refused > 16 * 2_000 / 2, "most refusals are the account's");
    }

    #[test]
    fn a_request_the_account_refuses_costs_its_connection_nothing() {
        let mut account = AccountBudget::new(&LIMITS, 0);
        // Three connections of 20 units each spend the account's 50.
        let mut spent = 0;
        for _ in 0..3 {
            let mut hog = RequestPolicy::new(&LIMITS, 0);
            while hog.admit(&LIMITS, &history(), 0, &mut account) == Admit::Forward {
                spent += 5;
                hog.on_delivery(true, 0);
            }
        }
        assert_eq!(spent, 50);
        // A fourth: refused by the account again and again (never by its
        // own bucket, which each refusal refunds).
        let mut other = RequestPolicy::new(&LIMITS, 0);
        for _ in 0..10 {
            assert!(matches!(
                other.admit(&LIMITS, &history(), 0, &mut account),
                Admit::Refuse(pb::ErrorCode::RateLimited, m) if m.contains("account")
            ));
        }
        assert_eq!(other.in_flight(), 0, "refused requests are not in flight");
        // 400 ms later the account has 20 units again and the connection its
        // own full 20: 4 History back to back.
        let mut took = 0;
        while other.admit(&LIMITS, &history(), 400, &mut account) == Admit::Forward {
            took += 1;
            other.on_delivery(true, 400);
        }
        assert_eq!(took, 4, "the connection's bucket was never charged");
    }

    #[test]
    fn account_send_rate_binds_across_connections_and_typing_over_it_is_dropped() {
        let mut account = AccountBudget::new(&LIMITS, 0);
        let mut a = RequestPolicy::new(&LIMITS, 0);
        let mut b = RequestPolicy::new(&LIMITS, 0);
        let mut c = RequestPolicy::new(&LIMITS, 0);
        let mut sent = 0;
        for p in [&mut a, &mut b, &mut c] {
            for _ in 0..10 {
                p.on_delivery(true, 0);
                if p.admit(&LIMITS, &send(1), 0, &mut account) == Admit::Forward {
                    sent += 1;
                }
            }
        }
        // 3 x 10 sends of their own, 25 for the account.
        assert_eq!(sent, 25);
        // Typing, 5 units each: three connections have 4 of their own, the
        // account 10 in all; the rest is dropped.
        let mut typing_forwarded = 0;
        for i in 0..21 {
            let p = match i % 3 {
                0 => &mut a,
                1 => &mut b,
                _ => &mut c,
            };
            match p.admit(&LIMITS, &typing(&format!("c{i}"), true), 0, &mut account) {
                Admit::Forward => typing_forwarded += 1,
                Admit::Drop => {}
                other => panic!("Typing is never answered: {other:?}"),
            }
        }
        assert_eq!(typing_forwarded, 10);
    }

    #[test]
    fn a_shared_bucket_seen_from_a_core_a_little_behind_does_not_refill() {
        let mut b = TokenBucket::full(10, 5_000);
        for _ in 0..10 {
            assert!(b.take(10, 1, 5_000));
        }
        // Another core's clock, sampled 3 ms earlier: no time passed (not a
        // wrap to 49 days, which would refill the bucket).
        assert!(!b.take(10, 1, 4_997));
        assert!(!b.take(10, 1, 5_000));
        assert!(b.take(10, 1, 5_100));
    }
}
