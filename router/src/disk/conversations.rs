//! `ConversationStore` on disk: appends with dedup, reads within a byte
//! budget, receipts, group records, quota counters.

use std::collections::BTreeSet;

use palaver_protocol::pb;
use redb::{ReadableTable, Table, WriteTransaction};

use crate::memory::apply_quota_charge;
use crate::store::{
    Appended, Budget, ConversationStore, GroupRecord, HistorySlice, Membership, QuotaCharge,
    QuotaOwner, RangeRead, Retention, StoreResult,
};

use super::*;

/// Messages [`ConversationStore::senders_between`] looks at, newest of the
/// range first: a Read receipt after a long absence costs no more than the
/// other stores' window.
const SENDERS_SCAN: u64 = 10_000;

/// The tables an append touches, opened once per batch.
struct AppendTables<'t> {
    seqs: Table<'t, &'static str, u64>,
    messages: Table<'t, (&'static str, u64), &'static [u8]>,
    dedup: Table<'t, (&'static str, &'static str, &'static [u8]), (u64, i64)>,
    writers: Table<'t, &'static str, u8>,
}

impl<'t> AppendTables<'t> {
    fn open(txn: &'t WriteTransaction) -> DiskResult<Self> {
        Ok(Self {
            seqs: txn.open_table(SEQS)?,
            messages: txn.open_table(MESSAGES)?,
            dedup: txn.open_table(DEDUP)?,
            writers: txn.open_table(WRITERS)?,
        })
    }

    fn append(
        &mut self,
        conversation_id: &str,
        mut message: pb::Message,
        retention: &Retention,
    ) -> DiskResult<Appended> {
        let last = self.seqs.get(conversation_id)?.map_or(0, |v| v.value());
        if let Some(ack) = duplicate_of(
            &self.dedup,
            &self.messages,
            conversation_id,
            last,
            &message,
            retention,
        )? {
            return Ok(Appended::Duplicate(ack));
        }
        let seq = last + 1;
        message.seq = seq;
        self.seqs.insert(conversation_id, seq)?;
        self.messages
            .insert((conversation_id, seq), encode(&message).as_slice())?;
        let expires = retention.now_ms.saturating_add(retention.dedup_ttl_ms);
        self.dedup.insert(
            (
                conversation_id,
                message.sender_user_id.as_str(),
                message.client_msg_id.as_slice(),
            ),
            (seq, expires),
        )?;
        // Dedup follows the window, as in the other stores: the entry of the
        // message that just left it goes (unless its id was stored again).
        let left = seq.saturating_sub(retention.history_window as u64);
        if left > 0 {
            let old = match self.messages.get((conversation_id, left))? {
                Some(bytes) => Some(decode(conversation_id, left, bytes.value())?),
                None => None,
            };
            if let Some(old) = old {
                let key = (
                    conversation_id,
                    old.sender_user_id.as_str(),
                    old.client_msg_id.as_slice(),
                );
                if self.dedup.get(key)?.map(|v| v.value().0) == Some(left) {
                    self.dedup.remove(key)?;
                }
            }
        }
        if let Some((a, b)) = palaver_protocol::parse_direct(conversation_id) {
            let bit = if message.sender_user_id == a {
                1
            } else if message.sender_user_id == b {
                2
            } else {
                0
            };
            let had = self.writers.get(conversation_id)?.map_or(0, |v| v.value());
            if had | bit != had {
                self.writers.insert(conversation_id, had | bit)?;
            }
        }
        Ok(Appended::Stored(message))
    }
}

