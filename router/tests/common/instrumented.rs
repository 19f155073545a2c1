//! A store wrapper that counts calls per method (to check batch-friendliness:
//! no per-recipient round trips) and can be told to fail.
// Each test binary uses part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use palaver_protocol::pb;
use palaver_router::store::*;
use palaver_router::MemoryStore;

#[derive(Default)]
pub struct Instrumented {
    pub inner: MemoryStore,
    pub calls: HashMap<&'static str, usize>,
    /// When set, every call fails with `StoreError::Unavailable`.
    pub failing: bool,
    /// When set, calls of this one method fail that way.
    pub fail_on: Option<&'static str>,
    /// When set, calls of this one method panic (a stand-in for a bug).
    pub panic_on: Option<&'static str>,
    /// Encoded bytes of the messages the reads returned, and group records
    /// read: the work a request made the store do.
    pub message_bytes_read: usize,
    pub group_records_read: usize,
}

impl Instrumented {
    fn call(&mut self, name: &'static str) -> StoreResult<&mut MemoryStore> {
        *self.calls.entry(name).or_default() += 1;
        if self.panic_on == Some(name) {
            panic!("test: {name} panics");
        }
        if self.failing || self.fail_on == Some(name) {
            return Err(StoreError::Unavailable("test says so".into()));
        }
        Ok(&mut self.inner)
    }

    pub fn count(&self, name: &str) -> usize {
        self.calls.get(name).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.calls.values().sum()
    }
}

impl ConversationStore for Instrumented {
    fn append_message(&mut self, c: &str, m: pb::Message, r: &Retention) -> StoreResult<Appended> {
        self.call("append_message")?.append_message(c, m, r)
    }
    fn append_messages(
        &mut self,
        appends: Vec<(String, pb::Message)>,
        r: &Retention,
    ) -> StoreResult<Vec<Appended>> {
        self.call("append_messages")?.append_messages(appends, r)
    }
    fn last_seqs(&mut self, ids: &[String]) -> StoreResult<Vec<u64>> {
        self.call("last_seqs")?.last_seqs(ids)
    }
    fn messages_after(&mut self, reads: &[RangeRead]) -> StoreResult<Vec<Vec<pb::Message>>> {
        let found = self.call("messages_after")?.messages_after(reads)?;
        self.message_bytes_read += found.iter().flatten().map(message_size).sum::<usize>();
        Ok(found)
    }
    fn messages_before(
        &mut self,
        c: &str,
        before: u64,
        limit: usize,
        max_bytes: usize,
    ) -> StoreResult<HistorySlice> {
        let slice = self
            .call("messages_before")?
            .messages_before(c, before, limit, max_bytes)?;
        self.message_bytes_read += slice.messages.iter().map(message_size).sum::<usize>();
        Ok(slice)
    }
    fn find_duplicates(
        &mut self,
        appends: Vec<(String, pb::Message)>,
        r: &Retention,
    ) -> StoreResult<Vec<Option<pb::SendAck>>> {
        self.call("find_duplicates")?.find_duplicates(appends, r)
    }
    fn charge_quotas(&mut self, charges: &[QuotaCharge]) -> StoreResult<Vec<bool>> {
        self.call("charge_quotas")?.charge_quotas(charges)
    }
    fn senders_between(&mut self, c: &str, a: u64, b: u64) -> StoreResult<Vec<String>> {
        self.call("senders_between")?.senders_between(c, a, b)
    }
    fn advance_receipt(
        &mut self,
        c: &str,
        u: &str,
        k: pb::ReceiptKind,
        s: u64,
    ) -> StoreResult<Option<u64>> {
        self.call("advance_receipt")?.advance_receipt(c, u, k, s)
    }
    fn create_group(&mut self, g: &GroupRecord) -> StoreResult<bool> {
        self.call("create_group")?.create_group(g)
    }
    fn groups(&mut self, ids: &[String]) -> StoreResult<Vec<Option<GroupRecord>>> {
        self.group_records_read += ids.len();
        self.call("groups")?.groups(ids)
    }
    fn membership(&mut self, c: &str, u: &str) -> StoreResult<Membership> {
        self.call("membership")?.membership(c, u)
    }
    fn update_members(
        &mut self,
        c: &str,
        upsert: &[pb::Member],
        remove: &[String],
    ) -> StoreResult<()> {
        self.call("update_members")?
            .update_members(c, upsert, remove)
    }
}

impl UserStore for Instrumented {
    fn conversations_of_user(&mut self, u: &str) -> StoreResult<Vec<String>> {
        self.call("conversations_of_user")?.conversations_of_user(u)
    }
    fn add_conversation_to_users(&mut self, c: &str, users: &[String]) -> StoreResult<()> {
        self.call("add_conversation_to_users")?
            .add_conversation_to_users(c, users)
    }
    fn remove_conversation_from_users(&mut self, c: &str, users: &[String]) -> StoreResult<()> {
        self.call("remove_conversation_from_users")?
            .remove_conversation_from_users(c, users)
    }
    fn mark_push_pending<U: AsRef<str>>(&mut self, c: &str, users: &[U]) -> StoreResult<Vec<bool>> {
        self.call("mark_push_pending")?.mark_push_pending(c, users)
    }
    fn clear_push_pending(&mut self, u: &str, c: Option<&str>) -> StoreResult<()> {
        self.call("clear_push_pending")?.clear_push_pending(u, c)
    }
}

impl SessionStore for Instrumented {
    fn apply_sessions(
        &mut self,
        g: &str,
        lease: Duration,
        now: i64,
        changes: &[SessionChange],
    ) -> StoreResult<SessionsApplied> {
        self.call("apply_sessions")?
            .apply_sessions(g, lease, now, changes)
    }
    fn sessions_of_users<U: AsRef<str>>(&mut self, users: &[U]) -> StoreResult<UserSessions> {
        self.call("sessions_of_users")?.sessions_of_users(users)
    }
    fn presence_of_users(&mut self, users: &[String]) -> StoreResult<Vec<UserPresence>> {
        self.call("presence_of_users")?.presence_of_users(users)
    }
}

impl GatewayRegistry for Instrumented {
    fn register_gateway(
        &mut self,
        g: &str,
        lease: Duration,
        now: i64,
    ) -> StoreResult<Vec<pb::Presence>> {
        self.call("register_gateway")?
            .register_gateway(g, lease, now)
    }
    fn dead_gateways(&mut self) -> StoreResult<Vec<String>> {
        self.call("dead_gateways")?.dead_gateways()
    }
    fn reap_gateway(
        &mut self,
        dead: &str,
        reaper: &str,
        now: i64,
    ) -> StoreResult<Option<Vec<pb::Presence>>> {
        self.call("reap_gateway")?.reap_gateway(dead, reaper, now)
    }
    fn rejoin_if_forgotten(&mut self, g: &str, lease: Duration, now: i64) -> StoreResult<bool> {
        self.call("rejoin_if_forgotten")?
            .rejoin_if_forgotten(g, lease, now)
    }
    fn deregister_gateway(&mut self, g: &str, now: i64) -> StoreResult<Vec<pb::Presence>> {
        self.call("deregister_gateway")?.deregister_gateway(g, now)
    }
}
