//! Per-core counters (relaxed atomics written only by their core thread or
//! its sink) and their Prometheus text rendering for the admin port.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use palaver_protocol::bodies::{self, BodyKind};
use palaver_protocol::pb::frame::Body;

/// Error codes counted individually; anything else lands in "other".
pub const ERROR_CODES: [u32; 20] = [
    1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 2000, 2001, 2002, 2003, 2004,
    2005, 2006, 3000, 3001,
];

fn error_code_index(code: u32) -> usize {
    ERROR_CODES
        .iter()
        .position(|&c| c == code)
        .unwrap_or(ERROR_CODES.len())
}

/// Counters of one core thread.
#[derive(Default)]
pub struct CoreMetrics {
    pub connections: AtomicI64,
    pub sessions: AtomicI64,
    pub accepted: AtomicU64,
    pub refused_full: AtomicU64,
    pub handshakes_ok: AtomicU64,
    pub handshakes_failed: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub hello_timeouts: AtomicU64,
    pub heartbeat_timeouts: AtomicU64,
    pub slow_consumer_disconnects: AtomicU64,
    /// Hellos refused because the account had `max_connections_per_account`
    /// devices connected here.
    pub too_many_connections: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Typing frames dropped (coalesced repeats, or over the request budget).
    pub typing_dropped: AtomicU64,
    /// Times a connection's reading stopped because its output was full.
    pub reads_paused: AtomicU64,
    /// Largest unsent output any connection of this core has held, bytes.
    pub max_conn_outbound_bytes: AtomicI64,
    pub delivery_queue_drops: AtomicU64,
    pub stale_deliveries: AtomicU64,
    /// Channel posts this core received (SPEC §21), and those dropped
    /// because its queue was full (its connections catch up by Sync).
    pub channel_posts: AtomicU64,
    pub channel_posts_dropped: AtomicU64,
    /// A channel's Typing over its per-core rate, dropped.
    pub channel_typing_dropped: AtomicU64,
    /// Open channel subscriptions (LIVE or COUNTS) on this core.
    pub channel_subscriptions: AtomicI64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Encrypted bytes waiting for the socket, summed over connections.
    pub outbound_buffered_bytes: AtomicI64,
    /// Indexed by [`BodyKind::metric_index`] (0: no body).
    pub frames_in: PerBody,
    pub frames_out: PerBody,
    pub errors_sent: [AtomicU64; ERROR_CODES.len() + 1],
}

/// One counter per body kind ([`BodyKind::metric_index`]); more kinds than
/// std derives `Default` for on an array.
pub struct PerBody(pub [AtomicU64; bodies::METRIC_SLOTS]);

