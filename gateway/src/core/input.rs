//! A connection's input: reading and decrypting what the socket has, a
//! round at a time, and handing each decoded frame to the connection's
//! rules ([`ConnPolicy`](crate::session::ConnPolicy)), whose effects
//! (`effects.rs`) answer it: Pong, requests to the backend, refusals,
//! closes; and the Hello's authentication, which the rules ask for.

use std::io::{self, Read};
use std::sync::atomic::Ordering::Relaxed;

use palaver_protocol::pb::{self, frame::Body};
use palaver_protocol::{error_reply, frame};
use palaver_router::api::Inbound;

use crate::metrics::CoreMetrics;
use crate::session::ReadGate;
use crate::tls_io::{self, AppSink};

use super::output::unread;
use super::{unix_ms, Conn, Ctx, Fate, SessionIds, MAX_LEFTOVER, READ_CHUNK, READ_ROUNDS};

impl Ctx {
    /// Reads and processes what the socket has, a round (one read) at a
    /// time: each round's frames are handled and their replies written before
    /// the next read, and reading stops when the output is full. Returns the
    /// fate and whether the socket may have more (the read budget ran out).
    /// `hup`: the peer's FIN may be queued behind the data (the readiness
    /// said so, or it is not known): read on to EOF instead of stopping at a
    /// short read, since the FIN raises no new edge once it was reported.
    pub(super) fn on_readable(&mut self, slot: usize, conn: &mut Conn, hup: bool) -> (Fate, bool) {
        match self.read_gate(slot, conn) {
            ReadGate::Read => {}
            ReadGate::Discard => return (self.discard_input(conn), false),
            ReadGate::Wait | ReadGate::Stall => return (Fate::Keep, false),
        }
        let mut used = conn.pending.tls_in().len();
        self.scratch.tls_in[..used].copy_from_slice(conn.pending.tls_in());
        conn.pending.set_tls_in(&[]);
        let mut frames = std::mem::take(&mut self.scratch.frames);
        let mut decode_error = None;
        let mut peer_gone = false;
        let mut more = false;
        let mut tls_failed = false;
        let mut rounds = 0;
        loop {
            let space = self.scratch.tls_in.len() - used;
            let n = match conn.sock.read(&mut self.scratch.tls_in[used..]) {
                Ok(0) => {
                    peer_gone = true;
                    0
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    peer_gone = true;
                    0
                }
            };
            if n == 0 {
                break;
            }
            self.metrics.bytes_in.fetch_add(n as u64, Relaxed);
            used += n;
            let mut sink = AppSink {
                decoder: &mut conn.decoder,
                frames: &mut frames,
                error: &mut decode_error,
            };
            let driven = tls_io::drive(
                &mut conn.tls,
                &mut self.scratch.tls_in[..used],
                &mut self.scratch.out,
                Some(&mut sink),
                &[],
            );
            self.scratch.tls_in.copy_within(driven.consumed..used, 0);
            used -= driven.consumed;
            if driven.error.is_some() {
                tls_failed = true;
                break;
            }
            if conn.policy.is_handshaking() && !conn.tls.is_handshaking() {
                // No ALPN at all is served as palaver/1 (SPEC §1); rustls already
                // refuses a client offering only other protocols.
                if conn
                    .tls
                    .alpn_protocol()
                    .is_some_and(|p| p != palaver_protocol::ALPN)
                {
                    self.scratch.out.clear();
                    frames.clear();
                    self.scratch.frames = frames;
                    return (Fate::Close, false);
                }
                CoreMetrics::inc(&self.metrics.handshakes_ok);
                conn.policy.on_handshake_done();
                self.arm(slot, conn);
            }
            for f in frames.drain(..) {
                if !conn.policy.is_open() {
                    break;
                }
                self.on_frame(slot, conn, f);
            }
            frames.clear();
            if let Some(e) = decode_error.take() {
                if conn.policy.is_open() {
                    CoreMetrics::inc(&self.metrics.frames_in[0]);
                    let err = error_reply(0, e.error_code(), e.to_string());
                    self.begin_close(slot, conn, Some(err));
                }
                break;
            }
            if driven.peer_closed {
                // close_notify: the peer sends nothing more, and its FIN may
                // have come with it (no new edge would report it).
                peer_gone = true;
                break;
            }
            if driven.closed || conn.policy.is_closing() {
                break;
            }
            if used > MAX_LEFTOVER {
                // A handshake message or record larger than anything legal.
                tls_failed = true;
                break;
            }
            // This round's replies leave before more requests are read.
            if self.finish_output(slot, conn) == Fate::Close {
                self.scratch.frames = frames;
                return (Fate::Close, false);
            }
            if self.read_gate(slot, conn) == ReadGate::Stall {
                break;
            }
            if n < space && !hup {
                // A short read drained the socket; anything arriving later
                // raises a new edge. Saves the WouldBlock read per event.
                break;
            }
            rounds += 1;
            if rounds == READ_ROUNDS {
                more = true;
                break;
            }
        }
        self.scratch.frames = frames;
        if tls_failed {
            // Any alert rustls produced is in scratch.out; send it and go.
            self.scratch.plain.clear();
            let _ = self.finish_output(slot, conn);
            return (Fate::Close, false);
        }
        if used > 0 && !conn.policy.is_closing() {
            conn.pending.set_tls_in(&self.scratch.tls_in[..used]);
        }
        if peer_gone {
            // Peer is gone (EOF or reset): nothing more will be read.
            self.scratch.plain.clear();
            self.scratch.out.clear();
            return (Fate::Close, false);
        }
        (self.finish_output(slot, conn), more)
    }

