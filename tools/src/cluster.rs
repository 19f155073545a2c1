//! `palaver cluster up|down|status`: Redis, Kafka, Cassandra (the history
//! archive), a router, an archiver and two gateways as detached processes,
//! recorded in a state file. Redis, Kafka, Cassandra and the gateways are
//! started by `palaver-stack`, the same code the tests start them with.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use palaver_stack::{
    find_palaver_binary, Cassandra, Gateway, GatewayLaunch, Kafka, Redis, WorkDir, POLL_INTERVAL,
};

/// One process of the local cluster, as recorded in the state file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterProcess {
    pub name: String,
    pub pid: u32,
    /// The port it serves (0 when none).
    pub port: u16,
}

const STATE_FILE: &str = "state";

/// The topics `palaver cluster up` creates, with their partition counts
/// (the router's defaults; gateways create their own delivery topics).
const CLUSTER_TOPICS: &[(&str, u32)] = &[
    ("palaver.inbound", 8),
    ("palaver.push", 8),
    ("palaver.stored", 8),
    ("palaver.channels", 8),
    ("palaver.dlq", 1),
];

fn pid_alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; its state letter is Z.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Reads `dir/state`: one `name pid port` line per process.
pub fn cluster_state(dir: &Path) -> Result<Vec<ClusterProcess>> {
    let path = dir.join(STATE_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow!("read {}: {e}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut f = line.split_whitespace();
            let parsed = (|| {
                Some(ClusterProcess {
                    name: f.next()?.to_string(),
                    pid: f.next()?.parse().ok()?,
                    port: f.next()?.parse().ok()?,
                })
            })();
            parsed.ok_or_else(|| anyhow!("{}: bad line {line:?}", path.display()))
        })
        .collect()
}

fn write_state(dir: &Path, procs: &[ClusterProcess]) -> Result<()> {
    let text: String = procs
        .iter()
        .map(|p| format!("{} {} {}\n", p.name, p.pid, p.port))
        .collect();
    let path = dir.join(STATE_FILE);
    fs::write(&path, text).with_context(|| format!("write {}", path.display()))
}

/// What `palaver cluster up` starts beyond Redis, Kafka, a router and two
/// gateways.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterOptions {
    /// Apache Cassandra (data under `dir/cassandra`) and a `palaver-archiver`,
    /// with the router reading below its Redis window from the archive.
    pub archive: bool,
    /// A push worker, `palaver-push --providers <this file>` (the APNs/FCM
    /// credentials, `push.toml`), as `push-1`.
    pub push_providers: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            archive: true,
            push_providers: None,
        }
    }
}

