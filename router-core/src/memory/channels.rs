//! `impl ChannelStore for MemoryStore`: a channel's members in an ordered
//! map beside its record (pages walk it from a key), read positions in a
//! hash map; counts kept as members come and go.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;

use palaver_protocol::pb;

use crate::store::{ChannelChange, ChannelRecord, ChannelStore, StoreResult};

use super::MemoryStore;

pub(super) struct ChannelState {
    record: ChannelRecord,
    members: BTreeMap<String, pb::Role>,
    read_positions: HashMap<String, u64>,
}

/// Each user once, ascending: a user named twice counts once against
/// max_members (and never leaves twice), and the change's lists come out
/// ascending.
fn distinct(users: &[String]) -> BTreeSet<&String> {
    users.iter().collect()
}

impl ChannelStore for MemoryStore {
    fn create_channel(
        &mut self,
        channel: &ChannelRecord,
        members: &[pb::Member],
    ) -> StoreResult<bool> {
        let state = self
            .conversations
            .entry(channel.conversation_id.clone())
            .or_default();
        if state.channel.is_some() {
            return Ok(false);
        }
        let members: BTreeMap<String, pb::Role> = members
            .iter()
            .map(|m| (m.user_id.clone(), m.role()))
            .collect();
        let mut record = channel.clone();
        record.member_count = members.len() as u32;
        record.admin_count = members.values().filter(|r| **r == pb::Role::Admin).count() as u32;
        state.channel = Some(ChannelState {
            record,
            members,
            read_positions: HashMap::new(),
        });
        Ok(true)
    }

    fn channel(&mut self, conversation_id: &str) -> StoreResult<Option<ChannelRecord>> {
        Ok(self
            .conversations
            .get(conversation_id)
            .and_then(|c| c.channel.as_ref())
            .map(|c| c.record.clone()))
    }

    fn channel_role(
        &mut self,
        conversation_id: &str,
        user_id: &str,
    ) -> StoreResult<Option<pb::Role>> {
        Ok(self
            .conversations
            .get(conversation_id)
            .and_then(|c| c.channel.as_ref())
            .and_then(|c| c.members.get(user_id).copied()))
    }

    fn change_channel_members(
        &mut self,
        conversation_id: &str,
        add: &[String],
        promote: &[String],
        remove: &[String],
        max_members: u32,
    ) -> StoreResult<Option<ChannelChange>> {
        let Some(channel) = self
            .conversations
            .get_mut(conversation_id)
            .and_then(|c| c.channel.as_mut())
        else {
            return Ok(Some(ChannelChange::default()));
        };
        let (add, promote, remove) = (distinct(add), distinct(promote), distinct(remove));
        let joining = add
            .iter()
            .filter(|u| !channel.members.contains_key(u.as_str()))
            .count();
        let leaving = remove
            .iter()
            .filter(|u| channel.members.contains_key(u.as_str()))
            .count();
        if channel.members.len() + joining - leaving > max_members as usize {
            return Ok(None);
        }
        let mut change = ChannelChange::default();
        for user in add {
            if !channel.members.contains_key(user) {
                channel.members.insert(user.clone(), pb::Role::Member);
                change.added.push(user.clone());
            }
        }
        for user in promote {
            if let Some(role) = channel.members.get_mut(user) {
                if *role != pb::Role::Admin {
                    *role = pb::Role::Admin;
                    change.promoted.push(user.clone());
                }
            }
        }
        let mut admins_left = 0;
        for user in remove {
            if let Some(role) = channel.members.remove(user) {
                admins_left += u32::from(role == pb::Role::Admin);
                channel.read_positions.remove(user);
                change.removed.push(user.clone());
            }
        }
        // Kept as they change, never counted over the members.
        channel.record.member_count = channel.members.len() as u32;
        channel.record.admin_count =
            channel.record.admin_count + change.promoted.len() as u32 - admins_left;
        change.member_count = channel.record.member_count;
        change.admin_count = channel.record.admin_count;
        Ok(Some(change))
    }

    fn channel_members(
        &mut self,
        conversation_id: &str,
        after_user_id: &str,
        limit: usize,
    ) -> StoreResult<(Vec<pb::Member>, bool)> {
        let Some(channel) = self
            .conversations
            .get(conversation_id)
            .and_then(|c| c.channel.as_ref())
        else {
            return Ok((Vec::new(), false));
        };
        let from = match after_user_id {
            "" => Bound::Unbounded,
            after => Bound::Excluded(after),
        };
        let mut page = channel
            .members
            .range::<str, _>((from, Bound::Unbounded))
            .map(|(user_id, role)| pb::Member {
                user_id: user_id.clone(),
                role: *role as i32,
            });
        let members: Vec<pb::Member> = page.by_ref().take(limit).collect();
        let more = page.next().is_some();
        Ok((members, more))
    }

    fn raise_read_position(
        &mut self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
    ) -> StoreResult<u64> {
        let Some(channel) = self
            .conversations
            .get_mut(conversation_id)
            .and_then(|c| c.channel.as_mut())
        else {
            return Ok(0);
        };
        let position = channel
            .read_positions
            .entry(user_id.to_owned())
            .or_default();
        *position = (*position).max(seq);
        Ok(*position)
    }

    fn read_position(&mut self, conversation_id: &str, user_id: &str) -> StoreResult<u64> {
        Ok(self
            .conversations
            .get(conversation_id)
            .and_then(|c| c.channel.as_ref())
            .and_then(|c| c.read_positions.get(user_id).copied())
            .unwrap_or(0))
    }
}
