//! What arrives from the server: Welcome, acks, messages, sync batches,
//! errors, GoAway, events, each turned into state and app events.

use palaver_protocol::pb::{self, frame::Body};

use crate::cursors::{Arrival, Release};
use crate::error::{ErrorCode, ServerError};
use crate::types::*;

use super::*;

impl Engine {
    pub(super) fn on_welcome(&mut self, w: pb::Welcome, now: u64) {
        self.attempt = 0;
        self.limits = w.limits.unwrap_or_default();
        self.user_id = w.user_id.clone();
        self.send_tokens = f64::from(self.send_rate());
        self.tokens_at = now;
        self.set_state(ConnectionState::Connected {
            user_id: w.user_id,
            session_id: w.session_id,
        });
        if self.sync.is_none() {
            // No resume cursors (fresh install): a Sync without cursors
            // lists every conversation (SPEC §7).
            self.start_sync(now);
        }
        // SPEC §10: subscriptions belong to the connection; restore them.
        let watched: Vec<String> = self.watched.iter().cloned().collect();
        if !watched.is_empty() {
            self.presence_subscribe(watched, false, now);
        }
        // SPEC §21: so are a channel's modes.
        let channels: Vec<(String, ChannelMode)> = self
            .open_channels
            .iter()
            .map(|(c, m)| (c.clone(), *m))
            .collect();
        for (conversation_id, mode) in channels {
            self.open_channel(conversation_id, mode, now);
        }
        if !self.receipts.is_empty() {
            self.receipts_due = Some(now);
        }
    }

    pub(super) fn on_go_away(&mut self, g: pb::GoAway, now: u64) {
        // GoAway is the last frame (SPEC §4): close at once.
        if g.reason == pb::GoAwayReason::Replaced as i32 {
            self.stop(now, Some(DisconnectCause::Replaced));
        } else {
            let detail = format!("GoAway {:?}", g.reason());
            self.fail(
                now,
                g.reconnect_delay_ms,
                0,
                ConnectFailure::ServerBusy { detail },
            );
        }
    }

    pub(super) fn on_error(&mut self, rid: u32, e: pb::Error, now: u64) {
        let err = ServerError::from_pb(&e);
        if err.code.closes_connection() {
            let auth = |error: &ServerError| ConnectFailure::AuthRefused {
                error: error.clone(),
            };
            match err.code {
                ErrorCode::TokenExpired if self.token_was_refreshed => {
                    // Expired although just fetched fresh: the provider's
                    // tokens or a clock are wrong, and will be next time.
                    self.stop(
                        now,
                        Some(DisconnectCause::Failed {
                            failure: auth(&err),
                        }),
                    );
                }
                ErrorCode::TokenExpired => {
                    self.refresh_token = true;
                    self.fail(now, 0, 0, auth(&err));
                }
                ErrorCode::Unauthenticated if !self.token_was_refreshed => {
                    // Maybe a revoked or rotated token: one more try with a
                    // fresh one before giving up.
                    self.refresh_token = true;
                    self.fail(now, 0, 0, auth(&err));
                }
                c if c.stops_reconnecting() => {
                    self.stop(now, Some(DisconnectCause::Server { error: err }))
                }
                // A client bug, or other connections of the account that
                // will not go away soon: no tight loop.
                ErrorCode::ProtocolViolation | ErrorCode::MalformedFrame => {
                    let detail = format!("{:?}: {}", err.code, err.message);
                    self.fail(
                        now,
                        0,
                        STRONG_BACKOFF_STEPS,
                        ConnectFailure::Protocol { detail },
                    )
                }
                ErrorCode::TooManyConnections => {
                    let detail = format!("{:?}: {}", err.code, err.message);
                    self.fail(
                        now,
                        0,
                        STRONG_BACKOFF_STEPS,
                        ConnectFailure::ServerBusy { detail },
                    )
                }
                ErrorCode::HelloTimeout | ErrorCode::HeartbeatTimeout => {
                    let detail = format!("{:?}: {}", err.code, err.message);
                    self.fail(now, 0, 0, ConnectFailure::TimedOut { detail })
                }
                code => {
                    let detail = format!("{code:?}: {}", err.message);
                    let why = match code {
                        ErrorCode::FrameTooLarge => ConnectFailure::Protocol { detail },
                        ErrorCode::SlowConsumer => ConnectFailure::ConnectionLost { detail },
                        _ => ConnectFailure::ServerBusy { detail },
                    };
                    self.fail(now, 0, 0, why)
                }
            }
            return;
        }
        // The Error names the Send by client_msg_id whatever its request id.
        let by_id = if !e.client_msg_id.is_empty() {
            Some(e.client_msg_id.clone())
        } else {
            None
        };
        let pending = self.in_flight.remove(&rid);
        let send_id = match (&pending, by_id) {
            (Some(InFlight::Send(id)), _) => Some(id.clone()),
            (_, Some(id)) => Some(id),
            _ => None,
        };
        if let Some(id) = send_id {
            if err.code.is_retryable() {
                self.outbox.retry_later(&id, now + RETRY_AFTER_MS);
            } else if let Some(m) = self.outbox.remove(&id) {
                self.outputs.push(Output::RemoveOutgoing(id.clone()));
                self.event(ClientEvent::SendFailed {
                    client_msg_id: id,
                    conversation_id: m.conversation_id,
                    error: err,
                });
            }
            return;
        }
        match pending {
            Some(InFlight::Ticket(ticket, request)) => {
                if err.code.is_retryable() {
                    // Same request later (SPEC §13, §14).
                    self.queued.push_back((ticket, request));
                } else {
                    self.event(ClientEvent::RequestFailed {
                        ticket,
                        error: Some(err),
                    });
                }
            }
            Some(InFlight::Sync) => {
                // Sync has no 2xxx; a 3xxx: try again on the next pump.
                self.sync = None;
                self.sync_wanted = true;
            }
            Some(InFlight::Channel(conversation_id)) => {
                // Refused (not a member, too many open): forgotten, not
                // set again at the next reconnect.
                self.open_channels.remove(&conversation_id);
                self.event(ClientEvent::ChannelOpenFailed {
                    conversation_id,
                    error: err,
                });
            }
            // A refused re-subscribe or a request sent with id 0 (receipts,
            // typing): best effort, nothing to retry.
            Some(InFlight::PresenceSubscribe) | Some(InFlight::Send(_)) | None => {}
        }
    }

