//! A connection's output: frames queued into the core's plaintext buffer,
//! sealed together into TLS records, written straight from the scratch
//! buffer; only what the socket refuses is kept (`tls_out`). Every change of
//! the unsent output is reported to the connection's rules, whose effects
//! say when reading resumes, when a client that fell behind is a slow
//! consumer and when the write side shuts (FIN) while closing.
//!
//! What the client has not read is the gateway's queue plus what the
//! kernel still holds in the socket's send buffer. The kernel's part is
//! asked for (`TIOCOUTQ`, one ioctl) only while the gateway holds a queue,
//! i.e. while the send buffer is full; when the socket takes everything,
//! what it holds is below SO_SNDBUF and the rules see 0.

use std::io::{self, Write};
use std::sync::atomic::Ordering::Relaxed;

use mio::net::TcpStream;
use palaver_protocol::{encode_frame, pb};

use crate::session::Unread;
use crate::tls_io;

use super::{unix_ms, Conn, Ctx, Fate};

/// Bytes written to `sock` that the peer has not acknowledged yet (Linux
/// `TIOCOUTQ`, a.k.a. SIOCOUTQ); 0 where it cannot be asked.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // one ioctl on a socket we own; see SAFETY below
fn kernel_unsent(sock: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int through the pointer, which points
    // at a live local; the fd is this socket's for the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if rc == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

#[cfg(not(target_os = "linux"))]
fn kernel_unsent(_sock: &TcpStream) -> usize {
    0
}

/// What the client of `conn` has not read, as far as the gateway can
/// tell: its queue and, while there is one, the kernel's send buffer.
pub(super) fn unread(conn: &Conn) -> usize {
    match conn.pending.out_len() {
        0 => 0,
        queued => queued + kernel_unsent(&conn.sock),
    }
}

impl Ctx {
    pub(super) fn deliver_one(
        &mut self,
        slot: usize,
        conn: &mut Conn,
        f: pb::Frame,
        closes: bool,
        answers: bool,
    ) {
        let len = palaver_protocol::encoded_frame_len(&f);
        let this_run = self.scratch.out.len() + self.scratch.plain.len();
        let before = *self.run.unread_before.get_or_insert_with(|| unread(conn));
        let unread = Unread {
            bytes: before + this_run,
            answers: conn.pending.answers() + self.run.answers,
        };
        // What became of it (the returned step) is in the effects.
        conn.policy.on_backend_frame(
            &self.limits,
            f,
            len,
            unread,
            closes,
            answers,
            self.now_ms,
            &mut self.effects,
        );
        self.apply(slot, conn);
    }

    /// Adds one frame to the connection's pending plaintext (encrypted with
    /// the rest of this turn's frames by [`seal`](Self::seal)).
    pub(super) fn queue(&mut self, f: &pb::Frame) {
        encode_frame(f, &mut self.scratch.plain);
        self.metrics.frame_out(f.body.as_ref());
    }

    /// Encrypts the pending plaintext into the output buffer: one TLS record
    /// per 16 KiB instead of one per frame.
    pub(super) fn seal(&mut self, conn: &mut Conn) {
        if self.scratch.plain.is_empty() {
            return;
        }
        let driven = tls_io::drive(
            &mut conn.tls,
            conn.pending.tls_in_mut(),
            &mut self.scratch.out,
            None,
            &self.scratch.plain,
        );
        // A partial record in tls_in is never complete here, so nothing was consumed.
        debug_assert_eq!(driven.consumed, 0);
        self.scratch.plain.clear();
    }

    /// Begins closing with `last` (if any) as the last frame, as the rules
    /// do it: close_notify behind it, the session ended, at most the linger
    /// time for the output to leave (the effects of [`ConnPolicy::close`]).
    ///
    /// [`ConnPolicy::close`]: crate::session::ConnPolicy::close
    pub(super) fn begin_close(&mut self, slot: usize, conn: &mut Conn, last: Option<pb::Frame>) {
        conn.policy
            .close(self.now_ms, last, self.limits.linger_ms, &mut self.effects);
        self.apply(slot, conn);
    }

    pub(super) fn end_session(&mut self, slot: usize, conn: &mut Conn) {
        if let Some(ids) = conn.ids.take() {
            // The backend hears of the close after the session's requests.
            self.flush_requests();
            let session = ids.session(&self.shared.gateway_id, self.conn_key(slot, conn));
            self.shared.backend.session_closed(&session, unix_ms());
            self.shared.accounts.close(ids.user_id(), ids.device_id());
            self.metrics.sessions.fetch_sub(1, Relaxed);
        }
    }

    /// Sends what the handler produced (in `scratch.out`): straight from the
    /// scratch buffer when nothing is queued, keeping only what the socket
    /// refused.
    pub(super) fn finish_output(&mut self, slot: usize, conn: &mut Conn) -> Fate {
        self.seal(conn);
        let answers = std::mem::take(&mut self.run).answers;
        if !self.scratch.out.is_empty() {
            if conn.pending.out_len() == 0 {
                let written = write_some(&mut conn.sock, &self.scratch.out);
                match written {
                    Ok(n) => {
                        self.metrics.bytes_out.fetch_add(n as u64, Relaxed);
                        if n < self.scratch.out.len() {
                            // What left counts as answers first (errs low).
                            conn.pending.push_out_answering(
                                &self.scratch.out[n..],
                                answers.saturating_sub(n),
                            );
                        }
                    }
                    Err(_) => {
                        self.scratch.out.clear();
                        return Fate::Close;
                    }
                }
            } else {
                // Already waiting for a writable event: just queue.
                conn.pending.push_out_answering(&self.scratch.out, answers);
            }
            self.scratch.out.clear();
        }
        self.after_output(slot, conn).0
    }

    /// Writable again: push queued output. Also says whether reading resumed.
    pub(super) fn flush(&mut self, slot: usize, conn: &mut Conn) -> (Fate, bool) {
        match write_some(&mut conn.sock, conn.pending.tls_out()) {
            Ok(n) => {
                self.metrics.bytes_out.fetch_add(n as u64, Relaxed);
                conn.pending.consume_out(n);
            }
            Err(_) => return (Fate::Close, false),
        }
        self.after_output(slot, conn)
    }

    /// The unsent output changed: account for it and let the rules say
    /// whether reading resumes, the slow-consumer deadline moved, or the
    /// write side shuts.
    pub(super) fn after_output(&mut self, slot: usize, conn: &mut Conn) -> (Fate, bool) {
        let level = conn.pending.out_len() as u32;
        if level != conn.accounted_out {
            self.metrics
                .max_conn_outbound_bytes
                .fetch_max(i64::from(level), Relaxed);
            self.metrics
                .outbound_buffered_bytes
                .fetch_add(i64::from(level) - i64::from(conn.accounted_out), Relaxed);
            conn.accounted_out = level;
        }
        let queued = conn.pending.out_len();
        let unread = unread(conn);
        conn.policy
            .on_output_level(&self.limits, queued, unread, self.now_ms, &mut self.effects);
        let applied = self.apply(slot, conn);
        (applied.fate, applied.resumed)
    }
}

/// Writes as much as the socket takes without blocking.
fn write_some(sock: &mut TcpStream, mut buf: &[u8]) -> io::Result<usize> {
    let mut total = 0;
    while !buf.is_empty() {
        match sock.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                total += n;
                buf = &buf[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}
