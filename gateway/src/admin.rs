//! Admin HTTP endpoint on its own thread: `GET /metrics` (Prometheus text)
//! and `GET /healthz`. It never touches a core thread.
//!
//! One nonblocking `mio` loop serves every admin connection, so a slow client
//! costs a table slot, never the thread. What one client can take is bounded:
//! - the request head (request line and headers) is at most
//!   [`MAX_HEAD_BYTES`]; a longer one gets `431` and the connection is closed,
//!   and no more than that is ever buffered;
//! - every connection has [`REQUEST_DEADLINE`] from accept to close (read,
//!   answer and all); a request not complete by then gets `408`;
//! - at most [`MAX_CONNECTIONS`] are open; a new one evicts the oldest, so
//!   connections held open cannot lock out a scraper (each new request is
//!   answered in the loop turn it arrives in);
//! - after the answer the write side is shut and at most [`LINGER_BYTES`] of
//!   unread input are discarded (so a client gets its answer rather than a
//!   reset), then the socket is closed.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

/// Produces the response body for a path: `(status, content type, body)`.
pub type Handler = dyn Fn(&str) -> (u16, &'static str, String) + Send + Sync;

/// Largest request head (request line + headers + blank line) accepted.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Time from accept to close for one request, whatever the client does.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Admin connections open at once; the oldest is evicted for a new one.
pub const MAX_CONNECTIONS: usize = 64;
/// Unread input discarded after the answer before the socket is closed.
pub const LINGER_BYTES: usize = 64 * 1024;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

pub struct AdminServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    pub fn start(addr: SocketAddr, handler: Arc<Handler>) -> io::Result<AdminServer> {
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let mut listener = TcpListener::from_std(std_listener);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let mut event_loop = Loop {
            poll,
            listener,
            handler,
            stop: stop.clone(),
            conns: Slab::with_capacity(MAX_CONNECTIONS),
            scratch: vec![0; 16 * 1024],
        };
        let thread = std::thread::Builder::new()
            .name("palaver-admin".into())
            .spawn(move || {
                if let Err(e) = event_loop.run() {
                    tracing::error!("admin endpoint stopped: {e}");
                }
            })?;
        Ok(AdminServer {
            addr,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Phase {
    /// Reading the request head into `head`.
    Reading,
    /// Writing `out[written..]`.
    Writing { out: Vec<u8>, written: usize },
    /// Answer sent, write side shut: discarding what the client still sends.
    Lingering { discarded: usize },
}

struct Conn {
    stream: TcpStream,
    deadline: Instant,
    head: Vec<u8>,
    phase: Phase,
}

/// What to do with a connection after driving it.
enum Next {
    Keep,
    Close,
}

struct Loop {
    poll: Poll,
    listener: TcpListener,
    handler: Arc<Handler>,
    stop: Arc<AtomicBool>,
    conns: Slab<Conn>,
    /// Reads while lingering go here (and are dropped).
    scratch: Vec<u8>,
}

impl Loop {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(128);
        loop {
            let timeout = self
                .conns
                .iter()
                .map(|(_, c)| c.deadline)
                .min()
                .map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) => {
                        let slot = t - FIRST_CONN;
                        if self.conns.contains(slot) {
                            self.drive(slot);
                        }
                    }
                }
            }
            self.expire(Instant::now());
        }
    }

    fn accept(&mut self) {
        loop {
            let (stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the pending connection stays queued;
                    // the next readiness event retries.
                    tracing::warn!("admin accept: {e}");
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                if let Some(oldest) = self
                    .conns
                    .iter()
                    .min_by_key(|(_, c)| c.deadline)
                    .map(|(slot, _)| slot)
                {
                    tracing::debug!("admin: connection table full, evicting the oldest");
                    self.close(oldest);
                }
            }
            let entry = self.conns.vacant_entry();
            let slot = entry.key();
            let mut conn = Conn {
                stream,
                deadline: Instant::now() + REQUEST_DEADLINE,
                head: Vec::new(),
                phase: Phase::Reading,
            };
            if self
                .poll
                .registry()
                .register(
                    &mut conn.stream,
                    Token(slot + FIRST_CONN),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_err()
            {
                continue;
            }
            entry.insert(conn);
            // Edge-triggered: the request may already be here.
            self.drive(slot);
        }
    }

    /// Runs the connection's phases as far as its socket allows.
    fn drive(&mut self, slot: usize) {
        let next = {
            let conn = &mut self.conns[slot];
            step(conn, &*self.handler, &mut self.scratch)
        };
        if let Next::Close = next {
            self.close(slot);
        }
    }

    /// Closes connections past their deadline; one still reading its request
    /// gets a best-effort `408` first.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(slot, _)| slot)
            .collect();
        for slot in expired {
            let conn = &mut self.conns[slot];
            if let Phase::Reading = conn.phase {
                let _ = conn
                    .stream
                    .write(&response(408, "text/plain", "request timeout\n", true));
            }
            self.close(slot);
        }
    }

    fn close(&mut self, slot: usize) {
        let mut conn = self.conns.remove(slot);
        let _ = self.poll.registry().deregister(&mut conn.stream);
    }
}

