//! Scenario settings: the flags of `palaver-bench run`, the same keys in a
//! scenario TOML file (flags win), and their resolution into a [`Config`]
//! with every default filled in, which is what workers receive and what the
//! report records so that a run can be repeated exactly.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// What a run does once its connections are up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioKind {
    /// Open connections at a rate, complete Hello, hold them heartbeating.
    Connect,
    /// Users in 1:1 and group conversations sending at a fixed total rate.
    Chat,
    /// Drop a share of the connections at once and reconnect them.
    ReconnectStorm,
    /// One large group, all members online, a few senders.
    Fanout,
    /// Pairs of users, one message in flight per pair: latency with no queue.
    OneHop,
    /// One large channel shared by every worker, opened LIVE (or COUNTS) by
    /// the connected members, a few posters.
    Channel,
}

impl ScenarioKind {
    /// Runs setup and a measured send phase (a worker `Scenario`), rather
    /// than only holding or cycling connections.
    pub fn sends_messages(self) -> bool {
        matches!(
            self,
            Self::Chat | Self::Fanout | Self::OneHop | Self::Channel
        )
    }
}

impl fmt::Display for ScenarioKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScenarioKind::Connect => "connect",
            ScenarioKind::Chat => "chat",
            ScenarioKind::ReconnectStorm => "reconnect-storm",
            ScenarioKind::Fanout => "fanout",
            ScenarioKind::OneHop => "one-hop",
            ScenarioKind::Channel => "channel",
        })
    }
}

/// A duration written like `30s`, `500ms`, `2m`, `1h` (flags and TOML).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a duration: write e.g. 500ms, 30s, 2m, 1h"))?;
        let secs = match unit {
            "ms" => value / 1000.0,
            "s" | "" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
        };
        Ok(Dur(Duration::from_secs_f64(secs)))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Group sizes and counts, written `SIZExCOUNT,...` (e.g. `10x50,100x4,1000x1`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct GroupMix(pub Vec<(u32, u32)>);

impl FromStr for GroupMix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut groups = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let parsed = part
                .split_once('x')
                .and_then(|(size, count)| Some((size.parse().ok()?, count.parse().ok()?)));
            match parsed {
                Some((size, count)) if size >= 2 => groups.push((size, count)),
                _ => {
                    return Err(format!(
                        "group mix `{part}`: write SIZExCOUNT with SIZE >= 2, e.g. 10x50,100x4"
                    ))
                }
            }
        }
        Ok(GroupMix(groups))
    }
}

impl fmt::Display for GroupMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(s, c)| format!("{s}x{c}")).collect();
        f.write_str(&parts.join(","))
    }
}

