//! `UserStore` on disk: conversation and group lists, presence links (who
//! may see whom), push marks, group-add counts.

use crate::store::{GroupAdds, StoreResult, UserStore};

use super::*;

/// Every `(user, _)` key of a table keyed by (user, string), in order.
fn of_user<V: redb::Value + 'static>(
    table: &impl ReadableTable<(&'static str, &'static str), V>,
    user_id: &str,
) -> DiskResult<Vec<String>> {
    let next = after(user_id);
    let mut keys = Vec::new();
    for entry in table.range((user_id, "")..(next.as_str(), ""))? {
        keys.push(entry?.0.value().1.to_owned());
    }
    Ok(keys)
}

impl UserStore for DiskStore {
    fn conversations_of_user(&mut self, user_id: &str) -> StoreResult<Vec<String>> {
        self.read(|txn| of_user(&txn.open_table(USER_CONVERSATIONS)?, user_id))
    }

    fn add_conversation_to_users(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<()> {
        let group = palaver_protocol::is_group_id(conversation_id);
        self.write(|txn| {
            let mut conversations = txn.open_table(USER_CONVERSATIONS)?;
            let mut groups = txn.open_table(USER_GROUPS)?;
            let mut counts = txn.open_table(GROUP_COUNTS)?;
            for user_id in user_ids {
                let user = user_id.as_str();
                conversations.insert((user, conversation_id), ())?;
                if group && groups.insert((user, conversation_id), ())?.is_none() {
                    let n = counts.get(user)?.map_or(0, |v| v.value());
                    counts.insert(user, n + 1)?;
                }
            }
            Ok(())
        })
    }

    fn remove_conversation_from_users(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<()> {
        self.write(|txn| {
            let mut conversations = txn.open_table(USER_CONVERSATIONS)?;
            let mut groups = txn.open_table(USER_GROUPS)?;
            let mut counts = txn.open_table(GROUP_COUNTS)?;
            for user_id in user_ids {
                let user = user_id.as_str();
                conversations.remove((user, conversation_id))?;
                if groups.remove((user, conversation_id))?.is_some() {
                    let n = counts.get(user)?.map_or(0, |v| v.value());
                    counts.insert(user, n.saturating_sub(1))?;
                }
            }
            Ok(())
        })
    }

    fn group_counts(&mut self, user_ids: &[String]) -> StoreResult<Vec<usize>> {
        self.read(|txn| {
            let counts = txn.open_table(GROUP_COUNTS)?;
            user_ids
                .iter()
                .map(|u| Ok(counts.get(u.as_str())?.map_or(0, |v| v.value() as usize)))
                .collect()
        })
    }

    fn presence_links(&mut self, pairs: &[(&str, &str)]) -> StoreResult<Vec<bool>> {
        self.read(|txn| {
            let writers = txn.open_table(WRITERS)?;
            let groups = txn.open_table(USER_GROUPS)?;
            pairs
                .iter()
                .map(|&(viewer, other)| {
                    // The pair's direct conversation: one lookup by its id.
                    let direct = palaver_protocol::direct_conversation_id(viewer, other);
                    let direct = writers
                        .get(direct.as_str())?
                        .is_some_and(|v| v.value() == 3);
                    // One probe of `other` per group of the viewer, all of
                    // them (no early exit: the work is the viewer's,
                    // whatever `other` holds or whether it exists).
                    let mut shared = false;
                    for group in of_user(&groups, viewer)? {
                        shared |= groups.get((other, group.as_str()))?.is_some();
                    }
                    Ok(viewer != other && (direct || shared))
                })
                .collect()
        })
    }

    fn group_adds_on(
        &mut self,
        day: i64,
        adder: &str,
        user_ids: &[String],
    ) -> StoreResult<Vec<GroupAdds>> {
        self.read(|txn| {
            let adds = txn.open_table(ADDS)?;
            let strangers = txn.open_table(STRANGER_ADDS)?;
            user_ids
                .iter()
                .map(|u| {
                    let user = u.as_str();
                    Ok(GroupAdds {
                        by_adder: adds.get((user, day, adder))?.map_or(0, |v| v.value()),
                        by_strangers: strangers.get((user, day))?.map_or(0, |v| v.value()),
                    })
                })
                .collect()
        })
    }

    fn count_group_adds(
        &mut self,
        day: i64,
        adder: &str,
        adds: &[(String, bool)],
    ) -> StoreResult<()> {
        self.write(|txn| {
            let mut by_adder = txn.open_table(ADDS)?;
            let mut strangers = txn.open_table(STRANGER_ADDS)?;
            for (user_id, stranger) in adds {
                let user = user_id.as_str();
                // Days before yesterday are forgotten (the trait keeps at
                // least until the day after), so a user holds two days.
                by_adder.retain_in((user, i64::MIN, "")..(user, day - 1, ""), |_, _| false)?;
                strangers.retain_in((user, i64::MIN)..(user, day - 1), |_, _| false)?;
                let n = by_adder.get((user, day, adder))?.map_or(0, |v| v.value());
                by_adder.insert((user, day, adder), n + 1)?;
                if *stranger {
                    let n = strangers.get((user, day))?.map_or(0, |v| v.value());
                    strangers.insert((user, day), n + 1)?;
                }
            }
            Ok(())
        })
    }

    fn mark_push_pending<U: AsRef<str>>(
        &mut self,
        conversation_id: &str,
        user_ids: &[U],
    ) -> StoreResult<Vec<bool>> {
        self.write(|txn| {
            let mut pending = txn.open_table(PUSH_PENDING)?;
            user_ids
                .iter()
                .map(|u| {
                    let key = (u.as_ref(), conversation_id);
                    // Read first: the common case (already pending) writes nothing.
                    if pending.get(key)?.is_some() {
                        return Ok(false);
                    }
                    pending.insert(key, ())?;
                    Ok(true)
                })
                .collect()
        })
    }

    fn clear_push_pending(
        &mut self,
        user_id: &str,
        conversation_id: Option<&str>,
    ) -> StoreResult<()> {
        let next = after(user_id);
        let range = (user_id, "")..(next.as_str(), "");
        // Every session open clears its user's marks: usually there are
        // none, and a turn that changes nothing needs no fsync.
        let any = self.read(|txn| {
            let pending = txn.open_table(PUSH_PENDING)?;
            Ok(match conversation_id {
                Some(id) => pending.get((user_id, id))?.is_some(),
                None => pending.range(range.clone())?.next().is_some(),
            })
        })?;
        if !any {
            return Ok(());
        }
        self.write(|txn| {
            let mut pending = txn.open_table(PUSH_PENDING)?;
            match conversation_id {
                Some(id) => {
                    pending.remove((user_id, id))?;
                }
                None => pending.retain_in(range, |_, _| false)?,
            }
            Ok(())
        })
    }
}
