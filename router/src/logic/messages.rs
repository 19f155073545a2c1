//! Messages: Send (one at a time, and the batch path `send_many` that
//! [`Router::handle_batch`] uses for runs of Sends), Sync and History.

use std::collections::HashMap;

use palaver_protocol::pb::{self, frame::Body, ErrorCode};
use prost::Message as _;

use super::{
    direct_access, direct_info, error_frame, event, group_access, group_info,
    parse_conversation_id, reject, reply, Access, ConversationRef, Failure, Rejection, Router,
};
use crate::api::Inbound;
use crate::bus::{Addressed, Output, PushEvent};
use crate::store::{Appended, GroupRecord, RangeRead, Retention, Store, StoreError, StoreResult};

impl<S: Store> Router<S> {
    // ---- Messages ------------------------------------------------------

    pub(super) fn send(
        &mut self,
        req: &Inbound,
        send: &pb::Send,
        out: &mut Output,
    ) -> Result<(), Failure> {
        Ok(self.send_many(&[(req, send)], out)?)
    }

    /// The checks of a Send that need no store, in SPEC §14's order (the
    /// gateway checks the body size first).
    pub(super) fn check_send(&self, send: &pb::Send) -> Result<(), Failure> {
        if send.body.len() > self.config.max_body_bytes {
            return reject(
                ErrorCode::BodyTooLarge,
                format!(
                    "body is {} bytes, the limit is {}",
                    send.body.len(),
                    self.config.max_body_bytes
                ),
            );
        }
        if send.client_msg_id.len() != 16 {
            return reject(
                ErrorCode::InvalidArgument,
                format!(
                    "client_msg_id must be exactly 16 bytes, got {}",
                    send.client_msg_id.len()
                ),
            );
        }
        match pb::ContentKind::try_from(send.kind) {
            Ok(pb::ContentKind::Unspecified) | Err(_) => reject(
                ErrorCode::InvalidArgument,
                format!("content kind {} is not a known ContentKind", send.kind),
            ),
            Ok(_) => Ok(()),
        }
    }