impl Serialize for GroupMix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GroupMix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Everything a run can be told, as flags or as keys of a scenario file.
/// Unset values take the defaults documented on each flag.
#[derive(clap::Args, Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Scenario: connect, chat, reconnect-storm, fanout, one-hop or channel.
    #[arg(long, value_enum)]
    pub scenario: Option<ScenarioKind>,
    /// Gateway address, HOST:PORT [default: 127.0.0.1:7443].
    #[arg(long)]
    pub target: Option<String>,
    /// TLS server name (SNI and certificate check) [default: localhost].
    #[arg(long)]
    pub server_name: Option<String>,
    /// Gateway data directory holding the dev CA and JWT key [default: .palaver].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// CA certificate (PEM) to trust [default: the dev CA in --data-dir].
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// JWT signing key file the gateway trusts [default: the dev key in --data-dir].
    #[arg(long)]
    pub jwt_key: Option<PathBuf>,
    /// Worker processes [default: enough for 15,000 connections each].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Source addresses for client sockets, dealt to the workers round-robin:
    /// `127.0.0.2-127.0.0.40`, a comma list, or `none` [default: 4 per worker from 127.0.0.2 for loopback targets].
    #[arg(long)]
    pub source_ips: Option<String>,
    /// Connections (= users) to open [default: 1000; fanout: group size x workers].
    #[arg(long)]
    pub connections: Option<u64>,
    /// New connections per second, all workers together; 0 = as fast as possible [default: 2000].
    #[arg(long)]
    pub connect_rate: Option<f64>,
    /// Most connection attempts in flight per worker [default: 500].
    #[arg(long)]
    pub max_inflight: Option<u64>,
    /// Give up on an attempt that has no Welcome after this long [default: 30s].
    #[arg(long)]
    pub connect_timeout: Option<Dur>,
    /// How long `connect` holds the connections once all are up, pinging at
    /// the interval the gateway announces in Welcome [default: 10s].
    #[arg(long)]
    pub hold: Option<Dur>,
    /// Messages per second, all senders together (chat, fanout) [default: 100].
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long senders send (chat, fanout) [default: 10s].
    #[arg(long)]
    pub duration: Option<Dur>,
    /// Share of messages sent in 1:1 conversations; the rest go to groups (chat) [default: 0.8].
    #[arg(long)]
    pub direct_share: Option<f64>,
    /// Groups as SIZExCOUNT,... (chat) [default: 10x10].
    #[arg(long)]
    pub groups: Option<GroupMix>,
    /// Message body size in bytes, at least 32 [default: 64].
    #[arg(long)]
    pub body_bytes: Option<u32>,
    /// After sending stops, wait this long at most for acks and deliveries [default: 5s].
    #[arg(long)]
    pub grace: Option<Dur>,
    /// Group size (fanout) [default: 1000].
    #[arg(long)]
    pub group_size: Option<u32>,
    /// Members of the fanout group, or of the channel, that send [default: 1].
    #[arg(long)]
    pub senders: Option<u32>,
    /// Members of the channel, at least --connections; the first
    /// --connections of them connect, the rest are only added (channel) [default: 100000].
    #[arg(long)]
    pub channel_members: Option<u64>,
    /// Share of the connected members that open the channel in COUNTS mode
    /// instead of LIVE (channel) [default: 0].
    #[arg(long)]
    pub channel_counts_share: Option<f64>,
    /// Percentage of connections dropped at once (reconnect-storm) [default: 50].
    #[arg(long)]
    pub drop_percent: Option<f64>,
    /// Pause between all connected and the next step (setup, storm, measuring) [default: 2s].
    #[arg(long)]
    pub settle: Option<Dur>,
    /// Give up waiting for a phase (setup, storm recovery, connecting) after this long [default: 10m].
    #[arg(long)]
    pub phase_timeout: Option<Dur>,
    /// TLS session resumption (reconnect-storm measures it) [default: true].
    #[arg(long)]
    pub resumption: Option<bool>,
    /// Gateway process id to sample RSS from; repeat for several processes.
    #[arg(long = "gateway-pid")]
    #[serde(default)]
    pub gateway_pid: Vec<u32>,
    /// Gateway admin base URL (http://HOST:PORT) whose /metrics is sampled.
    #[arg(long)]
    pub admin_url: Option<String>,
    /// Seed for every random choice [default: random, recorded in the report].
    #[arg(long)]
    pub seed: Option<u64>,
}

impl Settings {
    /// Reads a scenario file (the same keys as the flags, snake_case).
    pub fn from_file(path: &Path) -> Result<Settings> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("scenario file {}", path.display()))
    }

    /// `self` (flags) over `file`.
    pub fn over(self, file: Settings) -> Settings {
        macro_rules! pick {
            ($($f:ident),*) => { Settings { $($f: self.$f.or(file.$f),)* gateway_pid: if self.gateway_pid.is_empty() { file.gateway_pid } else { self.gateway_pid } } };
        }
        pick!(
            scenario,
            target,
            server_name,
            data_dir,
            ca,
            jwt_key,
            workers,
            source_ips,
            connections,
            connect_rate,
            max_inflight,
            connect_timeout,
            hold,
            rate,
            duration,
            direct_share,
            groups,
            body_bytes,
            grace,
            group_size,
            senders,
            channel_members,
            channel_counts_share,
            drop_percent,
            settle,
            phase_timeout,
            resumption,
            admin_url,
            seed
        )
    }
}

/// Smallest body that holds the latency header (see `worker::chat`).
pub const MIN_BODY_BYTES: u32 = 32;
/// Connections per worker when `--workers` is not given: well under the
/// 20,000 open files a process may have here.
pub const DEFAULT_CONNECTIONS_PER_WORKER: u64 = 15_000;
/// Source addresses per worker for a loopback target. Each (source, target)
/// pair has ~28,000 ephemeral ports; the kernel's search for a free one at
/// connect() gets slow as they fill (at ~14,000 per pair a worker spent
/// most of its time in `__inet_hash_connect`), so each worker spreads its
/// connections over several sources.
pub const LOOPBACK_SOURCES_PER_WORKER: usize = 4;
/// File descriptors a worker keeps for itself besides its sockets.
pub const WORKER_FD_RESERVE: u64 = 64;

