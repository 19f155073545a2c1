//! `palaver-gateway` processes: the workspace's binary, found beside the
//! running executable, started with a config and waited for until its port
//! accepts connections.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::*;

/// Finds a Palaver binary next to the running executable (cargo puts all of
/// a workspace's binaries in one directory; a test executable sits one level
/// below it, in `deps/`), else on PATH.
pub fn find_palaver_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().ok();
    let beside = exe
        .iter()
        .flat_map(|exe| exe.ancestors().skip(1).take(2))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    match beside {
        Some(p) => Ok(p),
        None => find_binary(name).map_err(|_| {
            err(format!(
                "`{name}` not found next to this executable or on PATH; build it with \
                 `cargo build --bins`"
            ))
        }),
    }
}

/// How to run one `palaver-gateway` ([`Gateway::launch`]).
#[derive(Clone, Debug)]
pub struct GatewayLaunch<'a> {
    /// Its `--gateway-id` (distinct among gateways sharing a backend).
    pub id: &'a str,
    /// The config file (e.g. a `[backend]` section).
    pub config: &'a Path,
    /// `HOST:PORT`; gateways given the same one share it (SO_REUSEPORT).
    pub listen: &'a str,
    pub cores: usize,
    /// Dev certificate and JWT secret: the first gateway of a data dir
    /// creates them, the others read them.
    pub data_dir: &'a Path,
    /// Where its stdout and stderr go (truncated first).
    pub log: PathBuf,
    /// `RUST_LOG` for it; `None` leaves the caller's environment alone.
    pub rust_log: Option<&'a str>,
}

/// A `palaver-gateway` process (the workspace's binary, see
/// [`find_palaver_binary`]); SIGKILLed on drop (a crash, as the rest of the
/// cluster sees it: no drain, no presence flush) unless detached.
pub struct Gateway {
    proc: Proc,
    port: u16,
}

impl Gateway {
    /// Starts gateway `id` on a free loopback port with 2 cores and
    /// `config_toml` (a gateway config file, e.g. a `[backend]` section)
    /// written to `dir/<id>.toml`, logging to `dir/<id>.log`, dev credentials
    /// in `data_dir`. Returns once it accepts connections (its backend
    /// started).
    pub fn start(dir: &Path, id: &str, config_toml: &str, data_dir: &Path) -> Result<Self> {
        let config = dir.join(format!("{id}.toml"));
        fs::write(&config, config_toml)
            .map_err(|e| err(format!("write {}: {e}", config.display())))?;
        let listen = format!("127.0.0.1:{}", free_port()?);
        Self::launch(&GatewayLaunch {
            id,
            config: &config,
            listen: &listen,
            cores: 2,
            data_dir,
            log: dir.join(format!("{id}.log")),
            rust_log: Some("info,rdkafka=warn"),
        })
    }

    /// Starts a gateway as `launch` says; returns once 127.0.0.1 at its
    /// listen port accepts connections.
    pub fn launch(launch: &GatewayLaunch) -> Result<Self> {
        let port: u16 = launch
            .listen
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| {
                err(format!(
                    "listen address {:?} must be HOST:PORT",
                    launch.listen
                ))
            })?;
        let mut cmd = Command::new(find_palaver_binary("palaver-gateway")?);
        cmd.arg("--config")
            .arg(launch.config)
            .args(["--gateway-id", launch.id])
            .args(["--cores", &launch.cores.to_string()])
            .args(["--listen", launch.listen])
            .arg("--data-dir")
            .arg(launch.data_dir);
        if let Some(filter) = launch.rust_log {
            cmd.env("RUST_LOG", filter);
        }
        let mut proc = Proc::spawn(cmd, launch.log.clone())?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        wait_until(
            &format!("gateway {} (accepting connections on {addr})", launch.id),
            &mut proc,
            || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok(),
        )?;
        Ok(Self { proc, port })
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGKILL: no drain, no presence flush, no goodbye.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGSTOPs the gateway (a stall: a paused VM, a long GC pause).
    pub fn pause(&self) -> Result<()> {
        signal(self.pid(), libc::SIGSTOP)
    }

    /// SIGCONTs the gateway.
    pub fn resume(&self) -> Result<()> {
        signal(self.pid(), libc::SIGCONT)
    }

    /// Leaves the gateway running after the handle is gone (`palaver
    /// cluster up`); returns its PID.
    pub fn detach(self) -> u32 {
        self.proc.detach()
    }
}
