//! `impl ConversationStore for RedisStore`: seq, history, dedup, receipts,
//! group records and members.

use std::collections::{HashMap, HashSet};

use palaver_protocol::pb;
use prost::Message as _;
use redis::Value;

use crate::store::{
    message_size, Appended, ConversationStore, GroupRecord, HistorySlice, Membership, QuotaCharge,
    RangeRead, Retention, StoreResult,
};

use super::keys::{
    conv_key, dedup_key, quota_key, receipt_key, ARCHIVED_SUFFIX, HISTORY_EPOCH, SEQ_PREFIX_LEN,
};
use super::{archive_error, corrupt, from_value, RedisStore};

/// The heaviest message a history entry can hold (a Send fits a 64 KiB
/// frame; the server adds ids and times): `read_range.lua` sizes its
/// chunks by it, so it fetches at most one message beyond a read's budget.
const HEAVIEST_MESSAGE_BYTES: usize = 65 * 1024;

impl RedisStore {
    /// One `read_range.lua` call: direction `a` (after `bound`) or `b`
    /// (before `bound`).
    pub(super) fn read_range(
        &self,
        conversation_id: &str,
        direction: &[u8],
        bound: u64,
        limit: usize,
        max_bytes: usize,
    ) -> redis::Cmd {
        Self::evalsha(
            &self.scripts.read_range,
            &[&conv_key(conversation_id, "h")],
            &[
                direction,
                bound.to_string().as_bytes(),
                limit.to_string().as_bytes(),
                max_bytes.to_string().as_bytes(),
                HEAVIEST_MESSAGE_BYTES.to_string().as_bytes(),
            ],
        )
    }
}

impl RedisStore {
    /// Append scripts for `appends`, one pipeline; with `check_only` they
    /// store nothing and say only which are duplicates (None: new).
    fn run_appends(
        &mut self,
        appends: Vec<(String, pb::Message)>,
        retention: &Retention,
        check_only: bool,
    ) -> StoreResult<Vec<Option<Appended>>> {
        let mut cmds = Vec::with_capacity(appends.len());
        let mut messages = Vec::with_capacity(appends.len());
        let (now, ttl, window) = (
            retention.now_ms.to_string(),
            retention.dedup_ttl_ms.to_string(),
            retention.history_window.to_string(),
        );
        let max_unarchived = self
            .archive
            .as_ref()
            .map_or(0, |a| a.max_unarchived)
            .to_string();
        for (conversation_id, mut message) in appends {
            message.seq = 0;
            let encoded = message.encode_to_vec();
            // The dedup key: sender, then client_msg_id (append.lua).
            let mut dedup_field =
                Vec::with_capacity(message.sender_user_id.len() + 1 + message.client_msg_id.len());
            dedup_field.extend_from_slice(message.sender_user_id.as_bytes());
            dedup_field.push(0);
            dedup_field.extend_from_slice(&message.client_msg_id);
            let (seq, h, dd, dq, legacy, archived, writers) = (
                conv_key(&conversation_id, "seq"),
                conv_key(&conversation_id, "h"),
                conv_key(&conversation_id, "dd"),
                conv_key(&conversation_id, "dq"),
                dedup_key(&conversation_id, &message.client_msg_id),
                conv_key(&conversation_id, ARCHIVED_SUFFIX),
                conv_key(&conversation_id, "w"),
            );
            let mut keys: Vec<&str> = vec![&seq, &h, &dd, &dq, &legacy, &archived];
            // A direct conversation records its writers (SPEC §10 consent;
            // the sender is ARGV[7]).
            if palaver_protocol::parse_direct(&conversation_id).is_some() {
                keys.push(&writers);
            }
            cmds.push(Self::evalsha(
                &self.scripts.append,
                &keys,
                &[
                    &encoded,
                    &dedup_field,
                    now.as_bytes(),
                    ttl.as_bytes(),
                    window.as_bytes(),
                    &message.client_msg_id,
                    message.sender_user_id.as_bytes(),
                    if check_only { b"1" } else { b"0" },
                    max_unarchived.as_bytes(),
                ],
            ));
            messages.push((conversation_id, message));
        }
        let replies = self.pipeline(cmds)?;
        if replies.len() != messages.len() {
            return Err(corrupt(format!(
                "{} replies to {} appends",
                replies.len(),
                messages.len()
            )));
        }
        replies
            .into_iter()
            .zip(messages)
            .map(|(reply, (conversation_id, mut message))| {
                let reply: Vec<Value> = from_value(reply)?;
                let mut reply = reply.into_iter();
                let code: i64 = from_value(reply.next().unwrap_or(Value::Nil))?;
                let seq: u64 = from_value(reply.next().unwrap_or(Value::Nil))?;
                let (message_id, server_time_ms) = match code {
                    1 => {
                        message.seq = seq;
                        return Ok(Some(Appended::Stored(message)));
                    }
                    3 => return Ok(None),
                    4 => return Ok(Some(Appended::Backlogged { last_seq: seq })),
                    2 => {
                        let member: Vec<u8> = from_value(reply.next().unwrap_or(Value::Nil))?;
                        let original = decode_history_member(&member)?;
                        (original.message_id, original.server_time_ms)
                    }
                    _ => {
                        let time: i64 = from_value(reply.next().unwrap_or(Value::Nil))?;
                        let id: String = from_value(reply.next().unwrap_or(Value::Nil))?;
                        (id, time)
                    }
                };
                Ok(Some(Appended::Duplicate(pb::SendAck {
                    client_msg_id: message.client_msg_id,
                    message_id,
                    conversation_id,
                    seq,
                    server_time_ms,
                })))
            })
            .collect()
    }
}

