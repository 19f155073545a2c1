//! The store contract (tests/contract) against the in-memory store.

use palaver_router::memory::MemoryStore;

mod contract;
use contract::*;

#[test]
fn memory_store_meets_the_store_contract() {
    append_batch_in_order(MemoryStore::new());
    dedup_follows_the_window(MemoryStore::new());
    ranges_and_senders(MemoryStore::new());
    receipts_and_groups(MemoryStore::new());
    users_and_push(MemoryStore::new());
    shared_conversations(MemoryStore::new());
    watches(MemoryStore::new());
    watches_capped_all_or_nothing(MemoryStore::new());
}
