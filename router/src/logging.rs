//! The log set-up every worker binary shares (`palaver-router`,
//! `palaver-archiver`, `palaver-push`).

/// Logs to stderr at `RUST_LOG`'s filter (default `info`), with colour codes
/// only for a person watching, not in log files.
pub fn init_worker_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
