//! What goes to the server: the pump (outbox sends, queued requests,
//! receipts, typing, presence), writes, and what losing a connection does.

use std::collections::HashMap;

use palaver_protocol::frame;
use palaver_protocol::pb::{self, frame::Body};
use palaver_protocol::state::ClientPhase;

use crate::config::backoff_ms;
use crate::types::*;

use super::*;

impl Engine {
    pub(super) fn established(&self) -> bool {
        matches!(&self.link, Link::Open { conn, .. } if conn.phase() == ClientPhase::Established)
    }

    pub(super) fn send_rate(&self) -> u32 {
        match self.limits.max_sends_per_second {
            0 => 50,
            n => n,
        }
    }

    pub(super) fn max_in_flight(&self) -> usize {
        match self.limits.max_requests_in_flight {
            0 => 64,
            n => n as usize,
        }
    }

    /// Sends whatever may go now: sync, receipts, queued requests, outbox.
    pub(super) fn pump(&mut self, now: u64) {
        if !self.established() {
            return;
        }
        if self.sync_wanted && self.sync.is_none() {
            self.sync_wanted = false;
            self.start_sync(now);
        }
        if self.receipts_due.is_some_and(|t| now >= t) {
            self.receipts_due = None;
            for ((conversation_id, kind), up_to_seq) in std::mem::take(&mut self.receipts) {
                self.write_with_id(
                    0,
                    Body::Receipt(pb::Receipt {
                        conversation_id,
                        kind: kind.to_pb(),
                        up_to_seq,
                    }),
                    now,
                );
            }
        }
        while self.in_flight.len() < self.max_in_flight() {
            let Some((ticket, request)) = self.queued.pop_front() else {
                break;
            };
            if request.is_push() && self.limits.max_push_token_bytes == 0 {
                // SPEC §16, §20: a server that did not announce them
                // would close the connection (MALFORMED_FRAME).
                self.event(ClientEvent::RequestFailed {
                    ticket,
                    error: Some(crate::error::ServerError {
                        code: crate::error::ErrorCode::InvalidArgument,
                        raw_code: 2000,
                        message: "this server does not serve push requests \
                                  (Welcome.limits.max_push_token_bytes is 0)"
                            .into(),
                    }),
                });
                continue;
            }
            let id = self.request_id();
            let body = request.body();
            self.in_flight.insert(id, InFlight::Ticket(ticket, request));
            self.write_with_id(id, body, now);
        }
        // Sends: paced to the announced rate (a token bucket, bursts up to
        // the rate, as the server counts them, SPEC §13).
        let rate = f64::from(self.send_rate());
        let elapsed = now.saturating_sub(self.tokens_at) as f64;
        self.send_tokens = (self.send_tokens + elapsed * rate / 1000.0).min(rate);
        self.tokens_at = now;
        let room = self.max_in_flight().saturating_sub(self.in_flight.len());
        let budget = (self.send_tokens.floor() as usize).min(room);
        if budget == 0 {
            return;
        }
        for m in self.outbox.ready(now, budget) {
            let id = self.request_id();
            self.outbox.mark_sent(&m.client_msg_id, id);
            self.in_flight
                .insert(id, InFlight::Send(m.client_msg_id.clone()));
            self.send_tokens -= 1.0;
            self.write_with_id(
                id,
                Body::Send(pb::Send {
                    conversation_id: m.conversation_id,
                    client_msg_id: m.client_msg_id,
                    kind: m.kind.to_pb(),
                    body: m.body,
                    reply_to_seq: m.reply_to_seq,
                    media: m.media.as_ref().map(Media::to_pb),
                    mention_user_ids: m.mention_user_ids,
                }),
                now,
            );
        }
    }

    pub(super) fn begin_round(&mut self, request_id: u32) {
        self.sync = Some(SyncRound {
            request_id,
            gapped_at_start: self.cursors.gapped().into_iter().collect(),
            received: HashMap::new(),
        });
        self.in_flight.insert(request_id, InFlight::Sync);
    }

    pub(super) fn start_sync(&mut self, now: u64) {
        let id = self.request_id();
        self.begin_round(id);
        let cursors = self
            .cursors
            .positions()
            .into_iter()
            .map(|(conversation_id, after_seq)| pb::Cursor {
                conversation_id,
                after_seq,
            })
            .collect();
        self.write_with_id(
            id,
            Body::Sync(pb::Sync {
                cursors,
                limit: self.cfg.sync_batch,
            }),
            now,
        );
    }

    pub(super) fn want_sync(&mut self, now: u64) {
        if self.sync.is_some() {
            self.sync_wanted = true; // after the current round
        } else if self.established() {
            self.start_sync(now);
        } else {
            self.sync_wanted = true;
        }
    }

    pub(super) fn add_receipt(
        &mut self,
        conversation_id: String,
        kind: ReceiptKind,
        up_to_seq: u64,
        due: u64,
    ) {
        let slot = self.receipts.entry((conversation_id, kind)).or_insert(0);
        *slot = (*slot).max(up_to_seq);
        self.receipts_due = Some(self.receipts_due.map_or(due, |d| d.min(due)));
    }

    pub(super) fn typing(&mut self, conversation_id: String, active: bool, now: u64) {
        let last = self.typing.get(&conversation_id).copied();
        let send = match (active, last) {
            (true, Some((true, at))) => now.saturating_sub(at) >= TYPING_REFRESH_MS,
            (true, _) => true,
            (false, Some((true, _))) => true,
            (false, _) => false,
        };
        // Typing is best effort: dropped while not connected.
        if send && self.established() {
            self.typing.insert(conversation_id.clone(), (active, now));
            self.write_with_id(
                0,
                Body::Typing(pb::Typing {
                    conversation_id,
                    active,
                    user_id: String::new(),
                }),
                now,
            );
        }
    }

