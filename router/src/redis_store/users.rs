//! `impl UserStore for RedisStore`: each user's conversations and pending
//! pushes.

use crate::store::{StoreResult, UserStore};

use super::keys::user_key;
use super::{from_value, RedisStore};

impl UserStore for RedisStore {
    fn conversations_of_user(&mut self, user_id: &str) -> StoreResult<Vec<String>> {
        self.query(redis::cmd("SMEMBERS").arg(user_key(user_id, "convs")))
    }

    /// Two round trips whatever the number of users: `SMEMBERS` of the
    /// asker's list, then one pipelined `SMISMEMBER` per other user against
    /// that user's own list (every command touches one key, so one hash
    /// slot: fine on Redis Cluster). Cost: `others.len()` × the asker's
    /// conversation count membership checks.
    fn shares_conversation(&mut self, user_id: &str, others: &[String]) -> StoreResult<Vec<bool>> {
        let mine = self.conversations_of_user(user_id)?;
        if mine.is_empty() || others.is_empty() {
            return Ok(vec![false; others.len()]);
        }
        let cmds = others
            .iter()
            .map(|other| {
                redis::cmd("SMISMEMBER")
                    .arg(user_key(other, "convs"))
                    .arg(&mine)
                    .clone()
            })
            .collect();
        self.pipeline(cmds)?
            .into_iter()
            .map(|v| from_value::<Vec<i64>>(v).map(|hits| hits.contains(&1)))
            .collect()
    }

    fn add_conversation_to_users(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<()> {
        let cmds = each_user(user_ids, "SADD", "convs", conversation_id);
        self.pipeline(cmds).map(|_| ())
    }

    fn remove_conversation_from_users(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<()> {
        let cmds = each_user(user_ids, "SREM", "convs", conversation_id);
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
