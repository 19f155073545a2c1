//! Replays the fuzz corpus (`fuzz/corpus/decode_frames/`, seeded from the
//! test vectors and grown by fuzzing) and every crash input ever found
//! (`fuzz/regressions/decode_frames/`) through the fuzz target's property, so
//! the normal test run keeps them fixed without a nightly toolchain.

// A test: a failed unwrap is a failed run (the workspace's unwrap_used
// floor is for the product's code).
#![allow(clippy::unwrap_used)]

#[path = "../fuzz/check.rs"]
mod check;

use std::path::Path;

fn replay(dir: &str) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        let caught = std::panic::catch_unwind(|| check::check_decode(&data));
        assert!(caught.is_ok(), "fuzz input {} fails", path.display());
        n += 1;
    }
    n
}

#[test]
fn fuzz_corpus_and_regressions_hold() {
    let corpus = replay("fuzz/corpus/decode_frames");
    assert!(corpus >= 100, "corpus has only {corpus} inputs");
    replay("fuzz/regressions/decode_frames");
}
