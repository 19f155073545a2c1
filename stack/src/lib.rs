//! Real redis-server, Redis Cluster, Apache Kafka (KRaft), Apache Cassandra
//! and `palaver-gateway` processes on free loopback ports, for the
//! integration tests (through `palaver-testkit`, which re-exports this crate
//! as `stack`) and for `palaver cluster` (the CLI's supervisor in
//! `tools/src/cluster.rs`).
//!
//! Each service gets its own working directory (a temporary one unless the
//! caller gives one), is polled until it answers (with a deadline), and is
//! killed when its handle is dropped — unless the handle is `detach`ed, which
//! `palaver cluster up` does so the processes outlive the CLI.
//!
//! A missing binary is an error naming `tools/scripts/install-deps.sh`; tests
//! `expect()` these results, so a machine without the binaries fails loudly
//! instead of skipping.

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a service may take to answer after it was spawned.
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// How often a readiness wait polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);
const INSTALL_HINT: &str = "run tools/scripts/install-deps.sh to install it";

#[derive(Debug)]
pub struct StackError(String);

impl fmt::Display for StackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StackError {}

pub type Result<T> = std::result::Result<T, StackError>;

fn err(message: impl Into<String>) -> StackError {
    StackError(message.into())
}

/// Sends a signal to a process (SIGSTOP/SIGCONT for stall tests, SIGTERM
/// and SIGKILL for `palaver cluster down` and the fault tests).
#[allow(unsafe_code)] // kill(2); see SAFETY below
pub fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(err(format!(
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        )))
    }
}

/// Finds `name` on PATH or in cargo's bin directory (where `cargo install`
/// puts binaries even when that directory is not on PATH).
pub fn find_binary(name: &str) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(cargo_home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(cargo_home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| err(format!("`{name}` is not installed; {INSTALL_HINT}")))
}

/// A free loopback TCP port: bind port 0, read what the kernel chose, release.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| err(format!("cannot bind a loopback port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| err(format!("local_addr: {e}")))
}

/// Set (to anything) to keep every temporary work dir: the logs of a run
/// that passed, to compare with one that failed.
pub const KEEP_WORK_DIRS: &str = "PALAVER_KEEP_WORK_DIRS";

/// A service's working directory; a temporary one is removed on drop,
/// unless a test is failing or [`KEEP_WORK_DIRS`] is set.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    remove_on_drop: bool,
}

impl WorkDir {
    /// A fresh directory under the system temp dir, removed on drop.
    pub fn temp(label: &str) -> Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "palaver-{label}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).map_err(|e| err(format!("create {}: {e}", path.display())))?;
        Ok(Self {
            path,
            remove_on_drop: std::env::var_os(KEEP_WORK_DIRS).is_none(),
        })
    }

    /// A directory the caller owns (created if missing, kept on drop).
    pub fn kept(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        fs::create_dir_all(&path).map_err(|e| err(format!("create {}: {e}", path.display())))?;
        // Absolute: services run with it as working directory.
        let path =
            fs::canonicalize(&path).map_err(|e| err(format!("resolve {}: {e}", path.display())))?;
        Ok(Self {
            path,
            remove_on_drop: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.remove_on_drop {
            return;
        }
        // A failing test's logs and data stay for the post-mortem.
        if std::thread::panicking() {
            eprintln!("kept for inspection: {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A child process killed (and reaped) on drop unless detached.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Result<Self> {
        let out =
            fs::File::create(&log).map_err(|e| err(format!("create {}: {e}", log.display())))?;
        let out2 = out.try_clone().map_err(|e| err(format!("dup log: {e}")))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(out2);
        let child = cmd
            .spawn()
            .map_err(|e| err(format!("spawn {:?}: {e}", cmd.get_program())))?;
        Ok(Self {
            child: Some(child),
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Err with the log's tail when the process has already exited.
    fn check_alive(&mut self, what: &str) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(err(format!(
                    "{what} exited during startup ({status}); log {}:\n{}",
                    self.log.display(),
                    log_tail(&self.log)
                )));
            }
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn detach(mut self) -> u32 {
        let pid = self.pid();
        self.child = None;
        pid
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last 20 lines of a log, for an error saying why a service did not start.
pub fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Polls `ready` until it returns true or the deadline passes.
fn wait_until(what: &str, proc: &mut Proc, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if ready() {
            return Ok(());
        }
        proc.check_alive(what)?;
        if Instant::now() > deadline {
            return Err(err(format!(
                "{what} did not become ready within {START_DEADLINE:?}; log {}:\n{}",
                proc.log.display(),
                log_tail(&proc.log)
            )));
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Sends one inline Redis command and returns the raw reply (enough to check
/// readiness without a Redis client library).
pub fn redis_inline(port: u16, command: &str) -> std::io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if resp_complete(&reply) {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// True when `reply` holds one whole simple/error/integer/bulk RESP reply.
fn resp_complete(reply: &[u8]) -> bool {
    let Some(line_end) = reply.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    if reply.first() != Some(&b'$') {
        return true;
    }
    let len: i64 = std::str::from_utf8(&reply[1..line_end])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(-1);
    len < 0 || reply.len() >= line_end + 2 + len as usize + 2
}

mod cassandra;
mod gateway;
mod kafka;
mod kafka_wire;
mod redis;

pub use cassandra::*;
pub use gateway::*;
pub use kafka::*;
pub use redis::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_names_the_install_script() {
        let e = find_binary("palaver-no-such-binary").unwrap_err();
        assert!(
            e.to_string().contains("tools/scripts/install-deps.sh"),
            "{e}"
        );
    }
}