impl ConversationStore for RedisStore {
    fn append_message(
        &mut self,
        conversation_id: &str,
        message: pb::Message,
        retention: &Retention,
    ) -> StoreResult<Appended> {
        self.append_messages(vec![(conversation_id.to_owned(), message)], retention)?
            .pop()
            .ok_or_else(|| corrupt("no reply to an append"))
    }

    /// One pipeline of append scripts: one round trip per node, and with
    /// `appendfsync always` one AOF fsync for the whole batch (Redis writes
    /// and fsyncs once per event-loop turn before replying).
    fn append_messages(
        &mut self,
        appends: Vec<(String, pb::Message)>,
        retention: &Retention,
    ) -> StoreResult<Vec<Appended>> {
        self.run_appends(appends, retention, false)?
            .into_iter()
            .map(|a| a.ok_or_else(|| corrupt("an append stored nothing")))
            .collect()
    }

    fn find_duplicates(
        &mut self,
        appends: Vec<(String, pb::Message)>,
        retention: &Retention,
    ) -> StoreResult<Vec<Option<pb::SendAck>>> {
        Ok(self
            .run_appends(appends, retention, true)?
            .into_iter()
            .map(|a| match a {
                Some(Appended::Duplicate(ack)) => Some(ack),
                _ => None,
            })
            .collect())
    }

    /// `SET NX GET`: the stored epoch, or a new one if the dataset has
    /// none (first start, or wiped since).
    fn history_epoch(&mut self) -> StoreResult<u64> {
        let fresh = crate::store::new_history_epoch();
        let cmd = redis::cmd("SET")
            .arg(HISTORY_EPOCH)
            .arg(fresh)
            .arg("NX")
            .arg("GET")
            .clone();
        let reply = self.pipeline(vec![cmd])?.pop();
        let old = match reply {
            Some(v) => from_value::<Option<u64>>(v)?,
            None => None,
        };
        Ok(old.unwrap_or(fresh))
    }

