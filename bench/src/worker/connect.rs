//! Opening connections: the connect schedule and ramp, sockets bound to
//! the planned source addresses, failures recorded, closing.

use std::cmp::Reverse;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Token};
use palaver_protocol::FrameDecoder;
use rustls::ClientConnection;
use socket2::{Domain, Protocol, Socket, Type};

use crate::ipc::Phase;

use super::traffic::io_reason;
use super::*;

impl Worker {
    // ---- connecting ---------------------------------------------------

    pub(super) fn next_connect_due(&self) -> Option<Instant> {
        if self.inflight >= self.plan.config.max_inflight {
            return None; // an I/O event will free a place
        }
        if !self.reconnect_queue.is_empty() {
            return Some(Instant::now());
        }
        (self.next_first_connect < self.users.len())
            .then(|| self.first_connect_due(self.next_first_connect))
    }

    pub(super) fn first_connect_due(&self, k: usize) -> Instant {
        if self.connect_rate > 0.0 {
            self.started + Duration::from_secs_f64(k as f64 / self.connect_rate)
        } else {
            self.started
        }
    }

    pub(super) fn start_connects(&mut self, now: Instant) {
        if self.phase == Phase::Finished {
            return;
        }
        while self.inflight < self.plan.config.max_inflight {
            if let Some(slot) = self.reconnect_queue.pop_front() {
                self.open(slot, now);
            } else if self.next_first_connect < self.users.len()
                && self.first_connect_due(self.next_first_connect) <= now
            {
                let slot = self.next_first_connect as u32;
                self.next_first_connect += 1;
                self.open(slot, now);
            } else {
                break;
            }
        }
    }

    pub(super) fn open(&mut self, slot: u32, now: Instant) {
        let user = &mut self.users[slot as usize];
        user.gen = user.gen.wrapping_add(1);
        let gen = user.gen;
        self.counters.attempts += 1;
        self.inflight += 1;
        let sources = &self.plan.source_ips;
        let source = (!sources.is_empty()).then(|| sources[slot as usize % sources.len()]);
        let sock = match connect_socket(self.plan.config.target, source) {
            Ok(s) => s,
            Err(e) => {
                self.inflight -= 1;
                self.record_failure(slot, io_reason("connect", &e), now);
                return;
            }
        };
        let mut sock = TcpStream::from_std(sock);
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            Token(slot as usize),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.inflight -= 1;
            self.record_failure(slot, io_reason("register", &e), now);
            return;
        }
        // Only a reconnect of a slot that had a session may resume.
        let config = if gen > 1 {
            self.tls.reconnect.clone()
        } else {
            self.tls.first.clone()
        };
        let tls = match ClientConnection::new(config, self.server_name.clone()) {
            Ok(t) => t,
            Err(e) => {
                self.inflight -= 1;
                self.record_failure(slot, format!("tls: {e}"), now);
                return;
            }
        };
        self.conns[slot as usize] = Some(Conn {
            sock,
            tls,
            state: State::Connecting,
            welcomed: false,
            started: now,
            hello_at: now,
            decoder: FrameDecoder::new(MAX_FRAME_BYTES),
            writable_interest: true,
            ping: None,
        });
        self.timers.push(Reverse(Timer {
            at: now + self.plan.config.connect_timeout.0,
            slot,
            gen,
            kind: TimerKind::Deadline,
        }));
    }

    /// An attempt failed before it held a session.
    pub(super) fn record_failure(&mut self, slot: u32, reason: String, now: Instant) {
        self.counters.failed += 1;
        *self.failures.entry(reason).or_default() += 1;
        if self.users[slot as usize].dropped_at.is_some() && self.phase == Phase::Storming {
            self.timers.push(Reverse(Timer {
                at: now + STORM_RETRY_DELAY,
                slot,
                gen: self.users[slot as usize].gen,
                kind: TimerKind::Retry,
            }));
        }
    }

    pub(super) fn is_ready(&self, slot: u32) -> bool {
        self.conns[slot as usize]
            .as_ref()
            .is_some_and(Conn::is_ready)
    }

    /// Milliseconds since the worker started: the clock of the protocol's
    /// client state machines.
    pub(super) fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.started).as_millis() as u64
    }

    /// Arms the session's next wake-up (Ping due or heartbeat deadline).
    pub(super) fn schedule_wake(&mut self, slot: u32) {
        let Some(Conn {
            state: State::Session(proto),
            ..
        }) = &self.conns[slot as usize]
        else {
            return;
        };
        if let Some(at_ms) = proto.next_wakeup() {
            self.timers.push(Reverse(Timer {
                at: self.started + Duration::from_millis(at_ms),
                slot,
                gen: self.users[slot as usize].gen,
                kind: TimerKind::Wake,
            }));
        }
    }

    pub(super) fn close(&mut self, slot: u32, end: End) {
        let Some(mut conn) = self.conns[slot as usize].take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.sock);
        let now = Instant::now();
        if conn.welcomed {
            self.counters.open -= 1;
            if let End::Failed(reason) = end {
                self.counters.disconnected += 1;
                *self.disconnects.entry(reason).or_default() += 1;
            }
        } else {
            self.inflight -= 1;
            if let End::Failed(reason) = end {
                self.record_failure(slot, reason, now);
            }
        }
    }
}

/// A nonblocking TCP socket connecting to `target`, bound to `source` first
/// (port chosen at connect time, so one source address serves many targets).
pub(super) fn connect_socket(
    target: SocketAddr,
    source: Option<IpAddr>,
) -> io::Result<std::net::TcpStream> {
    let sock = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        set_bind_address_no_port(&sock)?;
        sock.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match sock.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(sock.into())
}

/// IP_BIND_ADDRESS_NO_PORT: defer the port choice from bind() to connect(),
/// where the kernel can reuse a port for different destinations.
#[allow(unsafe_code)] // setsockopt: see SAFETY below
fn set_bind_address_no_port(sock: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and a c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