impl Default for PerBody {
    fn default() -> Self {
        PerBody(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl std::ops::Deref for PerBody {
    type Target = [AtomicU64; bodies::METRIC_SLOTS];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl CoreMetrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn frame_in(&self, body: Option<&Body>) {
        Self::inc(&self.frames_in[BodyKind::metric_index_of(body)]);
    }

    pub fn frame_out(&self, body: Option<&Body>) {
        Self::inc(&self.frames_out[BodyKind::metric_index_of(body)]);
        if let Some(Body::Error(e)) = body {
            Self::inc(&self.errors_sent[error_code_index(e.code)]);
        }
    }
}

/// Process-wide counters.
#[derive(Default)]
pub struct GlobalMetrics {
    pub tls_reloads_ok: AtomicU64,
    pub tls_reloads_failed: AtomicU64,
    pub draining: AtomicU64,
    /// The embedded engine's in-process push worker, when `[push]` started
    /// one ([`crate::GatewayHandle::report_push`]).
    pub push: std::sync::OnceLock<palaver_push::embedded::EmbeddedPushHandle>,
}

/// (name, type, help, read) of a one-value-per-core metric.
type Simple = (
    &'static str,
    &'static str,
    &'static str,
    fn(&CoreMetrics) -> i64,
);

/// Renders all counters in the Prometheus text exposition format.
pub fn render(
    gateway_id: &str,
    cores: &[std::sync::Arc<CoreMetrics>],
    global: &GlobalMetrics,
) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let gw = gateway_id;
    let simple: [Simple; 24] = [
        (
            "palaver_connections",
            "gauge",
            "Open connections (any state).",
            |m| m.connections.load(Relaxed),
        ),
        (
            "palaver_sessions",
            "gauge",
            "Authenticated sessions.",
            |m| m.sessions.load(Relaxed),
        ),
        (
            "palaver_accepted_total",
            "counter",
            "TCP connections accepted.",
            |m| m.accepted.load(Relaxed) as i64,
        ),
        (
            "palaver_refused_full_total",
            "counter",
            "Connections refused with SERVER_FULL.",
            |m| m.refused_full.load(Relaxed) as i64,
        ),
        (
            "palaver_handshakes_ok_total",
            "counter",
            "TLS handshakes completed.",
            |m| m.handshakes_ok.load(Relaxed) as i64,
        ),
        (
            "palaver_handshakes_failed_total",
            "counter",
            "TLS handshakes failed (incl. timeouts).",
            |m| m.handshakes_failed.load(Relaxed) as i64,
        ),
        (
            "palaver_handshake_timeouts_total",
            "counter",
            "TLS handshakes not finished in time.",
            |m| m.handshake_timeouts.load(Relaxed) as i64,
        ),
        (
            "palaver_hello_timeouts_total",
            "counter",
            "Connections closed for no Hello in time.",
            |m| m.hello_timeouts.load(Relaxed) as i64,
        ),
        (
            "palaver_heartbeat_timeouts_total",
            "counter",
            "Sessions closed for heartbeat silence.",
            |m| m.heartbeat_timeouts.load(Relaxed) as i64,
        ),
        (
            "palaver_slow_consumer_disconnects_total",
            "counter",
            "Connections closed as slow consumers (behind without reading, or an event that did not fit).",
            |m| m.slow_consumer_disconnects.load(Relaxed) as i64,
        ),
        (
            "palaver_too_many_connections_total",
            "counter",
            "Hellos refused with TOO_MANY_CONNECTIONS (the account's devices here at the cap).",
            |m| m.too_many_connections.load(Relaxed) as i64,
        ),
        (
            "palaver_rate_limited_total",
            "counter",
            "Requests refused by a rate limit, request budget or in-flight cap.",
            |m| m.rate_limited.load(Relaxed) as i64,
        ),
        (
            "palaver_typing_dropped_total",
            "counter",
            "Typing frames dropped: coalesced repeats or over the request budget.",
            |m| m.typing_dropped.load(Relaxed) as i64,
        ),
        (
            "palaver_reads_paused_total",
            "counter",
            "Times a connection stopped being read because its unsent output was full.",
            |m| m.reads_paused.load(Relaxed) as i64,
        ),
        (
            "palaver_max_conn_outbound_bytes",
            "gauge",
            "Largest unsent output one connection has held (high-water mark).",
            |m| m.max_conn_outbound_bytes.load(Relaxed),
        ),
        (
            "palaver_delivery_queue_drops_total",
            "counter",
            "Backend frames dropped because a core queue was full.",
            |m| m.delivery_queue_drops.load(Relaxed) as i64,
        ),
        (
            "palaver_stale_deliveries_total",
            "counter",
            "Backend frames for connections that no longer exist.",
            |m| m.stale_deliveries.load(Relaxed) as i64,
        ),
        (
            "palaver_channel_posts_total",
            "counter",
            "Channel posts received (one per channel message or Typing, per core).",
            |m| m.channel_posts.load(Relaxed) as i64,
        ),
        (
            "palaver_channel_posts_dropped_total",
            "counter",
            "Channel posts dropped because a core queue was full.",
            |m| m.channel_posts_dropped.load(Relaxed) as i64,
        ),
        (
            "palaver_channel_typing_dropped_total",
            "counter",
            "Channel Typing over the per-channel rate of a core, dropped.",
            |m| m.channel_typing_dropped.load(Relaxed) as i64,
        ),
        (
            "palaver_channel_subscriptions",
            "gauge",
            "Channels open (LIVE or COUNTS) on connections, summed.",
            |m| m.channel_subscriptions.load(Relaxed),
        ),
        (
            "palaver_bytes_in_total",
            "counter",
            "TLS bytes read from sockets.",
            |m| m.bytes_in.load(Relaxed) as i64,
        ),
        (
            "palaver_bytes_out_total",
            "counter",
            "TLS bytes written to sockets.",
            |m| m.bytes_out.load(Relaxed) as i64,
        ),
        (
            "palaver_outbound_buffered_bytes",
            "gauge",
            "Encrypted bytes waiting for slow sockets.",
            |m| m.outbound_buffered_bytes.load(Relaxed),
        ),
    ];
    for (name, kind, help, get) in simple {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (i, m) in cores.iter().enumerate() {
            let _ = writeln!(out, "{name}{{gateway=\"{gw}\",core=\"{i}\"}} {}", get(m));
        }
    }
    for (name, help, pick) in [
        ("palaver_frames_in_total", "Frames received, by type.", 0),
        ("palaver_frames_out_total", "Frames sent, by type.", 1),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (i, m) in cores.iter().enumerate() {
            let arr = if pick == 0 {
                &m.frames_in
            } else {
                &m.frames_out
            };
            for (t, c) in arr.iter().enumerate() {
                let v = c.load(Relaxed);
                if v > 0 {
                    let _ = writeln!(
                        out,
                        "{name}{{gateway=\"{gw}\",core=\"{i}\",type=\"{}\"}} {v}",
                        BodyKind::metric_name(t)
                    );
                }
            }
        }
    }
    let name = "palaver_errors_sent_total";
    let _ = writeln!(
        out,
        "# HELP {name} Error frames sent, by code.\n# TYPE {name} counter"
    );
    for (i, m) in cores.iter().enumerate() {
        for (k, c) in m.errors_sent.iter().enumerate() {
            let v = c.load(Relaxed);
            if v > 0 {
                let code = ERROR_CODES
                    .get(k)
                    .map_or("other".to_string(), u32::to_string);
                let _ = writeln!(
                    out,
                    "{name}{{gateway=\"{gw}\",core=\"{i}\",code=\"{code}\"}} {v}"
                );
            }
        }
    }
    for (name, kind, v) in [
        (
            "palaver_tls_reloads_ok_total",
            "counter",
            global.tls_reloads_ok.load(Relaxed),
        ),
        (
            "palaver_tls_reloads_failed_total",
            "counter",
            global.tls_reloads_failed.load(Relaxed),
        ),
        ("palaver_draining", "gauge", global.draining.load(Relaxed)),
    ] {
        let _ = writeln!(out, "# TYPE {name} {kind}\n{name}{{gateway=\"{gw}\"}} {v}");
    }
    if let Some(push) = global.push.get() {
        render_push(&mut out, gw, &push.stats());
    }
    out
}

/// The in-process push worker's counters (`palaver_push::dispatch::PushStats`).
fn render_push(out: &mut String, gw: &str, s: &palaver_push::dispatch::PushStats) {
    for (name, help, v) in [
        (
            "palaver_push_events_total",
            "Push events the push thread took.",
            s.events,
        ),
        (
            "palaver_push_coalesced_total",
            "Push events merged into another of the same conversation.",
            s.coalesced,
        ),
        (
            "palaver_push_sent_total",
            "Pushes the provider accepted.",
            s.pushed,
        ),
        (
            "palaver_push_skipped_online_total",
            "Registrations not pushed: device online.",
            s.skipped_online,
        ),
        (
            "palaver_push_skipped_muted_total",
            "Push events not pushed: conversation muted.",
            s.skipped_muted,
        ),
        (
            "palaver_push_skipped_read_total",
            "Push events not pushed: read on another device.",
            s.skipped_read,
        ),
        (
            "palaver_push_tokens_invalidated_total",
            "Dead tokens handed back to the engine (APNs 410, FCM UNREGISTERED).",
            s.invalidated,
        ),
        (
            "palaver_push_failed_total",
            "Pushes that can never succeed (dropped, logged).",
            s.dead_lettered,
        ),
        (
            "palaver_push_retries_total",
            "Batches tried again after a transient failure.",
            s.replays,
        ),
        (
            "palaver_push_no_provider_total",
            "Pushes not sent for want of credentials: what would have been sent.",
            s.no_provider,
        ),
        (
            "palaver_push_queue_full_total",
            "Push events dropped: the push thread's queue was full.",
            s.queue_full,
        ),
        (
            "palaver_push_abandoned_total",
            "Push events given up on after the retries.",
            s.abandoned,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{gateway=\"{gw}\"}} {v}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palaver_protocol::pb;
    use std::sync::Arc;

    #[test]
    fn renders_counters_with_labels() {
        let m = Arc::new(CoreMetrics::default());
        m.frame_in(Some(&Body::Ping(pb::Ping { nonce: 1 })));
        m.frame_out(Some(&Body::Error(pb::Error {
            code: 1007,
            ..Default::default()
        })));
        m.connections.fetch_add(3, Relaxed);
        let text = render("gw1", &[m], &GlobalMetrics::default());
        assert!(
            text.contains("palaver_connections{gateway=\"gw1\",core=\"0\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("palaver_frames_in_total{gateway=\"gw1\",core=\"0\",type=\"ping\"} 1")
        );
        assert!(
            text.contains("palaver_errors_sent_total{gateway=\"gw1\",core=\"0\",code=\"1007\"} 1")
        );
    }
}
