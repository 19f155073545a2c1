//! The run report: what the coordinator merges from its workers, the table
//! printed at the end, the JSON written with `--json`/`--out`, and merging
//! reports of several machines (`palaver-bench merge`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::hist::{self, names, Summary};
use crate::ipc::Counters;
use crate::settings::{Config, ScenarioKind};
use crate::sys::MachineInfo;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub scenario: ScenarioKind,
    /// The command line, argument by argument.
    pub command: Vec<String>,
    pub run_id: String,
    pub started_unix_ms: u64,
    pub elapsed_s: f64,
    pub machine: MachineInfo,
    pub config: Config,
    /// `K/M` when this machine ran part K of M.
    pub part: Option<String>,
    pub workers: Vec<WorkerInfo>,
    pub counters: Counters,
    /// Failed connection attempts by reason.
    pub failures: BTreeMap<String, u64>,
    /// Sessions lost by reason (closed by the server or the network).
    pub disconnects: BTreeMap<String, u64>,
    /// Send errors by error code.
    pub send_errors: BTreeMap<String, u64>,
    pub connections: ConnectionStats,
    pub chat: Option<ChatStats>,
    #[serde(default)]
    pub channel: Option<ChannelStats>,
    pub storm: Option<StormStats>,
    pub gateway: Option<GatewayStats>,
    /// Percentiles per latency histogram (ms).
    pub latency: BTreeMap<String, Summary>,
    /// Merged latency histograms (µs), HdrHistogram V2, base64: for re-plotting and merging.
    pub histograms: BTreeMap<String, String>,
    pub timeline: Vec<Sample>,
    /// Problems that make the numbers incomplete (worker died, phase timed out).
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub index: usize,
    pub users: u64,
    pub source_ips: Vec<String>,
    pub peak_open: u64,
    pub peak_rss_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnectionStats {
    pub target: u64,
    /// Sessions open at the end of the connect phase.
    pub established: u64,
    /// Most sessions open at once (sum of the workers' peaks).
    pub peak_open: u64,
    /// Sessions open when the run ended.
    pub open_at_end: u64,
    /// From the first attempt until every attempt had succeeded or failed.
    pub connect_phase_s: f64,
    /// Successful TLS handshakes per second during the connect phase.
    pub handshakes_per_s: f64,
    pub heartbeat_ms: Option<u32>,
    /// Bench RSS per open connection (all workers), bytes.
    pub bench_bytes_per_connection: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChatStats {
    pub conversations: u64,
    pub offered_rate: f64,
    pub send_duration_s: f64,
    /// Acked messages per second of the send phase.
    pub acked_per_s: f64,
    /// Deliveries per second from the first send until the last delivery.
    pub delivered_per_s: f64,
    /// This bench's own CPU (coordinator and workers, user + system) from
    /// every connection up to the end of the scenario, per sent message,
    /// microseconds: with the bench on the gateway's machine, what it took
    /// from the CPUs the gateway shares.
    #[serde(default)]
    pub bench_cpu_us_per_sent: Option<f64>,
}

/// The channel scenario: who had the channel open how, and what COUNTS
/// connections were shown.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChannelStats {
    pub members: u64,
    /// Connections whose OpenChannel was answered, by mode.
    pub live_receivers: u64,
    pub counts_receivers: u64,
    /// The highest seq any sender got acked.
    pub last_seq: u64,
    /// ChannelActivity frames received by all COUNTS connections.
    pub activity_frames: u64,
    /// COUNTS connections whose ChannelActivity reached `last_seq`.
    pub counts_reached_last_seq: u64,
}

