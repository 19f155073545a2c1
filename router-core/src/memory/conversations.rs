//! `ConversationStore` for the memory store: appends, dedup, reads within
//! a byte budget, receipts, group records, quota counters.

use std::collections::BTreeSet;

use palaver_protocol::pb;

use crate::store::{
    Appended, Budget, ConversationStore, GroupRecord, HistorySlice, Membership, QuotaCharge,
    RangeRead, Retention, StoreResult,
};

use super::*;

impl ConversationState {
    /// The ack of the stored original of `message` (same sender and
    /// client_msg_id), while it is in the window and within the dedup TTL.
    fn duplicate_of(
        &self,
        conversation_id: &str,
        message: &pb::Message,
        retention: &Retention,
    ) -> Option<pb::SendAck> {
        let original = self.history.find(
            &message.sender_user_id,
            &message.client_msg_id,
            retention.now_ms,
        )?;
        Some(pb::SendAck {
            client_msg_id: original.client_msg_id.clone(),
            message_id: original.message_id.clone(),
            conversation_id: conversation_id.to_owned(),
            seq: original.seq,
            server_time_ms: original.server_time_ms,
        })
    }

    /// Index into `history` of the first message with seq > `after_seq`.
    fn index_after(&self, after_seq: u64) -> usize {
        match self.history.front() {
            None => 0,
            Some(first) => (after_seq + 1)
                .saturating_sub(first.seq)
                .min(self.history.len() as u64) as usize,
        }
    }
}

impl ConversationStore for MemoryStore {
    fn append_message(
        &mut self,
        conversation_id: &str,
        mut message: pb::Message,
        retention: &Retention,
    ) -> StoreResult<Appended> {
        // Looked up before `entry`, which would copy the id every time.
        let state = match self.conversations.get_mut(conversation_id) {
            Some(state) => state,
            None => self
                .conversations
                .entry(conversation_id.to_owned())
                .or_default(),
        };
        // Dedup is tied to the history window (see `History`): the original
        // is remembered while it is stored and its dedup TTL has not passed.
        if let Some(ack) = state.duplicate_of(conversation_id, &message, retention) {
            return Ok(Appended::Duplicate(ack));
        }
        state.last_seq += 1;
        message.seq = state.last_seq;
        if let Some((a, b)) = palaver_protocol::parse_direct(conversation_id) {
            if message.sender_user_id == a {
                state.direct_writers |= 1;
            } else if message.sender_user_id == b {
                state.direct_writers |= 2;
            }
        }
        let expires = retention.now_ms.saturating_add(retention.dedup_ttl_ms);
        state.history.push_back(message.clone(), expires);
        while state.history.len() > retention.history_window {
            state.history.pop_front();
        }
        Ok(Appended::Stored(message))
    }

    fn history_epoch(&mut self) -> StoreResult<u64> {
        Ok(self.history_epoch.0)
    }

    fn last_seqs(&mut self, conversation_ids: &[String]) -> StoreResult<Vec<u64>> {
        Ok(conversation_ids
            .iter()
            .map(|id| self.conversations.get(id).map_or(0, |c| c.last_seq))
            .collect())
    }

    fn messages_after(&mut self, reads: &[RangeRead]) -> StoreResult<Vec<Vec<pb::Message>>> {
        Ok(reads
            .iter()
            .map(|read| match self.conversations.get(&read.conversation_id) {
                None => Vec::new(),
                Some(state) => {
                    let mut budget = Budget::new(read.max_bytes);
                    state
                        .history
                        .range_from(state.index_after(read.after_seq))
                        .take(read.limit)
                        .take_while(|m| budget.take(m))
                        .cloned()
                        .collect()
                }
            })
            .collect())
    }

