//! The store contract: checks every `Store` implementation must pass, run
//! against `MemoryStore` (tests/memory_store.rs), `RedisStore` on standalone
//! Redis and Redis Cluster (tests/redis_store.rs) and the durable
//! `DiskStore` (tests/disk_store.rs). Each check takes a fresh store.
//! The checks are in one file per store trait (`conversations.rs`,
//! `users.rs`, `sessions.rs`, `push.rs`, `channels.rs`); this file holds the shared helpers and the
//! macro that runs them all.
// Each test binary uses a different subset of the helpers.
#![allow(dead_code)]

use palaver_protocol::pb;
use palaver_router_core::api::{Session, SessionAddr};
use palaver_router_core::store::{Appended, Retention};

/// One `#[test]` per check of the contract, each on a fresh store, so the
/// first failure hides none of the others. Every check is named here once;
/// `every_check_of_the_contract_is_run` fails if one is added to this file
/// but not here.
///
/// `$fresh` makes `(keep_alive, store)` (a server the store needs, kept
/// until the check ends); `$expire(step_ms)` makes the hook that lets a
/// gateway's lease run out (`step_ms` of a manual clock for a store that has
/// one; a store on a real clock waits for its own expiry).
#[macro_export]
macro_rules! store_contract_tests {
    ($fresh:expr, $expire:expr) => {
        mod store_contract {
            use super::*;

            $crate::store_contract_tests!(@checks $fresh;
                append_batch_in_order,
                dedup_follows_the_window,
                ranges_and_senders,
                quotas_count_per_owner_and_day,
                dedup_is_per_sender,
                reads_stay_within_their_byte_budget,
                receipts_and_groups,
                users_and_push,
                presence_links_and_consent,
                group_add_counts,
                push_tokens_register_replace_and_cap,
                a_push_token_has_one_owner_across_users,
                push_token_invalidation_loses_to_a_reregistration,
                mutes_expire_and_are_capped,
                recipients_say_whose_registered_devices_are_offline,
                push_context_for_the_worker,
                the_history_epoch_is_announced_and_stable,
                channels_are_created_once_with_their_counts,
                channel_member_changes_keep_their_counts,
                channel_members_page_in_order,
                a_large_channel_pages_without_gaps,
                channel_read_positions_rise_only,
                calls_on_a_missing_channel_change_nothing,
            );

            #[test]
            fn sessions_and_registry() {
                let (_keep, s, expire) = $expire($fresh(), 201);
                contract::sessions_and_registry(s, expire);
            }

            #[test]
            fn presence_events_ignore_dead_gateways() {
                let (_keep, s, expire) = $expire($fresh(), 501);
                contract::presence_events_ignore_dead_gateways(s, expire);
            }

            #[test]
            fn a_gateway_reaped_while_stalled_rejoins() {
                let (_keep, s, expire) = $expire($fresh(), 501);
                contract::a_gateway_reaped_while_stalled_rejoins(s, expire);
            }
        }
    };
    (@checks $fresh:expr; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                let (_keep, s) = $fresh();
                contract::$check(s);
            }
        )*
    };
}

/// The names of the contract's checks, read from the source of the files
/// that hold them (the `pub fn <name><S: Store>` items), for the test that
/// each is run.
pub fn check_names() -> Vec<String> {
    [
        include_str!("conversations.rs"),
        include_str!("users.rs"),
        include_str!("sessions.rs"),
        include_str!("push.rs"),
        include_str!("channels.rs"),
    ]
    .iter()
    .flat_map(|source| source.lines())
    .filter_map(|l| l.strip_prefix("pub fn "))
    .filter(|l| l.contains("<S: Store>"))
    .filter_map(|l| l.split('<').next())
    .map(str::to_string)
    .collect()
}

pub fn retention(now_ms: i64, window: usize) -> Retention {
    Retention {
        now_ms,
        dedup_ttl_ms: 1000,
        history_window: window,
    }
}

pub fn message(conv: &str, cmid: u8, sender: &str) -> pb::Message {
    pb::Message {
        conversation_id: conv.into(),
        client_msg_id: vec![cmid; 16],
        message_id: format!("m{cmid}"),
        sender_user_id: sender.into(),
        body: vec![cmid; 3],
        kind: pb::ContentKind::Text as i32,
        server_time_ms: 1000 + cmid as i64,
        ..Default::default()
    }
}

pub fn stored(a: Appended) -> pb::Message {
    match a {
        Appended::Stored(m) => m,
        other => panic!("expected a stored message, got {other:?}"),
    }
}

pub fn addr(gw: &str, conn: u64) -> SessionAddr {
    SessionAddr {
        gateway_id: gw.into(),
        conn,
    }
}

pub fn session(user: &str, device: &str, gw: &str, conn: u64) -> Session {
    Session {
        user_id: user.into(),
        device_id: device.into(),
        addr: addr(gw, conn),
    }
}

mod channels;
mod conversations;
mod push;
mod sessions;
mod users;

pub use channels::*;
pub use conversations::*;
pub use push::*;
pub use sessions::*;
pub use users::*;
