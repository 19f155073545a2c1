//! `palaver-bench run`: resolves the scenario, spawns worker processes of this
//! same binary, steps them through the scenario's phases, shows progress,
//! samples the gateway's memory, and merges the workers' final reports into
//! one [`Report`].

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::hist;
use crate::ipc::{ChannelTally, Command, Counters, Phase, WorkerFinal, WorkerMsg, WorkerPlan};
use crate::report::{
    ChannelStats, ChatStats, ConnectionStats, GatewayStats, Report, Sample, StormStats, WorkerInfo,
};
use crate::settings::{Config, ScenarioKind, Settings};
use crate::sys::{self, MachineInfo};

/// Arguments of `palaver-bench run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Scenario file (TOML) with the same keys as the flags, e.g.
    /// bench/scenarios/smoke.toml; flags given as well override its keys.
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write report.json, the SVG plots, the command line and machine info into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run only part K of M (1-based) of the scenario, for loading one
    /// gateway from M machines; combine their reports with `palaver-bench merge`.
    #[arg(long, value_name = "K/M")]
    pub part: Option<String>,
}

enum Event {
    Msg(usize, Box<WorkerMsg>),
    /// The worker's stdout ended (it exited or crashed).
    Gone(usize),
}

struct WorkerProc {
    child: Child,
    stdin: Option<ChildStdin>,
    plan: WorkerPlan,
    phase: Phase,
    counters: Counters,
    interval_e2e_p99_us: u64,
    final_report: Option<WorkerFinal>,
    gone: bool,
}

struct Run {
    config: Config,
    workers: Vec<WorkerProc>,
    events: mpsc::Receiver<Event>,
    started: Instant,
    progress: Progress,
    timeline: Vec<Sample>,
    last_sample: (Instant, Counters),
    problems: Vec<String>,
    /// When each phase was first reached by every worker.
    phase_reached: BTreeMap<Phase, Instant>,
    /// Sessions open when the scenario ended (before Finish closes them).
    open_at_end: u64,
    /// This bench's CPU seconds (coordinator and workers) when every
    /// connection was up, and at the end of the scenario.
    cpu_s: (Option<f64>, Option<f64>),
}

pub fn run(args: RunArgs) -> Result<()> {
    let command: Vec<String> = std::env::args().collect();
    let file_settings = match &args.file {
        Some(path) => Settings::from_file(path)?,
        None => Settings::default(),
    };
    let mut config = args.settings.over(file_settings).resolve()?;
    let (part_index, parts) = parse_part(args.part.as_deref())?;
    if parts > 1 && config.scenario == ScenarioKind::Channel {
        // Each part would create its own channel, and the per-seq loss
        // count needs every worker's tallies in one coordinator.
        bail!("--part is not supported by the channel scenario: run it from one machine");
    }
    // Every part has `workers` workers; the users are split over all of them.
    let local_workers = config.workers;
    config.workers *= parts;
    let ca_pem = crate::tls::read_ca(&config.ca)?;
    crate::tls::client_config(&ca_pem)?;
    let jwt_key = std::fs::read_to_string(&config.jwt_key).with_context(|| {
        format!(
            "reading the JWT key {}: start the gateway once so it writes its dev key, \
             or pass --jwt-key / --data-dir",
            config.jwt_key.display()
        )
    })?;
    palaver_credentials::TokenMinter::from_key_file_contents(&jwt_key)?;
    std::net::TcpStream::connect_timeout(&config.target, Duration::from_secs(5)).with_context(
        || {
            format!(
                "nothing answers at {}: start a gateway there (see bench/README.md) or pass --target",
                config.target
            )
        },
    )?;

    let machine = MachineInfo::collect();
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let run_id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let mut gateway =
        (!config.gateway_pid.is_empty() || config.admin_url.is_some()).then(|| GatewayStats {
            pids: config.gateway_pid.clone(),
            ..Default::default()
        });
    if let Some(g) = gateway.as_mut() {
        sample_gateway(&config, g, When::Before)?;
    }

    let first_worker = part_index * local_workers;
    let mut run = Run::start(
        &config,
        &run_id,
        first_worker..first_worker + local_workers,
        ca_pem,
        jwt_key,
    )?;
    let result = run.drive(gateway.as_mut());
    if let Err(e) = &result {
        run.problems.push(format!("{e:#}"));
    }
    run.finish_workers();
    let report = run.report(RunInfo {
        command,
        run_id,
        started_unix_ms,
        machine,
        part: args.part.clone(),
        gateway,
    })?;

    print!("{}", report.table());
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    if let Some(dir) = &args.out {
        write_out_dir(&report, dir)?;
    }
    if report.problems.is_empty() {
        Ok(())
    } else {
        bail!("the run had problems: {}", report.problems.join("; "))
    }
}