fn step(conn: &mut Conn, handler: &Handler, scratch: &mut [u8]) -> Next {
    loop {
        match &mut conn.phase {
            Phase::Reading => match read_head(conn) {
                Err(_) => return Next::Close,
                Ok(HeadState::Incomplete) => return Next::Keep,
                Ok(HeadState::Closed) => return Next::Close,
                Ok(HeadState::TooLarge) => {
                    tracing::debug!("admin: request head over {MAX_HEAD_BYTES} bytes");
                    conn.head = Vec::new();
                    let out =
                        response(431, "text/plain", "request header fields too large\n", true);
                    conn.phase = Phase::Writing { out, written: 0 };
                }
                Ok(HeadState::Complete) => {
                    let out = answer(&conn.head, handler);
                    conn.head = Vec::new();
                    conn.phase = Phase::Writing { out, written: 0 };
                }
            },
            Phase::Writing { out, written } => {
                while *written < out.len() {
                    match conn.stream.write(&out[*written..]) {
                        Ok(0) => return Next::Close,
                        Ok(n) => *written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return Next::Close,
                    }
                }
                let _ = conn.stream.flush();
                if conn.stream.shutdown(Shutdown::Write).is_err() {
                    return Next::Close;
                }
                conn.phase = Phase::Lingering { discarded: 0 };
            }
            Phase::Lingering { discarded } => loop {
                match conn.stream.read(scratch) {
                    Ok(0) => return Next::Close,
                    Ok(n) => {
                        *discarded += n;
                        if *discarded > LINGER_BYTES {
                            return Next::Close;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Next::Close,
                }
            },
        }
    }
}

enum HeadState {
    Incomplete,
    Complete,
    TooLarge,
    /// The peer closed before sending a request line.
    Closed,
}

/// Reads into `conn.head`, never past [`MAX_HEAD_BYTES`].
fn read_head(conn: &mut Conn) -> io::Result<HeadState> {
    let mut chunk = [0u8; 2048];
    loop {
        let room = MAX_HEAD_BYTES - conn.head.len();
        if room == 0 {
            return Ok(HeadState::TooLarge);
        }
        let want = room.min(chunk.len());
        match conn.stream.read(&mut chunk[..want]) {
            Ok(0) => {
                // A client that half-closes after its request line is served
                // as before (headers end at end of input).
                return Ok(if conn.head.contains(&b'\n') {
                    HeadState::Complete
                } else {
                    HeadState::Closed
                });
            }
            Ok(n) => {
                // Search only where the terminator can newly appear.
                let from = conn.head.len().saturating_sub(3);
                conn.head.extend_from_slice(&chunk[..n]);
                if head_complete(&conn.head[from..]) {
                    return Ok(HeadState::Complete);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(HeadState::Incomplete),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// True if `bytes` holds the blank line ending a request head.
fn head_complete(bytes: &[u8]) -> bool {
    bytes.windows(4).any(|w| w == b"\r\n\r\n") || bytes.windows(2).any(|w| w == b"\n\n")
}

/// The response to a complete request head.
fn answer(head: &[u8], handler: &Handler) -> Vec<u8> {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let request_line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");
    let (status, ctype, body) = if method != "GET" && method != "HEAD" {
        (405, "text/plain", "method not allowed\n".to_string())
    } else {
        handler(path)
    };
    response(status, ctype, &body, method != "HEAD")
}

fn response(status: u16, ctype: &str, body: &str, with_body: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_terminators() {
        assert!(head_complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(head_complete(b"GET / HTTP/1.0\n\n"));
        assert!(!head_complete(b"GET / HTTP/1.1\r\nHost: x\r\n"));
    }

    #[test]
    fn answers_by_method() {
        let handler: &Handler = &|path: &str| (200, "text/plain", format!("{path}\n"));
        let get = String::from_utf8(answer(b"GET /healthz HTTP/1.1\r\n\r\n", handler)).unwrap();
        assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
        assert!(get.ends_with("\r\n\r\n/healthz\n"), "{get}");
        let head = String::from_utf8(answer(b"HEAD /x HTTP/1.1\r\n\r\n", handler)).unwrap();
        assert!(head.contains("Content-Length: 3\r\n") && head.ends_with("\r\n\r\n"));
        let post = String::from_utf8(answer(b"POST /x HTTP/1.1\r\n\r\n", handler)).unwrap();
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    }
}
