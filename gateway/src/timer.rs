//! A hashed timing wheel with coarse ticks, one per core thread.
//!
//! Scheduling and firing are O(1). Deadlines are re-armed lazily: a
//! connection stores its deadline and the tick of its one live wheel entry;
//! activity only moves the stored deadline, and when the entry fires the
//! owner re-checks and re-inserts it if the deadline moved. Deadlines further
//! than one revolution away are parked at the furthest slot and re-inserted.

/// One wheel entry: which connection (slab slot + generation) and the tick it
/// was scheduled for (so the owner can tell its live entry from stale ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerEntry {
    pub slot: u32,
    pub generation: u32,
    pub tick: u32,
}

pub struct TimerWheel {
    slots: Vec<Vec<TimerEntry>>,
    mask: u32,
    /// Last tick whose slot has been fired.
    fired_through: u32,
}

impl TimerWheel {
    /// `slots` is rounded up to a power of two; `now` is the current tick.
    pub fn new(slots: usize, now: u32) -> Self {
        let n = slots.next_power_of_two().max(2);
        TimerWheel {
            slots: (0..n).map(|_| Vec::new()).collect(),
            mask: (n - 1) as u32,
            fired_through: now,
        }
    }

    fn span(&self) -> u32 {
        self.mask + 1
    }

    /// Inserts an entry for `at` (clamped to the wheel's horizon: never in the
    /// past, at most one revolution ahead). Returns the tick it will fire at.
    pub fn schedule(&mut self, slot: u32, generation: u32, at: u32) -> u32 {
        let earliest = self.fired_through.wrapping_add(1);
        let latest = self.fired_through.wrapping_add(self.span() - 1);
        let tick = at.clamp(earliest, latest);
        self.slots[(tick & self.mask) as usize].push(TimerEntry {
            slot,
            generation,
            tick,
        });
        tick
    }

    /// Moves every entry due at or before `now` into `out`.
    pub fn advance(&mut self, now: u32, out: &mut Vec<TimerEntry>) {
        // After a long stall every slot is due at most once.
        let steps = now.saturating_sub(self.fired_through).min(self.span());
        for _ in 0..steps {
            self.fired_through = self.fired_through.wrapping_add(1);
            let bucket = &mut self.slots[(self.fired_through & self.mask) as usize];
            out.append(bucket);
            // A drained bucket gives its memory back. Kept, every bucket would
            // hold the most entries it ever saw: entries hop around the wheel
            // as deadlines move, so idle memory would creep for a whole
            // revolution (measured: +68 B per heartbeating connection over
            // 5 min). Refilling costs a few reallocations per bucket per turn.
            *bucket = Vec::new();
        }
        self.fired_through = self.fired_through.max(now);
    }

    /// Entries currently held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.slots.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_order_of_ticks_and_clamps() {
        let mut w = TimerWheel::new(8, 100);
        assert_eq!(w.schedule(1, 0, 103), 103);
        assert_eq!(w.schedule(2, 0, 50), 101); // past: next tick
        assert_eq!(w.schedule(3, 0, 1000), 107); // beyond horizon: parked
        let mut out = Vec::new();
        w.advance(101, &mut out);
        assert_eq!(out.iter().map(|e| e.slot).collect::<Vec<_>>(), vec![2]);
        out.clear();
        w.advance(104, &mut out);
        assert_eq!(out.iter().map(|e| e.slot).collect::<Vec<_>>(), vec![1]);
        out.clear();
        w.advance(106, &mut out);
        assert!(out.is_empty());
        w.advance(107, &mut out);
        assert_eq!(
            out,
            vec![TimerEntry {
                slot: 3,
                generation: 0,
                tick: 107
            }]
        );
        assert!(w.is_empty());
    }

    #[test]
    fn long_stall_fires_everything_once() {
        let mut w = TimerWheel::new(4, 0);
        for i in 1..=3 {
            w.schedule(i, 0, i);
        }
        let mut out = Vec::new();
        w.advance(1000, &mut out);
        assert_eq!(out.len(), 3);
        assert!(w.is_empty());
        // Scheduling after the stall is relative to the new now.
        assert_eq!(w.schedule(9, 0, 5), 1001);
    }

    #[test]
    fn fired_buckets_hold_no_memory() {
        let mut w = TimerWheel::new(16, 0);
        for i in 0..1000 {
            w.schedule(i, 0, 1 + i % 8);
        }
        let mut out = Vec::new();
        w.advance(20, &mut out);
        assert_eq!(out.len(), 1000);
        assert_eq!(w.slots.iter().map(Vec::capacity).sum::<usize>(), 0);
    }
}
