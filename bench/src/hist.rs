//! Latency histograms: microsecond HdrHistograms, their V2 serialized form
//! (base64) for shipping from workers, and the percentile summary reported.

use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Names of the histograms a worker keeps.
pub mod names {
    /// TCP connect + TLS handshake.
    pub const CONNECT: &str = "connect";
    /// Hello sent → Welcome received.
    pub const HELLO: &str = "hello";
    /// Ping sent → Pong received.
    pub const PING: &str = "ping";
    /// Scheduled send time → delivery to each member.
    pub const E2E: &str = "e2e";
    /// Scheduled send time → SendAck.
    pub const ACK: &str = "ack";
    /// Connection dropped in a storm → Welcome on the new connection.
    pub const RECONNECT: &str = "reconnect";
    pub const ALL: [&str; 6] = [CONNECT, HELLO, PING, E2E, ACK, RECONNECT];
}

/// Highest value recorded: one hour in µs (larger values saturate).
const MAX_US: u64 = 3_600_000_000;

/// An empty latency histogram (1 µs .. 1 h, 3 significant digits).
pub fn new() -> Histogram<u64> {
    // The bounds are constants that satisfy the constructor's rules.
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// Records `d` in µs (at least 1).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).clamp(1, MAX_US));
}

pub fn encode(h: &Histogram<u64>) -> Result<String> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| anyhow::anyhow!("serializing a histogram: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

pub fn decode(text: &str) -> Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .context("histogram is not base64")?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("histogram is not HdrHistogram V2: {e:?}"))?;
    Ok(h)
}

/// Adds `src` into `dst` (both from [`new`], so the bounds agree).
pub fn merge(dst: &mut Histogram<u64>, src: &Histogram<u64>) -> Result<()> {
    dst.add(src)
        .map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))
}

/// The percentiles a report shows, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub p9999_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    pub fn of(h: &Histogram<u64>) -> Summary {
        let ms = |us: u64| us as f64 / 1000.0;
        Summary {
            count: h.len(),
            min_ms: ms(h.min()),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            p9999_ms: ms(h.value_at_quantile(0.9999)),
            max_ms: ms(h.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_merge() {
        let mut a = new();
        for us in 1..=1000 {
            record(&mut a, Duration::from_micros(us));
        }
        let b = decode(&encode(&a).unwrap()).unwrap();
        assert_eq!(b.len(), 1000);
        assert_eq!(b.value_at_quantile(0.5), a.value_at_quantile(0.5));
        let mut m = new();
        merge(&mut m, &a).unwrap();
        merge(&mut m, &b).unwrap();
        assert_eq!(m.len(), 2000);
        let s = Summary::of(&m);
        assert!((s.p50_ms - 0.5).abs() < 0.01, "{s:?}");
        assert_eq!(s.max_ms, 1.0);
        assert!(decode("not base64!").is_err());
    }

    #[test]
    fn huge_values_saturate() {
        let mut h = new();
        record(&mut h, Duration::from_secs(10 * 3600));
        assert_eq!(h.len(), 1);
    }
}