    /// Whether to read now, as the rules say with what the client has not
    /// read; reading that just stopped (the output is full) is counted and
    /// the slow-consumer deadline armed, through the effects.
    fn read_gate(&mut self, slot: usize, conn: &mut Conn) -> ReadGate {
        let unread = unread(conn);
        let gate = conn
            .policy
            .read_gate(&self.limits, unread, self.now_ms, &mut self.effects);
        self.apply(slot, conn);
        gate
    }

    /// Closing connections only wait for the peer's FIN; input is dropped.
    pub(super) fn discard_input(&mut self, conn: &mut Conn) -> Fate {
        loop {
            match conn.sock.read(&mut self.scratch.tls_in[..READ_CHUNK]) {
                Ok(0) => return Fate::Close,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Fate::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Fate::Close,
            }
        }
    }

    pub(super) fn on_frame(&mut self, slot: usize, conn: &mut Conn, f: pb::Frame) {
        self.metrics.frame_in(f.body.as_ref());
        {
            // The account's budget, locked only if a request is charged to it.
            let user_id = conn.ids.as_ref().map_or("", |ids| ids.user_id());
            let mut account = self.shared.accounts.budget(user_id);
            conn.policy.on_frame(
                &self.limits,
                f,
                self.now_ms,
                &mut account,
                &mut self.effects,
            );
        }
        self.apply(slot, conn);
    }

    pub(super) fn on_hello(
        &mut self,
        slot: usize,
        conn: &mut Conn,
        request_id: u32,
        hello: pb::Hello,
    ) {
        let user_id = match self.shared.auth.verify(&hello.token, &hello.device_id) {
            Ok(user) => user,
            Err(e) => {
                let err = error_reply(request_id, e.error_code(), e.to_string());
                self.begin_close(slot, conn, Some(err));
                return;
            }
        };
        if let Err(full) = self
            .shared
            .accounts
            .open(&user_id, &hello.device_id, self.now_ms)
        {
            CoreMetrics::inc(&self.metrics.too_many_connections);
            let err = error_reply(
                request_id,
                pb::ErrorCode::TooManyConnections,
                format!(
                    "user {user_id} already has {} devices connected (max_connections_per_account {})",
                    full.held, full.max
                ),
            );
            self.begin_close(slot, conn, Some(err));
            return;
        }
        let key = self.conn_key(slot, conn);
        let ids = SessionIds::new(&user_id, &hello.device_id);
        let session = ids.session(&self.shared.gateway_id, key);
        conn.policy.accept_hello(&self.limits, self.now_ms);
        let limits = self.shared.config.limits.protocol();
        let welcome = frame(
            request_id,
            Body::Welcome(pb::Welcome {
                protocol_version: palaver_protocol::PROTOCOL_VERSION,
                session_id: format!("{}/{key:016x}", self.shared.gateway_id),
                user_id,
                heartbeat_interval_ms: self.limits.heartbeat_interval_ms,
                limits: Some(limits.to_pb()),
                server_time_ms: unix_ms(),
            }),
        );
        // Welcome is queued before the backend hears of the session, so it
        // precedes anything the backend sends.
        self.queue(&welcome);
        self.flush_requests();
        self.shared.backend.session_opened(&session);
        self.metrics.sessions.fetch_add(1, Relaxed);
        conn.ids = Some(ids);
        self.arm(slot, conn);
        if !hello.resume.is_empty() {
            conn.policy.forwarded_untracked();
            self.requests.push(Inbound {
                from: session,
                request_id,
                body: Body::Sync(pb::Sync {
                    cursors: hello.resume,
                    limit: 0,
                }),
                received_ms: unix_ms(),
            });
        }
    }
}
