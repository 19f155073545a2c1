//! CPU time from `/proc`, for the benchmarks' "CPU per message" figures.

/// CPU time (user + system) recorded in a `/proc/.../stat` file, in
/// seconds: `/proc/<pid>/stat` for a process, `/proc/self/stat`, or
/// `/proc/thread-self/stat` for the calling thread. Panics if the file
/// cannot be read or parsed (a benchmark without its figure is no use).
pub fn cpu_seconds(stat_path: &str) -> f64 {
    let stat =
        std::fs::read_to_string(stat_path).unwrap_or_else(|e| panic!("reading {stat_path}: {e}"));
    // Fields after the command name (which may hold spaces, in parentheses)
    // start at field 3 (state); utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map_or_else(|| panic!("{stat_path}: no command name"), |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |field: usize| -> u64 {
        fields
            .get(field - 3)
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("{stat_path}: field {field} missing"))
    };
    // USER_HZ: 100 on every Linux this runs on (the ABI fixes it).
    (ticks(14) + ticks(15)) as f64 / 100.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_thread_uses_cpu() {
        // Spins until the thread's own counter shows 30 ms of CPU: how much
        // wall time that takes depends on the machine's load, not on the
        // code, so only a counter that never advances fails (after 60 s).
        let before = super::cpu_seconds("/proc/thread-self/stat");
        let start = std::time::Instant::now();
        let mut x = 0u64;
        let mut used = 0.0;
        while used < 0.03 {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            used = super::cpu_seconds("/proc/thread-self/stat") - before;
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "a minute of spinning counted as {used} s of CPU"
            );
        }
        // The process's time includes this thread's, but the kernel rounds
        // user and system time down to ticks separately for each file: the
        // process's figure may be up to two ticks (20 ms) short of the sum
        // of its threads'. (Failed in CI without the slack: 0.02 < 0.03.)
        let process = super::cpu_seconds("/proc/self/stat");
        assert!(
            process >= used - 0.02,
            "process {process} s, this thread {used} s"
        );
    }
}