    pub(super) fn presence_subscribe(
        &mut self,
        user_ids: Vec<String>,
        unsubscribe: bool,
        now: u64,
    ) {
        for chunk in user_ids.chunks(PRESENCE_CHUNK) {
            let id = self.request_id();
            self.in_flight.insert(id, InFlight::PresenceSubscribe);
            self.write_with_id(
                id,
                Body::PresenceSubscribe(pb::PresenceSubscribe {
                    user_ids: chunk.to_vec(),
                    unsubscribe,
                }),
                now,
            );
        }
    }

    /// Sets this connection's mode for a channel (SPEC §21), to a server
    /// that announced channels.
    pub(super) fn open_channel(&mut self, conversation_id: String, mode: ChannelMode, now: u64) {
        if self.limits.max_channel_members == 0 {
            return;
        }
        let id = self.request_id();
        self.in_flight
            .insert(id, InFlight::Channel(conversation_id.clone()));
        self.write_with_id(
            id,
            Body::OpenChannel(pb::OpenChannel {
                conversation_id,
                mode: mode.to_pb() as i32,
            }),
            now,
        );
    }

    pub(super) fn request_id(&mut self) -> u32 {
        let id = self.next_request_id;
        // SPEC §3: wrap after 2^32-1, skipping 0.
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        id
    }

    pub(super) fn write(&mut self, body: Body, now: u64) {
        let id = self.request_id();
        self.write_with_id(id, body, now);
    }

    pub(super) fn write_with_id(&mut self, id: u32, body: Body, now: u64) {
        let Link::Open { conn, .. } = &mut self.link else {
            return;
        };
        if !conn.may_send(&body) {
            return;
        }
        conn.on_sent(now);
        self.writes.push(frame(id, body));
    }

    pub(super) fn event(&mut self, e: ClientEvent) {
        self.outputs.push(Output::Event(e));
    }

    pub(super) fn log(&mut self, level: LogLevel, line: String) {
        self.outputs.push(Output::Log(level, line));
    }

    pub(super) fn set_state(&mut self, s: ConnectionState) {
        if self.state != s {
            self.state = s.clone();
            self.event(ClientEvent::StateChanged { state: s });
        }
    }

    pub(super) fn flush_cursors(&mut self) {
        for id in std::mem::take(&mut self.dirty_cursors) {
            let after_seq = self.cursors.contiguous(&id);
            let history_epoch = self.cursors.epoch_of(&id);
            self.outputs.push(Output::SaveCursor(SyncCursor {
                conversation_id: id,
                after_seq,
                history_epoch,
            }));
        }
    }

    // ---- connection loss -------------------------------------------------------------

    /// Drops the current transport: what was in flight goes back to the
    /// queues (Sends keep their client_msg_id).
    pub(super) fn drop_connection(&mut self) {
        if matches!(self.link, Link::Dialling { .. } | Link::Open { .. }) {
            self.close_transport = true;
        }
        if let Link::Open { conn, .. } = &mut self.link {
            conn.close();
        }
        // The caller (fail, stop) says where the link goes next.
        self.link = Link::Idle;
        self.outbox.connection_lost();
        let mut requeue = Vec::new();
        let mut in_flight: Vec<_> = self.in_flight.drain().collect();
        in_flight.sort_by_key(|(id, _)| *id);
        for (_, f) in in_flight {
            if let InFlight::Ticket(ticket, request) = f {
                if request.safe_to_repeat() {
                    requeue.push((ticket, request));
                } else {
                    self.event(ClientEvent::RequestFailed {
                        ticket,
                        error: None,
                    });
                }
            }
        }
        requeue.sort_by_key(|(t, _)| *t);
        for r in requeue.into_iter().rev() {
            self.queued.push_front(r);
        }
        if self.sync.take().is_some() {
            // Every (re)connect syncs anyway.
        }
        self.typing.clear();
    }

    /// The connection failed or is going away: reconnect after
    /// `floor_ms` + full-jitter backoff.
    pub(super) fn fail(&mut self, now: u64, floor_ms: u32, extra_steps: u32, why: ConnectFailure) {
        self.drop_connection();
        self.log(LogLevel::Info, format!("connection failed: {why:?}"));
        self.last_failure = Some(why);
        if !self.running {
            self.link = Link::Idle;
            return;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let delay = backoff_ms(
            self.attempt,
            floor_ms,
            self.cfg.backoff_base_ms,
            self.cfg.backoff_max_ms,
            self.rng,
        );
        self.attempt = self.attempt.saturating_add(1 + extra_steps);
        self.link = Link::Waiting {
            at: now.saturating_add(delay),
        };
        self.set_state(ConnectionState::Connecting {
            attempt: self.attempt,
            retry_in_ms: delay,
            last_failure: self.last_failure.clone(),
        });
    }

    /// Stop connecting until the app calls `connect` again.
    pub(super) fn stop(&mut self, _now: u64, cause: Option<DisconnectCause>) {
        self.drop_connection();
        if let Some(DisconnectCause::Failed { failure }) = &cause {
            self.log(
                LogLevel::Warn,
                format!("stopped reconnecting, retrying cannot help: {failure:?}"),
            );
        }
        self.running = false;
        self.link = Link::Idle;
        self.set_state(ConnectionState::Disconnected { cause });
    }
}
