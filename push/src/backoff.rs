//! Exponential backoff with jitter, shared by reconnects and retries.

use std::time::Duration;

use rand::Rng;

/// `min · 2^(attempt-1)` capped at `max`, then "equal jitter": half fixed,
/// half random, so synchronized failures (a provider outage hitting every
/// in-flight push at once) do not come back as one synchronized wave.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
        }
    }

    /// The ceiling for the `attempt`-th retry (1-based), before jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The pause before the `attempt`-th retry (1-based), jittered.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let nanos = half.as_nanos().min(u64::MAX as u128) as u64;
        half + Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_jitters_within_bounds() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(200));
        assert_eq!(b.ceiling(4), Duration::from_millis(800));
        assert_eq!(b.ceiling(5), Duration::from_secs(1));
        assert_eq!(b.ceiling(500), Duration::from_secs(1));
        for attempt in 1..10 {
            for _ in 0..50 {
                let d = b.delay(attempt);
                assert!(
                    d >= b.ceiling(attempt) / 2 && d <= b.ceiling(attempt),
                    "{d:?}"
                );
            }
        }
    }
}