    fn messages_before(
        &mut self,
        conversation_id: &str,
        before_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> StoreResult<HistorySlice> {
        let Some(state) = self.conversations.get(conversation_id) else {
            return Ok(HistorySlice::default());
        };
        let end = if before_seq == 0 {
            state.history.len()
        } else {
            state.index_after(before_seq - 1)
        };
        // Newest first, only what fits is cloned.
        let mut budget = Budget::new(max_bytes);
        let mut start = end;
        while start > end.saturating_sub(limit) {
            match state.history.get(start - 1) {
                Some(m) if budget.take(m) => start -= 1,
                _ => break,
            }
        }
        Ok(HistorySlice {
            messages: state.history.range(start..end).cloned().collect(),
            has_more: start > 0,
        })
    }

    fn find_duplicates(
        &mut self,
        appends: Vec<(String, pb::Message)>,
        retention: &Retention,
    ) -> StoreResult<Vec<Option<pb::SendAck>>> {
        Ok(appends
            .iter()
            .map(|(conversation_id, message)| {
                self.conversations.get(conversation_id)?.duplicate_of(
                    conversation_id,
                    message,
                    retention,
                )
            })
            .collect())
    }

    fn charge_quotas(&mut self, charges: &[QuotaCharge]) -> StoreResult<Vec<bool>> {
        let granted = charges
            .iter()
            .map(|charge| {
                let counter = self
                    .quotas
                    .entry(charge.owner.clone())
                    .or_insert((charge.period, 0));
                apply_quota_charge(counter, charge)
            })
            .collect();
        if self.quotas.len() > 2 * self.quotas_pruned_at.max(1024) {
            let now_s = self.now_ms() / 1000;
            self.quotas.retain(|owner, (period, _)| {
                let current = now_s / i64::from(owner.period_s());
                i64::from(*period) >= current
            });
            self.quotas_pruned_at = self.quotas.len();
        }
        Ok(granted)
    }

    fn senders_between(
        &mut self,
        conversation_id: &str,
        after_seq: u64,
        up_to_seq: u64,
    ) -> StoreResult<Vec<String>> {
        let Some(state) = self.conversations.get(conversation_id) else {
            return Ok(Vec::new());
        };
        let mut senders = BTreeSet::new();
        for message in state.history.range_from(state.index_after(after_seq)) {
            if message.seq > up_to_seq {
                break;
            }
            senders.insert(message.sender_user_id.as_str());
        }
        Ok(senders.into_iter().map(str::to_owned).collect())
    }

    fn advance_receipt(
        &mut self,
        conversation_id: &str,
        user_id: &str,
        kind: pb::ReceiptKind,
        up_to_seq: u64,
    ) -> StoreResult<Option<u64>> {
        let state = self
            .conversations
            .entry(conversation_id.to_owned())
            .or_default();
        let mark = state
            .receipts
            .entry((user_id.to_owned(), kind as i32))
            .or_insert(0);
        if up_to_seq > *mark {
            let previous = *mark;
            *mark = up_to_seq;
            Ok(Some(previous))
        } else {
            Ok(None)
        }
    }

    fn create_group(&mut self, group: &GroupRecord) -> StoreResult<bool> {
        let state = self
            .conversations
            .entry(group.conversation_id.clone())
            .or_default();
        if state.group.is_some() {
            return Ok(false);
        }
        state.group = Some(GroupState {
            title: group.title.clone(),
            members: group
                .members
                .iter()
                .map(|m| (m.user_id.clone(), m.role()))
                .collect(),
            created_ms: group.created_ms,
        });
        Ok(true)
    }

    fn groups(&mut self, conversation_ids: &[String]) -> StoreResult<Vec<Option<GroupRecord>>> {
        Ok(conversation_ids
            .iter()
            .map(|id| {
                let group = self.conversations.get(id)?.group.as_ref()?;
                Some(GroupRecord {
                    conversation_id: id.clone(),
                    title: group.title.clone(),
                    members: group
                        .members
                        .iter()
                        .map(|(user_id, role)| pb::Member {
                            user_id: user_id.clone(),
                            role: *role as i32,
                        })
                        .collect(),
                    created_ms: group.created_ms,
                })
            })
            .collect())
    }

    fn membership(&mut self, conversation_id: &str, user_id: &str) -> StoreResult<Membership> {
        let group = self
            .conversations
            .get(conversation_id)
            .and_then(|c| c.group.as_ref());
        Ok(match group {
            None => Membership::NoSuchGroup,
            Some(g) => match g.members.get(user_id) {
                None => Membership::NotMember,
                Some(role) => Membership::Member(*role),
            },
        })
    }

    fn update_members(
        &mut self,
        conversation_id: &str,
        upsert: &[pb::Member],
        remove: &[String],
    ) -> StoreResult<()> {
        let group = self
            .conversations
            .get_mut(conversation_id)
            .and_then(|c| c.group.as_mut());
        if let Some(group) = group {
            for member in upsert {
                group.members.insert(member.user_id.clone(), member.role());
            }
            for user_id in remove {
                group.members.remove(user_id);
            }
        }
        Ok(())
    }

    fn written_by_both(&mut self, direct_ids: &[String]) -> StoreResult<Vec<bool>> {
        Ok(direct_ids
            .iter()
            .map(|id| self.direct_written_by_both(id))
            .collect())
    }

    fn members_among(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<Vec<bool>> {
        let group = self
            .conversations
            .get(conversation_id)
            .and_then(|c| c.group.as_ref());
        Ok(user_ids
            .iter()
            .map(|u| group.is_some_and(|g| g.members.contains_key(u)))
            .collect())
    }
}

/// One quota charge against an owner's counter `(period, used)`, the rule
/// of [`ConversationStore::charge_quotas`] for every store that keeps the
/// counter itself (memory, disk): a later period starts from zero, a period
/// that is over has nothing to count against, a refund never goes below
/// zero, and a charge that would pass the limit changes nothing.
pub fn apply_quota_charge(counter: &mut (u32, u64), charge: &QuotaCharge) -> bool {
    let (period, used) = counter;
    let amount = charge.amount.unsigned_abs();
    if charge.period > *period {
        *period = charge.period;
        *used = 0;
    }
    if charge.period < *period {
        return charge.amount <= 0 || amount <= charge.limit;
    }
    if charge.amount <= 0 {
        *used = used.saturating_sub(amount);
        return true;
    }
    let after = used.saturating_add(amount);
    if after > charge.limit {
        return false;
    }
    *used = after;
    true
}
