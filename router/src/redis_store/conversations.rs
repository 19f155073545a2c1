//! `impl ConversationStore for RedisStore`: seq, history, dedup, receipts,
//! group records and members.

use std::collections::{HashMap, HashSet};

use palaver_protocol::pb;
use prost::Message as _;
use redis::Value;

use crate::store::{
    Appended, ConversationStore, GroupRecord, HistorySlice, Membership, RangeRead, Retention,
    StoreResult,
};

use super::keys::{conv_key, dedup_key, receipt_key, SEQ_PREFIX_LEN};
use super::{corrupt, from_value, RedisStore};

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
        let mut cmds = Vec::with_capacity(appends.len());
        let mut messages = Vec::with_capacity(appends.len());
        let (now, ttl, window) = (
            retention.now_ms.to_string(),
            retention.dedup_ttl_ms.to_string(),
            retention.history_window.to_string(),
        );
        for (conversation_id, mut message) in appends {
            message.seq = 0;
            let encoded = message.encode_to_vec();
            let (seq, h, dd, dq, legacy, writers) = (
                conv_key(&conversation_id, "seq"),
                conv_key(&conversation_id, "h"),
                conv_key(&conversation_id, "dd"),
                conv_key(&conversation_id, "dq"),
                dedup_key(&conversation_id, &message.client_msg_id),
                conv_key(&conversation_id, "w"),
            );
            let mut keys: Vec<&str> = vec![&seq, &h, &dd, &dq, &legacy];
            let mut args: Vec<&[u8]> = vec![
                &encoded,
                &message.client_msg_id,
                now.as_bytes(),
                ttl.as_bytes(),
                window.as_bytes(),
            ];
            // A direct conversation records its writers (SPEC §10 consent).
            if palaver_protocol::parse_direct(&conversation_id).is_some() {
                keys.push(&writers);
                args.push(message.sender_user_id.as_bytes());
            }
            cmds.push(Self::evalsha(&self.scripts.append, &keys, &args));
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
                        return Ok(Appended::Stored(message));
                    }
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
                Ok(Appended::Duplicate(pb::SendAck {
                    client_msg_id: message.client_msg_id,
                    message_id,
                    conversation_id,
                    seq,
                    server_time_ms,
                }))
            })
            .collect()
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
            .map(|r| {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(conv_key(&r.conversation_id, "h"))
                    .arg(format!("({}", r.after_seq))
                    .arg("+inf")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(r.limit)
                    .clone()
            })
            .collect();
        self.pipeline(cmds)?
            .into_iter()
            .map(|v| decode_history(from_value(v)?))
            .collect()
    }

    fn messages_before(
        &mut self,
        conversation_id: &str,
        before_seq: u64,
        limit: usize,
    ) -> StoreResult<HistorySlice> {
        if limit == 0 {
            return Ok(HistorySlice::default());
        }
        let max = if before_seq == 0 {
            "+inf".to_string()
        } else {
            format!("({before_seq}")
        };
        let members: Vec<Vec<u8>> = self.query(
            redis::cmd("ZREVRANGEBYSCORE")
                .arg(conv_key(conversation_id, "h"))
                .arg(max)
                .arg("-inf")
                .arg("LIMIT")
                .arg(0)
                .arg(limit + 1),
        )?;
        let has_more = members.len() > limit;
        let mut messages = decode_history(members.into_iter().take(limit).collect())?;
        messages.reverse();
        Ok(HistorySlice { messages, has_more })
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