/// A fully resolved run configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub scenario: ScenarioKind,
    pub target: SocketAddr,
    pub server_name: String,
    pub ca: PathBuf,
    pub jwt_key: PathBuf,
    pub workers: usize,
    pub source_ips: Vec<IpAddr>,
    pub connections: u64,
    pub connect_rate: f64,
    pub max_inflight: u64,
    pub connect_timeout: Dur,
    pub hold: Dur,
    pub rate: f64,
    pub duration: Dur,
    pub direct_share: f64,
    pub groups: GroupMix,
    pub body_bytes: u32,
    pub grace: Dur,
    pub group_size: u32,
    pub senders: u32,
    /// Channel members (channel; 0 in reports written before channels).
    #[serde(default)]
    pub channel_members: u64,
    #[serde(default)]
    pub channel_counts_share: f64,
    pub drop_percent: f64,
    pub settle: Dur,
    pub phase_timeout: Dur,
    pub resumption: bool,
    pub gateway_pid: Vec<u32>,
    pub admin_url: Option<String>,
    pub seed: u64,
}

impl Settings {
    /// Fills in defaults and checks that the combination makes sense.
    pub fn resolve(self) -> Result<Config> {
        let scenario = self.scenario.context(
            "no scenario: pass --scenario connect|chat|reconnect-storm|fanout|one-hop|channel or a scenario file",
        )?;
        let target_text = self.target.unwrap_or_else(|| "127.0.0.1:7443".into());
        let target = target_text
            .to_socket_addrs()
            .with_context(|| format!("--target {target_text}: not HOST:PORT"))?
            .next()
            .with_context(|| format!("--target {target_text}: resolves to no address"))?;
        let data_dir = self.data_dir.unwrap_or_else(|| PathBuf::from(".palaver"));
        let ca = self
            .ca
            .unwrap_or_else(|| data_dir.join(palaver_credentials::devcerts::CA_CERT_FILE));
        let jwt_key = self
            .jwt_key
            .unwrap_or_else(|| data_dir.join(palaver_credentials::devcerts::JWT_SECRET_FILE));

        let group_size = self.group_size.unwrap_or(1000);
        if group_size < 2 {
            bail!("--group-size must be at least 2");
        }
        let connections = match (scenario, self.connections) {
            (_, Some(n)) => n,
            (ScenarioKind::Fanout, None) => {
                u64::from(group_size) * self.workers.unwrap_or(1) as u64
            }
            (_, None) => 1000,
        };
        if connections == 0 {
            bail!("--connections must be at least 1");
        }
        let workers = self
            .workers
            .unwrap_or_else(|| connections.div_ceil(DEFAULT_CONNECTIONS_PER_WORKER) as usize)
            .max(1);
        if workers as u64 > connections {
            bail!("--workers {workers} is more than --connections {connections}");
        }

        let source_ips = match self.source_ips.as_deref() {
            Some("none") => Vec::new(),
            Some(spec) => parse_ip_list(spec)?,
            None if target.ip().is_loopback() && target.is_ipv4() => (0..workers
                * LOOPBACK_SOURCES_PER_WORKER)
                .map(|i| {
                    IpAddr::V4(Ipv4Addr::from(
                        u32::from(Ipv4Addr::new(127, 0, 0, 2)) + i as u32,
                    ))
                })
                .collect(),
            None => Vec::new(),
        };

        let body_bytes = self.body_bytes.unwrap_or(64);
        if body_bytes < MIN_BODY_BYTES {
            bail!("--body-bytes must be at least {MIN_BODY_BYTES} (the latency header)");
        }
        let direct_share = self.direct_share.unwrap_or(0.8);
        if !(0.0..=1.0).contains(&direct_share) {
            bail!("--direct-share must be between 0 and 1");
        }
        let drop_percent = self.drop_percent.unwrap_or(50.0);
        if !(0.0..=100.0).contains(&drop_percent) || drop_percent == 0.0 {
            bail!("--drop-percent must be above 0 and at most 100");
        }
        let rate = self.rate.unwrap_or(100.0);
        if rate.is_nan() || rate <= 0.0 {
            bail!("--rate must be above 0 messages per second");
        }
        let connect_rate = self.connect_rate.unwrap_or(2000.0);
        if connect_rate < 0.0 {
            bail!("--connect-rate must be 0 (unlimited) or more");
        }
        let senders = self.senders.unwrap_or(1);
        if scenario == ScenarioKind::Channel {
            if senders == 0 || u64::from(senders) > connections {
                bail!("--senders must be between 1 and --connections ({connections})");
            }
        } else if senders == 0 || senders > group_size {
            bail!("--senders must be between 1 and --group-size ({group_size})");
        }
        let channel_members = self.channel_members.unwrap_or(100_000);
        if scenario == ScenarioKind::Channel && channel_members < connections {
            bail!("--channel-members ({channel_members}) must be at least --connections ({connections})");
        }
        let channel_counts_share = self.channel_counts_share.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&channel_counts_share) {
            bail!("--channel-counts-share must be between 0 and 1");
        }
        let groups = match scenario {
            ScenarioKind::Fanout => GroupMix(vec![(group_size, workers as u32)]),
            ScenarioKind::OneHop | ScenarioKind::Channel => GroupMix(Vec::new()),
            _ => self.groups.unwrap_or_else(|| GroupMix(vec![(10, 10)])),
        };
        let config = Config {
            scenario,
            target,
            server_name: self.server_name.unwrap_or_else(|| "localhost".into()),
            ca,
            jwt_key,
            workers,
            source_ips,
            connections,
            connect_rate,
            max_inflight: self.max_inflight.unwrap_or(500).max(1),
            connect_timeout: self.connect_timeout.unwrap_or(Dur(Duration::from_secs(30))),
            hold: self.hold.unwrap_or(Dur(Duration::from_secs(10))),
            rate,
            duration: self.duration.unwrap_or(Dur(Duration::from_secs(10))),
            direct_share: if matches!(scenario, ScenarioKind::Fanout | ScenarioKind::Channel) {
                0.0
            } else {
                direct_share
            },
            groups,
            body_bytes,
            grace: self.grace.unwrap_or(Dur(Duration::from_secs(5))),
            group_size,
            senders,
            channel_members,
            channel_counts_share,
            drop_percent,
            settle: self.settle.unwrap_or(Dur(Duration::from_secs(2))),
            phase_timeout: self.phase_timeout.unwrap_or(Dur(Duration::from_secs(600))),
            resumption: self.resumption.unwrap_or(true),
            gateway_pid: self.gateway_pid,
            admin_url: self.admin_url,
            seed: self.seed.unwrap_or_else(rand::random),
        };
        config.check_worker_sizes()?;
        Ok(config)
    }
}