/// The ack of the stored original of `message` (same sender and
/// client_msg_id), while it is among the newest `history_window` messages
/// (`last` is the conversation's last seq) and within the dedup TTL.
fn duplicate_of(
    dedup: &impl ReadableTable<(&'static str, &'static str, &'static [u8]), (u64, i64)>,
    messages: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    conversation_id: &str,
    last: u64,
    message: &pb::Message,
    retention: &Retention,
) -> DiskResult<Option<pb::SendAck>> {
    let key = (
        conversation_id,
        message.sender_user_id.as_str(),
        message.client_msg_id.as_slice(),
    );
    let Some((seq, expires)) = dedup.get(key)?.map(|v| v.value()) else {
        return Ok(None);
    };
    let in_window = seq.saturating_add(retention.history_window as u64) > last;
    if !in_window || expires <= retention.now_ms {
        return Ok(None);
    }
    let Some(bytes) = messages.get((conversation_id, seq))? else {
        // Deleted by retention meanwhile: nothing to answer with.
        return Ok(None);
    };
    let original = decode(conversation_id, seq, bytes.value())?;
    Ok(Some(pb::SendAck {
        client_msg_id: original.client_msg_id,
        message_id: original.message_id,
        conversation_id: conversation_id.to_owned(),
        seq,
        server_time_ms: original.server_time_ms,
    }))
}

fn quota_key(owner: &QuotaOwner) -> (u8, &str) {
    match owner {
        QuotaOwner::Account(id) => (0, id),
        QuotaOwner::Conversation(id) => (1, id),
        QuotaOwner::MembershipChanges(id) => (2, id),
    }
}

impl ConversationStore for DiskStore {
    fn append_message(
        &mut self,
        conversation_id: &str,
        message: pb::Message,
        retention: &Retention,
    ) -> StoreResult<Appended> {
        self.write(|txn| AppendTables::open(txn)?.append(conversation_id, message, retention))
    }

    fn append_messages(
        &mut self,
        appends: Vec<(String, pb::Message)>,
        retention: &Retention,
    ) -> StoreResult<Vec<Appended>> {
        if appends.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|txn| {
            let mut tables = AppendTables::open(txn)?;
            appends
                .into_iter()
                .map(|(conversation_id, message)| {
                    tables.append(&conversation_id, message, retention)
                })
                .collect()
        })
    }

    fn find_duplicates(
        &mut self,
        appends: Vec<(String, pb::Message)>,
        retention: &Retention,
    ) -> StoreResult<Vec<Option<pb::SendAck>>> {
        self.read(|txn| {
            let seqs = txn.open_table(SEQS)?;
            let dedup = txn.open_table(DEDUP)?;
            let messages = txn.open_table(MESSAGES)?;
            appends
                .iter()
                .map(|(conversation_id, message)| {
                    let last = seqs.get(conversation_id.as_str())?.map_or(0, |v| v.value());
                    duplicate_of(&dedup, &messages, conversation_id, last, message, retention)
                })
                .collect()
        })
    }

    fn history_epoch(&mut self) -> StoreResult<u64> {
        Ok(self.history_epoch)
    }

    fn last_seqs(&mut self, conversation_ids: &[String]) -> StoreResult<Vec<u64>> {
        self.read(|txn| {
            let seqs = txn.open_table(SEQS)?;
            conversation_ids
                .iter()
                .map(|id| Ok(seqs.get(id.as_str())?.map_or(0, |v| v.value())))
                .collect()
        })
    }

    fn messages_after(&mut self, reads: &[RangeRead]) -> StoreResult<Vec<Vec<pb::Message>>> {
        self.read(|txn| {
            let messages = txn.open_table(MESSAGES)?;
            reads
                .iter()
                .map(|read| {
                    let id = read.conversation_id.as_str();
                    let mut got = Vec::new();
                    let Some(from) = read.after_seq.checked_add(1) else {
                        return Ok(got);
                    };
                    let mut budget = Budget::new(read.max_bytes);
                    for entry in messages.range((id, from)..=(id, u64::MAX))? {
                        if got.len() >= read.limit {
                            break;
                        }
                        let (key, value) = entry?;
                        let message = decode(id, key.value().1, value.value())?;
                        if !budget.take(&message) {
                            break;
                        }
                        got.push(message);
                    }
                    Ok(got)
                })
                .collect()
        })
    }

    fn messages_before(
        &mut self,
        conversation_id: &str,
        before_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> StoreResult<HistorySlice> {
        self.read(|txn| {
            let messages = txn.open_table(MESSAGES)?;
            let id = conversation_id;
            let end = if before_seq == 0 {
                u64::MAX
            } else {
                before_seq - 1
            };
            let mut newest_first = messages.range((id, 0)..=(id, end))?.rev();
            let mut budget = Budget::new(max_bytes);
            let mut got = Vec::new();
            let mut has_more = false;
            while got.len() < limit {
                let Some(entry) = newest_first.next() else {
                    break;
                };
                let (key, value) = entry?;
                let message = decode(id, key.value().1, value.value())?;
                if !budget.take(&message) {
                    has_more = true;
                    break;
                }
                got.push(message);
            }
            if !has_more {
                has_more = newest_first.next().is_some();
            }
            got.reverse();
            Ok(HistorySlice {
                messages: got,
                has_more,
            })
        })
    }

    fn charge_quotas(&mut self, charges: &[QuotaCharge]) -> StoreResult<Vec<bool>> {
        self.write(|txn| {
            let mut quotas = txn.open_table(QUOTAS)?;
            charges
                .iter()
                .map(|charge| {
                    // One counter per owner: the next period's replaces it,
                    // so counters are bounded by the owners.
                    let key = quota_key(&charge.owner);
                    let before = quotas.get(key)?.map_or((charge.period, 0), |v| v.value());
                    let mut counter = before;
                    let granted = apply_quota_charge(&mut counter, charge);
                    if counter != before {
                        quotas.insert(key, counter)?;
                    }
                    Ok(granted)
                })
                .collect()
        })
    }

    fn senders_between(
        &mut self,
        conversation_id: &str,
        after_seq: u64,
        up_to_seq: u64,
    ) -> StoreResult<Vec<String>> {
        if up_to_seq <= after_seq {
            return Ok(Vec::new());
        }
        self.read(|txn| {
            let messages = txn.open_table(MESSAGES)?;
            let id = conversation_id;
            let from = (after_seq + 1).max(up_to_seq.saturating_sub(SENDERS_SCAN - 1));
            let mut senders = BTreeSet::new();
            for entry in messages.range((id, from)..=(id, up_to_seq))? {
                let (key, value) = entry?;
                senders.insert(decode(id, key.value().1, value.value())?.sender_user_id);
            }
            Ok(senders.into_iter().collect())
        })
    }

    fn advance_receipt(
        &mut self,
        conversation_id: &str,
        user_id: &str,
        kind: pb::ReceiptKind,
        up_to_seq: u64,
    ) -> StoreResult<Option<u64>> {
        self.write(|txn| {
            let mut receipts = txn.open_table(RECEIPTS)?;
            let key = (conversation_id, user_id, kind as i32);
            let mark = receipts.get(key)?.map_or(0, |v| v.value());
            if up_to_seq > mark {
                receipts.insert(key, up_to_seq)?;
                Ok(Some(mark))
            } else {
                Ok(None)
            }
        })
    }

    fn create_group(&mut self, group: &GroupRecord) -> StoreResult<bool> {
        self.write(|txn| {
            let mut groups = txn.open_table(GROUPS)?;
            let id = group.conversation_id.as_str();
            if groups.get(id)?.is_some() {
                return Ok(false);
            }
            groups.insert(id, (group.title.as_str(), group.created_ms))?;
            let mut members = txn.open_table(MEMBERS)?;
            for member in &group.members {
                members.insert((id, member.user_id.as_str()), member.role() as i32)?;
            }
            Ok(true)
        })
    }

    fn groups(&mut self, conversation_ids: &[String]) -> StoreResult<Vec<Option<GroupRecord>>> {
        self.read(|txn| {
            let groups = txn.open_table(GROUPS)?;
            let members = txn.open_table(MEMBERS)?;
            conversation_ids
                .iter()
                .map(|id| {
                    let Some((title, created_ms)) = groups.get(id.as_str())?.map(|v| {
                        let (title, created_ms) = v.value();
                        (title.to_owned(), created_ms)
                    }) else {
                        return Ok(None);
                    };
                    let next = after(id);
                    let mut list = Vec::new();
                    for entry in members.range((id.as_str(), "")..(next.as_str(), ""))? {
                        let (key, role) = entry?;
                        list.push(pb::Member {
                            user_id: key.value().1.to_owned(),
                            role: role.value(),
                        });
                    }
                    Ok(Some(GroupRecord {
                        conversation_id: id.clone(),
                        title,
                        members: list,
                        created_ms,
                    }))
                })
                .collect()
        })
    }

    fn membership(&mut self, conversation_id: &str, user_id: &str) -> StoreResult<Membership> {
        self.read(|txn| {
            let members = txn.open_table(MEMBERS)?;
            if let Some(role) = members.get((conversation_id, user_id))? {
                let role = pb::Role::try_from(role.value()).unwrap_or_default();
                return Ok(Membership::Member(role));
            }
            let groups = txn.open_table(GROUPS)?;
            Ok(if groups.get(conversation_id)?.is_some() {
                Membership::NotMember
            } else {
                Membership::NoSuchGroup
            })
        })
    }

    fn update_members(
        &mut self,
        conversation_id: &str,
        upsert: &[pb::Member],
        remove: &[String],
    ) -> StoreResult<()> {
        self.write(|txn| {
            if txn.open_table(GROUPS)?.get(conversation_id)?.is_none() {
                return Ok(());
            }
            let mut members = txn.open_table(MEMBERS)?;
            for member in upsert {
                members.insert(
                    (conversation_id, member.user_id.as_str()),
                    member.role() as i32,
                )?;
            }
            for user_id in remove {
                members.remove((conversation_id, user_id.as_str()))?;
            }
            Ok(())
        })
    }

    fn written_by_both(&mut self, direct_ids: &[String]) -> StoreResult<Vec<bool>> {
        self.read(|txn| {
            let writers = txn.open_table(WRITERS)?;
            direct_ids
                .iter()
                .map(|id| Ok(writers.get(id.as_str())?.is_some_and(|v| v.value() == 3)))
                .collect()
        })
    }

    fn members_among(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<Vec<bool>> {
        self.read(|txn| {
            let members = txn.open_table(MEMBERS)?;
            user_ids
                .iter()
                .map(|u| Ok(members.get((conversation_id, u.as_str()))?.is_some()))
                .collect()
        })
    }
}
