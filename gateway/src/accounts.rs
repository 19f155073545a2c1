//! The accounts of one gateway process: for each user with a session here,
//! how many devices it has connected (SPEC §13 `max_connections_per_account`)
//! and the budget its connections share ([`AccountBudget`]).
//!
//! Shared by every core thread (a connection lives on one core, a user's
//! connections on any), so it is a fixed array of mutex-guarded shards
//! chosen by a hash of the user id. A shard is locked only at Hello, at a
//! session's end and when a request that passed its connection's buckets
//! is charged to the account; never for Ping/Pong, deliveries or I/O. Each
//! lock is held for a map lookup and a few additions.
//!
//! Keys are 64-bit hashes (a per-process random SipHash key, so clients
//! cannot aim at a collision), not the ids: a session of the registry is two
//! small map entries and no allocation of its own. Two users whose hashes
//! collided (about one chance in 2^64 per pair) would share one account.
//!
//! A device counts once however many connections it has here: a Hello from
//! a device that is already connected replaces that connection (the
//! backend sends the older one `GoAway(REPLACED)`, SPEC §12) and is not one
//! more. An account and its budget go when its last session ends.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::policy::{AccountAccess, AccountBudget, PolicyLimits};

/// Shards of the registry (a power of two). Two core threads contend only
/// when they touch users of the same shard at the same moment.
const SHARDS: usize = 64;

pub struct Accounts {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    max_connections: u32,
    limits: PolicyLimits,
}

#[derive(Default)]
struct Shard {
    /// User hash → the account.
    accounts: HashMap<u64, Account, BuildHasherDefault<Prehashed>>,
    /// (user, device) hash → that device's sessions here.
    devices: HashMap<u64, u32, BuildHasherDefault<Prehashed>>,
}

struct Account {
    /// Devices with a session here.
    devices: u32,
    budget: AccountBudget,
}

/// Why a Hello is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooManyConnections {
    /// Devices of the account connected here.
    pub held: u32,
    pub max: u32,
}

impl Accounts {
    pub fn new(max_connections_per_account: u32, limits: PolicyLimits) -> Self {
        Accounts {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            max_connections: max_connections_per_account,
            limits,
        }
    }

    fn user_key(&self, user_id: &str) -> u64 {
        self.hasher.hash_one(user_id)
    }

    fn device_key(&self, user_id: &str, device_id: &str) -> u64 {
        self.hasher.hash_one((user_id, device_id))
    }

    /// The shard of a user: bits 32.. of its hash (the maps index by the
    /// low bits and tag by the top ones, which stay spread within a shard).
    fn shard(&self, user: u64) -> MutexGuard<'_, Shard> {
        let index = (user >> 32) as usize % SHARDS;
        // A panic while holding a shard cannot leave it half-updated
        // (each update is a few integer writes); keep serving.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A Hello of `user_id` from `device_id` at `now_ms` was authenticated:
    /// registers the session, unless the account already has
    /// `max_connections_per_account` other devices connected here.
    pub fn open(
        &self,
        user_id: &str,
        device_id: &str,
        now_ms: u64,
    ) -> Result<(), TooManyConnections> {
        let user = self.user_key(user_id);
        let device = self.device_key(user_id, device_id);
        let mut shard = self.shard(user);
        let Shard { accounts, devices } = &mut *shard;
        if let Some(sessions) = devices.get_mut(&device) {
            // This device again: it replaces its connection.
            *sessions += 1;
            return Ok(());
        }
        let limits = &self.limits;
        let account = accounts.entry(user).or_insert_with(|| Account {
            devices: 0,
            budget: AccountBudget::new(limits, now_ms),
        });
        if account.devices >= self.max_connections {
            return Err(TooManyConnections {
                held: account.devices,
                max: self.max_connections,
            });
        }
        account.devices += 1;
        devices.insert(device, 1);
        Ok(())
    }

    /// A session [`open`](Self::open) registered has ended.
    pub fn close(&self, user_id: &str, device_id: &str) {
        let user = self.user_key(user_id);
        let device = self.device_key(user_id, device_id);
        let mut shard = self.shard(user);
        let Shard { accounts, devices } = &mut *shard;
        let Some(sessions) = devices.get_mut(&device) else {
            debug_assert!(false, "closing a session that was never opened");
            return;
        };
        *sessions -= 1;
        if *sessions > 0 {
            return;
        }
        devices.remove(&device);
        if let Some(account) = accounts.get_mut(&user) {
            account.devices -= 1;
            if account.devices == 0 {
                accounts.remove(&user);
            }
        }
    }

