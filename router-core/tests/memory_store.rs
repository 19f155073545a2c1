//! The store contract (tests/contract) against the in-memory store.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use palaver_router_core::memory::MemoryStore;
use palaver_router_core::ManualClock;

mod contract;
use contract::*;

/// A fresh store on a manual clock.
fn fresh() -> (Arc<ManualClock>, MemoryStore) {
    let clock = Arc::new(ManualClock::new(1_000));
    (clock.clone(), MemoryStore::with_clock(clock))
}

/// Leases run out by the store's injected clock: no sleeping.
#[allow(clippy::type_complexity)]
fn expire(
    (clock, store): (Arc<ManualClock>, MemoryStore),
    step_ms: i64,
) -> ((), MemoryStore, Box<dyn FnMut(&mut MemoryStore, &str)>) {
    ((), store, Box::new(move |_, _| clock.advance(step_ms)))
}

crate::store_contract_tests!(fresh, expire);

/// Every `pub fn …<S: Store>` check of tests/contract runs on this store and
/// on Redis (`../../router/tests/redis_store.rs`; both files name it).
#[test]
fn every_check_of_the_contract_is_run() {
    let names = check_names();
    assert!(names.len() >= 13, "{names:?}");
    let memory = include_str!("contract/mod.rs");
    let redis = include_str!("../../router/tests/redis_store.rs");
    for name in names {
        assert!(
            memory.contains(&format!("                {name},"))
                || memory.contains(&format!("fn {name}() {{")),
            "{name} is not in store_contract_tests!"
        );
        assert!(
            redis.contains(&format!("{name}(")),
            "{name} is not run on Redis Cluster (redis_store.rs all_checks)"
        );
    }
}

/// A memory store's history dies with it: each new one announces a new
/// history epoch (SPEC §7), which is how clients notice a restarted
/// memory-only node.
#[test]
fn each_memory_store_is_a_new_history_epoch() {
    use palaver_router_core::store::ConversationStore;
    let a = MemoryStore::new().history_epoch().unwrap();
    let b = MemoryStore::new().history_epoch().unwrap();
    assert!(a != 0 && b != 0 && a != b, "{a} {b}");
}
