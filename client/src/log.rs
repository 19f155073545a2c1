//! The SDK's logging hook: one sink for the whole process, set by the app
//! (`setLogSink` in Kotlin and Swift) to route the SDK's lines to logcat,
//! os_log or its own logger. Without one, nothing is printed: an SDK must
//! not write to a phone's stderr. Lines are short, one per happening
//! (a connection failed and why, reconnecting stopped, a listener threw);
//! never tokens or message bodies.

use std::sync::{Arc, RwLock};

/// How much a line matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, uniffi::Enum)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// Receives the SDK's log lines, from SDK threads (never the app's): keep
/// it quick and thread-safe. A sink that throws loses that line only.
#[uniffi::export(with_foreign)]
pub trait LogSink: Send + Sync {
    fn log(&self, level: LogLevel, message: String);
}

static SINK: RwLock<Option<Arc<dyn LogSink>>> = RwLock::new(None);

/// Routes every later log line of every client in this process to `sink`
/// (replacing the previous one).
#[uniffi::export]
pub fn set_log_sink(sink: Arc<dyn LogSink>) {
    if let Ok(mut s) = SINK.write() {
        *s = Some(sink);
    }
}

/// Stops logging.
#[uniffi::export]
pub fn clear_log_sink() {
    if let Ok(mut s) = SINK.write() {
        *s = None;
    }
}

/// Hands one line to the sink, if there is one.
pub(crate) fn log(level: LogLevel, message: String) {
    let sink = SINK.read().ok().and_then(|s| s.clone());
    if let Some(sink) = sink {
        // A throwing foreign sink arrives as a panic across UniFFI: it
        // loses this line, nothing else.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink.log(level, message)));
    }
}