    fn last_seqs(&mut self, conversation_ids: &[String]) -> StoreResult<Vec<u64>> {
        let cmds = conversation_ids
            .iter()
            .map(|c| redis::cmd("GET").arg(conv_key(c, "seq")).clone())
            .collect();
        self.pipeline(cmds)?
            .into_iter()
            .map(|v| Ok(from_value::<Option<u64>>(v)?.unwrap_or(0)))
            .collect()
    }

    fn messages_after(&mut self, reads: &[RangeRead]) -> StoreResult<Vec<Vec<pb::Message>>> {
        let cmds = reads
            .iter()
            .map(|r| self.read_range(&r.conversation_id, b"a", r.after_seq, r.limit, r.max_bytes))
            .collect();
        let windowed: Vec<Vec<pb::Message>> = self
            .pipeline(cmds)?
            .into_iter()
            .map(|v| Ok(decode_range(v)?.1))
            .collect::<StoreResult<_>>()?;
        let Some(link) = &self.archive else {
            return Ok(windowed);
        };
        // Below the window: what the read wants before the oldest message
        // Redis returned comes from the archive, then the window continues
        // it (a read cut short by its budget is continued by the caller).
        reads
            .iter()
            .zip(windowed)
            .map(|(read, window)| {
                let Some(first) = window.first().map(|m| m.seq) else {
                    return Ok(window);
                };
                if first <= read.after_seq + 1 {
                    return Ok(window);
                }
                let mut older = link
                    .archive
                    .read_after(
                        &read.conversation_id,
                        read.after_seq,
                        first,
                        read.limit,
                        read.max_bytes,
                    )
                    .map_err(archive_error)?;
                if older.last().map(|m| m.seq + 1) != Some(first) {
                    // Cut short by the budget (or a hole: expired rows): the
                    // window's part comes with the next read.
                    return Ok(older);
                }
                let mut used: usize = older.iter().map(message_size).sum();
                for m in window {
                    let size = message_size(&m);
                    if older.len() >= read.limit
                        || (read.max_bytes > 0 && used + size > read.max_bytes)
                    {
                        break;
                    }
                    used += size;
                    older.push(m);
                }
                Ok(older)
            })
            .collect()
    }

