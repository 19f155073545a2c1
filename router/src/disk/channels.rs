//! `ChannelStore` on disk: a channel's record (with its counts) under its
//! id, its members as (channel, user) → role keys so a page is one range
//! scan and a membership check one lookup, read positions as (channel,
//! user) → seq. The rules are those of `memory/channels.rs`, over tables.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use crate::store::{ChannelChange, ChannelRecord, ChannelStore, StoreResult};

use super::*;

/// channel → (title, settings as protobuf, created ms, member count, admin
/// count). The counts change with the members, never counted over them.
type ChannelRow<'a> = (&'a str, &'a [u8], i64, u32, u32);
const CHANNELS: TableDefinition<&str, ChannelRow<'static>> = TableDefinition::new("channels");
/// (channel, user) → role. Apart from the groups' members: a channel's are
/// only ever read one user or one page at a time.
const CHANNEL_MEMBERS: TableDefinition<(&str, &str), i32> = TableDefinition::new("channel_members");
/// (channel, user) → read position (seq).
const CHANNEL_READS: TableDefinition<(&str, &str), u64> = TableDefinition::new("channel_reads");

const ADMIN: i32 = pb::Role::Admin as i32;
const MEMBER: i32 = pb::Role::Member as i32;

fn decode_record(conversation_id: &str, row: ChannelRow<'_>) -> DiskResult<ChannelRecord> {
    let (title, settings, created_ms, member_count, admin_count) = row;
    Ok(ChannelRecord {
        conversation_id: conversation_id.to_owned(),
        title: title.to_owned(),
        settings: pb::ChannelSettings::decode(settings)
            .map_err(|_| DiskError::Corrupt("channels"))?,
        created_ms,
        member_count,
        admin_count,
    })
}

/// Each user once, ascending (a user named twice counts once).
fn distinct(users: &[String]) -> BTreeSet<&str> {
    users.iter().map(String::as_str).collect()
}

impl ChannelStore for DiskStore {
    fn create_channel(
        &mut self,
        channel: &ChannelRecord,
        members: &[pb::Member],
    ) -> StoreResult<bool> {
        self.write(|txn| {
            let mut channels = txn.open_table(CHANNELS)?;
            let id = channel.conversation_id.as_str();
            if channels.get(id)?.is_some() {
                return Ok(false);
            }
            // A user listed twice is one member, with the last role given.
            let roles: BTreeMap<&str, i32> = members
                .iter()
                .map(|m| (m.user_id.as_str(), m.role() as i32))
                .collect();
            let admin_count = roles.values().filter(|r| **r == ADMIN).count() as u32;
            let settings = channel.settings.encode_to_vec();
            channels.insert(
                id,
                (
                    channel.title.as_str(),
                    settings.as_slice(),
                    channel.created_ms,
                    roles.len() as u32,
                    admin_count,
                ),
            )?;
            let mut table = txn.open_table(CHANNEL_MEMBERS)?;
            for (user_id, role) in roles {
                table.insert((id, user_id), role)?;
            }
            Ok(true)
        })
    }

    fn channel(&mut self, conversation_id: &str) -> StoreResult<Option<ChannelRecord>> {
        self.read(|txn| {
            let channels = txn.open_table(CHANNELS)?;
            let row = channels.get(conversation_id)?;
            row.map(|row| decode_record(conversation_id, row.value()))
                .transpose()
        })
    }

    fn channel_role(
        &mut self,
        conversation_id: &str,
        user_id: &str,
    ) -> StoreResult<Option<pb::Role>> {
        self.read(|txn| {
            let members = txn.open_table(CHANNEL_MEMBERS)?;
            let role = members.get((conversation_id, user_id))?;
            Ok(role.map(|r| pb::Role::try_from(r.value()).unwrap_or_default()))
        })
    }