/// `K/M` → (K-1, M).
fn parse_part(part: Option<&str>) -> Result<(usize, usize)> {
    let Some(text) = part else {
        return Ok((0, 1));
    };
    let parsed = text.split_once('/').and_then(|(k, m)| {
        Some((
            k.trim().parse::<usize>().ok()?,
            m.trim().parse::<usize>().ok()?,
        ))
    });
    match parsed {
        Some((k, m)) if k >= 1 && k <= m => Ok((k - 1, m)),
        _ => bail!("--part {text}: write K/M with 1 <= K <= M, e.g. 2/4"),
    }
}

/// Writes report.json, plots, command line and machine info into `dir`.
pub fn write_out_dir(report: &Report, dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    report.write_json(&dir.join("report.json"))?;
    std::fs::write(dir.join("command.txt"), shell_words(&report.command) + "\n")?;
    std::fs::write(
        dir.join("machine.json"),
        serde_json::to_string_pretty(&report.machine)? + "\n",
    )?;
    std::fs::write(dir.join("summary.txt"), report.table())?;
    crate::plot::write_all(report, dir)
}

fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// When the gateway is sampled.
#[derive(Clone, Copy)]
enum When {
    Before,
    Connected,
    After,
}

fn sample_gateway(config: &Config, g: &mut GatewayStats, when: When) -> Result<()> {
    let rss = if g.pids.is_empty() {
        None
    } else {
        Some(sys::total_rss_bytes(&g.pids)?)
    };
    let cpu = if g.pids.is_empty() {
        None
    } else {
        Some(sys::total_cpu_seconds(&g.pids)?)
    };
    let metrics = match &config.admin_url {
        Some(url) => sys::scrape_metrics(url)?,
        None => BTreeMap::new(),
    };
    match when {
        When::Before => {
            g.rss_before_bytes = rss;
            g.metrics_before = metrics;
        }
        When::Connected => {
            g.rss_connected_bytes = rss;
            g.cpu_connected_s = cpu;
            g.metrics_connected = metrics;
        }
        When::After => {
            g.rss_after_bytes = rss;
            g.cpu_after_s = cpu;
            g.metrics_after = metrics;
        }
    }
    Ok(())
}

struct RunInfo {
    command: Vec<String>,
    run_id: String,
    started_unix_ms: u64,
    machine: MachineInfo,
    part: Option<String>,
    gateway: Option<GatewayStats>,
}

