//! `UserStore` for the memory store: conversation lists, presence links
//! (who may see whom), push marks, group-add counts.

use std::collections::{HashMap, HashSet};

use crate::store::{GroupAdds, StoreResult, UserStore};

use super::*;

impl MemoryStore {
    pub(super) fn direct_written_by_both(&self, direct_id: &str) -> bool {
        self.conversations
            .get(direct_id)
            .is_some_and(|c| c.direct_writers == 3)
    }
}

/// The groups of a user with none.
fn no_groups() -> &'static HashSet<String> {
    static NONE: std::sync::OnceLock<HashSet<String>> = std::sync::OnceLock::new();
    NONE.get_or_init(HashSet::new)
}

impl UserStore for MemoryStore {
    fn conversations_of_user(&mut self, user_id: &str) -> StoreResult<Vec<String>> {
        Ok(self
            .users
            .get(user_id)
            .map(|u| u.conversations.iter().cloned().collect())
            .unwrap_or_default())
    }

    fn add_conversation_to_users(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<()> {
        let group = palaver_protocol::is_group_id(conversation_id);
        for user_id in user_ids {
            let user = self.users.entry(user_id.clone()).or_default();
            if !user.conversations.contains(conversation_id) {
                user.conversations.insert(conversation_id.to_owned());
            }
            if group && !user.groups.contains(conversation_id) {
                user.groups.insert(conversation_id.to_owned());
            }
        }
        Ok(())
    }

    fn remove_conversation_from_users(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<()> {
        for user_id in user_ids {
            if let Some(user) = self.users.get_mut(user_id) {
                user.conversations.remove(conversation_id);
                user.groups.remove(conversation_id);
            }
        }
        Ok(())
    }

    fn group_counts(&mut self, user_ids: &[String]) -> StoreResult<Vec<usize>> {
        Ok(user_ids
            .iter()
            .map(|u| self.users.get(u).map_or(0, |u| u.groups.len()))
            .collect())
    }

    fn presence_links(&mut self, pairs: &[(&str, &str)]) -> StoreResult<Vec<bool>> {
        let mut lookups = 0u64;
        let links = pairs
            .iter()
            .map(|&(viewer, other)| {
                // The pair's direct conversation: one lookup by its id.
                lookups += 1;
                let direct = viewer != other
                    && self.direct_written_by_both(&palaver_protocol::direct_conversation_id(
                        viewer, other,
                    ));
                // One probe of `other`'s groups per group of the viewer,
                // all of them, whether `other` exists or not (no early
                // exit: the work is the viewer's, not `other`'s).
                let theirs = self.users.get(other).map_or(no_groups(), |u| &u.groups);
                let mine = self.users.get(viewer).map_or(no_groups(), |u| &u.groups);
                let mut shared = false;
                for group in mine {
                    lookups += 1;
                    shared |= theirs.contains(group);
                }
                direct || (viewer != other && shared)
            })
            .collect();
        self.visibility_lookups += lookups;
        Ok(links)
    }

    fn group_adds_on(
        &mut self,
        day: i64,
        adder: &str,
        user_ids: &[String],
    ) -> StoreResult<Vec<GroupAdds>> {
        Ok(user_ids
            .iter()
            .map(|u| {
                let adds = self.users.get(u).and_then(|u| u.adds.as_ref());
                match adds {
                    Some(adds) if adds.day == day => GroupAdds {
                        by_adder: adds.by_adder.get(adder).copied().unwrap_or(0),
                        by_strangers: adds.by_strangers,
                    },
                    _ => GroupAdds::default(),
                }
            })
            .collect())
    }

    fn count_group_adds(
        &mut self,
        day: i64,
        adder: &str,
        adds: &[(String, bool)],
    ) -> StoreResult<()> {
        for (user_id, stranger) in adds {
            let user = self.users.entry(user_id.clone()).or_default();
            let counts = match &mut user.adds {
                Some(counts) if counts.day == day => counts,
                other => other.insert(DayAdds {
                    day,
                    by_adder: HashMap::new(),
                    by_strangers: 0,
                }),
            };
            *counts.by_adder.entry(adder.to_owned()).or_default() += 1;
            if *stranger {
                counts.by_strangers += 1;
            }
        }
        Ok(())
    }

    fn mark_push_pending<U: AsRef<str>>(
        &mut self,
        conversation_id: &str,
        user_ids: &[U],
    ) -> StoreResult<Vec<bool>> {
        Ok(user_ids
            .iter()
            .map(|user_id| {
                let user_id = user_id.as_ref();
                // Looked up before `entry`, which would copy the id every time.
                let user = match self.users.get_mut(user_id) {
                    Some(user) => user,
                    None => self.users.entry(user_id.to_owned()).or_default(),
                };
                if user.push_pending.contains(conversation_id) {
                    false
                } else {
                    user.push_pending.insert(conversation_id.to_owned())
                }
            })
            .collect())
    }

    fn clear_push_pending(
        &mut self,
        user_id: &str,
        conversation_id: Option<&str>,
    ) -> StoreResult<()> {
        if let Some(user) = self.users.get_mut(user_id) {
            match conversation_id {
                Some(id) => {
                    user.push_pending.remove(id);
                }
                None => user.push_pending.clear(),
            }
        }
        Ok(())
    }
}