    pub(super) fn on_send_ack(&mut self, rid: u32, a: pb::SendAck, now: u64) {
        self.in_flight.remove(&rid);
        if self.outbox.remove(&a.client_msg_id).is_none() {
            return; // a repeat ack of a message already acknowledged
        }
        self.outputs
            .push(Output::RemoveOutgoing(a.client_msg_id.clone()));
        self.event(ClientEvent::MessageSent {
            client_msg_id: a.client_msg_id,
            conversation_id: a.conversation_id.clone(),
            seq: a.seq,
            message_id: a.message_id,
            server_time_ms: a.server_time_ms,
        });
        let before = self.cursors.contiguous(&a.conversation_id);
        let (released, arrival) = self.cursors.on_own(&a.conversation_id, a.seq);
        if self.cursors.contiguous(&a.conversation_id) != before {
            self.dirty_cursors.insert(a.conversation_id.clone());
        }
        self.release(&a.conversation_id, released, now);
        self.after_arrival(arrival, now);
    }

    pub(super) fn on_message(&mut self, m: pb::Message, now: u64) {
        let conv = m.conversation_id.clone();
        let (released, arrival) = self.cursors.on_message(ChatMessage::from_pb(m));
        self.release(&conv, released, now);
        self.after_arrival(arrival, now);
    }

    /// A gap is filled by a Sync. So is a repeat outside a sync round: it
    /// may be a plain repeat (a resend delivers the original again), or the
    /// first message of a server that lost its history while this client
    /// stayed connected (seqs went backwards); the Sync's epoch tells which.
    /// During a round, repeats are the expected overlap with Deliver.
    fn after_arrival(&mut self, arrival: Arrival, now: u64) {
        match arrival {
            Arrival::Gap => self.want_sync(now),
            Arrival::Repeat if self.sync.is_none() => self.want_sync(now),
            Arrival::Repeat | Arrival::Taken => {}
        }
    }

    /// A SyncBatch or HistoryPage announced the server's history epoch.
    /// Conversations whose positions count in an earlier one start again
    /// from 0 (and the app is told); returns them.
    pub(super) fn on_epoch(&mut self, epoch: u64) -> Vec<String> {
        let (reset, adopted) = self.cursors.adopt_epoch(epoch);
        for id in adopted.iter().chain(&reset) {
            self.dirty_cursors.insert(id.clone());
        }
        if !reset.is_empty() {
            self.log(
                LogLevel::Info,
                format!(
                    "the server lost or replaced its history (new epoch {epoch:#x}): \
                     {} conversation(s) sync again from seq 1",
                    reset.len()
                ),
            );
        }
        if !reset.is_empty() {
            // This reset's messages only (at most `RECENT_MESSAGES`).
            self.delivered_before_reset.clear();
        }
        for id in &reset {
            if let Some(round) = self.sync.as_mut() {
                round.received.remove(id);
                round.gapped_at_start.remove(id);
            }
            let delivered: Vec<MessageKey> = self
                .recent
                .iter()
                .filter(|(conv, _, _)| conv == id)
                .cloned()
                .collect();
            self.delivered_before_reset.extend(delivered);
            self.event(ClientEvent::HistoryReset {
                conversation_id: id.clone(),
            });
        }
        reset
    }