impl Config {
    /// Users (= connections) of worker `index`: a contiguous range, sizes
    /// differing by at most one.
    pub fn worker_users(&self, index: usize) -> std::ops::Range<u64> {
        let w = self.workers as u64;
        let i = index as u64;
        let base = self.connections / w;
        let extra = self.connections % w;
        let start = i * base + i.min(extra);
        start..start + base + u64::from(i < extra)
    }

    /// Source addresses of local worker `local` of `count`: the list dealt
    /// round-robin, or one shared address when there are fewer than workers.
    pub fn worker_sources(&self, local: usize, count: usize) -> Vec<IpAddr> {
        let ips = &self.source_ips;
        if ips.is_empty() {
            return Vec::new();
        }
        if ips.len() < count {
            return vec![ips[local % ips.len()]];
        }
        ips.iter().skip(local).step_by(count).copied().collect()
    }

    /// Groups of worker `index` (sizes): the group list dealt round-robin.
    pub fn worker_groups(&self, index: usize) -> Vec<u32> {
        let mut all = Vec::new();
        for &(size, count) in &self.groups.0 {
            all.extend(std::iter::repeat_n(size, count as usize));
        }
        all.into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.workers == index)
            .map(|(_, size)| size)
            .collect()
    }

    /// Every worker must fit in the per-process open-file limit, and chat
    /// conversations live inside one worker, so its groups must fit its users.
    fn check_worker_sizes(&self) -> Result<()> {
        let fd_limit = crate::sys::open_file_limit();
        for i in 0..self.workers {
            let users = self.worker_users(i);
            let n = users.end - users.start;
            if n + WORKER_FD_RESERVE > fd_limit {
                bail!(
                    "worker {i} would hold {n} connections but a process may open only {fd_limit} files: \
                     use more --workers (at least {})",
                    self.connections.div_ceil(fd_limit.saturating_sub(WORKER_FD_RESERVE).max(1))
                );
            }
            if self.scenario.sends_messages() {
                let groups = self.worker_groups(i);
                if let Some(&largest) = groups.iter().max() {
                    if u64::from(largest) > n {
                        bail!(
                            "worker {i} has {n} users but must host a group of {largest}: \
                             conversations live inside one worker, so give each worker more \
                             connections (fewer --workers or more --connections)"
                        );
                    }
                }
                if groups.is_empty()
                    && self.direct_share < 1.0
                    && self.scenario == ScenarioKind::Chat
                    && n >= 2
                {
                    bail!(
                        "worker {i} has no group but --direct-share is below 1: add groups (--groups) \
                         or set --direct-share 1"
                    );
                }
                if self.direct_share > 0.0 && n < 2 {
                    bail!("worker {i} has fewer than 2 users: 1:1 conversations need pairs");
                }
            }
        }
        Ok(())
    }
}

