//! The one runner every driver uses (`palaver_router_core::runner`), driven
//! directly over the in-memory store wrapped in a counter that can be told
//! to fail or to panic: a batch's neighbours of a failing request are
//! served, the failing one is answered (INTERNAL for a panic, UNAVAILABLE
//! for a store error after the driver's retries) and reported to the driver.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/instrumented.rs"]
mod instrumented;

use std::sync::Arc;

use common::*;
use instrumented::Instrumented;
use palaver_protocol::pb::{self, frame::Body, ErrorCode};
use palaver_router_core::runner::{self, Failure, NoRetry, Retry};
use palaver_router_core::store::StoreError;
use palaver_router_core::{ManualClock, Output, Router, RouterConfig, Session};

fn router() -> Router<Instrumented> {
    Router::new(
        Instrumented::default(),
        RouterConfig::default(),
        Arc::new(ManualClock::new(1_700_000_000_000)),
    )
}

fn answer<'a>(out: &'a Output, s: &Session, request_id: u32) -> &'a Body {
    out.frames
        .iter()
        .find(|a| a.to == s.addr && a.frame.request_id == request_id)
        .and_then(|a| a.frame.body.as_ref())
        .unwrap_or_else(|| panic!("no answer to {request_id}"))
}

fn history(conversation: &str) -> Body {
    Body::History(pb::History {
        conversation_id: conversation.into(),
        before_seq: 0,
        limit: 10,
    })
}

#[test]
fn a_panicking_request_is_answered_internal_and_the_batch_goes_on() {
    let mut r = router();
    let alice = session("alice", "phone", "g1", 1);
    let bob = session("bob", "phone", "g1", 2);
    r.store_mut().panic_on = Some("messages_before");
    let requests = vec![
        request(&alice, 1, send_body("dm:alice:bob", 1, "one")),
        request(&bob, 2, history("dm:alice:bob")),
        request(&bob, 3, send_body("dm:alice:bob", 2, "two")),
        request(&alice, 4, send_body("dm:alice:bob", 3, "three")),
    ];
    let mut out = Output::default();
    let gave_up = runner::run(&mut r, &requests, &mut out, &mut NoRetry);
    assert_eq!(gave_up.len(), 1);
    assert_eq!(gave_up[0].index, 1);
    assert_eq!(gave_up[0].attempts, 1);
    assert!(
        matches!(&gave_up[0].failure, Failure::Panicked(m) if m.contains("messages_before")),
        "{:?}",
        gave_up[0].failure
    );
    assert!(
        matches!(answer(&out, &bob, 2), Body::Error(e) if e.code == ErrorCode::Internal as u32)
    );
    let seqs: Vec<u64> = [(&alice, 1), (&bob, 3), (&alice, 4)]
        .into_iter()
        .map(|(s, id)| match answer(&out, s, id) {
            Body::SendAck(a) => a.seq,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3], "every neighbour served, in order");
    // Exactly one answer per request: the panicking unit left nothing.
    assert_eq!(
        out.frames.iter().filter(|a| a.answers_request).count(),
        requests.len()
    );
}

/// Counts the retries it allows.
struct Retries {
    allowed: u32,
    asked: u32,
}

impl<S> Retry<S> for Retries {
    fn again(&mut self, _error: &StoreError, attempt: u32) -> bool {
        self.asked += 1;
        attempt < self.allowed
    }
}

#[test]
fn a_failing_store_is_retried_as_the_driver_says_then_answered_unavailable() {
    let mut r = router();
    let alice = session("alice", "phone", "g1", 1);
    r.store_mut().fail_on = Some("messages_before");
    let requests = vec![
        request(&alice, 1, history("dm:alice:bob")),
        request(&alice, 2, send_body("dm:alice:bob", 1, "one")),
    ];
    let mut retries = Retries {
        allowed: 3,
        asked: 0,
    };
    let mut out = Output::default();
    let gave_up = runner::run(&mut r, &requests, &mut out, &mut retries);
    assert_eq!(retries.asked, 3);
    assert_eq!(
        r.store().count("messages_before"),
        1 + 3,
        "the batch, then 3 attempts"
    );
    assert_eq!(gave_up.len(), 1);
    assert_eq!((gave_up[0].index, gave_up[0].attempts), (0, 3));
    assert!(matches!(gave_up[0].failure, Failure::Store(_)));
    assert!(
        matches!(answer(&out, &alice, 1), Body::Error(e) if e.code == ErrorCode::Unavailable as u32)
    );
    assert!(matches!(answer(&out, &alice, 2), Body::SendAck(_)));
}
