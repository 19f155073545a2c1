//! The one way a driver runs client requests through the [`Router`]: a
//! batch of [`Inbound`] in, [`Output`] out, with one failure policy. The
//! embedded engine, the Kafka router worker and the bridge's readers all
//! call [`run`]; what differs between them is only whether a store error is
//! retried (a [`Retry`]) and where a request given up on is recorded (the
//! driver reads the returned [`GaveUp`]s: `palaver.dlq` for the worker, the
//! log and a counter for the others).
//!
//! The policy:
//! - the batch goes through [`Router::handle_batch`] (runs of Sends share
//!   one pipelined append and one session lookup);
//! - if that fails — a store error or a panic — the requests from the failed
//!   unit on are run one at a time; those before it are done and keep
//!   their output;
//! - a store error is retried while the driver's [`Retry`] says so, then
//!   answered `UNAVAILABLE` (the output the failed attempt left describes
//!   effects that happened, so it stays);
//! - a panic is a bug: a retry would panic again. Its partial output is
//!   dropped, the request is answered `INTERNAL`, and the runner goes on with
//!   the next request: a panicking request never takes down the thread that
//!   runs it (a gateway's core 0 hosting the engine, a reader, a worker) nor
//!   another request.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::api::Inbound;
use crate::bus::Output;
use crate::logic::{BatchProgress, Router};
use crate::store::{Store, StoreError};

/// Why a request was given up on.
#[derive(Debug)]
pub enum Failure {
    /// The store failed, and the driver stopped retrying.
    Store(StoreError),
    /// Handling it panicked, with this message.
    Panicked(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Store(e) => write!(f, "{e}"),
            Failure::Panicked(message) => write!(f, "panicked: {message}"),
        }
    }
}

/// A request the runner answered with an error instead of its result.
#[derive(Debug)]
pub struct GaveUp {
    /// Its index in the batch.
    pub index: usize,
    pub failure: Failure,
    /// Attempts made (1 for a panic: it is not retried).
    pub attempts: u32,
}

/// What a driver decides when a request fails.
pub trait Retry<S> {
    /// Try again after `attempt` failed attempts (the driver may wait here)?
    fn again(&mut self, error: &StoreError, attempt: u32) -> bool;

    /// After a panic, before the next request: e.g. drop a store connection
    /// that may have been left mid-reply.
    fn after_panic(&mut self, _store: &mut S) {}
}

/// Never retries: the store error is answered at once (the memory store
/// does not fail; a read the client can repeat).
pub struct NoRetry;

impl<S> Retry<S> for NoRetry {
    fn again(&mut self, _error: &StoreError, _attempt: u32) -> bool {
        false
    }
}

/// Runs `requests` in order through `router`, appending what they produce
/// to `out`; returns the requests given up on, each already answered in
/// `out` (see the module doc for the policy).
pub fn run<S: Store>(
    router: &mut Router<S>,
    requests: &[Inbound],
    out: &mut Output,
    retry: &mut dyn Retry<S>,
) -> Vec<GaveUp> {
    let mut gave_up = Vec::new();
    let mut progress = BatchProgress::default();
    let handled = catch_unwind(AssertUnwindSafe(|| {
        router.handle_batch(requests, out, &mut progress)
    }));
    match handled {
        Ok(Ok(())) => return gave_up,
        Ok(Err(e)) => {
            tracing::warn!(
                done = progress.done,
                "store error in a batch, going on request by request: {e}"
            );
        }
        Err(_) => {
            // The unit that panicked may have left partial output; the
            // request-by-request pass finds the request and answers it.
            out.frames.truncate(progress.frames);
            out.pushes.truncate(progress.pushes);
            out.channel_posts.truncate(progress.channel_posts);
            retry.after_panic(router.store_mut());
        }
    }
    for (index, request) in requests.iter().enumerate().skip(progress.done) {
        if let Some((failure, attempts)) = run_one(router, request, out, retry) {
            gave_up.push(GaveUp {
                index,
                failure,
                attempts,
            });
        }
    }
    gave_up
}

/// One request, with the driver's retries; `None` when it was handled.
fn run_one<S: Store>(
    router: &mut Router<S>,
    request: &Inbound,
    out: &mut Output,
    retry: &mut dyn Retry<S>,
) -> Option<(Failure, u32)> {
    let mut attempt = 1;
    loop {
        let (frames, pushes, posts) = (out.frames.len(), out.pushes.len(), out.channel_posts.len());
        match catch_unwind(AssertUnwindSafe(|| router.handle(request, out))) {
            Ok(Ok(())) => return None,
            Ok(Err(e)) => {
                if retry.again(&e, attempt) {
                    attempt += 1;
                    continue;
                }
                out.frames.push(Router::<S>::unavailable_reply(request, &e));
                return Some((Failure::Store(e), attempt));
            }
            Err(panic) => {
                out.frames.truncate(frames);
                out.pushes.truncate(pushes);
                out.channel_posts.truncate(posts);
                let message = panic_message(&*panic);
                tracing::error!(
                    user = %request.from.user_id,
                    request_id = request.request_id,
                    "request handling panicked: {message}"
                );
                retry.after_panic(router.store_mut());
                out.frames.push(Router::<S>::internal_error_reply(request));
                return Some((Failure::Panicked(message), attempt));
            }
        }
    }
}

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}