    fn change_channel_members(
        &mut self,
        conversation_id: &str,
        add: &[String],
        promote: &[String],
        remove: &[String],
        max_members: u32,
    ) -> StoreResult<Option<ChannelChange>> {
        let (add, promote, remove) = (distinct(add), distinct(promote), distinct(remove));
        let id = conversation_id;
        // Decided before anything is written: the transaction is the whole
        // turn's, so this call could not roll back only its own writes.
        let verdict = self.read(|txn| {
            let channels = txn.open_table(CHANNELS)?;
            let Some(row) = channels.get(id)? else {
                return Ok(None);
            };
            let (_, _, _, member_count, _) = row.value();
            let members = txn.open_table(CHANNEL_MEMBERS)?;
            let mut joining = 0u64;
            for user in &add {
                joining += u64::from(members.get((id, *user))?.is_none());
            }
            let mut leaving = 0u64;
            for user in &remove {
                leaving += u64::from(members.get((id, *user))?.is_some());
            }
            let after = u64::from(member_count) + joining - leaving.min(u64::from(member_count));
            Ok(Some(after <= u64::from(max_members)))
        })?;
        match verdict {
            None => return Ok(Some(ChannelChange::default())),
            Some(false) => return Ok(None),
            Some(true) => {}
        }
        self.write(|txn| {
            let mut channels = txn.open_table(CHANNELS)?;
            let (title, settings, created_ms, mut member_count, mut admin_count) = {
                let row = channels.get(id)?.ok_or(DiskError::Corrupt("channels"))?;
                let (title, settings, created_ms, members, admins) = row.value();
                (
                    title.to_owned(),
                    settings.to_vec(),
                    created_ms,
                    members,
                    admins,
                )
            };
            let mut members = txn.open_table(CHANNEL_MEMBERS)?;
            let mut reads = txn.open_table(CHANNEL_READS)?;
            let mut change = ChannelChange::default();
            for user in add {
                if members.get((id, user))?.is_none() {
                    members.insert((id, user), MEMBER)?;
                    change.added.push(user.to_owned());
                }
            }
            for user in promote {
                let role = members.get((id, user))?.map(|r| r.value());
                if role.is_some_and(|r| r != ADMIN) {
                    members.insert((id, user), ADMIN)?;
                    change.promoted.push(user.to_owned());
                }
            }
            let mut admins_left = 0;
            for user in remove {
                let role = members.remove((id, user))?.map(|r| r.value());
                if let Some(role) = role {
                    admins_left += u32::from(role == ADMIN);
                    reads.remove((id, user))?;
                    change.removed.push(user.to_owned());
                }
            }
            // Checked: counts that do not match the members are a corrupt
            // file, answered as such rather than wrapped or panicked on.
            let corrupt = || DiskError::Corrupt("channels");
            member_count = (member_count + change.added.len() as u32)
                .checked_sub(change.removed.len() as u32)
                .ok_or_else(corrupt)?;
            admin_count = (admin_count + change.promoted.len() as u32)
                .checked_sub(admins_left)
                .ok_or_else(corrupt)?;
            channels.insert(
                id,
                (
                    title.as_str(),
                    settings.as_slice(),
                    created_ms,
                    member_count,
                    admin_count,
                ),
            )?;
            change.member_count = member_count;
            change.admin_count = admin_count;
            Ok(Some(change))
        })
    }

    fn channel_members(
        &mut self,
        conversation_id: &str,
        after_user_id: &str,
        limit: usize,
    ) -> StoreResult<(Vec<pb::Member>, bool)> {
        self.read(|txn| {
            let members = txn.open_table(CHANNEL_MEMBERS)?;
            let id = conversation_id;
            let next = after(id);
            let from = match after_user_id {
                "" => Bound::Included((id, "")),
                after => Bound::Excluded((id, after)),
            };
            let to = Bound::Excluded((next.as_str(), ""));
            let mut page = members.range((from, to))?;
            let mut got = Vec::new();
            while got.len() < limit {
                let Some(entry) = page.next() else {
                    return Ok((got, false));
                };
                let (key, role) = entry?;
                got.push(pb::Member {
                    user_id: key.value().1.to_owned(),
                    role: role.value(),
                });
            }
            let more = page.next().transpose()?.is_some();
            Ok((got, more))
        })
    }

    fn raise_read_position(
        &mut self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
    ) -> StoreResult<u64> {
        self.write(|txn| {
            if txn.open_table(CHANNELS)?.get(conversation_id)?.is_none() {
                return Ok(0);
            }
            let mut reads = txn.open_table(CHANNEL_READS)?;
            let key = (conversation_id, user_id);
            let position = reads.get(key)?.map_or(0, |v| v.value());
            if seq > position {
                reads.insert(key, seq)?;
                return Ok(seq);
            }
            Ok(position)
        })
    }

    fn read_position(&mut self, conversation_id: &str, user_id: &str) -> StoreResult<u64> {
        self.read(|txn| {
            let reads = txn.open_table(CHANNEL_READS)?;
            let position = reads.get((conversation_id, user_id))?;
            Ok(position.map_or(0, |v| v.value()))
        })
    }
}