    /// Sends, in order, with the store work of all of them batched: one
    /// `groups` read for the group conversations among them, one
    /// `append_messages` (one pipeline, one AOF fsync in Redis), one
    /// `sessions_of_users` for the members of every conversation, then a
    /// push mark per message that has offline members. The frames are
    /// exactly those of one Send at a time, in input order (per Send: its
    /// Error, or its Delivers then its SendAck). On a store error no frame
    /// of any of them is in `out` (push events of marks already set are,
    /// since those effects happened) and the error is returned; the caller
    /// retries them, which dedup makes safe.
    pub(super) fn send_many(
        &mut self,
        sends: &[(&Inbound, &pb::Send)],
        out: &mut Output,
    ) -> StoreResult<()> {
        // 1. Checks without the store; group conversations to look up.
        let mut checked: Vec<Result<Option<Access>, Rejection>> = Vec::with_capacity(sends.len());
        let mut group_ids: Vec<String> = Vec::new();
        for (req, send) in sends {
            let user = &req.from.user_id;
            let result = self.check_send(send).and_then(|()| {
                match parse_conversation_id(&send.conversation_id)? {
                    ConversationRef::Direct { a, b } => direct_access(user, a, b).map(Some),
                    ConversationRef::Group => Ok(None),
                }
            });
            checked.push(match result {
                Ok(None) => {
                    if !group_ids.contains(&send.conversation_id) {
                        group_ids.push(send.conversation_id.clone());
                    }
                    Ok(None)
                }
                Ok(access) => Ok(access),
                Err(Failure::Rejected(code, message)) => Err((code, message)),
                Err(Failure::Store(e)) => return Err(e),
            });
        }
        let mut groups: HashMap<String, Option<GroupRecord>> = HashMap::new();
        if !group_ids.is_empty() {
            let records = self.store.groups(&group_ids)?;
            groups.extend(group_ids.into_iter().zip(records));
        }
        let accesses: Vec<Result<Access, Rejection>> = checked
            .into_iter()
            .zip(sends)
            .map(|(checked, (req, send))| match checked {
                Ok(Some(access)) => Ok(access),
                Ok(None) => {
                    let group = groups.get(&send.conversation_id).cloned().flatten();
                    group_access(&send.conversation_id, &req.from.user_id, group).map_err(|f| {
                        match f {
                            Failure::Rejected(code, message) => (code, message),
                            Failure::Store(e) => (ErrorCode::Internal, e.to_string()),
                        }
                    })
                }
                Err(rejected) => Err(rejected),
            })
            .collect();

        // 2. One batch of appends for the accepted Sends.
        let now_ms = self.clock.now_ms();
        let retention = Retention {
            now_ms,
            dedup_ttl_ms: self.config.dedup_ttl_ms,
            history_window: self.config.history_window,
        };
        let mut appends = Vec::with_capacity(sends.len());
        for ((req, send), access) in sends.iter().zip(&accesses) {
            if access.is_ok() {
                appends.push((
                    send.conversation_id.clone(),
                    pb::Message {
                        conversation_id: send.conversation_id.clone(),
                        seq: 0,
                        message_id: self.ids.next(),
                        sender_user_id: req.from.user_id.clone(),
                        sender_device_id: req.from.device_id.clone(),
                        client_msg_id: send.client_msg_id.clone(),
                        kind: send.kind,
                        body: send.body.clone(),
                        reply_to_seq: send.reply_to_seq,
                        media: send.media.clone(),
                        server_time_ms: now_ms,
                    },
                ));
            }
        }
        let appended = if appends.is_empty() {
            Vec::new()
        } else {
            self.store.append_messages(appends, &retention)?
        };

        // 3. A direct conversation is listed for both users by its first
        // message, and again on a retry (the first attempt may have stopped
        // right after the append).
        let mut appended_iter = appended.iter();
        let mut results: Vec<Result<(&Access, &Appended), Rejection>> =
            Vec::with_capacity(sends.len());
        for access in &accesses {
            match access {
                Ok(access) => match appended_iter.next() {
                    Some(appended) => results.push(Ok((access, appended))),
                    None => return Err(StoreError::Corrupt("fewer appends than asked".into())),
                },
                Err(rejected) => results.push(Err(rejected.clone())),
            }
        }
        for ((_, send), result) in sends.iter().zip(&results) {
            if let Ok((Access::Direct(users), appended)) = result {
                let first = match appended {
                    Appended::Duplicate(_) => true,
                    Appended::Stored(message) => message.seq == 1,
                };
                if first {
                    self.store
                        .add_conversation_to_users(&send.conversation_id, users)?;
                }
            }
        }

        // 4. One session lookup for the members of every stored message.
        let mut users: Vec<String> = Vec::new();
        let mut user_index: HashMap<String, usize> = HashMap::new();
        for (access, appended) in results.iter().flatten() {
            if let Appended::Stored(_) = appended {
                for user in access.member_ids() {
                    if !user_index.contains_key(&user) {
                        user_index.insert(user.clone(), users.len());
                        users.push(user);
                    }
                }
            }
        }
        let sessions = if users.is_empty() {
            Vec::new()
        } else {
            self.store.sessions_of_users(&users)?
        };

        // 5. The frames, in input order; push marks for offline members.
        let mut frames = Vec::new();
        for ((req, send), result) in sends.iter().zip(results) {
            let (access, appended) = match result {
                Err((code, message)) => {
                    frames.push(error_frame(req, code, message));
                    continue;
                }
                Ok(ok) => ok,
            };
            let message = match appended {
                Appended::Duplicate(ack) => {
                    frames.push(reply(req, Body::SendAck(ack.clone())));
                    continue;
                }
                Appended::Stored(message) => message,
            };
            let deliver = event(Body::Deliver(pb::Deliver {
                message: Some(message.clone()),
            }));
            let mut offline = Vec::new();
            for user_id in access.member_ids() {
                let devices = user_index
                    .get(&user_id)
                    .and_then(|&i| sessions.get(i))
                    .map_or(&[][..], Vec::as_slice);
                if devices.is_empty() {
                    if user_id != req.from.user_id {
                        offline.push(user_id);
                    }
                    continue;
                }
                for device in devices {
                    if device.addr != req.from.addr {
                        frames.push(Addressed {
                            to: device.addr.clone(),
                            frame: deliver.clone(),
                        });
                    }
                }
            }
            // The recipients' Delivers are written before the sender's
            // SendAck: no connection sees a different order (the sending
            // connection gets no Deliver, SPEC §6), and the delivery is the
            // latency that counts (one write less ahead of it).
            frames.push(reply(
                req,
                Body::SendAck(pb::SendAck {
                    client_msg_id: message.client_msg_id.clone(),
                    message_id: message.message_id.clone(),
                    conversation_id: send.conversation_id.clone(),
                    seq: message.seq,
                    server_time_ms: message.server_time_ms,
                }),
            ));
            if !offline.is_empty() {
                let fresh = self
                    .store
                    .mark_push_pending(&send.conversation_id, &offline)?;
                for (user_id, fresh) in offline.into_iter().zip(fresh) {
                    if fresh {
                        out.pushes.push(PushEvent {
                            user_id,
                            conversation_id: send.conversation_id.clone(),
                            seq: message.seq,
                            message_id: message.message_id.clone(),
                            sender_user_id: message.sender_user_id.clone(),
                            kind: message.kind,
                            server_time_ms: message.server_time_ms,
                        });
                    }
                }
            }
        }
        out.frames.extend(frames);
        Ok(())
    }

    // ---- Sync and history ----------------------------------------------

    pub(super) fn batch_limit(&self, requested: u32) -> usize {
        match requested as usize {
            0 => self.config.default_batch,
            n => n.min(self.config.max_batch),
        }
    }

