//! A worker's traffic: timers, the scenario's sends, socket readiness,
//! TLS and frames in and out.

use std::cmp::Reverse;
use std::io::{self, ErrorKind, Read, Write};
use std::time::Instant;

use mio::{Interest, Registry, Token};
use palaver_protocol::pb::frame::Body;
use palaver_protocol::{encode_frame, pb, ClientConn, Timeout, Verdict};
use rustls::HandshakeKind;

use crate::hist::{self, names};
use crate::ipc::Phase;

use super::*;

impl Worker {
    // ---- timers -------------------------------------------------------

    pub(super) fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse(t)) = self.timers.peek().copied() {
            if t.at > now {
                break;
            }
            self.timers.pop();
            if t.gen != self.users[t.slot as usize].gen {
                continue;
            }
            match t.kind {
                TimerKind::Retry => {
                    if self.phase == Phase::Storming && self.conns[t.slot as usize].is_none() {
                        self.reconnect_queue.push_back(t.slot);
                    }
                }
                TimerKind::Deadline => {
                    let Some(conn) = &self.conns[t.slot as usize] else {
                        continue;
                    };
                    let what = match conn.state {
                        _ if conn.welcomed => continue,
                        State::Connecting => "timeout: tcp connect",
                        State::Handshaking => "timeout: tls handshake",
                        State::Session(_) => "timeout: no Welcome",
                    };
                    self.close(t.slot, End::Failed(what.into()));
                }
                TimerKind::Wake => self.on_wake(t.slot, now),
            }
        }
    }

    /// A session's wake-up: give up on a silent server, or ping when the
    /// connection has been idle for an interval.
    pub(super) fn on_wake(&mut self, slot: u32, now: Instant) {
        let now_ms = self.ms(now);
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let State::Session(proto) = &conn.state else {
            return;
        };
        if let Some(timeout) = proto.check_timeout(now_ms) {
            let what = match timeout {
                Timeout::Heartbeat => "timeout: server silent for 2.5 heartbeat intervals",
                Timeout::Welcome => "timeout: no Welcome",
                Timeout::Hello | Timeout::Drain => "timeout",
            };
            return self.close(slot, End::Failed(what.into()));
        }
        if proto.ping_due(now_ms) {
            if conn.ping.is_some() {
                self.counters.pongs_missed += 1;
            }
            let nonce = self.next_nonce;
            self.next_nonce += 1;
            conn.ping = Some((nonce, now));
            self.counters.pings += 1;
            self.send(
                slot,
                &palaver_protocol::frame(0, Body::Ping(pb::Ping { nonce })),
            );
        }
        self.schedule_wake(slot);
    }

    // ---- the scenario's traffic ----------------------------------------

    pub(super) fn scenario_tick(&mut self, now: Instant) {
        let Some(scenario) = self.scenario.as_mut() else {
            return;
        };
        let conns = &self.conns;
        let ready = |slot: u32| conns[slot as usize].as_ref().is_some_and(Conn::is_ready);
        let mut outbox = std::mem::take(&mut self.outbox);
        match self.phase {
            Phase::SettingUp => {
                self.setup_wake = scenario.setup_due(now, &ready, &mut outbox);
            }
            Phase::Chatting => scenario.due(now, &ready, &mut self.counters, &mut outbox),
            _ => self.setup_wake = None,
        }
        self.outbox = outbox;
        self.send_outbox();
    }

    pub(super) fn send_outbox(&mut self) {
        let mut outbox = std::mem::take(&mut self.outbox);
        for (slot, frame) in outbox.drain(..) {
            if !self.is_ready(slot) {
                if let Some(scenario) = self.scenario.as_mut() {
                    scenario.setup_failed(slot, frame.request_id, "sender not connected".into());
                }
                continue;
            }
            self.send(slot, &frame);
        }
        self.outbox = outbox;
    }

    // ---- I/O ----------------------------------------------------------

    /// Writes one frame to a connection's TLS stream and flushes.
    pub(super) fn send(&mut self, slot: u32, frame: &pb::Frame) {
        let now_ms = self.ms(Instant::now());
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        self.scratch.clear();
        encode_frame(frame, &mut self.scratch);
        if conn.tls.writer().write_all(&self.scratch).is_err() {
            self.close(slot, End::Failed("send buffer full".into()));
            return;
        }
        if let State::Session(proto) = &mut conn.state {
            proto.on_sent(now_ms);
        }
        if let Err(e) = flush(conn, self.poll.registry(), slot) {
            self.close(slot, End::Failed(io_reason("write", &e)));
        }
    }

    pub(super) fn on_io(&mut self, slot: usize) {
        let now = Instant::now();
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let slot = slot as u32;
        if matches!(conn.state, State::Connecting) {
            match conn.sock.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    return self.close(slot, End::Failed(io_reason("connect", &e)))
                }
            }
            match conn.sock.peer_addr() {
                Ok(_) => conn.state = State::Handshaking,
                Err(e) if e.kind() == ErrorKind::NotConnected => return,
                Err(e) => return self.close(slot, End::Failed(io_reason("connect", &e))),
            }
        }
        let mut frames = std::mem::take(&mut self.frames);
        let mut end: Option<String> = None;
        'read: loop {
            match conn.tls.read_tls(&mut conn.sock) {
                Ok(0) => {
                    end = Some("closed by server".into());
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    end = Some(io_reason("read", &e));
                    break;
                }
            }
            if let Err(e) = conn.tls.process_new_packets() {
                // Tell the server why (best effort), then give up.
                let _ = conn.tls.write_tls(&mut conn.sock);
                end = Some(format!("tls: {e}"));
                break;
            }
            loop {
                match conn.tls.reader().read(&mut self.read_buf) {
                    Ok(0) => {
                        end = Some("closed by server (close_notify)".into());
                        break 'read;
                    }
                    Ok(n) => {
                        if let Err(e) = conn.decoder.decode(&self.read_buf[..n], |f| frames.push(f))
                        {
                            end = Some(format!("bad frame from server: {e}"));
                            break 'read;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        end = Some(io_reason("tls read", &e));
                        break 'read;
                    }
                }
            }
        }
        if matches!(conn.state, State::Handshaking) && !conn.tls.is_handshaking() && end.is_none() {
            self.handshake_done(slot, now);
        }
        let gen = self.users[slot as usize].gen;
        for frame in frames.drain(..) {
            if self.users[slot as usize].gen != gen || self.conns[slot as usize].is_none() {
                break; // a frame closed the connection
            }
            self.on_frame(slot, frame, now);
        }
        self.frames = frames;
        if self.users[slot as usize].gen != gen {
            return;
        }
        if let Some(conn) = self.conns[slot as usize].as_mut() {
            if let Some(reason) = end {
                return self.close(slot, End::Failed(reason));
            }
            if let Err(e) = flush(conn, self.poll.registry(), slot) {
                self.close(slot, End::Failed(io_reason("write", &e)));
            }
        }
    }

    pub(super) fn handshake_done(&mut self, slot: u32, now: Instant) {
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        hist::record(
            self.histograms.get_mut(names::CONNECT).expect("histogram"),
            now - conn.started,
        );
        if conn.tls.handshake_kind() == Some(HandshakeKind::Resumed) {
            self.counters.handshakes_resumed += 1;
        } else {
            self.counters.handshakes_full += 1;
        }
        if conn.tls.alpn_protocol() != Some(palaver_protocol::ALPN) {
            return self.close(
                slot,
                End::Failed("tls: server did not select ALPN palaver/1".into()),
            );
        }
        let welcome_timeout_ms = self.plan.config.connect_timeout.0.as_millis() as u32;
        conn.state = State::Session(ClientConn::new(
            now.saturating_duration_since(self.started).as_millis() as u64,
            welcome_timeout_ms,
        ));
        conn.hello_at = now;
        let user = &mut self.users[slot as usize];
        let token = match &user.token {
            Some(t) => t.clone(),
            None => match self.minter.mint(&user.id) {
                Ok(t) => {
                    user.token = Some(t.clone());
                    t
                }
                Err(e) => return self.close(slot, End::Failed(format!("token: {e}"))),
            },
        };
        let hello = pb::Hello {
            protocol_version: palaver_protocol::PROTOCOL_VERSION,
            token,
            device_id: "bench".into(),
            client_name: "palaver-bench".into(),
            client_version: env!("CARGO_PKG_VERSION").into(),
            resume: Vec::new(),
        };
        self.send(
            slot,
            &palaver_protocol::frame(HELLO_REQUEST_ID, Body::Hello(hello)),
        );
    }

    pub(super) fn on_frame(&mut self, slot: u32, frame: pb::Frame, now: Instant) {
        let now_ms = self.ms(now);
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let State::Session(proto) = &mut conn.state else {
            return;
        };
        match proto.on_frame(&frame, now_ms) {
            Err(e) => return self.close(slot, End::Failed(format!("protocol: {e}"))),
            // Hold is a server verdict; a client never gets it.
            Ok(Verdict::Ignore | Verdict::Hold) => return,
            Ok(Verdict::Process) => {}
        }
        let welcomed = conn.welcomed;
        match &frame.body {
            Some(Body::Welcome(w)) => self.on_welcome(slot, w, now),
            Some(Body::Error(e)) => self.on_error(slot, frame.request_id, e, welcomed),
            Some(Body::GoAway(g)) => {
                let reason = pb::GoAwayReason::try_from(g.reason)
                    .map_or_else(|_| g.reason.to_string(), |r| r.as_str_name().to_string());
                self.close(slot, End::Failed(format!("GoAway {reason}")));
            }
            Some(Body::Pong(p)) => {
                if let Some((nonce, sent)) = conn.ping {
                    if nonce == p.nonce {
                        conn.ping = None;
                        self.counters.pongs += 1;
                        hist::record(
                            self.histograms.get_mut(names::PING).expect("histogram"),
                            now - sent,
                        );
                    }
                }
            }
            Some(Body::Ping(p)) => self.send(
                slot,
                &palaver_protocol::frame(0, Body::Pong(pb::Pong { nonce: p.nonce })),
            ),
            _ => {
                if let Some(scenario) = self.scenario.as_mut() {
                    let me = &self.users[slot as usize].id;
                    scenario.on_frame(slot, me, &frame, now, &mut self.counters);
                }
            }
        }
    }

    pub(super) fn on_welcome(&mut self, slot: u32, welcome: &pb::Welcome, now: Instant) {
        let conn = self.conns[slot as usize].as_mut().expect("caller checked");
        conn.welcomed = true;
        hist::record(
            self.histograms.get_mut(names::HELLO).expect("histogram"),
            now - conn.hello_at,
        );
        let resumed = conn.tls.handshake_kind() == Some(HandshakeKind::Resumed);
        self.inflight -= 1;
        self.counters.welcomed += 1;
        self.counters.open += 1;
        self.heartbeat_ms
            .get_or_insert(welcome.heartbeat_interval_ms);
        self.schedule_wake(slot);
        if let Some(dropped) = self.users[slot as usize].dropped_at.take() {
            hist::record(
                self.histograms
                    .get_mut(names::RECONNECT)
                    .expect("histogram"),
                now - dropped,
            );
            self.counters.storm_reconnected += 1;
            if resumed {
                self.counters.storm_resumed += 1;
            }
            if let Some(storm) = self.storm.as_mut() {
                storm.remaining -= 1;
                if storm.remaining == 0 {
                    storm.done_at = Some(now);
                }
            }
        }
    }

    pub(super) fn on_error(
        &mut self,
        slot: u32,
        request_id: u32,
        error: &pb::Error,
        welcomed: bool,
    ) {
        let name = chat::error_name(error.code);
        if palaver_protocol::closes_connection(error.code) || !welcomed {
            return self.close(slot, End::Failed(format!("Error {name}")));
        }
        let Some(scenario) = self.scenario.as_mut() else {
            *self
                .disconnects
                .entry(format!("Error {name} (request failed)"))
                .or_default() += 1;
            return;
        };
        if !scenario.on_error(slot, request_id, error, &mut self.counters) {
            self.counters.unexpected += 1;
        }
    }
}

/// Writes pending TLS output; watches for writability only while some is left.
pub(super) fn flush(conn: &mut Conn, registry: &Registry, slot: u32) -> io::Result<()> {
    if matches!(conn.state, State::Connecting) {
        return Ok(());
    }
    while conn.tls.wants_write() {
        match conn.tls.write_tls(&mut conn.sock) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if !conn.writable_interest {
                    registry.reregister(
                        &mut conn.sock,
                        Token(slot as usize),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    conn.writable_interest = true;
                }
                return Ok(());
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if conn.writable_interest {
        registry.reregister(&mut conn.sock, Token(slot as usize), Interest::READABLE)?;
        conn.writable_interest = false;
    }
    Ok(())
}

/// A failure reason from an I/O error, worded so that equal causes group.
pub(super) fn io_reason(what: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        // The same code always gives the same text.
        Some(code) => format!("{what}: {}", io::Error::from_raw_os_error(code)),
        None => format!("{what}: {}", e.kind()),
    }
}
