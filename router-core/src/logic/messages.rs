//! Messages: Send (one at a time, and the batch path `send_many` that
//! [`Router::handle_batch`] uses for runs of Sends), Sync and History.

use std::collections::HashMap;

use palaver_protocol::pb::{self, frame::Body, ErrorCode};
use prost::Message as _;

use super::channels::channel_info;
use super::{
    access, direct_info, error_frame, event, group_info, parse_conversation_id, reject, reply,
    Access, ConversationRef, Failure, Rejection, Router,
};
use crate::api::{Inbound, SessionAddr};
use crate::bus::{Addressed, ChannelPost, Output, PushEvent};
use crate::store::{
    Appended, QuotaCharge, QuotaOwner, RangeRead, Recipients, Retention, Store, StoreError,
    StoreResult,
};

impl<S: Store> Router<S> {
    // ---- Messages ------------------------------------------------------

    pub(super) fn send(&mut self, req: &Inbound, out: &mut Output) -> Result<(), Failure> {
        Ok(self.send_many(std::slice::from_ref(req), out)?)
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
    /// `recipients` read (sessions, and whose registered push devices are
    /// offline) for the members of every conversation, then a push mark per
    /// message that has members to push. The frames are
    /// exactly those of one Send at a time, in input order (per Send: its
    /// Error, or its Delivers then its SendAck). On a store error no frame
    /// of any of them is in `out` (push events of marks already set are,
    /// since those effects happened) and the error is returned; the caller
    /// retries them, which dedup makes safe.
    ///
    /// `sends` are requests whose body is a Send (a run of them:
    /// [`Router::handle_batch`]); any other is skipped.
    ///
    /// Member ids are borrowed from the conversation ids and the group
    /// records throughout, never copied: this is the per-message path.
    pub(super) fn send_many(&mut self, sends: &[Inbound], out: &mut Output) -> StoreResult<()> {
        let sends = || {
            sends.iter().filter_map(|req| match &req.body {
                Body::Send(send) => Some((req, send)),
                _ => None,
            })
        };
        // 1. Checks, with one read of the groups the Sends name.
        let mut group_ids: Vec<String> = Vec::new();
        for (_, send) in sends() {
            let group = self.check_send(send).is_ok()
                && matches!(
                    parse_conversation_id(&send.conversation_id),
                    Ok(ConversationRef::Group)
                );
            if group && !group_ids.contains(&send.conversation_id) {
                group_ids.push(send.conversation_id.clone());
            }
        }
        let groups = if group_ids.is_empty() {
            Vec::new()
        } else {
            self.store.groups(&group_ids)?
        };
        // A channel's sender and mentions: lookups in its member set.
        let mut channel_checks: Vec<Option<Result<Vec<String>, Rejection>>> = Vec::new();
        for (req, send) in sends() {
            let check = if self.check_send(send).is_ok()
                && palaver_protocol::is_channel_id(&send.conversation_id)
            {
                let checked = self.channel_send_check(
                    &send.conversation_id,
                    &req.from.user_id,
                    &send.mention_user_ids,
                );
                Some(match checked {
                    Ok(mentioned) => Ok(mentioned),
                    Err(Failure::Rejected(code, message)) => Err((code, message)),
                    Err(Failure::Store(e)) => return Err(e),
                })
            } else {
                None
            };
            channel_checks.push(check);
        }
        let mut accesses: Vec<Result<Access, Rejection>> = sends()
            .zip(&channel_checks)
            .map(|((req, send), channel)| {
                // A batch names few groups: a linear search.
                let group = group_ids
                    .iter()
                    .position(|id| *id == send.conversation_id)
                    .and_then(|i| groups.get(i))
                    .and_then(Option::as_ref);
                self.check_send(send)
                    .and_then(|()| match channel {
                        Some(Ok(mentioned)) => Ok(Access::Channel(mentioned)),
                        Some(Err((code, message))) => {
                            Err(Failure::Rejected(*code, message.clone()))
                        }
                        None => access(&send.conversation_id, &req.from.user_id, group),
                    })
                    .map_err(|f| match f {
                        Failure::Rejected(code, message) => (code, message),
                        Failure::Store(e) => (ErrorCode::Internal, e.to_string()),
                    })
            })
            .collect();

        // 1b. Storage quotas (SPEC §13).
        let now_ms = self.clock.now_ms();
        let retention = Retention {
            now_ms,
            dedup_ttl_ms: self.config.dedup_ttl_ms,
            history_window: self.config.history_window,
        };
        let listed: Vec<(&Inbound, &pb::Send)> = sends().collect();
        let charged = self.charge_quotas(&listed, &mut accesses, &retention)?;

        // 2. One batch of appends for the accepted Sends.
        let mut appends = Vec::with_capacity(accesses.len());
        for ((req, send), access) in sends().zip(&accesses) {
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
        let mut appended = if appends.is_empty() {
            Vec::new()
        } else {
            self.store.append_messages(appends, &retention)?
        };
        let accepted = accesses.iter().filter(|a| a.is_ok()).count();
        if appended.len() != accepted {
            return Err(StoreError::Corrupt("fewer appends than asked".into()));
        }

        // 3. A direct conversation is listed for both users by its first
        // message, and again on a retry (the first attempt may have stopped
        // right after the append).
        let accepted = || accesses.iter().filter_map(|a| a.as_ref().ok().copied());
        let accepted_sends = sends().zip(&accesses).filter(|(_, a)| a.is_ok());
        for ((access, appended), ((_, send), _)) in accepted().zip(&appended).zip(accepted_sends) {
            if let Access::Direct([a, b]) = access {
                let first = match appended {
                    Appended::Duplicate(_) => true,
                    Appended::Stored(message) => message.seq == 1,
                    Appended::Backlogged { .. } => false,
                };
                if first {
                    self.store
                        .add_conversation_to_users(&send.conversation_id, &[a.into(), b.into()])?;
                }
            }
        }

        // 3a. A duplicate stored nothing: what it was charged is given back.
        let duplicates = (0..listed.len())
            .filter(|&i| accesses[i].is_ok())
            .zip(&appended)
            .filter(|(i, a)| {
                charged[*i] && matches!(a, Appended::Duplicate(_) | Appended::Backlogged { .. })
            })
            .map(|(i, _)| listed[i]);
        let refunds = self.quota_charges(duplicates, now_ms, -1);
        if !refunds.is_empty() {
            self.store.charge_quotas(&refunds)?;
        }

        // 3b. A repeated Send is delivered again (SPEC §6: at-least-once).
        // Its first attempt may have stopped after the append, before any
        // Deliver or push left (a store error later in its batch, a router
        // crash before the output was shipped, a lost ack): without this,
        // online members would only see it at their next Sync, and offline
        // ones would get no push. Recipients dedupe by seq.
        self.redeliver_duplicates(&mut appended)?;

        // 4. One session lookup for the members of every stored message:
        // each user once, found again by binary search.
        let mut users: Vec<&str> = Vec::with_capacity(
            accepted()
                .zip(&appended)
                .filter(|(_, a)| matches!(a, Appended::Stored(_)))
                .map(|(access, _)| access.member_count())
                .sum(),
        );
        for (access, appended) in accepted().zip(&appended) {
            if let Appended::Stored(_) = appended {
                users.extend(access.member_ids());
            }
        }
        users.sort_unstable();
        users.dedup();
        // The same read also says who has a registered push device that is
        // not online (one pipeline in Redis, SPEC §20): the only users a
        // push event is made for.
        let Recipients { sessions, push_due } = if users.is_empty() {
            Recipients::default()
        } else {
            self.store.recipients(&users)?
        };

        // 5. The frames, in input order, straight into `out` (taken back
        // if a push mark fails); push marks for members with a registered
        // device that is not online.
        let frames_before = out.frames.len();
        let posts_before = out.channel_posts.len();
        let mut appended = appended.into_iter();
        for ((req, send), access) in sends().zip(accesses) {
            let access = match access {
                Err((code, message)) => {
                    out.frames.push(error_frame(req, code, message));
                    continue;
                }
                Ok(access) => access,
            };
            let message = match appended.next() {
                Some(Appended::Duplicate(ack)) => {
                    out.frames.push(reply(req, Body::SendAck(ack)));
                    continue;
                }
                Some(Appended::Backlogged { last_seq }) => {
                    out.frames.push(error_frame(
                        req,
                        ErrorCode::Unavailable,
                        format!(
                            "the history archive is behind: {} holds as many unarchived \
                             messages as it may (last seq {last_seq}); retry later",
                            send.conversation_id
                        ),
                    ));
                    continue;
                }
                Some(Appended::Stored(message)) => message,
                // Counted above.
                None => {
                    out.frames.truncate(frames_before);
                    out.channel_posts.truncate(posts_before);
                    return Err(StoreError::Corrupt("fewer appends than asked".into()));
                }
            };
            if self.config.archive_stream {
                out.stored.push(message.clone());
            }
            let ack = pb::SendAck {
                client_msg_id: message.client_msg_id.clone(),
                message_id: message.message_id.clone(),
                conversation_id: send.conversation_id.clone(),
                seq: message.seq,
                server_time_ms: message.server_time_ms,
            };
            // Each recipient but the last gets a copy of the message; the
            // last gets the message itself, after the push events (built
            // from it: a redelivered original keeps its own sender and
            // kind, SPEC §6) are out.
            let deliver = |message| {
                event(Body::Deliver(pb::Deliver {
                    message: Some(message),
                }))
            };
            let mut last: Option<&SessionAddr> = None;
            // Members to push, with their devices online now.
            let mut to_push: Vec<(&str, &[String])> = Vec::new();
            for user_id in access.member_ids() {
                let found = users.binary_search(&user_id).ok();
                let devices = found.map_or(&[][..], |i| sessions.of(i));
                if user_id != req.from.user_id {
                    if let Some(Some(online)) = found.and_then(|i| push_due.get(i)) {
                        to_push.push((user_id, online.as_slice()));
                    }
                }
                // A channel's message reaches connections through its post.
                let devices = if let Access::Channel(_) = access {
                    &[][..]
                } else {
                    devices
                };
                for addr in devices {
                    if *addr != req.from.addr {
                        if let Some(to) = last.replace(addr) {
                            out.frames.push(Addressed {
                                to: to.clone(),
                                frame: deliver(message.clone()),
                                answers_request: false,
                            });
                        }
                    }
                }
            }
            if !to_push.is_empty() {
                let marked: Vec<&str> = to_push.iter().map(|(user_id, _)| *user_id).collect();
                let fresh = match self.store.mark_push_pending(&send.conversation_id, &marked) {
                    Ok(fresh) => fresh,
                    Err(e) => {
                        out.frames.truncate(frames_before);
                        out.channel_posts.truncate(posts_before);
                        return Err(e);
                    }
                };
                for ((user_id, online), fresh) in to_push.into_iter().zip(fresh) {
                    if fresh {
                        out.pushes.push(PushEvent {
                            user_id: user_id.to_owned(),
                            conversation_id: send.conversation_id.clone(),
                            seq: message.seq,
                            message_id: message.message_id.clone(),
                            sender_user_id: message.sender_user_id.clone(),
                            kind: message.kind,
                            server_time_ms: message.server_time_ms,
                            online_device_ids: online.to_vec(),
                        });
                    }
                }
            }
            if let Access::Channel(_) = access {
                // Published once, for every gateway (SPEC §21).
                out.channel_posts.push(ChannelPost {
                    conversation_id: send.conversation_id.clone(),
                    last_seq: message.seq,
                    frame: deliver(message),
                    from: Some(req.from.addr.clone()),
                });
            } else if let Some(to) = last {
                out.frames.push(Addressed {
                    to: to.clone(),
                    frame: deliver(message),
                    answers_request: false,
                });
            }
            // The recipients' Delivers are written before the sender's
            // SendAck: no connection sees a different order (the sending
            // connection gets no Deliver, SPEC §6), and the delivery is the
            // latency that counts (one write less ahead of it).
            out.frames.push(reply(req, Body::SendAck(ack)));
        }
        Ok(())
    }

    /// Replaces each [`Appended::Duplicate`] with the original message
    /// (read back, one store call for all of them), so it is delivered and
    /// pushed again. Also when this batch stored the original: a batch is
    /// answered exactly as its requests one at a time. A duplicate whose
    /// original left the history window stays a duplicate (ack only).
    fn redeliver_duplicates(&mut self, appended: &mut [Appended]) -> StoreResult<()> {
        let (again, reads): (Vec<usize>, Vec<RangeRead>) = appended
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match a {
                Appended::Duplicate(ack) if ack.seq > 0 => Some((
                    i,
                    RangeRead {
                        conversation_id: ack.conversation_id.clone(),
                        after_seq: ack.seq - 1,
                        limit: 1,
                        max_bytes: usize::MAX,
                    },
                )),
                _ => None,
            })
            .unzip();
        if again.is_empty() {
            return Ok(());
        }
        let found = self.store.messages_after(&reads)?;
        for (i, mut messages) in again.into_iter().zip(found) {
            let Appended::Duplicate(ack) = &appended[i] else {
                continue;
            };
            if let Some(original) = messages
                .pop()
                .filter(|m| m.seq == ack.seq && m.message_id == ack.message_id)
            {
                appended[i] = Appended::Stored(original);
            }
        }
        Ok(())
    }

    /// Charges each accepted Send's weight to the sender's and the
    /// conversation's quota of the day (one store call). A Send over either
    /// is refused QUOTA_EXCEEDED and what the other quota took is given back
    /// — unless it is the retry of a message stored earlier (one more store
    /// call, only when something was refused): that one is answered with its
    /// original ack as usual, free. Returns which Sends were charged (their
    /// charge is refunded if the append finds a duplicate).
    fn charge_quotas(
        &mut self,
        sends: &[(&Inbound, &pb::Send)],
        accesses: &mut [Result<Access, Rejection>],
        retention: &Retention,
    ) -> StoreResult<Vec<bool>> {
        let mut charged = vec![false; sends.len()];
        let accepted: Vec<usize> = (0..sends.len()).filter(|&i| accesses[i].is_ok()).collect();
        if accepted.is_empty() {
            return Ok(charged);
        }
        let charges = self.quota_charges(accepted.iter().map(|&i| sends[i]), retention.now_ms, 1);
        let granted = self.store.charge_quotas(&charges)?;
        let mut refunds = Vec::new();
        let mut refused = Vec::new();
        for ((&i, charge), granted) in accepted
            .iter()
            .zip(charges.chunks(2))
            .zip(granted.chunks(2))
        {
            if granted.iter().all(|g| *g) {
                charged[i] = true;
                continue;
            }
            for (c, g) in charge.iter().zip(granted) {
                if *g {
                    refunds.push(QuotaCharge {
                        amount: -c.amount,
                        ..c.clone()
                    });
                }
            }
            let over = usize::from(granted[0]);
            let whose = match &charge[over].owner {
                QuotaOwner::Account(_) => "your account".to_string(),
                QuotaOwner::Conversation(id) | QuotaOwner::MembershipChanges(id) => {
                    format!("conversation {id}")
                }
            };
            let access = std::mem::replace(
                &mut accesses[i],
                Err((
                    ErrorCode::QuotaExceeded,
                    format!(
                        "the daily storage quota of {whose} ({} bytes) is used up; \
                         it starts again at 00:00 UTC",
                        charge[over].limit
                    ),
                )),
            );
            refused.push((i, access));
        }
        if !refunds.is_empty() {
            self.store.charge_quotas(&refunds)?;
        }
        if !refused.is_empty() {
            let candidates = refused
                .iter()
                .map(|&(i, _)| {
                    let (req, send) = sends[i];
                    let message = pb::Message {
                        sender_user_id: req.from.user_id.clone(),
                        client_msg_id: send.client_msg_id.clone(),
                        ..Default::default()
                    };
                    (send.conversation_id.clone(), message)
                })
                .collect();
            let found = self.store.find_duplicates(candidates, retention)?;
            for ((i, access), duplicate) in refused.into_iter().zip(found) {
                if duplicate.is_some() {
                    accesses[i] = access;
                }
            }
        }
        Ok(charged)
    }

    /// The quota charges (account, then conversation) of `sends`, signed by
    /// `sign` (1: charge, -1: refund).
    fn quota_charges<'s>(
        &self,
        sends: impl Iterator<Item = (&'s Inbound, &'s pb::Send)>,
        now_ms: i64,
        sign: i64,
    ) -> Vec<QuotaCharge> {
        let day = u32::try_from(now_ms.max(0) / DAY_MS).unwrap_or(u32::MAX);
        let mut charges = Vec::new();
        for (req, send) in sends {
            let bytes = sign * (send.body.len() + QUOTA_OVERHEAD_BYTES) as i64;
            charges.push(QuotaCharge {
                owner: QuotaOwner::Account(req.from.user_id.clone()),
                period: day,
                amount: bytes,
                limit: self.config.account_bytes_per_day,
            });
            charges.push(QuotaCharge {
                owner: QuotaOwner::Conversation(send.conversation_id.clone()),
                period: day,
                amount: bytes,
                limit: self.config.conversation_bytes_per_day,
            });
        }
        charges
    }