    pub(super) fn sync(
        &mut self,
        req: &Inbound,
        sync: &pb::Sync,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let user = &req.from.user_id;
        let limit = self.batch_limit(sync.limit);
        let mut conversation_ids = self.store.conversations_of_user(user)?;
        conversation_ids.sort_unstable();
        let cursors: HashMap<&str, u64> = sync
            .cursors
            .iter()
            .map(|c| (c.conversation_id.as_str(), c.after_seq))
            .collect();
        let mut last_seqs = self.store.last_seqs(&conversation_ids)?;

        // Conversations the client does not know yet, listed first; within
        // the byte budget, so a huge account pages through them too.
        let mut budget = self.config.max_batch_bytes;
        let mut has_more = false;
        let absent: Vec<(usize, &String)> = conversation_ids
            .iter()
            .enumerate()
            .filter(|(_, id)| !cursors.contains_key(id.as_str()))
            .collect();
        let absent_groups: Vec<String> = absent
            .iter()
            .filter(|(_, id)| id.starts_with("grp:"))
            .map(|(_, id)| (*id).clone())
            .collect();
        let mut groups = self.store.groups(&absent_groups)?.into_iter();
        let mut conversations = Vec::new();
        // Messages are only sent for conversations the client knows or is
        // told about in this batch, so it never holds messages of a
        // conversation it has no info for.
        let mut known: Vec<bool> = conversation_ids
            .iter()
            .map(|id| cursors.contains_key(id.as_str()))
            .collect();
        for (index, id) in absent {
            let info = if id.starts_with("grp:") {
                match groups.next().flatten() {
                    Some(group) => group_info(group, last_seqs[index]),
                    None => {
                        // Listed but its record is gone (lost data): treat it
                        // as empty, or has_more would never clear.
                        last_seqs[index] = 0;
                        continue;
                    }
                }
            } else {
                match parse_conversation_id(id) {
                    Ok(ConversationRef::Direct { a, b }) => direct_info(a, b, last_seqs[index]),
                    _ => {
                        last_seqs[index] = 0;
                        continue;
                    }
                }
            };
            let size = info.encoded_len();
            if size > budget && !conversations.is_empty() {
                has_more = true;
                break;
            }
            budget = budget.saturating_sub(size);
            conversations.push(info);
            known[index] = true;
        }

        // Plan how many messages each conversation contributes.
        let mut reads = Vec::new();
        let mut remaining = limit;
        for (index, id) in conversation_ids.iter().enumerate() {
            let after_seq = cursors.get(id.as_str()).copied().unwrap_or(0);
            if last_seqs[index] <= after_seq {
                continue;
            }
            if !known[index] || remaining == 0 {
                has_more = true;
                continue;
            }
            let wanted = (last_seqs[index] - after_seq).min(remaining as u64) as usize;
            remaining -= wanted;
            reads.push((
                index,
                RangeRead {
                    conversation_id: id.clone(),
                    after_seq,
                    limit: wanted,
                },
            ));
        }
        let range_reads: Vec<RangeRead> = reads.iter().map(|(_, r)| r.clone()).collect();
        let results = self.store.messages_after(&range_reads)?;
        let mut messages = Vec::new();
        'conversations: for ((index, _), batch) in reads.iter().zip(results) {
            let last_seq = last_seqs[*index];
            let mut newest = 0;
            for message in batch {
                let size = message.encoded_len();
                if size > budget && !(messages.is_empty() && conversations.is_empty()) {
                    has_more = true;
                    break 'conversations;
                }
                budget = budget.saturating_sub(size);
                newest = message.seq;
                messages.push(message);
            }
            if newest != 0 && newest < last_seq {
                has_more = true;
            }
        }
        out.frames.push(reply(
            req,
            Body::SyncBatch(pb::SyncBatch {
                messages,
                conversations,
                has_more,
            }),
        ));
        Ok(())
    }

    pub(super) fn history(
        &mut self,
        req: &Inbound,
        history: &pb::History,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let conversation_id = &history.conversation_id;
        self.check_member(conversation_id, &req.from.user_id)?;
        let limit = self.batch_limit(history.limit);
        let mut slice = self
            .store
            .messages_before(conversation_id, history.before_seq, limit)?;
        // Keep the newest messages that fit the byte budget (at least one).
        let mut budget = self.config.max_batch_bytes;
        let mut keep_from = slice.messages.len();
        while keep_from > 0 {
            let size = slice.messages[keep_from - 1].encoded_len();
            if size > budget && keep_from < slice.messages.len() {
                break;
            }
            budget = budget.saturating_sub(size);
            keep_from -= 1;
        }
        if keep_from > 0 {
            slice.messages.drain(..keep_from);
            slice.has_more = true;
        }
        out.frames.push(reply(
            req,
            Body::HistoryPage(pb::HistoryPage {
                conversation_id: conversation_id.clone(),
                messages: slice.messages,
                has_more: slice.has_more,
            }),
        ));
        Ok(())
    }
}
