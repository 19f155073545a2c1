//! `impl ChannelStore for RedisStore`: every key of a channel carries its
//! id as hash tag (`c:{<conv>}:chan`, `:cm`, `:cr`, `:rp`, see `keys.rs`),
//! so each call is one command or one script in one slot, whatever the
//! member count: a role is one HGET, a page one `channel_page.lua`, a
//! change one `change_channel_members.lua` (its max_members check inside).

use std::collections::{BTreeMap, BTreeSet};

use palaver_protocol::pb;
use prost::Message as _;
use redis::{Script, Value};

use crate::store::{ChannelChange, ChannelRecord, ChannelStore, StoreResult};

use super::keys::conv_key;
use super::{corrupt, from_value, RedisStore};

/// The keys of one channel, in the order the scripts take them.
struct ChannelKeys {
    record: String,
    members: String,
    roles: String,
    reads: String,
}

impl ChannelKeys {
    fn of(conversation_id: &str) -> Self {
        Self {
            record: conv_key(conversation_id, "chan"),
            members: conv_key(conversation_id, "cm"),
            roles: conv_key(conversation_id, "cr"),
            reads: conv_key(conversation_id, "rp"),
        }
    }
}

fn role_of(value: &[u8]) -> StoreResult<pb::Role> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .and_then(|r| pb::Role::try_from(r).ok())
        .ok_or_else(|| corrupt(format!("channel role {:?}", String::from_utf8_lossy(value))))
}

fn number<T: std::str::FromStr>(field: &str, value: Option<Vec<u8>>) -> StoreResult<T> {
    value
        .as_deref()
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| corrupt(format!("channel record field {field}")))
}

