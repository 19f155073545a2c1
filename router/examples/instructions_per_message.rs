//! Instructions per Send on the message path, for callgrind to count
//! exactly (issue 23: a metric that does not depend on machine load).
//! The same paths, conversations, batch sizes and warm-up as
//! `allocs_per_message` (`path/mod.rs`); only the counted rounds run inside
//! `counted_router` / `counted_engine`, which callgrind is told to collect
//! (`--collect-atstart=no --toggle-collect=…`), so setup and warm-up are
//! not counted. One scenario per run:
//!
//! ```text
//! valgrind --tool=callgrind --collect-atstart=no \
//!   --toggle-collect='*counted_*' --callgrind-out-file=/dev/null \
//!   target/release/examples/instructions_per_message router "dm online" 64
//! ```
//!
//! `bench/scripts/instructions.sh` runs every scenario and divides
//! callgrind's `Collected` by the Sends counted.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

mod path;

use palaver_router::api::Inbound;
use path::*;

/// Sends counted per run (a multiple of both batch sizes; callgrind runs
/// about 50× slower than native, and the count is exact).
const SENDS: usize = 2_048;

#[inline(never)]
fn counted_router(path: &mut RouterPath, batches: &[Vec<Inbound>]) {
    for requests in batches {
        path.run(requests);
    }
}

#[inline(never)]
fn counted_engine(path: &mut EnginePath, conversation_id: &str, batch: usize) {
    for _ in 0..SENDS / batch {
        path.round(conversation_id, batch);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [which, case, batch] = args.as_slice() else {
        eprintln!("usage: instructions_per_message <router|engine> <dm online|dm offline|group 20> <1|64>");
        std::process::exit(2);
    };
    let batch: usize = batch.parse().expect("a batch size");
    assert!(
        SENDS.is_multiple_of(batch),
        "the batch size divides {SENDS}"
    );
    let world = World::new();
    match which.as_str() {
        "router" => {
            let mut path = RouterPath::new(&world);
            let conversation_id = conversation(&path.cases, case);
            for _ in 0..WARM_UP / batch {
                let requests = path.prepare(&conversation_id, batch);
                path.run(&requests);
            }
            let batches: Vec<Vec<Inbound>> = (0..SENDS / batch)
                .map(|_| path.prepare(&conversation_id, batch))
                .collect();
            counted_router(&mut path, &batches);
        }
        "engine" => {
            let mut path = EnginePath::new(&world);
            let conversation_id = conversation(&path.cases, case);
            for _ in 0..WARM_UP / batch {
                path.round(&conversation_id, batch);
            }
            counted_engine(&mut path, &conversation_id, batch);
            path.shutdown();
        }
        other => panic!("no path {other:?}: router or engine"),
    }
    println!("sends={SENDS}");
}

fn conversation(cases: &[Case], name: &str) -> String {
    cases
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no conversation {name:?}"))
        .conversation_id
        .clone()
}