impl ChannelStats {
    pub fn from_tally(t: &crate::ipc::ChannelTally, members: u64) -> ChannelStats {
        let last_seq = t.last_seq();
        ChannelStats {
            members,
            live_receivers: t.live_receivers,
            counts_receivers: t.counts_receivers,
            last_seq,
            activity_frames: t.activity_frames,
            counts_reached_last_seq: t
                .counts_last_seq
                .iter()
                .filter(|&&(seq, _)| seq >= last_seq)
                .map(|&(_, n)| n)
                .sum(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StormStats {
    pub dropped: u64,
    pub reconnected: u64,
    pub resumed: u64,
    pub resumed_share: f64,
    /// From the drop until the last dropped connection had its Welcome again.
    pub recovery_s: Option<f64>,
    pub reconnects_per_s: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GatewayStats {
    pub pids: Vec<u32>,
    /// Summed RSS before any bench connection.
    pub rss_before_bytes: Option<u64>,
    /// When every connection was up (after the settle pause).
    pub rss_connected_bytes: Option<u64>,
    /// At the end of the hold / scenario, before closing.
    pub rss_after_bytes: Option<u64>,
    pub open_when_sampled: u64,
    /// (rss_connected - rss_before) / open connections.
    pub bytes_per_connection: Option<f64>,
    /// Summed CPU time (user + system) of the pids when every connection
    /// was up, seconds.
    #[serde(default)]
    pub cpu_connected_s: Option<f64>,
    /// The same at the end of the scenario (messages: after the grace wait).
    #[serde(default)]
    pub cpu_after_s: Option<f64>,
    /// (cpu_after - cpu_connected) / messages sent, microseconds: the
    /// gateway CPU per sent message over setup, sending and grace.
    #[serde(default)]
    pub cpu_us_per_sent: Option<f64>,
    pub metrics_before: BTreeMap<String, f64>,
    pub metrics_connected: BTreeMap<String, f64>,
    pub metrics_after: BTreeMap<String, f64>,
}

/// One point of the run's timeline (rates over the preceding second).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sample {
    pub t_s: f64,
    pub open: u64,
    pub handshakes_per_s: f64,
    pub failed: u64,
    pub sent_per_s: f64,
    pub delivered_per_s: f64,
    /// Highest worker p99 of delivery latency over the interval, ms.
    pub e2e_p99_ms: f64,
}

impl Report {
    pub fn summarize_histograms(&mut self) -> Result<()> {
        self.latency.clear();
        for (name, encoded) in &self.histograms {
            let h = hist::decode(encoded)?;
            if !h.is_empty() {
                self.latency.insert(name.clone(), Summary::of(&h));
            }
        }
        Ok(())
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let c = &self.counters;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\n== palaver-bench {} == run {} on {} ({} cpus, {:.1} GiB, {}), {:.1}s",
            self.scenario,
            self.run_id,
            self.machine.hostname,
            self.machine.cpus,
            self.machine.memory_bytes as f64 / (1u64 << 30) as f64,
            self.machine.kernel,
            self.elapsed_s
        );
        let k = &self.connections;
        let _ = writeln!(t, "\nconnections");
        let _ = writeln!(
            t,
            "  target {}  established {}  peak open {}  open at end {}  failed attempts {}  lost {}",
            k.target, k.established, k.peak_open, k.open_at_end, c.failed, c.disconnected
        );
        let _ = writeln!(
            t,
            "  connect phase {:.1}s  handshakes/s {:.0}  full {}  resumed {}  heartbeat {}",
            k.connect_phase_s,
            k.handshakes_per_s,
            c.handshakes_full,
            c.handshakes_resumed,
            k.heartbeat_ms
                .map_or("-".to_string(), |ms| format!("{ms}ms")),
        );
        let _ = writeln!(
            t,
            "  pings {}  pongs {}  pongs missed {}",
            c.pings, c.pongs, c.pongs_missed
        );
        if let Some(b) = k.bench_bytes_per_connection {
            let _ = writeln!(t, "  bench RSS per connection {:.0} B", b);
        }
        write_map(&mut t, "failed attempts by reason", &self.failures);
        write_map(&mut t, "lost sessions by reason", &self.disconnects);
        if let Some(g) = &self.gateway {
            let _ = writeln!(t, "\ngateway memory (pids {:?})", g.pids);
            let mib = |b: Option<u64>| {
                b.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
            };
            let _ = writeln!(
                t,
                "  RSS before {}  connected {}  after {}",
                mib(g.rss_before_bytes),
                mib(g.rss_connected_bytes),
                mib(g.rss_after_bytes)
            );
            if let Some(b) = g.bytes_per_connection {
                let _ = writeln!(
                    t,
                    "  RSS delta per connection {:.0} B ({} connections)",
                    b, g.open_when_sampled
                );
            }
            if let (Some(a), Some(b)) = (g.cpu_connected_s, g.cpu_after_s) {
                let _ = writeln!(
                    t,
                    "  CPU connected -> end {:.2} s  per sent message {}",
                    b - a,
                    g.cpu_us_per_sent
                        .map_or("-".into(), |us| format!("{us:.1} us"))
                );
            }
            for (name, after) in &g.metrics_connected {
                let before = g.metrics_before.get(name).copied().unwrap_or(0.0);
                if (after - before).abs() > f64::EPSILON {
                    let _ = writeln!(t, "  metric {name}: {before} -> {after}");
                }
            }
        }
        if let Some(chat) = &self.chat {
            let _ = writeln!(t, "\nmessages");
            let _ = writeln!(
                t,
                "  conversations {}  offered {:.0}/s for {:.1}s  sent {}  skipped {}  acked {} ({:.0}/s)  send errors {}",
                chat.conversations,
                chat.offered_rate,
                chat.send_duration_s,
                c.sent,
                c.send_skipped,
                c.acked,
                chat.acked_per_s,
                c.send_errors
            );
            let _ = writeln!(
                t,
                "  deliveries {} of {} expected ({:.0}/s)  losses {}  unacked {}  duplicates {}  order violations {}  echoes {}  unexpected {}",
                c.delivered,
                c.expected_deliveries,
                chat.delivered_per_s,
                c.losses,
                c.unacked,
                c.duplicates,
                c.order_violations,
                c.echoes,
                c.unexpected
            );
            if let Some(us) = chat.bench_cpu_us_per_sent {
                let _ = writeln!(
                    t,
                    "  bench CPU per sent message {us:.1} us (coordinator and workers)"
                );
            }
            write_map(&mut t, "send errors by code", &self.send_errors);
        }
        if let Some(ch) = &self.channel {
            let _ = writeln!(t, "\nchannel");
            let _ = writeln!(
                t,
                "  members {}  open LIVE {}  open COUNTS {}  last seq {}",
                ch.members, ch.live_receivers, ch.counts_receivers, ch.last_seq
            );
            if ch.counts_receivers > 0 {
                let _ = writeln!(
                    t,
                    "  COUNTS: ChannelActivity frames {} ({:.1} per connection)  reached last seq {} of {}",
                    ch.activity_frames,
                    ch.activity_frames as f64 / ch.counts_receivers as f64,
                    ch.counts_reached_last_seq,
                    ch.counts_receivers
                );
            }
        }
        if let Some(s) = &self.storm {
            let _ = writeln!(t, "\nreconnect storm");
            let _ = writeln!(
                t,
                "  dropped {}  reconnected {}  resumed {} ({:.1}%)  all back after {}  reconnects/s {}",
                s.dropped,
                s.reconnected,
                s.resumed,
                s.resumed_share * 100.0,
                s.recovery_s.map_or("never".into(), |v| format!("{v:.2}s")),
                s.reconnects_per_s.map_or("-".into(), |v| format!("{v:.0}")),
            );
        }
        if !self.latency.is_empty() {
            let _ = writeln!(
                t,
                "\nlatency (ms)   {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
                "count", "min", "p50", "p90", "p99", "p99.9", "p99.99", "max"
            );
            for name in names::ALL {
                if let Some(s) = self.latency.get(name) {
                    let _ = writeln!(
                        t,
                        "  {:<12} {:>9} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
                        name,
                        s.count,
                        s.min_ms,
                        s.p50_ms,
                        s.p90_ms,
                        s.p99_ms,
                        s.p999_ms,
                        s.p9999_ms,
                        s.max_ms
                    );
                }
            }
        }
        for p in &self.problems {
            let _ = writeln!(t, "\nPROBLEM: {p}");
        }
        t
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    pub fn read_json(path: &Path) -> Result<Report> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a bench report", path.display()))
    }

    /// Combines reports of the parts of one run made on several machines:
    /// counts add up, histograms merge, timelines add point by point
    /// (aligned on each part's start).
    pub fn merge(mut reports: Vec<Report>) -> Result<Report> {
        anyhow::ensure!(!reports.is_empty(), "nothing to merge");
        let mut merged = reports.remove(0);
        let mut hists = BTreeMap::new();
        for (name, text) in &merged.histograms {
            hists.insert(name.clone(), hist::decode(text)?);
        }
        for r in reports {
            merged.counters.add(&r.counters);
            for (map, other) in [
                (&mut merged.failures, &r.failures),
                (&mut merged.disconnects, &r.disconnects),
                (&mut merged.send_errors, &r.send_errors),
            ] {
                for (k, v) in other {
                    *map.entry(k.clone()).or_default() += v;
                }
            }
            for (name, text) in &r.histograms {
                let h = hist::decode(text)?;
                match hists.get_mut(name) {
                    Some(m) => hist::merge(m, &h)?,
                    None => {
                        hists.insert(name.clone(), h);
                    }
                }
            }
            let k = &mut merged.connections;
            k.target += r.connections.target;
            k.established += r.connections.established;
            k.peak_open += r.connections.peak_open;
            k.open_at_end += r.connections.open_at_end;
            k.connect_phase_s = k.connect_phase_s.max(r.connections.connect_phase_s);
            k.handshakes_per_s += r.connections.handshakes_per_s;
            if let (Some(a), Some(b)) = (&mut merged.chat, &r.chat) {
                a.conversations += b.conversations;
                a.offered_rate += b.offered_rate;
                a.acked_per_s += b.acked_per_s;
                a.delivered_per_s += b.delivered_per_s;
            }
            if let (Some(a), Some(b)) = (&mut merged.storm, &r.storm) {
                a.dropped += b.dropped;
                a.reconnected += b.reconnected;
                a.resumed += b.resumed;
                a.recovery_s = match (a.recovery_s, b.recovery_s) {
                    (Some(x), Some(y)) => Some(x.max(y)),
                    _ => None,
                };
                a.resumed_share = a.resumed as f64 / a.reconnected.max(1) as f64;
                a.reconnects_per_s = a.recovery_s.map(|s| a.reconnected as f64 / s.max(1e-9));
            }
            if merged.gateway.is_none() {
                merged.gateway = r.gateway.clone();
            }
            let offset = (r.started_unix_ms as f64 - merged.started_unix_ms as f64) / 1000.0;
            merge_timeline(&mut merged.timeline, &r.timeline, offset);
            merged.workers.extend(r.workers);
            merged.problems.extend(r.problems);
            merged.elapsed_s = merged.elapsed_s.max(r.elapsed_s + offset);
        }
        merged.part = None;
        merged.histograms = hists
            .iter()
            .map(|(n, h)| Ok((n.clone(), hist::encode(h)?)))
            .collect::<Result<_>>()?;
        merged.summarize_histograms()?;
        Ok(merged)
    }
}

/// Adds `other` (whose times are `offset` seconds later) into `into`, point
/// by nearest whole second.
fn merge_timeline(into: &mut Vec<Sample>, other: &[Sample], offset: f64) {
    for s in other {
        let t = s.t_s + offset;
        match into.iter_mut().find(|x| (x.t_s - t).abs() < 0.5) {
            Some(x) => {
                x.open += s.open;
                x.handshakes_per_s += s.handshakes_per_s;
                x.failed += s.failed;
                x.sent_per_s += s.sent_per_s;
                x.delivered_per_s += s.delivered_per_s;
                x.e2e_p99_ms = x.e2e_p99_ms.max(s.e2e_p99_ms);
            }
            None => into.push(Sample {
                t_s: t,
                ..s.clone()
            }),
        }
    }
    into.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
}

fn write_map(t: &mut String, title: &str, map: &BTreeMap<String, u64>) {
    if map.is_empty() {
        return;
    }
    let _ = writeln!(t, "  {title}:");
    for (k, v) in map {
        let _ = writeln!(t, "    {v:>9}  {k}");
    }
}