/// Each user once, ascending: the script's answer lists come out so.
fn distinct(users: &[String]) -> Vec<&str> {
    users
        .iter()
        .map(String::as_str)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

impl RedisStore {
    /// Runs one script (loaded again if Redis lost it) and returns its reply.
    fn run_script(
        &mut self,
        script: impl FnOnce(&super::Scripts) -> &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> StoreResult<Value> {
        let cmd = Self::evalsha(script(&self.scripts), keys, args);
        self.pipeline(vec![cmd])?
            .pop()
            .ok_or_else(|| corrupt("no reply to a channel script"))
    }
}

impl ChannelStore for RedisStore {
    fn create_channel(
        &mut self,
        channel: &ChannelRecord,
        members: &[pb::Member],
    ) -> StoreResult<bool> {
        let keys = ChannelKeys::of(&channel.conversation_id);
        // A user listed twice is one member, with the last role given.
        let roles: BTreeMap<&str, i32> = members
            .iter()
            .map(|m| (m.user_id.as_str(), m.role() as i32))
            .collect();
        let admin_count = roles
            .values()
            .filter(|r| **r == pb::Role::Admin as i32)
            .count();
        let head = [
            channel.title.clone().into_bytes(),
            channel.settings.encode_to_vec(),
            channel.created_ms.to_string().into_bytes(),
            roles.len().to_string().into_bytes(),
            admin_count.to_string().into_bytes(),
        ];
        let role_args: Vec<(&str, String)> = roles
            .iter()
            .map(|(user, role)| (*user, role.to_string()))
            .collect();
        let mut args: Vec<&[u8]> = head.iter().map(Vec::as_slice).collect();
        for (user, role) in &role_args {
            args.push(user.as_bytes());
            args.push(role.as_bytes());
        }
        let reply = self.run_script(
            |s| &s.create_channel,
            &[&keys.record, &keys.members, &keys.roles, &keys.reads],
            &args,
        )?;
        Ok(from_value::<i64>(reply)? == 1)
    }

    fn channel(&mut self, conversation_id: &str) -> StoreResult<Option<ChannelRecord>> {
        let fields: Vec<Option<Vec<u8>>> = self.query(
            redis::cmd("HMGET")
                .arg(conv_key(conversation_id, "chan"))
                .arg(&[
                    "title",
                    "settings",
                    "created_ms",
                    "member_count",
                    "admin_count",
                ]),
        )?;
        let mut fields = fields.into_iter();
        let mut next = || fields.next().flatten();
        let Some(title) = next() else {
            return Ok(None);
        };
        let settings = next().unwrap_or_default();
        Ok(Some(ChannelRecord {
            conversation_id: conversation_id.to_owned(),
            title: String::from_utf8(title).map_err(|_| corrupt("channel title"))?,
            settings: pb::ChannelSettings::decode(settings.as_slice())
                .map_err(|_| corrupt("channel settings"))?,
            created_ms: number("created_ms", next())?,
            member_count: number("member_count", next())?,
            admin_count: number("admin_count", next())?,
        }))
    }

    fn channel_role(
        &mut self,
        conversation_id: &str,
        user_id: &str,
    ) -> StoreResult<Option<pb::Role>> {
        let role: Option<Vec<u8>> = self.query(
            redis::cmd("HGET")
                .arg(conv_key(conversation_id, "cr"))
                .arg(user_id),
        )?;
        role.as_deref().map(role_of).transpose()
    }

    fn change_channel_members(
        &mut self,
        conversation_id: &str,
        add: &[String],
        promote: &[String],
        remove: &[String],
        max_members: u32,
    ) -> StoreResult<Option<ChannelChange>> {
        let keys = ChannelKeys::of(conversation_id);
        let (add, promote, remove) = (distinct(add), distinct(promote), distinct(remove));
        let head = [
            max_members.to_string(),
            (pb::Role::Admin as i32).to_string(),
            (pb::Role::Member as i32).to_string(),
            add.len().to_string(),
            promote.len().to_string(),
        ];
        let mut args: Vec<&[u8]> = head.iter().map(String::as_bytes).collect();
        args.extend(
            add.iter()
                .chain(&promote)
                .chain(&remove)
                .map(|u| u.as_bytes()),
        );
        let reply = self.run_script(
            |s| &s.change_channel_members,
            &[&keys.record, &keys.members, &keys.roles, &keys.reads],
            &args,
        )?;
        let reply: Vec<Value> = from_value(reply)?;
        let mut reply = reply.into_iter();
        let mut int = || -> StoreResult<i64> { from_value(reply.next().unwrap_or(Value::Nil)) };
        match int()? {
            0 => return Ok(Some(ChannelChange::default())),
            1 => return Ok(None),
            2 => {}
            other => return Err(corrupt(format!("channel change status {other}"))),
        }
        let count = |v: i64| u32::try_from(v).map_err(|_| corrupt("channel count"));
        let member_count = count(int()?)?;
        let admin_count = count(int()?)?;
        let added = usize::try_from(int()?).map_err(|_| corrupt("channel change"))?;
        let promoted = usize::try_from(int()?).map_err(|_| corrupt("channel change"))?;
        let mut users = reply
            .map(from_value::<String>)
            .collect::<StoreResult<Vec<_>>>()?;
        if users.len() < added + promoted {
            return Err(corrupt("channel change lists"));
        }
        let removed = users.split_off(added + promoted);
        let promoted = users.split_off(added);
        Ok(Some(ChannelChange {
            added: users,
            removed,
            promoted,
            member_count,
            admin_count,
        }))
    }

    fn channel_members(
        &mut self,
        conversation_id: &str,
        after_user_id: &str,
        limit: usize,
    ) -> StoreResult<(Vec<pb::Member>, bool)> {
        let keys = ChannelKeys::of(conversation_id);
        // Lua counts in doubles: a limit past 2^40 is as good as none.
        let limit = limit.min(1 << 40).to_string();
        let reply = self.run_script(
            |s| &s.channel_page,
            &[&keys.members, &keys.roles],
            &[after_user_id.as_bytes(), limit.as_bytes()],
        )?;
        let reply: Vec<Value> = from_value(reply)?;
        let mut reply = reply.into_iter();
        let more: i64 = from_value(reply.next().unwrap_or(Value::Nil))?;
        let mut members = Vec::with_capacity(reply.len() / 2);
        while let Some(user_id) = reply.next() {
            let role: Vec<u8> = from_value(reply.next().unwrap_or(Value::Nil))?;
            members.push(pb::Member {
                user_id: from_value(user_id)?,
                role: role_of(&role)? as i32,
            });
        }
        Ok((members, more == 1))
    }

    fn raise_read_position(
        &mut self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
    ) -> StoreResult<u64> {
        let keys = ChannelKeys::of(conversation_id);
        let seq = seq.to_string();
        let reply = self.run_script(
            |s| &s.raise_read_position,
            &[&keys.record, &keys.reads],
            &[user_id.as_bytes(), seq.as_bytes()],
        )?;
        let position: String = from_value(reply)?;
        position
            .parse()
            .map_err(|_| corrupt(format!("channel read position {position:?}")))
    }

    fn read_position(&mut self, conversation_id: &str, user_id: &str) -> StoreResult<u64> {
        let position: Option<u64> = self.query(
            redis::cmd("HGET")
                .arg(conv_key(conversation_id, "rp"))
                .arg(user_id),
        )?;
        Ok(position.unwrap_or(0))
    }
}
