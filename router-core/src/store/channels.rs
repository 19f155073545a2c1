//! Channels (SPEC §21): conversations of up to 100,000 members, fanned out
//! on read. Their members are not a list inside a record (a group's are, at
//! most 1,000): a channel keeps a set of (user, role), so every call here
//! costs the same at 10 members and at 100,000 — one membership lookup per
//! Send, one page per ListMembers, counters kept beside the set. Every call
//! touches the keys of one channel (one Redis hash tag, one script).

use palaver_protocol::pb;

use super::StoreResult;

/// A channel as stored, without its members.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelRecord {
    pub conversation_id: String,
    pub title: String,
    pub settings: pb::ChannelSettings,
    pub created_ms: i64,
    /// Members now, admins included.
    pub member_count: u32,
    /// Admins now (the last one may not leave while others stay).
    pub admin_count: u32,
}

/// What [`ChannelStore::change_channel_members`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelChange {
    /// Users who were not members and now are, ascending.
    pub added: Vec<String>,
    /// Members who now are not, ascending.
    pub removed: Vec<String>,
    /// Members (already, or just added) who became admins, ascending.
    pub promoted: Vec<String>,
    pub member_count: u32,
    pub admin_count: u32,
}

pub trait ChannelStore {
    /// Creates the channel with `members` (each user once; roles as given,
    /// the creator an admin). False, changing nothing, if it exists.
    fn create_channel(
        &mut self,
        channel: &ChannelRecord,
        members: &[pb::Member],
    ) -> StoreResult<bool>;

    /// The channel with its counts now; None if there is none.
    fn channel(&mut self, conversation_id: &str) -> StoreResult<Option<ChannelRecord>>;

    /// The user's role in the channel, None if not a member (or no such
    /// channel). One lookup, whatever the member count.
    fn channel_role(
        &mut self,
        conversation_id: &str,
        user_id: &str,
    ) -> StoreResult<Option<pb::Role>>;

    /// Atomically: `add` join as members (members already are untouched),
    /// `promote` become admins (members, or added in this call), `remove`
    /// leave (non-members ignored). The caller has checked the lists are
    /// disjoint where they must be (SPEC §11). If the members after would be
    /// more than `max_members`, nothing changes and the answer is None.
    /// Without the channel, nothing changes and the answer is an empty
    /// change with counts 0.
    fn change_channel_members(
        &mut self,
        conversation_id: &str,
        add: &[String],
        promote: &[String],
        remove: &[String],
        max_members: u32,
    ) -> StoreResult<Option<ChannelChange>>;

    /// Up to `limit` members with user ids bytewise after `after_user_id`
    /// ("" from the start), ascending, and whether more follow.
    fn channel_members(
        &mut self,
        conversation_id: &str,
        after_user_id: &str,
        limit: usize,
    ) -> StoreResult<(Vec<pb::Member>, bool)>;

    /// Raises the user's read position in the channel to `seq` (never
    /// lowers it); returns the position after. One key per (channel, user).
    fn raise_read_position(
        &mut self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
    ) -> StoreResult<u64>;

    /// The user's read position in the channel (0: none).
    fn read_position(&mut self, conversation_id: &str, user_id: &str) -> StoreResult<u64>;
}
