//! The core's timers: one timing-wheel entry per connection, re-armed
//! lazily; when an entry fires, the connection's rules
//! ([`ConnPolicy::poll_timeout`](crate::session::ConnPolicy::poll_timeout))
//! say which deadline passed, and their effects
//! ([`ConnPolicy::expire`](crate::session::ConnPolicy::expire)) what follows.

use crate::session::Expiry;

use super::{ticks, Conn, Core, Ctx, Fate, TICK_MS};

impl Core {
    pub(super) fn on_tick(&mut self) {
        let now = self.ctx.now_ms;
        if self.accept_retry && now / TICK_MS != self.last_tick {
            self.accept_retry = false;
            self.accept_pending = true;
        }
        self.last_tick = now / TICK_MS;
        if let Some(deadline) = self.drain_deadline_ms {
            if now >= deadline {
                self.close_all();
                return;
            }
        }
        let mut fired = std::mem::take(&mut self.ctx.scratch.fired);
        self.ctx.wheel.advance((now / TICK_MS) as u32, &mut fired);
        for entry in fired.drain(..) {
            let slot = entry.slot as usize;
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.generation != entry.generation || conn.timer_tick != entry.tick {
                continue; // stale entry: the connection has a newer one
            }
            conn.timer_tick = u32::MAX;
            let Some(expiry) = conn.policy.poll_timeout(now) else {
                self.ctx.arm(slot, conn); // activity moved the deadline: re-park
                continue;
            };
            let generation = conn.generation;
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let conn = &mut self.conns[slot];
                if self.ctx.expire(slot, conn, expiry) == Fate::Close {
                    self.close(slot);
                }
            }));
            if caught.is_err() {
                self.recover(slot, Some(generation));
            }
        }
        self.ctx.scratch.fired = fired;
        self.flush_channel_counts();
    }
}

impl Ctx {
    /// Makes sure the wheel holds an entry no later than the connection's
    /// deadline (later deadlines are handled lazily when the entry fires).
    pub(super) fn arm(&mut self, slot: usize, conn: &mut Conn) {
        let due = ticks(conn.policy.deadline());
        if conn.timer_tick == u32::MAX || due < conn.timer_tick {
            conn.timer_tick = self.wheel.schedule(slot as u32, conn.generation, due);
        }
    }

    pub(super) fn expire(&mut self, slot: usize, conn: &mut Conn, expiry: Expiry) -> Fate {
        conn.policy
            .expire(&self.limits, expiry, self.now_ms, &mut self.effects);
        match self.apply(slot, conn).fate {
            Fate::Close => Fate::Close,
            // Closing began with the frame that says why: it leaves now.
            Fate::Keep => self.finish_output(slot, conn),
        }
    }
}