    // ---- Sync and history ----------------------------------------------

    pub(super) fn batch_limit(&self, requested: u32) -> usize {
        match requested as usize {
            0 => self.config.default_batch,
            n => n.min(self.config.max_batch),
        }
    }

    /// Sync: the user's conversations the client does not know (listed
    /// first), then messages after each cursor, within `limit` and about
    /// `max_batch_bytes`. The work is bounded by what the batch holds: group
    /// records are read [`LISTING_CHUNK`] at a time until the listing is
    /// full (not every group and member list of a user in thousands of
    /// groups), and messages are read in waves of [`READ_WAVE`]
    /// conversations, each read with a share of the bytes left, so no read
    /// copies more than it may return (plus one message).
    pub(super) fn sync(
        &mut self,
        req: &Inbound,
        sync: &pb::Sync,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let user = &req.from.user_id;
        let limit = self.batch_limit(sync.limit);
        // Read before the data it vouches for.
        let history_epoch = self.store.history_epoch()?;
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
        let absent: Vec<usize> = (0..conversation_ids.len())
            .filter(|&i| !cursors.contains_key(conversation_ids[i].as_str()))
            .collect();
        let mut conversations = Vec::new();
        // Messages are only sent for conversations the client knows or is
        // told about in this batch, so it never holds messages of a
        // conversation it has no info for.
        let mut known: Vec<bool> = conversation_ids
            .iter()
            .map(|id| cursors.contains_key(id.as_str()))
            .collect();
        'listing: for chunk in absent.chunks(LISTING_CHUNK) {
            let group_ids: Vec<String> = chunk
                .iter()
                .map(|&i| &conversation_ids[i])
                .filter(|id| id.starts_with("grp:"))
                .cloned()
                .collect();
            let mut groups = self.store.groups(&group_ids)?.into_iter();
            for &index in chunk {
                let id = &conversation_ids[index];
                let info = if id.starts_with("grp:") {
                    match groups.next().flatten() {
                        Some(group) => group_info(group, last_seqs[index]),
                        None => {
                            // Listed but its record is gone (lost data): treat
                            // it as empty, or has_more would never clear.
                            last_seqs[index] = 0;
                            continue;
                        }
                    }
                } else {
                    match parse_conversation_id(id) {
                        Ok(ConversationRef::Direct { a, b }) => direct_info(a, b, last_seqs[index]),
                        // One record read per channel listed (the listing
                        // is bounded by its byte budget).
                        Ok(ConversationRef::Channel) => match self.store.channel(id)? {
                            Some(channel) => channel_info(channel, last_seqs[index]),
                            None => {
                                last_seqs[index] = 0;
                                continue;
                            }
                        },
                        _ => {
                            last_seqs[index] = 0;
                            continue;
                        }
                    }
                };
                let size = info.encoded_len();
                if size > budget && !conversations.is_empty() {
                    has_more = true;
                    break 'listing;
                }
                budget = budget.saturating_sub(size);
                conversations.push(info);
                known[index] = true;
            }
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
                    max_bytes: 0,
                },
            ));
        }
        // Read them in waves, each read with its share of the bytes left,
        // as many reads as the bytes left could fill with the heaviest
        // messages (at most READ_WAVE): a read returns at most its share
        // plus one message, so a wave reads about what the batch can hold.
        // A conversation cut short is continued by the client (has_more).
        let heaviest = self.config.max_body_bytes + MESSAGE_ENVELOPE_BYTES;
        let mut messages = Vec::new();
        let mut next = 0;
        'waves: while next < reads.len() && budget > 0 {
            let wave_len = (budget / heaviest)
                .clamp(1, READ_WAVE)
                .min(reads.len() - next);
            let share = budget / wave_len;
            let wave = &mut reads[next..next + wave_len];
            next += wave_len;
            for (_, read) in wave.iter_mut() {
                read.max_bytes = share;
            }
            let wave_reads: Vec<RangeRead> = wave.iter().map(|(_, r)| r.clone()).collect();
            let results = self.store.messages_after(&wave_reads)?;
            for ((index, _), batch) in wave.iter().zip(results) {
                let last_seq = last_seqs[*index];
                let mut newest = 0;
                for message in batch {
                    let size = message.encoded_len();
                    if size > budget && !(messages.is_empty() && conversations.is_empty()) {
                        has_more = true;
                        break 'waves;
                    }
                    budget = budget.saturating_sub(size);
                    newest = message.seq;
                    messages.push(message);
                }
                if newest != 0 && newest < last_seq {
                    has_more = true;
                }
            }
        }
        if next < reads.len() {
            has_more = true;
        }
        out.frames.push(reply(
            req,
            Body::SyncBatch(pb::SyncBatch {
                messages,
                conversations,
                has_more,
                history_epoch,
            }),
        ));
        Ok(())
    }

    /// History: the newest `limit` messages before `before_seq` that fit
    /// `max_batch_bytes` (at least one), read by the store within that
    /// budget: a page of 500 large messages copies what it returns, not
    /// 500 messages.
    pub(super) fn history(
        &mut self,
        req: &Inbound,
        history: &pb::History,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let conversation_id = &history.conversation_id;
        self.check_member(conversation_id, &req.from.user_id)?;
        let limit = self.batch_limit(history.limit);
        let slice = self.store.messages_before(
            conversation_id,
            history.before_seq,
            limit,
            self.config.max_batch_bytes,
        )?;
        out.frames.push(reply(
            req,
            Body::HistoryPage(pb::HistoryPage {
                conversation_id: conversation_id.clone(),
                messages: slice.messages,
                has_more: slice.has_more,
                history_epoch: self.store.history_epoch()?,
            }),
        ));
        Ok(())
    }
}

/// Absent conversations whose group records one store call reads while a
/// SyncBatch's listing fills.
const LISTING_CHUNK: usize = 16;

/// What a stored message weighs against the storage quotas beyond its body
/// (SPEC §13): ids, times, index entries.
const QUOTA_OVERHEAD_BYTES: usize = 256;

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// Most conversations whose messages one store call reads (one pipeline).
const READ_WAVE: usize = 16;

/// What the server adds to a Send's body in a stored message, at most (ids,
/// sender, times, kind): with `max_body_bytes`, the heaviest message.
const MESSAGE_ENVELOPE_BYTES: usize = 1024;