/// `A-B` (IPv4 range, inclusive) or `A,B,C`.
fn parse_ip_list(spec: &str) -> Result<Vec<IpAddr>> {
    if let Some((from, to)) = spec.split_once('-') {
        let from: Ipv4Addr = from
            .trim()
            .parse()
            .with_context(|| format!("--source-ips {spec}"))?;
        let to: Ipv4Addr = to
            .trim()
            .parse()
            .with_context(|| format!("--source-ips {spec}"))?;
        let (a, b) = (u32::from(from), u32::from(to));
        if b < a || b - a > 65_535 {
            bail!(
                "--source-ips {spec}: the range must go upwards and hold at most 65536 addresses"
            );
        }
        return Ok((a..=b).map(|v| IpAddr::V4(Ipv4Addr::from(v))).collect());
    }
    spec.split(',')
        .map(|s| {
            s.trim()
                .parse()
                .with_context(|| format!("--source-ips: `{s}` is not an IP address"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(
            "500ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!("2m".parse::<Dur>().unwrap().0, Duration::from_secs(120));
        assert_eq!(
            "1.5s".parse::<Dur>().unwrap().0,
            Duration::from_millis(1500)
        );
        assert!("ten".parse::<Dur>().is_err());
        assert!("5d".parse::<Dur>().is_err());
        assert_eq!(Dur(Duration::from_secs(30)).to_string(), "30s");
        assert_eq!(Dur(Duration::from_millis(250)).to_string(), "250ms");
    }

    #[test]
    fn group_mix_parses() {
        let mix: GroupMix = "10x50, 1000x1".parse().unwrap();
        assert_eq!(mix.0, vec![(10, 50), (1000, 1)]);
        assert_eq!(mix.to_string(), "10x50,1000x1");
        assert!("1x5".parse::<GroupMix>().is_err());
        assert!("10".parse::<GroupMix>().is_err());
    }

    #[test]
    fn users_split_evenly_and_cover_all() {
        let s = Settings {
            scenario: Some(ScenarioKind::Connect),
            connections: Some(10),
            workers: Some(3),
            seed: Some(1),
            ..Default::default()
        };
        let c = s.resolve().unwrap();
        let ranges: Vec<_> = (0..3).map(|i| c.worker_users(i)).collect();
        assert_eq!(ranges, vec![0..4, 4..7, 7..10]);
        assert_eq!(c.source_ips.len(), 3 * LOOPBACK_SOURCES_PER_WORKER);
        assert_eq!(c.source_ips[0].to_string(), "127.0.0.2");
        assert_eq!(c.worker_sources(1, 3)[0].to_string(), "127.0.0.3");
        assert_eq!(c.worker_sources(1, 3).len(), LOOPBACK_SOURCES_PER_WORKER);
    }

    #[test]
    fn groups_too_big_for_a_worker_are_refused() {
        let s = Settings {
            scenario: Some(ScenarioKind::Chat),
            connections: Some(100),
            workers: Some(2),
            groups: Some("60x1".parse().unwrap()),
            ..Default::default()
        };
        let err = s.resolve().unwrap_err().to_string();
        assert!(err.contains("group of 60"), "{err}");
    }

    #[test]
    fn flags_override_file() {
        let file: Settings = toml::from_str(
            "scenario = \"chat\"\nconnections = 50\nrate = 10.0\nduration = \"3s\"\ngateway_pid = [7]\n",
        )
        .unwrap();
        let flags = Settings {
            rate: Some(20.0),
            ..Default::default()
        };
        let s = flags.over(file);
        assert_eq!(s.rate, Some(20.0));
        assert_eq!(s.connections, Some(50));
        assert_eq!(s.duration, Some(Dur(Duration::from_secs(3))));
        assert_eq!(s.gateway_pid, vec![7]);
        assert!(toml::from_str::<Settings>("connectons = 5").is_err());
    }
}