impl Run {
    fn start(
        config: &Config,
        run_id: &str,
        indexes: std::ops::Range<usize>,
        ca_pem: String,
        jwt_key: String,
    ) -> Result<Run> {
        let exe = std::env::current_exe().context("locating the palaver-bench binary")?;
        let (tx, events) = mpsc::channel();
        let mut workers = Vec::new();
        let indexes_len = indexes.len();
        for (local, index) in indexes.enumerate() {
            let users = config.worker_users(index);
            let plan = WorkerPlan {
                index,
                run_id: run_id.to_string(),
                config: config.clone(),
                user_start: users.start,
                user_end: users.end,
                groups: config.worker_groups(index),
                source_ips: config.worker_sources(local, indexes_len),
                ca_pem: ca_pem.clone(),
                jwt_key: jwt_key.clone(),
            };
            let mut child = Process::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting a worker process")?;
            let mut stdin = child.stdin.take().context("worker stdin")?;
            let line = serde_json::to_string(&plan)? + "\n";
            stdin.write_all(line.as_bytes())?;
            let stdout = child.stdout.take().context("worker stdout")?;
            let tx = tx.clone();
            let slot = workers.len();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<WorkerMsg>(&line) {
                        Ok(msg) => {
                            if tx.send(Event::Msg(slot, Box::new(msg))).is_err() {
                                return;
                            }
                        }
                        Err(e) => eprintln!("worker {index}: unreadable line ({e}): {line}"),
                    }
                }
                let _ = tx.send(Event::Gone(slot));
            });
            workers.push(WorkerProc {
                child,
                stdin: Some(stdin),
                plan,
                phase: Phase::Connecting,
                counters: Counters::default(),
                interval_e2e_p99_us: 0,
                final_report: None,
                gone: false,
            });
        }
        let now = Instant::now();
        Ok(Run {
            config: config.clone(),
            workers,
            events,
            started: now,
            progress: Progress::new(),
            timeline: Vec::new(),
            last_sample: (now, Counters::default()),
            problems: Vec::new(),
            phase_reached: BTreeMap::new(),
            open_at_end: 0,
            cpu_s: (None, None),
        })
    }

    /// Steps the workers through the scenario.
    fn drive(&mut self, mut gateway: Option<&mut GatewayStats>) -> Result<()> {
        let timeout = self.config.phase_timeout.0;
        let settle = self.config.settle.0;
        self.wait_phase(Phase::Connected, timeout)?;
        self.pump_for(settle)?;
        self.cpu_s.0 = self.own_cpu_seconds();
        if let Some(g) = gateway.as_deref_mut() {
            sample_gateway(&self.config, g, When::Connected)?;
            g.open_when_sampled = self.totals().open;
        }
        match self.config.scenario {
            ScenarioKind::Connect => {
                self.pump_for(self.config.hold.0)?;
            }
            ScenarioKind::ReconnectStorm => {
                self.command(Command::Storm);
                self.wait_phase(Phase::StormDone, timeout)?;
                self.pump_for(settle)?;
            }
            // Every scenario that sends messages.
            _ => {
                self.command(Command::Setup);
                self.wait_phase(Phase::Ready, timeout)?;
                if self.config.scenario == ScenarioKind::Channel {
                    // Adding up to 100,000 members is setup, not traffic: CPU
                    // per sent message counts from the channel opened.
                    self.cpu_s.0 = self.own_cpu_seconds();
                    if let Some(g) = gateway.as_deref_mut().filter(|g| !g.pids.is_empty()) {
                        g.cpu_connected_s = Some(sys::total_cpu_seconds(&g.pids)?);
                    }
                }
                self.command(Command::Chat);
                let send_and_grace =
                    self.config.duration.0 + self.config.grace.0 + Duration::from_secs(30);
                self.wait_phase(Phase::ChatDone, send_and_grace)?;
            }
        }
        self.open_at_end = self.totals().open;
        self.cpu_s.1 = self.own_cpu_seconds();
        if let Some(g) = gateway {
            sample_gateway(&self.config, g, When::After)?;
        }
        Ok(())
    }

    /// CPU seconds of this process and its live workers; `None` if one
    /// cannot be read (a worker gone: the figure would be short).
    fn own_cpu_seconds(&self) -> Option<f64> {
        let mut pids = vec![std::process::id()];
        pids.extend(self.workers.iter().map(|w| w.child.id()));
        sys::total_cpu_seconds(&pids).ok()
    }

    fn command(&mut self, cmd: Command) {
        for w in &mut self.workers {
            if let Some(stdin) = w.stdin.as_mut() {
                let line = serde_json::to_string(&cmd).expect("commands serialize") + "\n";
                if stdin.write_all(line.as_bytes()).is_err() {
                    w.stdin = None;
                }
            }
        }
    }

    fn min_phase(&self) -> Phase {
        self.workers
            .iter()
            .map(|w| w.phase)
            .min()
            .unwrap_or(Phase::Finished)
    }

    fn wait_phase(&mut self, phase: Phase, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.min_phase() < phase {
            if Instant::now() >= deadline {
                bail!(
                    "gave up after {:.0}s waiting for every worker to reach `{}`",
                    timeout.as_secs_f64(),
                    phase.name()
                );
            }
            self.pump(deadline)?;
        }
        Ok(())
    }

    fn pump_for(&mut self, d: Duration) -> Result<()> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.pump(until)?;
        }
        Ok(())
    }

    /// Handles worker messages until `until` or the next tick.
    fn pump(&mut self, until: Instant) -> Result<()> {
        let next_tick = self.last_sample.0 + Duration::from_secs(1);
        let wait = until
            .min(next_tick)
            .saturating_duration_since(Instant::now());
        match self.events.recv_timeout(wait) {
            Ok(event) => self.on_event(event)?,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("all workers are gone"),
        }
        if Instant::now() >= next_tick {
            self.tick();
        }
        Ok(())
    }

    fn on_event(&mut self, event: Event) -> Result<()> {
        let (i, msg) = match event {
            Event::Msg(i, msg) => (i, *msg),
            Event::Gone(i) => {
                let w = &mut self.workers[i];
                w.gone = true;
                if w.final_report.is_none() {
                    let status = w.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    bail!("worker {} exited without a report ({status})", w.plan.index);
                }
                return Ok(());
            }
        };
        match msg {
            WorkerMsg::Progress {
                phase,
                counters,
                interval_e2e_p99_us,
            } => {
                let w = &mut self.workers[i];
                w.phase = phase;
                w.counters = counters;
                w.interval_e2e_p99_us = w.interval_e2e_p99_us.max(interval_e2e_p99_us);
                let min = self.min_phase();
                self.phase_reached.entry(min).or_insert_with(Instant::now);
            }
            WorkerMsg::Final(report) => {
                let w = &mut self.workers[i];
                w.counters = report.counters.clone();
                w.final_report = Some(*report);
            }
            // The shared channel exists with all its members: every worker opens it.
            WorkerMsg::ChannelCreated { conversation_id } => {
                self.command(Command::OpenChannel { conversation_id });
            }
            WorkerMsg::Fatal { message } => {
                bail!("worker {} failed: {message}", self.workers[i].plan.index);
            }
        }
        Ok(())
    }

    fn totals(&self) -> Counters {
        let mut total = Counters::default();
        for w in &self.workers {
            total.add(&w.counters);
        }
        total
    }

    /// Once a second: a timeline point and the progress line.
    fn tick(&mut self) {
        let now = Instant::now();
        let total = self.totals();
        let (last_at, last) = &self.last_sample;
        let dt = (now - *last_at).as_secs_f64().max(1e-3);
        let e2e_p99_ms = self
            .workers
            .iter_mut()
            .map(|w| std::mem::take(&mut w.interval_e2e_p99_us))
            .max()
            .unwrap_or(0) as f64
            / 1000.0;
        let handshakes = |c: &Counters| c.handshakes_full + c.handshakes_resumed;
        let sample = Sample {
            t_s: (now - self.started).as_secs_f64(),
            open: total.open,
            handshakes_per_s: (handshakes(&total) - handshakes(last)) as f64 / dt,
            failed: total.failed,
            sent_per_s: (total.sent - last.sent) as f64 / dt,
            delivered_per_s: (total.delivered - last.delivered) as f64 / dt,
            e2e_p99_ms,
        };
        let mut line = format!(
            "[{:>6.1}s] {:<10} open {:>7}/{}  hs/s {:>6.0}  failed {}  lost {}",
            sample.t_s,
            self.min_phase().name(),
            total.open,
            self.config.connections,
            sample.handshakes_per_s,
            total.failed,
            total.disconnected
        );
        if self.config.scenario.sends_messages() {
            line += &format!(
                "  sent/s {:>6.0}  deliv/s {:>7.0}  e2e p99 {:.1}ms",
                sample.sent_per_s, sample.delivered_per_s, sample.e2e_p99_ms
            );
        }
        if self.config.scenario == ScenarioKind::ReconnectStorm && total.storm_dropped > 0 {
            line += &format!(
                "  storm back {}/{} resumed {}",
                total.storm_reconnected, total.storm_dropped, total.storm_resumed
            );
        }
        self.progress.show(&line);
        self.timeline.push(sample);
        self.last_sample = (now, total);
    }

    /// Tells every worker to finish and collects the final reports (bounded wait).
    fn finish_workers(&mut self) {
        self.command(Command::Finish);
        for w in &mut self.workers {
            w.stdin = None; // EOF also means finish
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while self
            .workers
            .iter()
            .any(|w| w.final_report.is_none() && !w.gone)
        {
            if Instant::now() >= deadline {
                self.problems
                    .push("some workers sent no final report within 60s".into());
                break;
            }
            if let Err(e) = self.pump(deadline) {
                self.problems.push(format!("{e:#}"));
            }
        }
        for w in &mut self.workers {
            if w.final_report.is_none() {
                let _ = w.child.kill();
            }
            let _ = w.child.wait();
        }
        self.progress.done();
    }

    fn report(self, info: RunInfo) -> Result<Report> {
        let mut counters = Counters::default();
        let mut failures = BTreeMap::new();
        let mut disconnects = BTreeMap::new();
        let mut send_errors = BTreeMap::new();
        let mut hists = BTreeMap::new();
        let mut workers = Vec::new();
        let mut storm_recovery: Option<f64> = Some(0.0);
        let mut heartbeat_ms = None;
        let mut problems = self.problems;
        let mut channel_tally: Option<ChannelTally> = None;
        for w in &self.workers {
            let Some(f) = &w.final_report else {
                problems.push(format!("worker {} sent no final report", w.plan.index));
                storm_recovery = None;
                continue;
            };
            counters.add(&f.counters);
            for (map, part) in [
                (&mut failures, &f.failures),
                (&mut disconnects, &f.disconnects),
                (&mut send_errors, &f.send_errors),
            ] {
                for (k, v) in part {
                    *map.entry(k.clone()).or_insert(0) += v;
                }
            }
            for (name, text) in &f.histograms {
                let h = hist::decode(text)?;
                match hists.get_mut(name) {
                    Some(m) => hist::merge(m, &h)?,
                    None => {
                        hists.insert(name.clone(), h);
                    }
                }
            }
            storm_recovery = match (storm_recovery, f.storm_recovery_ms) {
                (Some(a), Some(b)) => Some(a.max(b / 1000.0)),
                _ => None,
            };
            heartbeat_ms = heartbeat_ms.or(f.heartbeat_ms);
            if let Some(t) = &f.channel {
                channel_tally.get_or_insert_with(Default::default).add(t);
            }
            workers.push(WorkerInfo {
                index: w.plan.index,
                users: w.plan.users(),
                source_ips: w.plan.source_ips.iter().map(|ip| ip.to_string()).collect(),
                peak_open: f.peak_open,
                peak_rss_bytes: f.peak_rss_bytes,
            });
        }
        let reached = |p: Phase| {
            self.phase_reached
                .get(&p)
                .map(|t| (*t - self.started).as_secs_f64())
        };
        let connect_phase_s = reached(Phase::Connected).unwrap_or(0.0);
        let established = self
            .timeline
            .iter()
            .find(|s| Some(s.t_s) >= reached(Phase::Connected))
            .map_or(counters.welcomed, |s| s.open);
        let peak_open: u64 = workers.iter().map(|w| w.peak_open).sum();
        let peak_rss: u64 = workers.iter().map(|w| w.peak_rss_bytes).sum();
        let handshakes_in_connect =
            counters.handshakes_full + counters.handshakes_resumed - counters.storm_reconnected;
        let connections = ConnectionStats {
            target: self.workers.iter().map(|w| w.plan.users()).sum(),
            established,
            peak_open,
            open_at_end: self.open_at_end,
            connect_phase_s,
            handshakes_per_s: handshakes_in_connect as f64 / connect_phase_s.max(1e-3),
            heartbeat_ms,
            bench_bytes_per_connection: (peak_open > 0).then(|| peak_rss as f64 / peak_open as f64),
        };
        let config = self.config;
        // A channel message's sender and receivers are in different workers:
        // its losses are counted here, over every worker's tallies.
        let channel = channel_tally.map(|t| {
            let (expected, losses) = t.expected_and_losses();
            counters.expected_deliveries = expected;
            counters.losses = losses;
            ChannelStats::from_tally(&t, config.channel_members)
        });
        let chat = config.scenario.sends_messages().then(|| {
            let send_s = config.duration.0.as_secs_f64();
            let chat_span = match (reached(Phase::Chatting), reached(Phase::ChatDone)) {
                (Some(a), Some(b)) if b > a => b - a,
                _ => send_s,
            };
            ChatStats {
                conversations: if config.scenario == ScenarioKind::Channel {
                    1
                } else {
                    self.workers
                        .iter()
                        .map(|w| {
                            let u = w.plan.users();
                            let directs = if config.direct_share > 0.0 { u / 2 } else { 0 };
                            directs + w.plan.groups.len() as u64
                        })
                        .sum()
                },
                offered_rate: config.rate
                    * self.workers.iter().map(|w| w.plan.users()).sum::<u64>() as f64
                    / config.connections as f64,
                send_duration_s: send_s,
                acked_per_s: counters.acked as f64 / send_s,
                delivered_per_s: counters.delivered as f64 / chat_span,
                bench_cpu_us_per_sent: match self.cpu_s {
                    (Some(a), Some(b)) if counters.sent > 0 => {
                        Some((b - a) * 1e6 / counters.sent as f64)
                    }
                    _ => None,
                },
            }
        });
        let storm = (config.scenario == ScenarioKind::ReconnectStorm).then(|| StormStats {
            dropped: counters.storm_dropped,
            reconnected: counters.storm_reconnected,
            resumed: counters.storm_resumed,
            resumed_share: counters.storm_resumed as f64 / counters.storm_reconnected.max(1) as f64,
            recovery_s: storm_recovery,
            reconnects_per_s: storm_recovery
                .map(|s| counters.storm_reconnected as f64 / s.max(1e-3)),
        });
        let gateway = info.gateway.map(|mut g| {
            if let (Some(before), Some(connected)) = (g.rss_before_bytes, g.rss_connected_bytes) {
                if g.open_when_sampled > 0 {
                    g.bytes_per_connection =
                        Some((connected as f64 - before as f64) / g.open_when_sampled as f64);
                }
            }
            if let (Some(a), Some(b)) = (g.cpu_connected_s, g.cpu_after_s) {
                if counters.sent > 0 {
                    g.cpu_us_per_sent = Some((b - a) * 1e6 / counters.sent as f64);
                }
            }
            g
        });
        let histograms = hists
            .iter()
            .map(|(n, h)| Ok((n.clone(), hist::encode(h)?)))
            .collect::<Result<_>>()?;
        let mut report = Report {
            scenario: config.scenario,
            command: info.command,
            run_id: info.run_id,
            started_unix_ms: info.started_unix_ms,
            elapsed_s: (Instant::now() - self.started).as_secs_f64(),
            machine: info.machine,
            config,
            part: info.part,
            workers,
            counters,
            failures,
            disconnects,
            send_errors,
            connections,
            chat,
            channel,
            storm,
            gateway,
            latency: BTreeMap::new(),
            histograms,
            timeline: self.timeline,
            problems,
        };
        report.summarize_histograms()?;
        Ok(report)
    }
}

/// Live progress: an indicatif spinner on a terminal, plain lines otherwise
/// (both on stderr, so stdout carries only the final table).
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress { bar }
    }

    fn show(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(line.to_string()),
            None => eprintln!("{line}"),
        }
    }

    fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_parse() {
        assert_eq!(parse_part(None).unwrap(), (0, 1));
        assert_eq!(parse_part(Some("2/3")).unwrap(), (1, 3));
        assert!(parse_part(Some("0/3")).is_err());
        assert!(parse_part(Some("4/3")).is_err());
        assert!(parse_part(Some("x")).is_err());
    }

    #[test]
    fn command_lines_are_quoted_for_a_shell() {
        let args = ["palaver-bench", "run", "--groups", "10x5", "a b", "it's"].map(String::from);
        assert_eq!(
            shell_words(&args),
            "palaver-bench run --groups 10x5 'a b' 'it'\\''s'"
        );
    }
}
