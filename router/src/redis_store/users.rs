//! `impl UserStore for RedisStore`: each user's conversations, groups,
//! pending pushes and group-add counts, and the presence links (SPEC §10).

use redis::Value;

use crate::store::{GroupAdds, StoreResult, UserStore};

use super::keys::{adds_key, conv_key, user_key};
use super::{from_value, RedisStore};

/// Group-add counts live two days: the day's limit reads the current day.
const ADDS_TTL_S: u64 = 2 * 24 * 60 * 60;

impl UserStore for RedisStore {
    fn conversations_of_user(&mut self, user_id: &str) -> StoreResult<Vec<String>> {
        self.query(redis::cmd("SMEMBERS").arg(user_key(user_id, "convs")))
    }

    fn add_conversation_to_users(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<()> {
        let mut cmds = each_user(user_ids, "SADD", "convs", conversation_id);
        if palaver_protocol::is_group_id(conversation_id) {
            cmds.extend(each_user(user_ids, "SADD", "grps", conversation_id));
        }
        self.pipeline(cmds).map(|_| ())
    }

    fn remove_conversation_from_users(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<()> {
        let mut cmds = each_user(user_ids, "SREM", "convs", conversation_id);
        if palaver_protocol::is_group_id(conversation_id) {
            cmds.extend(each_user(user_ids, "SREM", "grps", conversation_id));
        }
        self.pipeline(cmds).map(|_| ())
    }

    /// `SCARD u:{user}:grps` per user.
    fn group_counts(&mut self, user_ids: &[String]) -> StoreResult<Vec<usize>> {
        let cmds = user_ids
            .iter()
            .map(|u| redis::cmd("SCARD").arg(user_key(u, "grps")).clone())
            .collect();
        self.pipeline(cmds)?.into_iter().map(from_value).collect()
    }

    /// Two round trips whatever the number of pairs, every command on one
    /// key (one hash slot: fine on Redis Cluster): `SMEMBERS` of each
    /// distinct viewer's group list with `SCARD` of each pair's direct
    /// writers set, then one `SMISMEMBER` of the other's group list with
    /// all of the viewer's groups per pair whose viewer has groups. Which
    /// commands run, their arguments and the size of their replies follow
    /// from the viewers' groups and the number of pairs only.
    fn presence_links(&mut self, pairs: &[(&str, &str)]) -> StoreResult<Vec<bool>> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let mut viewers: Vec<&str> = pairs.iter().map(|(v, _)| *v).collect();
        viewers.sort_unstable();
        viewers.dedup();
        let mut cmds: Vec<redis::Cmd> = viewers
            .iter()
            .map(|v| redis::cmd("SMEMBERS").arg(user_key(v, "grps")).clone())
            .collect();
        cmds.extend(pairs.iter().map(|(v, o)| {
            let direct = palaver_protocol::direct_conversation_id(v, o);
            redis::cmd("SCARD").arg(conv_key(&direct, "w")).clone()
        }));
        let mut replies = self.pipeline(cmds)?.into_iter();
        let mut next = || replies.next().unwrap_or(Value::Nil);
        let groups: Vec<Vec<String>> = viewers
            .iter()
            .map(|_| from_value(next()))
            .collect::<StoreResult<_>>()?;
        let mut links: Vec<bool> = pairs
            .iter()
            .map(|(v, o)| Ok(v != o && from_value::<u64>(next())? >= 2))
            .collect::<StoreResult<_>>()?;
        let groups_of = |viewer: &str| {
            viewers
                .binary_search(&viewer)
                .ok()
                .and_then(|i| groups.get(i))
                .filter(|g| !g.is_empty())
        };
        let mut probed = Vec::new();
        let mut cmds = Vec::new();
        for (i, (viewer, other)) in pairs.iter().enumerate() {
            if let Some(mine) = groups_of(viewer) {
                probed.push(i);
                cmds.push(
                    redis::cmd("SMISMEMBER")
                        .arg(user_key(other, "grps"))
                        .arg(mine)
                        .clone(),
                );
            }
        }
        for (i, reply) in probed.into_iter().zip(self.pipeline(cmds)?) {
            let hits: Vec<i64> = from_value(reply)?;
            let (viewer, other) = pairs[i];
            links[i] |= viewer != other && hits.contains(&1);
        }
        Ok(links)
    }

    /// One `HMGET u:{user}:adds:<day> a:<adder> s` per user.
    fn group_adds_on(
        &mut self,
        day: i64,
        adder: &str,
        user_ids: &[String],
    ) -> StoreResult<Vec<GroupAdds>> {
        let field = format!("a:{adder}");
        let cmds = user_ids
            .iter()
            .map(|u| {
                redis::cmd("HMGET")
                    .arg(adds_key(u, day))
                    .arg(&field)
                    .arg("s")
                    .clone()
            })
            .collect();
        self.pipeline(cmds)?
            .into_iter()
            .map(|v| {
                let counts: Vec<Option<u32>> = from_value(v)?;
                Ok(GroupAdds {
                    by_adder: counts.first().copied().flatten().unwrap_or(0),
                    by_strangers: counts.get(1).copied().flatten().unwrap_or(0),
                })
            })
            .collect()
    }

    /// `HINCRBY` (the adder's field, and `s` for a stranger) and `EXPIRE`
    /// (two days) per user, pipelined.
    fn count_group_adds(
        &mut self,
        day: i64,
        adder: &str,
        adds: &[(String, bool)],
    ) -> StoreResult<()> {
        let field = format!("a:{adder}");
        let mut cmds = Vec::with_capacity(3 * adds.len());
        for (user_id, stranger) in adds {
            let key = adds_key(user_id, day);
            cmds.push(redis::cmd("HINCRBY").arg(&key).arg(&field).arg(1).clone());
            if *stranger {
                cmds.push(redis::cmd("HINCRBY").arg(&key).arg("s").arg(1).clone());
            }
            cmds.push(redis::cmd("EXPIRE").arg(&key).arg(ADDS_TTL_S).clone());
        }
        self.pipeline(cmds).map(|_| ())
    }

    fn mark_push_pending<U: AsRef<str>>(
        &mut self,
        conversation_id: &str,
        user_ids: &[U],
    ) -> StoreResult<Vec<bool>> {
        let cmds = each_user(user_ids, "SADD", "push", conversation_id);
        self.pipeline(cmds)?.into_iter().map(from_value).collect()
    }

    fn clear_push_pending(
        &mut self,
        user_id: &str,
        conversation_id: Option<&str>,
    ) -> StoreResult<()> {
        let key = user_key(user_id, "push");
        match conversation_id {
            Some(id) => self.query::<()>(redis::cmd("SREM").arg(key).arg(id)),
            None => self.query::<()>(redis::cmd("DEL").arg(key)),
        }
    }
}

/// `COMMAND u:{<user>}:<field> member` for each user: one key, so one hash
/// slot, per command (pipelined by the caller).
fn each_user(
    user_ids: &[impl AsRef<str>],
    command: &str,
    field: &str,
    member: &str,
) -> Vec<redis::Cmd> {
    user_ids
        .iter()
        .map(|u| {
            redis::cmd(command)
                .arg(user_key(u.as_ref(), field))
                .arg(member)
                .clone()
        })
        .collect()
}
