//! Heap allocations per Send on the message path, counted exactly by a
//! counting global allocator (so the numbers do not depend on machine load:
//! run it anywhere, debug or release, and compare).
//!
//! Two paths, three conversations each, Sends handed over in batches of 1
//! and of 64 (what one gateway turn hands the engine at low and high load):
//!
//! - `router`: `Router::handle_batch` over a `MemoryStore`, then
//!   `Output::flush` into an outlet that drops the frames (the router
//!   tier's shape, minus Kafka and Redis). The `Inbound`s are built before
//!   counting starts.
//! - `engine`: the embedded engine as `palaver-gateway` runs it (hosted,
//!   turns driven here), end to end: each `Inbound` built the way a gateway
//!   core builds it (its `Session` from the connection's ids, the decoded
//!   `Send`'s three buffers, a fresh request Vec per hand-over), then
//!   `submit_batch`, the engine's turns, and a sink that drops the frames.
//!
//! Conversations: `dm online` (alice → bob, one device each), `dm offline`
//! (alice → carol, who never connected: a push event the first time, then
//! coalesced), `group 20` (alice and 19 others, all online, one device
//! each). Every conversation is warmed up past its history window first,
//! so the counts are those of a busy steady state.
//!
//! An allocation is a call to `alloc` or `realloc`; bytes are the sizes
//! requested (a `realloc` counts its new size).
//!
//! ```text
//! cargo run --release -p palaver-router --example allocs_per_message
//! ```
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

mod path;

use path::*;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

/// Counts every allocation of the process (this example runs one thread:
/// the hosted engine has none of its own).
struct Counting;

#[allow(unsafe_code)] // a counting allocator wraps the system's
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(l.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(l.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new as u64, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn counters() -> (u64, u64) {
    (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    )
}

/// One row of the table: allocations and bytes per Send.
struct Row {
    path: &'static str,
    case: &'static str,
    batch: usize,
    allocs: f64,
    bytes: f64,
}

impl Row {
    /// Runs `round` (one batch of `batch` Sends; returns the allocations
    /// and bytes it made) for the warm-up, then for the counted Sends.
    fn measure(
        path: &'static str,
        case: &'static str,
        batch: usize,
        mut round: impl FnMut() -> (u64, u64),
    ) -> Row {
        for _ in 0..WARM_UP / batch {
            round();
        }
        let (mut allocs, mut bytes) = (0, 0);
        for _ in 0..COUNTED / batch {
            let (a, b) = round();
            allocs += a;
            bytes += b;
        }
        Row {
            path,
            case,
            batch,
            allocs: allocs as f64 / COUNTED as f64,
            bytes: bytes as f64 / COUNTED as f64,
        }
    }
}

fn measure_router(world: &World, rows: &mut Vec<Row>) {
    let mut path = RouterPath::new(world);
    let cases: Vec<(&'static str, String)> = path
        .cases
        .iter()
        .map(|c| (c.name, c.conversation_id.clone()))
        .collect();
    for (name, conversation_id) in cases {
        for batch in BATCHES {
            let round = || {
                let requests = path.prepare(&conversation_id, batch);
                let before = counters();
                path.run(&requests);
                let after = counters();
                drop(requests);
                (after.0 - before.0, after.1 - before.1)
            };
            rows.push(Row::measure("router", name, batch, round));
        }
    }
}

fn measure_engine(world: &World, rows: &mut Vec<Row>) {
    let mut path = EnginePath::new(world);
    let cases: Vec<(&'static str, String)> = path
        .cases
        .iter()
        .map(|c| (c.name, c.conversation_id.clone()))
        .collect();
    for (name, conversation_id) in cases {
        for batch in BATCHES {
            let round = || {
                let before = counters();
                path.round(&conversation_id, batch);
                let after = counters();
                (after.0 - before.0, after.1 - before.1)
            };
            rows.push(Row::measure("engine", name, batch, round));
        }
    }
    path.shutdown();
}

fn main() {
    let world = World::new();
    let mut rows = Vec::new();
    measure_router(&world, &mut rows);
    measure_engine(&world, &mut rows);
    println!("heap allocations per Send ({COUNTED} Sends per row, after {WARM_UP} warm-up Sends)");
    println!();
    println!("| path   | conversation | batch | allocs/Send | bytes/Send |");
    println!("| ------ | ------------ | ----: | ----------: | ---------: |");
    for r in rows {
        println!(
            "| {:<6} | {:<12} | {:>5} | {:>11.2} | {:>10.1} |",
            r.path, r.case, r.batch, r.allocs, r.bytes
        );
    }
}
