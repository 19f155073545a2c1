//! What the bench reads from the operating system and the gateway besides the
//! protocol: open-file limits, process RSS, machine facts for the report, and
//! the gateway's Prometheus `/metrics` page.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The soft limit on open files of this process.
#[allow(unsafe_code)] // getrlimit: see SAFETY below
pub fn open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

/// Raises the soft open-file limit to the hard one; returns the new soft limit.
#[allow(unsafe_code)] // getrlimit/setrlimit: see SAFETY below
pub fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    open_file_limit()
}

/// Resident set size of a process in bytes (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path}: is process {pid} running?"))?;
    status_kib(&status, "VmRSS:")
        .map(|kib| kib * 1024)
        .with_context(|| format!("{path} has no VmRSS line"))
}

/// CPU time (user + system, all threads) a process has used so far, in
/// seconds (`utime` + `stime` of `/proc/<pid>/stat`).
#[allow(unsafe_code)] // sysconf: see SAFETY below
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path}: is process {pid} running?"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{path}: no command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let tick = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: field {i} missing"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((tick(14)? + tick(15)?) as f64 / hz)
}

/// Sum of [`cpu_seconds`] over several processes.
pub fn total_cpu_seconds(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

/// Sum of [`rss_bytes`] over several processes.
pub fn total_rss_bytes(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|&p| rss_bytes(p)).sum()
}

fn status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Facts about the machine a run happened on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MachineInfo {
    pub hostname: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_bytes: u64,
    pub kernel: String,
    pub open_file_limit: u64,
}

impl MachineInfo {
    pub fn collect() -> MachineInfo {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let meminfo = read("/proc/meminfo");
        let cpuinfo = read("/proc/cpuinfo");
        MachineInfo {
            hostname: read("/proc/sys/kernel/hostname").trim().to_string(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default(),
            memory_bytes: status_kib(&meminfo, "MemTotal:").unwrap_or(0) * 1024,
            kernel: format!(
                "{} {}",
                read("/proc/sys/kernel/ostype").trim(),
                read("/proc/sys/kernel/osrelease").trim()
            ),
            open_file_limit: open_file_limit(),
        }
    }
}

/// Fetches `<admin_url>/metrics` (plain HTTP) and returns every sample as
/// `name{labels}` → value.
pub fn scrape_metrics(admin_url: &str) -> Result<BTreeMap<String, f64>> {
    let rest = admin_url
        .strip_prefix("http://")
        .with_context(|| format!("--admin-url {admin_url}: only http:// URLs are supported"))?;
    let (host, base_path) = rest.split_once('/').unwrap_or((rest, ""));
    let path = if base_path.is_empty() || base_path.ends_with("metrics") {
        format!(
            "/{}",
            if base_path.is_empty() {
                "metrics"
            } else {
                base_path
            }
        )
    } else {
        format!("/{}/metrics", base_path.trim_end_matches('/'))
    };
    let addr = host
        .to_socket_addrs()
        .with_context(|| format!("--admin-url {admin_url}: bad host"))?
        .next()
        .with_context(|| format!("--admin-url {admin_url}: resolves to nothing"))?;
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {admin_url}"))?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading {admin_url}{path}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("metrics response has no HTTP header")?;
    let status = head.split_whitespace().nth(1);
    if !head.starts_with("HTTP/1.") || status != Some("200") {
        bail!(
            "{admin_url}{path} answered `{}`",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(parse_prometheus(body))
}

/// Prometheus text format: `name{labels} value [timestamp]`, `#` comments.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The name part may contain spaces inside label values; the value
        // follows the closing brace, or the first space when there are none.
        let split_at = match line.rfind('}') {
            Some(brace) => brace + 1,
            None => line.find(' ').unwrap_or(line.len()),
        };
        let (name, rest) = line.split_at(split_at);
        if let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
            out.insert(name.to_string(), value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_rss_is_readable() {
        let rss = rss_bytes(std::process::id()).unwrap();
        assert!(rss > 0);
        assert!(rss_bytes(u32::MAX).is_err());
    }

    #[test]
    fn prometheus_text_parses() {
        let m = parse_prometheus(
            "# HELP x y\n# TYPE a gauge\na 1\nb{core=\"0\",k=\"a b\"} 2.5 1700000000\nbad line here\n",
        );
        assert_eq!(m.get("a"), Some(&1.0));
        assert_eq!(m.get("b{core=\"0\",k=\"a b\"}"), Some(&2.5));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn machine_info_has_basics() {
        let m = MachineInfo::collect();
        assert!(m.cpus >= 1);
        assert!(cpu_seconds(std::process::id()).unwrap() >= 0.0);
        assert!(m.memory_bytes > 0);
        assert!(m.kernel.contains("Linux"));
    }
}