    fn messages_before(
        &mut self,
        conversation_id: &str,
        before_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> StoreResult<HistorySlice> {
        if limit == 0 {
            return Ok(HistorySlice::default());
        }
        let cmd = self.read_range(conversation_id, b"b", before_seq, limit, max_bytes);
        let reply = self.pipeline(vec![cmd])?.pop();
        let (has_more, mut messages) =
            decode_range(reply.ok_or_else(|| corrupt("no reply to a history read"))?)?;
        messages.reverse();
        let Some(link) = self.archive.clone() else {
            return Ok(HistorySlice { messages, has_more });
        };
        // The window holds nothing older (has_more is false): the page goes
        // on in the archive below the oldest seq it returned.
        let used: usize = messages.iter().map(message_size).sum();
        let below = match messages.first() {
            Some(m) => m.seq,
            None if before_seq > 0 => before_seq,
            None => self.last_seqs(&[conversation_id.to_owned()])?[0] + 1,
        };
        let full = messages.len() >= limit || (max_bytes > 0 && used >= max_bytes);
        if has_more || full || below <= 1 {
            return Ok(HistorySlice {
                messages,
                has_more: has_more || (full && below > 1),
            });
        }
        let budget = if max_bytes == 0 { 0 } else { max_bytes - used };
        let older = link
            .archive
            .read_before(
                conversation_id,
                below,
                limit - messages.len(),
                budget.max(1),
            )
            .map_err(archive_error)?;
        // Older messages remain unless the archive ran out (or the oldest
        // is seq 1).
        let has_more = older.last().is_some_and(|m| m.seq > 1)
            && (older.len() == limit - messages.len() || max_bytes > 0);
        let mut page: Vec<pb::Message> = older.into_iter().rev().collect();
        page.extend(messages);
        Ok(HistorySlice {
            messages: page,
            has_more,
        })
    }

    fn charge_quotas(&mut self, charges: &[QuotaCharge]) -> StoreResult<Vec<bool>> {
        let cmds = charges
            .iter()
            .map(|c| {
                // Kept two periods: a period's counter outlives it on any clock.
                let ttl_s = 2 * c.owner.period_s();
                Self::evalsha(
                    &self.scripts.charge_quota,
                    &[&quota_key(&c.owner, c.period)],
                    &[
                        c.amount.to_string().as_bytes(),
                        c.limit.to_string().as_bytes(),
                        ttl_s.to_string().as_bytes(),
                    ],
                )
            })
            .collect();
        self.pipeline(cmds)?
            .into_iter()
            .map(|v| Ok(from_value::<i64>(v)? == 1))
            .collect()
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
        let members: Vec<Vec<u8>> = self.query(
            redis::cmd("ZRANGEBYSCORE")
                .arg(conv_key(conversation_id, "h"))
                .arg(format!("({after_seq}"))
                .arg(up_to_seq),
        )?;
        let mut senders = HashSet::new();
        for m in decode_history(members)? {
            senders.insert(m.sender_user_id);
        }
        Ok(senders.into_iter().collect())
    }

    fn advance_receipt(
        &mut self,
        conversation_id: &str,
        user_id: &str,
        kind: pb::ReceiptKind,
        up_to_seq: u64,
    ) -> StoreResult<Option<u64>> {
        let key = receipt_key(conversation_id, kind);
        let previous: i64 = self.with_conn(|conn, scripts| {
            scripts
                .advance_receipt
                .key(&key)
                .arg(user_id)
                .arg(up_to_seq)
                .invoke(conn.as_dyn())
        })?;
        Ok(u64::try_from(previous).ok())
    }

    fn create_group(&mut self, group: &GroupRecord) -> StoreResult<bool> {
        let id = &group.conversation_id;
        let (g, m) = (conv_key(id, "g"), conv_key(id, "m"));
        let created: i64 = self.with_conn(|conn, scripts| {
            let mut inv = scripts.create_group.prepare_invoke();
            inv.key(&g).key(&m).arg(&group.title).arg(group.created_ms);
            for member in &group.members {
                inv.arg(&member.user_id).arg(member.role);
            }
            inv.invoke(conn.as_dyn())
        })?;
        Ok(created == 1)
    }

    fn groups(&mut self, conversation_ids: &[String]) -> StoreResult<Vec<Option<GroupRecord>>> {
        let mut cmds = Vec::with_capacity(2 * conversation_ids.len());
        for id in conversation_ids {
            cmds.push(redis::cmd("HGETALL").arg(conv_key(id, "g")).clone());
            cmds.push(redis::cmd("HGETALL").arg(conv_key(id, "m")).clone());
        }
        let mut replies = self.pipeline(cmds)?.into_iter();
        let mut out = Vec::with_capacity(conversation_ids.len());
        for id in conversation_ids {
            let g: HashMap<String, String> = from_value(replies.next().unwrap_or(Value::Nil))?;
            let m: HashMap<String, String> = from_value(replies.next().unwrap_or(Value::Nil))?;
            if g.is_empty() {
                out.push(None);
                continue;
            }
            let mut members = m
                .into_iter()
                .map(|(user_id, role)| {
                    Ok(pb::Member {
                        user_id,
                        role: role_of(&role)? as i32,
                    })
                })
                .collect::<StoreResult<Vec<_>>>()?;
            members.sort_by(|a, b| a.user_id.cmp(&b.user_id));
            out.push(Some(GroupRecord {
                conversation_id: id.clone(),
                title: g.get("title").cloned().unwrap_or_default(),
                members,
                created_ms: g
                    .get("created")
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| corrupt(format!("group {id} without created time")))?,
            }));
        }
        Ok(out)
    }

