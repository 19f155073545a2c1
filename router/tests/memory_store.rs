//! The store contract (tests/contract) against the in-memory store.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use palaver_router::memory::MemoryStore;
use palaver_router::ManualClock;

mod contract;
use contract::*;

#[test]
fn memory_store_meets_the_store_contract() {
    append_batch_in_order(MemoryStore::new());
    dedup_follows_the_window(MemoryStore::new());
    ranges_and_senders(MemoryStore::new());
    quotas_count_per_owner_and_day(MemoryStore::new());
    dedup_is_per_sender(MemoryStore::new());
    reads_stay_within_their_byte_budget(MemoryStore::new());
    receipts_and_groups(MemoryStore::new());
    users_and_push(MemoryStore::new());
    presence_links_and_consent(MemoryStore::new());
    group_add_counts(MemoryStore::new());
    // Leases run out by an injected clock: no sleeping.
    let clock = Arc::new(ManualClock::new(1_000));
    sessions_and_registry(MemoryStore::with_clock(clock.clone()), |_, _| {
        clock.advance(201)
    });
    let clock = Arc::new(ManualClock::new(1_000));
    presence_events_ignore_dead_gateways(MemoryStore::with_clock(clock.clone()), |_, _| {
        clock.advance(501)
    });
    let clock = Arc::new(ManualClock::new(1_000));
    a_gateway_reaped_while_stalled_rejoins(MemoryStore::with_clock(clock.clone()), |_, _| {
        clock.advance(501)
    });
}