    pub(super) fn release(&mut self, conv: &str, released: Vec<Release>, now: u64) {
        if released.is_empty() {
            return;
        }
        self.dirty_cursors.insert(conv.to_string());
        let mut delivered_up_to = None;
        for r in released {
            match r {
                Release::Message(message) => {
                    if message.sender_user_id != self.user_id {
                        delivered_up_to = Some(message.seq);
                    }
                    let key: MessageKey = (
                        message.conversation_id.clone(),
                        message.sender_user_id.clone(),
                        message.client_msg_id.clone(),
                    );
                    if !key.2.is_empty() && self.delivered_before_reset.remove(&key) {
                        // Stored again under a new seq by a server that lost
                        // its history: the app has it already.
                        continue;
                    }
                    if self.recent.len() == RECENT_MESSAGES {
                        self.recent.pop_front();
                    }
                    self.recent.push_back(key);
                    self.event(ClientEvent::Message { message });
                }
                Release::Unavailable { from_seq, to_seq } => {
                    self.event(ClientEvent::MessagesUnavailable {
                        conversation_id: conv.to_string(),
                        from_seq,
                        to_seq,
                    })
                }
            }
        }
        // A channel keeps read positions only (SPEC §21): no DELIVERED.
        let channel = palaver_protocol::is_channel_id(conv);
        if let (Some(seq), true) = (
            delivered_up_to,
            self.cfg.auto_delivered_receipts && !channel,
        ) {
            self.add_receipt(
                conv.to_string(),
                ReceiptKind::Delivered,
                seq,
                now + RECEIPT_BATCH_MS,
            );
        }
    }

    pub(super) fn on_sync_batch(&mut self, rid: u32, mut b: pb::SyncBatch, now: u64) {
        // Messages of a conversation just reset were read above the stale
        // cursor: dropped here, they come again from seq 1, in order.
        let reset = self.on_epoch(b.history_epoch);
        if !reset.is_empty() {
            b.messages
                .retain(|m| reset.binary_search(&m.conversation_id).is_err());
            b.has_more = true; // sync the reset conversations from 0
        }
        let ours = self.sync.as_ref().is_some_and(|s| s.request_id == rid);
        if !ours {
            // A stale round (superseded); its messages are still good.
            for m in b.messages {
                self.on_message(m, now);
            }
            if !reset.is_empty() {
                self.want_sync(now);
            }
            return;
        }
        self.in_flight.remove(&rid);
        for c in b.conversations {
            let c = Conversation::from_pb(c);
            self.cursors.know(&c.conversation_id);
            self.event(ClientEvent::ConversationUpdated { conversation: c });
        }
        for m in b.messages {
            if let Some(round) = self.sync.as_mut() {
                let r = round.received.entry(m.conversation_id.clone()).or_insert(0);
                *r = (*r).max(m.seq);
            }
            self.on_message(m, now);
        }
        if b.has_more {
            let Some(round) = self.sync.as_mut() else {
                return;
            };
            let received = std::mem::take(&mut round.received);
            let cursors = self
                .cursors
                .positions()
                .into_iter()
                .map(|(id, seq)| {
                    let after_seq = received.get(&id).copied().unwrap_or(0).max(seq);
                    pb::Cursor {
                        conversation_id: id,
                        after_seq,
                    }
                })
                .collect();
            let id = self.request_id();
            if let Some(round) = self.sync.as_mut() {
                round.request_id = id;
            }
            self.in_flight.insert(id, InFlight::Sync);
            self.write_with_id(
                id,
                Body::Sync(pb::Sync {
                    cursors,
                    limit: self.cfg.sync_batch,
                }),
                now,
            );
            return;
        }
        // Round complete.
        if let Some(round) = self.sync.take() {
            for conv in round.gapped_at_start {
                let released = self.cursors.give_up_gap(&conv);
                self.release(&conv, released, now);
            }
        }
        self.event(ClientEvent::SyncComplete);
        if !self.cursors.gapped().is_empty() {
            self.sync_wanted = true;
        }
    }

    pub(super) fn on_conversation(&mut self, rid: u32, c: Conversation) {
        self.cursors.know(&c.conversation_id);
        if let Some(InFlight::Ticket(ticket, _)) = self.in_flight.remove(&rid) {
            self.event(ClientEvent::ConversationResult {
                ticket,
                conversation: c.clone(),
            });
        }
        self.event(ClientEvent::ConversationUpdated { conversation: c });
    }
}
