//! A store wrapper that counts calls per method (to check batch-friendliness:
//! no per-recipient round trips) and the items its reads return (to check
//! that work does not grow with data an asker may not see), and can be told
//! to fail.
// Each test binary uses part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use palaver_protocol::pb;
use palaver_router_core::store::*;
use palaver_router_core::MemoryStore;

/// Counts per store method, sorted by method name.
pub type Counts = Vec<(&'static str, usize)>;

#[derive(Default)]
pub struct Instrumented {
    pub inner: MemoryStore,
    pub calls: HashMap<&'static str, usize>,
    /// Items returned by reads, per method (conversation ids, group
    /// members, answers per pair, ...).
    pub items: HashMap<&'static str, usize>,
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

    /// Counts `n` items returned by `name`.
    fn returned<T>(
        &mut self,
        name: &'static str,
        result: StoreResult<T>,
        n: impl Fn(&T) -> usize,
    ) -> StoreResult<T> {
        if let Ok(value) = &result {
            *self.items.entry(name).or_default() += n(value);
        }
        result
    }

    /// Everything the store did for the router so far, comparable between
    /// two runs: calls per method, items returned per method, and the
    /// memory store's own visibility lookups.
    pub fn work(&self) -> (Counts, Counts, u64) {
        let mut calls: Vec<_> = self.calls.iter().map(|(k, v)| (*k, *v)).collect();
        calls.sort();
        let mut items: Vec<_> = self.items.iter().map(|(k, v)| (*k, *v)).collect();
        items.sort();
        (calls, items, self.inner.visibility_lookups())
    }

    /// Forgets the counts so far (the store's data stays).
    pub fn reset_counts(&mut self) -> u64 {
        self.calls.clear();
        self.items.clear();
        self.inner.visibility_lookups()
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
    fn history_epoch(&mut self) -> StoreResult<u64> {
        self.call("history_epoch")?.history_epoch()
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
        let r = self.call("senders_between")?.senders_between(c, a, b);
        self.returned("senders_between", r, Vec::len)
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
        let r = self.call("groups")?.groups(ids);
        self.returned("groups", r, |g| {
            g.iter().flatten().map(|g| g.members.len()).sum()
        })
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
    fn written_by_both(&mut self, ids: &[String]) -> StoreResult<Vec<bool>> {
        let r = self.call("written_by_both")?.written_by_both(ids);
        self.returned("written_by_both", r, Vec::len)
    }
    fn members_among(&mut self, c: &str, users: &[String]) -> StoreResult<Vec<bool>> {
        let r = self.call("members_among")?.members_among(c, users);
        self.returned("members_among", r, Vec::len)
    }
}

impl UserStore for Instrumented {
    fn conversations_of_user(&mut self, u: &str) -> StoreResult<Vec<String>> {
        let r = self.call("conversations_of_user")?.conversations_of_user(u);
        self.returned("conversations_of_user", r, Vec::len)
    }
    fn group_counts(&mut self, users: &[String]) -> StoreResult<Vec<usize>> {
        let r = self.call("group_counts")?.group_counts(users);
        self.returned("group_counts", r, Vec::len)
    }
    fn presence_links(&mut self, pairs: &[(&str, &str)]) -> StoreResult<Vec<bool>> {
        let r = self.call("presence_links")?.presence_links(pairs);
        self.returned("presence_links", r, Vec::len)
    }
    fn group_adds_on(
        &mut self,
        day: i64,
        adder: &str,
        users: &[String],
    ) -> StoreResult<Vec<GroupAdds>> {
        let r = self.call("group_adds_on")?.group_adds_on(day, adder, users);
        self.returned("group_adds_on", r, Vec::len)
    }
    fn count_group_adds(
        &mut self,
        day: i64,
        adder: &str,
        adds: &[(String, bool)],
    ) -> StoreResult<()> {
        self.call("count_group_adds")?
            .count_group_adds(day, adder, adds)
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
        let r = self.call("presence_of_users")?.presence_of_users(users);
        self.returned("presence_of_users", r, Vec::len)
    }
}

impl PushStore for Instrumented {
    fn register_push_token(
        &mut self,
        u: &str,
        d: &str,
        t: &PushToken,
        max: usize,
    ) -> StoreResult<Registered> {
        self.call("register_push_token")?
            .register_push_token(u, d, t, max)
    }
    fn unregister_push_token(&mut self, u: &str, d: &str) -> StoreResult<bool> {
        self.call("unregister_push_token")?
            .unregister_push_token(u, d)
    }
    fn push_tokens(&mut self, u: &str) -> StoreResult<Vec<DeviceToken>> {
        self.call("push_tokens")?.push_tokens(u)
    }
    fn invalidate_push_token(&mut self, u: &str, d: &str, t: &str, at: i64) -> StoreResult<bool> {
        self.call("invalidate_push_token")?
            .invalidate_push_token(u, d, t, at)
    }
    fn set_mute(
        &mut self,
        u: &str,
        c: &str,
        m: Option<Mute>,
        now: i64,
        max: usize,
    ) -> StoreResult<bool> {
        self.call("set_mute")?.set_mute(u, c, m, now, max)
    }
    fn mute_of(&mut self, u: &str, c: &str, now: i64) -> StoreResult<Option<Mute>> {
        self.call("mute_of")?.mute_of(u, c, now)
    }
    fn recipients<U: AsRef<str>>(&mut self, users: &[U]) -> StoreResult<Recipients> {
        self.call("recipients")?.recipients(users)
    }
    fn push_context(&mut self, u: &str, c: &str, seq: u64, now: i64) -> StoreResult<PushContext> {
        self.call("push_context")?.push_context(u, c, seq, now)
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

impl ChannelStore for Instrumented {
    fn create_channel(
        &mut self,
        channel: &ChannelRecord,
        members: &[pb::Member],
    ) -> StoreResult<bool> {
        self.call("create_channel")?
            .create_channel(channel, members)
    }

    fn channel(&mut self, conversation_id: &str) -> StoreResult<Option<ChannelRecord>> {
        self.call("channel")?.channel(conversation_id)
    }

    fn channel_role(
        &mut self,
        conversation_id: &str,
        user_id: &str,
    ) -> StoreResult<Option<pb::Role>> {
        self.call("channel_role")?
            .channel_role(conversation_id, user_id)
    }

    fn change_channel_members(
        &mut self,
        conversation_id: &str,
        add: &[String],
        promote: &[String],
        remove: &[String],
        max_members: u32,
    ) -> StoreResult<Option<ChannelChange>> {
        self.call("change_channel_members")?.change_channel_members(
            conversation_id,
            add,
            promote,
            remove,
            max_members,
        )
    }

    fn channel_members(
        &mut self,
        conversation_id: &str,
        after_user_id: &str,
        limit: usize,
    ) -> StoreResult<(Vec<pb::Member>, bool)> {
        let result =
            self.call("channel_members")?
                .channel_members(conversation_id, after_user_id, limit);
        self.returned("channel_members", result, |(members, _)| members.len())
    }

    fn raise_read_position(
        &mut self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
    ) -> StoreResult<u64> {
        self.call("raise_read_position")?
            .raise_read_position(conversation_id, user_id, seq)
    }

    fn read_position(&mut self, conversation_id: &str, user_id: &str) -> StoreResult<u64> {
        self.call("read_position")?
            .read_position(conversation_id, user_id)
    }
}