    fn membership(&mut self, conversation_id: &str, user_id: &str) -> StoreResult<Membership> {
        let replies = self.pipeline(vec![
            redis::cmd("EXISTS")
                .arg(conv_key(conversation_id, "g"))
                .clone(),
            redis::cmd("HGET")
                .arg(conv_key(conversation_id, "m"))
                .arg(user_id)
                .clone(),
        ])?;
        let mut replies = replies.into_iter();
        let exists: bool = from_value(replies.next().unwrap_or(Value::Nil))?;
        let role: Option<String> = from_value(replies.next().unwrap_or(Value::Nil))?;
        Ok(match (exists, role) {
            (false, _) => Membership::NoSuchGroup,
            (true, None) => Membership::NotMember,
            (true, Some(role)) => Membership::Member(role_of(&role)?),
        })
    }

    /// `SCARD c:{dm}:w` per id: 2 once both users have written.
    fn written_by_both(&mut self, direct_ids: &[String]) -> StoreResult<Vec<bool>> {
        let cmds = direct_ids
            .iter()
            .map(|id| redis::cmd("SCARD").arg(conv_key(id, "w")).clone())
            .collect();
        self.pipeline(cmds)?
            .into_iter()
            .map(|v| Ok(from_value::<u64>(v)? >= 2))
            .collect()
    }

    /// One `HMGET` of the member hash.
    fn members_among(
        &mut self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> StoreResult<Vec<bool>> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let roles: Vec<Option<String>> = self.query(
            redis::cmd("HMGET")
                .arg(conv_key(conversation_id, "m"))
                .arg(user_ids),
        )?;
        Ok(roles.iter().map(Option::is_some).collect())
    }

    fn update_members(
        &mut self,
        conversation_id: &str,
        upsert: &[pb::Member],
        remove: &[String],
    ) -> StoreResult<()> {
        let (g, m) = (
            conv_key(conversation_id, "g"),
            conv_key(conversation_id, "m"),
        );
        self.with_conn(|conn, scripts| {
            let mut inv = scripts.update_members.prepare_invoke();
            inv.key(&g).key(&m).arg(upsert.len());
            for member in upsert {
                inv.arg(&member.user_id).arg(member.role);
            }
            for user_id in remove {
                inv.arg(user_id);
            }
            inv.invoke::<i64>(conn.as_dyn())
        })?;
        Ok(())
    }
}

/// Decodes a history member: seq prefix, then the Message with seq 0.
fn decode_history_member(member: &[u8]) -> StoreResult<pb::Message> {
    if member.len() < SEQ_PREFIX_LEN {
        return Err(corrupt("history entry shorter than its seq prefix"));
    }
    let seq: u64 = std::str::from_utf8(&member[..SEQ_PREFIX_LEN])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt("history entry seq prefix"))?;
    let mut message = pb::Message::decode(&member[SEQ_PREFIX_LEN..])
        .map_err(|e| corrupt(format!("history entry: {e}")))?;
    message.seq = seq;
    Ok(message)
}

/// A `read_range.lua` reply: {has_more, member...}.
pub(super) fn decode_range(reply: redis::Value) -> StoreResult<(bool, Vec<pb::Message>)> {
    let mut items: Vec<redis::Value> = from_value(reply)?;
    if items.is_empty() {
        return Err(corrupt("empty history read reply"));
    }
    let has_more: i64 = from_value(items.remove(0))?;
    let members = items
        .into_iter()
        .map(from_value::<Vec<u8>>)
        .collect::<StoreResult<Vec<_>>>()?;
    Ok((has_more != 0, decode_history(members)?))
}

fn decode_history(members: Vec<Vec<u8>>) -> StoreResult<Vec<pb::Message>> {
    members.iter().map(|m| decode_history_member(m)).collect()
}

fn role_of(value: &str) -> StoreResult<pb::Role> {
    value
        .parse::<i32>()
        .ok()
        .and_then(|r| pb::Role::try_from(r).ok())
        .ok_or_else(|| corrupt(format!("member role {value:?}")))
}