    /// Devices of `user_id` connected here.
    pub fn connections(&self, user_id: &str) -> u32 {
        let user = self.user_key(user_id);
        self.shard(user)
            .accounts
            .get(&user)
            .map_or(0, |a| a.devices)
    }

    /// Accounts with a session here.
    pub fn len(&self) -> usize {
        (0..SHARDS)
            .map(|i| {
                self.shards[i]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .accounts
                    .len()
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The budget of `user_id`'s account, for a request of one of its
    /// sessions (locked only if the request gets that far).
    pub fn budget<'a>(&'a self, user_id: &'a str) -> AccountRef<'a> {
        AccountRef {
            accounts: self,
            user_id,
        }
    }
}

/// One account's budget in the registry, looked up when a request is
/// charged to it.
pub struct AccountRef<'a> {
    accounts: &'a Accounts,
    user_id: &'a str,
}

impl AccountAccess for AccountRef<'_> {
    fn with_budget<R>(&mut self, f: impl FnOnce(&mut AccountBudget) -> R) -> R {
        let user = self.accounts.user_key(self.user_id);
        let mut shard = self.accounts.shard(user);
        match shard.accounts.get_mut(&user) {
            Some(account) => f(&mut account.budget),
            // Not registered (cannot happen while its session is open):
            // only the connection's own buckets apply.
            None => f(&mut AccountBudget::new(&self.accounts.limits, 0)),
        }
    }
}

/// The maps' keys are SipHash outputs already: use them as they are.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; this keeps any other input correct.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palaver_protocol::pb::{self, frame::Body};

    use crate::policy::{Admit, RequestPolicy};

    const LIMITS: PolicyLimits = PolicyLimits {
        max_body_bytes: 1000,
        max_sends_per_second: 10,
        max_requests_per_second: 100,
        max_requests_in_flight: 64,
        typing_coalesce_ms: 2_000,
        max_account_sends_per_second: 15,
        max_account_requests_per_second: 200,
    };

    #[test]
    fn an_account_holds_at_most_its_cap_of_devices_and_a_device_again_is_not_one_more() {
        let a = Accounts::new(3, LIMITS);
        for d in ["d1", "d2", "d3"] {
            a.open("alice", d, 0).unwrap();
        }
        assert_eq!(
            a.open("alice", "d4", 0),
            Err(TooManyConnections { held: 3, max: 3 })
        );
        // d2 reconnects (its older connection is being replaced): allowed.
        a.open("alice", "d2", 0).unwrap();
        assert_eq!(a.connections("alice"), 3);
        // Other users are not affected.
        a.open("bob", "d4", 0).unwrap();
        // The replaced d2 connection ends: d2 is still connected.
        a.close("alice", "d2");
        assert_eq!(a.open("alice", "d4", 0).map_err(|e| e.held), Err(3));
        // d2's newer connection ends too: room for d4.
        a.close("alice", "d2");
        assert_eq!(a.connections("alice"), 2);
        a.open("alice", "d4", 0).unwrap();
        for d in ["d1", "d3", "d4"] {
            a.close("alice", d);
        }
        a.close("bob", "d4");
        assert_eq!(a.connections("alice"), 0);
        assert!(a.is_empty(), "accounts go with their last session");
    }

    #[test]
    fn sessions_of_one_account_on_several_threads_share_one_budget() {
        let a = std::sync::Arc::new(Accounts::new(16, LIMITS));
        let send = Body::Send(pb::Send {
            conversation_id: "c".into(),
            client_msg_id: vec![1; 16],
            ..Default::default()
        });
        for i in 0..4 {
            a.open("alice", &format!("d{i}"), 0).unwrap();
        }
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (a, send) = (a.clone(), send.clone());
                std::thread::spawn(move || {
                    let mut p = RequestPolicy::new(&LIMITS, 0);
                    (0..10)
                        .filter(|_| {
                            p.admit(&LIMITS, &send, 0, &mut a.budget("alice")) == Admit::Forward
                        })
                        .count()
                })
            })
            .collect();
        let forwarded: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        // 4 connections with 10 sends of their own each; the account has 15.
        assert_eq!(forwarded, 15);
        for i in 0..4 {
            a.close("alice", &format!("d{i}"));
        }
        assert!(a.is_empty());
    }

    #[test]
    fn shards_spread_users() {
        let a = Accounts::new(16, LIMITS);
        let mut used = std::collections::HashSet::new();
        for i in 0..1000 {
            used.insert((a.user_key(&format!("u{i}")) >> 32) as usize % SHARDS);
        }
        assert_eq!(used.len(), SHARDS);
    }
}
