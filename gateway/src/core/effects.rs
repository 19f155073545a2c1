//! Carrying out what a connection's rules decided ([`Effect`]s, in order):
//! the one place where the core turns them into TLS records, socket calls,
//! backend requests, timers and counters. Nothing here decides; the tests'
//! virtual-clock `Pair` (`session/tests.rs`) carries out the same effects
//! on in-memory queues.

use std::net::Shutdown;

use palaver_protocol::FrameDecoder;
use palaver_router::api::Inbound;

use crate::metrics::CoreMetrics;
use crate::session::{Counted, Effect, Expiry};
use crate::tls_io;

use super::{unix_ms, Conn, Ctx, Fate, REQUEST_BATCH};

/// What carrying out a call's effects left: the connection's fate, and
/// whether reading resumed ([`Effect::ResumeReading`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Applied {
    pub fate: Fate,
    pub resumed: bool,
}

impl Ctx {
    /// Carries out the effects the connection's rules just pushed to
    /// `self.effects`, and any they lead to (a refused Hello closes).
    pub(super) fn apply(&mut self, slot: usize, conn: &mut Conn) -> Applied {
        let mut applied = Applied {
            fate: Fate::Keep,
            resumed: false,
        };
        while !self.effects.is_empty() {
            // Two buffers swapped: effects added while these run go to the
            // other, and neither is reallocated.
            let mut batch = std::mem::take(&mut self.effects);
            std::mem::swap(&mut self.effects, &mut self.effects_spare);
            for effect in batch.drain(..) {
                self.carry_out(slot, conn, effect, &mut applied);
            }
            self.effects_spare = batch;
        }
        applied
    }

    fn carry_out(&mut self, slot: usize, conn: &mut Conn, effect: Effect, applied: &mut Applied) {
        match effect {
            Effect::Write { frame, answer } => {
                if answer {
                    self.run.answers += palaver_protocol::encoded_frame_len(&frame);
                }
                self.queue(&frame);
            }
            Effect::Forward { request_id, body } => {
                if let Some(ids) = &conn.ids {
                    // Handed to the backend with the rest of this turn's
                    // requests (`flush_requests`), in the order read.
                    let from = ids.session(&self.shared.gateway_id, self.conn_key(slot, conn));
                    self.requests.push(Inbound {
                        from,
                        request_id,
                        body,
                        received_ms: unix_ms(),
                    });
                    if self.requests.len() >= REQUEST_BATCH {
                        self.flush_requests();
                    }
                }
            }
            Effect::Authenticate { request_id, hello } => {
                self.on_hello(slot, conn, request_id, hello)
            }
            Effect::Closing => {
                // The last frame is queued: seal it, close_notify behind it.
                self.seal(conn);
                tls_io::close_notify(
                    &mut conn.tls,
                    conn.pending.tls_in_mut(),
                    &mut self.scratch.out,
                );
                conn.pending.set_tls_in(&[]);
                conn.decoder = FrameDecoder::new(0);
                self.end_session(slot, conn);
                self.arm(slot, conn);
            }
            Effect::SendFin => {
                // Everything is out: FIN, then wait (bounded by the linger
                // deadline) for the peer's FIN so unread input does not turn
                // the close into a reset that could destroy our last frame.
                applied.fate = if conn.sock.shutdown(Shutdown::Write).is_err() {
                    Fate::Close
                } else {
                    self.discard_input(conn)
                };
            }
            Effect::Drop => applied.fate = Fate::Close,
            Effect::Rearm => self.arm(slot, conn),
            Effect::ResumeReading => {
                self.arm(slot, conn);
                applied.resumed = true;
            }
            Effect::Count(counted) => {
                let counter = match counted {
                    Counted::RateLimited => &self.metrics.rate_limited,
                    Counted::TypingDropped => &self.metrics.typing_dropped,
                    Counted::StaleDelivery => &self.metrics.stale_deliveries,
                    Counted::SlowConsumer | Counted::Expired(Expiry::SlowConsumer) => {
                        &self.metrics.slow_consumer_disconnects
                    }
                    Counted::ReadsPaused => &self.metrics.reads_paused,
                    Counted::Expired(Expiry::Handshake) => &self.metrics.handshake_timeouts,
                    Counted::Expired(Expiry::Hello) => &self.metrics.hello_timeouts,
                    Counted::Expired(Expiry::Heartbeat) => &self.metrics.heartbeat_timeouts,
                    // A linger running out is how every close that waited
                    // in vain ends; nothing to count.
                    Counted::Expired(Expiry::Linger) => return,
                };
                CoreMetrics::inc(counter);
            }
        }
    }
}