/// Starts Redis (AOF, `appendfsync always`), Apache Kafka (one KRaft node,
/// log dir under `dir/kafka`), with `options.archive` Apache Cassandra
/// (under `dir/cassandra`) and an archiver, with `options.push_providers` a
/// push worker, one router and two gateways
/// (`gw1`, `gw2`) sharing `listen` via SO_REUSEPORT, all in the background,
/// with logs and state under `dir`. `data_dir` holds the gateways' dev
/// certificate and JWT secret (as for a single gateway).
pub fn cluster_up(
    dir: &Path,
    data_dir: &Path,
    listen: &str,
    options: ClusterOptions,
) -> Result<Vec<ClusterProcess>> {
    let running: Vec<ClusterProcess> = cluster_state(dir)?
        .into_iter()
        .filter(|p| pid_alive(p.pid))
        .collect();
    if !running.is_empty() {
        bail!(
            "a cluster is already running from {} ({} processes); run `palaver cluster down` first",
            dir.display(),
            running.len()
        );
    }
    let router_bin = find_palaver_binary("palaver-router")?;
    // Missing binaries are reported before anything starts.
    find_palaver_binary("palaver-gateway")?;
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut procs = Vec::new();
    let result = (|| -> Result<()> {
        let redis = Redis::start_with(WorkDir::kept(dir.join("redis"))?, &[])?;
        let redis_url = redis.url();
        procs.push(ClusterProcess {
            name: "redis".into(),
            pid: redis.pid(),
            port: redis.port(),
        });
        redis.detach();

        let kafka = Kafka::start_in(WorkDir::kept(dir.join("kafka"))?, 1)?;
        let brokers = kafka.bootstrap();
        for (topic, partitions) in CLUSTER_TOPICS {
            kafka.create_topic(topic, *partitions)?;
        }
        procs.push(ClusterProcess {
            name: "kafka".into(),
            pid: kafka.pid(0),
            port: kafka.port(0),
        });
        kafka.detach();

        let spawn = |name: &str, mut cmd: Command| -> Result<ClusterProcess> {
            let log = dir.join(format!("{name}.log"));
            let out =
                fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
            let out2 = out.try_clone().context("dup log")?;
            let child = cmd
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(out2)
                .spawn()
                .with_context(|| format!("spawn {name}"))?;
            Ok(ClusterProcess {
                name: name.into(),
                pid: child.id(),
                port: 0,
            })
        };
        let mut router = Command::new(&router_bin);
        router.args([
            "--brokers",
            &brokers,
            "--redis",
            &redis_url,
            "--router-id",
            "router-1",
        ]);
        let mut cassandra_nodes = None;
        if options.archive {
            let archiver_bin = find_palaver_binary("palaver-archiver")?;
            let cassandra = Cassandra::start_in(WorkDir::kept(dir.join("cassandra"))?)?;
            let nodes = cassandra.address();
            procs.push(ClusterProcess {
                name: "cassandra".into(),
                pid: cassandra.pid(),
                port: cassandra.port(),
            });
            cassandra.detach();
            router.args(["--cassandra", &nodes]);
            cassandra_nodes = Some(nodes.clone());
            let mut archiver = Command::new(&archiver_bin);
            archiver.args([
                "--brokers",
                &brokers,
                "--redis",
                &redis_url,
                "--cassandra",
                &nodes,
                "--archiver-id",
                "archiver-1",
            ]);
            procs.push(spawn("archiver-1", archiver)?);
        }
        procs.push(spawn("router-1", router)?);
        if let Some(providers) = &options.push_providers {
            let push_bin = find_palaver_binary("palaver-push")?;
            let mut push = Command::new(&push_bin);
            push.args([
                "--brokers",
                &brokers,
                "--redis",
                &redis_url,
                "--worker-id",
                "push-1",
            ])
            .arg("--providers")
            .arg(providers);
            procs.push(spawn("push-1", push)?);
        }

        let config = dir.join("gateway.toml");
        // The gateways serve History and Sync below the window from the
        // archive too.
        let archive_line = cassandra_nodes
            .as_ref()
            .map(|nodes| format!("cassandra = \"{nodes}\"\n"))
            .unwrap_or_default();
        fs::write(
            &config,
            format!(
                "[backend]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\nredis = \"{redis_url}\"\n{archive_line}"
            ),
        )
        .with_context(|| format!("write {}", config.display()))?;
        for id in ["gw1", "gw2"] {
            // Returns once the port accepts connections: the first gateway
            // has created the dev certificate the second then reads.
            let gateway = Gateway::launch(&GatewayLaunch {
                id,
                config: &config,
                listen,
                cores: 1,
                data_dir,
                log: dir.join(format!("{id}.log")),
                rust_log: None,
            })?;
            procs.push(ClusterProcess {
                name: id.into(),
                port: gateway.addr().port(),
                pid: gateway.detach(),
            });
        }
        Ok(())
    })();
    write_state(dir, &procs)?;
    match result {
        Ok(()) => Ok(procs),
        Err(e) => {
            let _ = cluster_down(dir);
            Err(e)
        }
    }
}

/// Stops every process of the state file (SIGTERM, then SIGKILL after a
/// grace period), gateways first, and clears the state.
pub fn cluster_down(dir: &Path) -> Result<Vec<ClusterProcess>> {
    let mut procs = cluster_state(dir)?;
    procs.reverse();
    for p in &procs {
        if !pid_alive(p.pid) {
            continue;
        }
        let _ = Command::new("kill").arg(p.pid.to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while pid_alive(p.pid) && Instant::now() < deadline {
            thread::sleep(POLL_INTERVAL);
        }
        if pid_alive(p.pid) {
            let _ = Command::new("kill")
                .args(["-9", &p.pid.to_string()])
                .status();
        }
    }
    let _ = fs::remove_file(dir.join(STATE_FILE));
    procs.reverse();
    Ok(procs)
}

/// Each recorded process and whether it is running.
pub fn cluster_status(dir: &Path) -> Result<Vec<(ClusterProcess, bool)>> {
    Ok(cluster_state(dir)?
        .into_iter()
        .map(|p| {
            let alive = pid_alive(p.pid);
            (p, alive)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_state_round_trips_and_rejects_bad_lines() {
        let dir = WorkDir::temp("state-test").unwrap();
        assert!(cluster_state(dir.path()).unwrap().is_empty());
        let procs = vec![ClusterProcess {
            name: "redis".into(),
            pid: 42,
            port: 6379,
        }];
        write_state(dir.path(), &procs).unwrap();
        assert_eq!(cluster_state(dir.path()).unwrap(), procs);
        fs::write(dir.path().join(STATE_FILE), "redis notapid 1\n").unwrap();
        assert!(cluster_state(dir.path()).is_err());
    }
}
