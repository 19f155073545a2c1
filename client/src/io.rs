//! The one I/O thread: it alone owns the socket and the rustls connection
//! (reading and writing one TLS stream from two threads is how a
//! hand-written client lost its Hello), feeds the [`Engine`] and writes what
//! it asks. A second thread hands events to the app's listener and runs the
//! store callbacks, so a slow listener never stalls reading (SPEC §13, slow
//! consumers).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use palaver_protocol::{encode_frame, pb, FrameDecoder};
use rustls::pki_types::ServerName;
use rustls::ClientConnection;

use crate::engine::{Command, DialFailure, Engine, Output};
use crate::ffi::{ClientStore, EventListener, TokenError, TokenProvider};
use crate::log::{log, LogLevel};
use crate::types::{ConnectFailure, ConnectionState};

pub(crate) const SOCKET: Token = Token(0);
pub(crate) const WAKER: Token = Token(1);
/// SPEC §2: clients accept server frames up to 2 MiB; leave headroom.
const MAX_SERVER_FRAME: usize = 4 * 1024 * 1024;

/// What the app-facing handle shares with the I/O thread.
pub(crate) struct Shared {
    pub state: Mutex<ConnectionState>,
    pub max_body_bytes: AtomicUsize,
    /// `shutdown()` was called: no more events reach the app, and a token
    /// fetched after it is not used.
    pub closed: AtomicBool,
    /// The I/O thread has returned (shutdown waits for it a moment, never
    /// for an app callback such as a slow token provider).
    pub exited: Mutex<bool>,
    pub exited_changed: Condvar,
}

impl Shared {
    pub fn new(state: ConnectionState, max_body_bytes: usize) -> Self {
        Shared {
            state: Mutex::new(state),
            max_body_bytes: AtomicUsize::new(max_body_bytes),
            closed: AtomicBool::new(false),
            exited: Mutex::new(false),
            exited_changed: Condvar::new(),
        }
    }

    /// Waits up to `patience` for the I/O thread to return; true if it did.
    pub fn wait_exited(&self, patience: Duration) -> bool {
        let Ok(exited) = self.exited.lock() else {
            return false;
        };
        self.exited_changed
            .wait_timeout_while(exited, patience, |exited| !*exited)
            .map(|(exited, _)| *exited)
            .unwrap_or(false)
    }

    fn mark_exited(&self) {
        if let Ok(mut exited) = self.exited.lock() {
            *exited = true;
        }
        self.exited_changed.notify_all();
    }
}

/// One TCP + TLS connection in progress or up.
struct Transport {
    sock: TcpStream,
    tls: ClientConnection,
    decoder: FrameDecoder,
    /// TLS finished and the engine was told.
    up: bool,
    token: String,
    interest: Interest,
}

pub(crate) struct IoThread {
    pub engine: Engine,
    pub commands: Receiver<Command>,
    pub poll: Poll,
    pub tokens: Arc<dyn TokenProvider>,
    pub tls: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
    pub address: String,
    pub outputs: Sender<Output>,
    pub shared: Arc<Shared>,
}

impl IoThread {
    pub fn run(mut self) {
        self.run_until_closed();
        self.shared.mark_exited();
    }

    fn run_until_closed(&mut self) {
        let epoch = Instant::now();
        let now = || u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut events = Events::with_capacity(64);
        let mut transport: Option<Transport> = None;
        loop {
            let mut disconnected = false;
            loop {
                match self.commands.try_recv() {
                    Ok(cmd) => self.engine.command(cmd, now()),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            if disconnected {
                // Every handle is gone: close as if asked to.
                self.engine.command(Command::Close, now());
            }
            if let Some(fresh) = self.engine.poll_dial(now()) {
                match self.dial(fresh) {
                    Ok(t) => transport = Some(t),
                    Err(why) => self.engine.on_dial_failed(now(), why),
                }
            }
            self.engine.on_tick(now());
            self.flush(&mut transport, now());
            if self.engine.is_closed() {
                return;
            }
            let t = now();
            let timeout = self
                .engine
                .next_wakeup(t)
                .map(|w| Duration::from_millis(w.saturating_sub(t).max(1)));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    // The poller itself broke: nothing sensible is left.
                    self.engine.command(Command::Close, now());
                    self.flush(&mut transport, now());
                    return;
                }
            }
            for ev in events.iter() {
                if ev.token() == SOCKET {
                    self.on_socket(&mut transport, now());
                }
            }
        }
    }

    fn dial(&mut self, fresh: bool) -> Result<Transport, DialFailure> {
        let token = match self.tokens.fetch_token(fresh) {
            Ok(t) => t,
            Err(TokenError::Denied { detail }) => return Err(DialFailure::TokenDenied(detail)),
            Err(TokenError::Unavailable { detail }) => {
                return Err(DialFailure::Transient(ConnectFailure::TokenUnavailable {
                    detail,
                }))
            }
        };
        // The app shut the client down while its provider was busy: the
        // loop closes next, without dialing.
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(DialFailure::Transient(ConnectFailure::ConnectionLost {
                detail: "shut down".into(),
            }));
        }
        let unreachable =
            |detail: String| DialFailure::Transient(ConnectFailure::Unreachable { detail });
        let addr: SocketAddr = match self.address.to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .ok_or_else(|| unreachable(format!("{}: no address", self.address)))?,
            Err(e) => return Err(unreachable(format!("{}: {e}", self.address))),
        };
        let mut sock = TcpStream::connect(addr).map_err(|e| unreachable(format!("{addr}: {e}")))?;
        let mut tls =
            ClientConnection::new(self.tls.clone(), self.server_name.clone()).map_err(|e| {
                DialFailure::Transient(ConnectFailure::Tls {
                    detail: e.to_string(),
                })
            })?;
        // rustls caps unsent data at 64 KiB by default and then accepts
        // nothing more, which a burst of large Sends exceeds. The engine
        // already bounds what it writes (requests in flight × frame size).
        tls.set_buffer_limit(None);
        let interest = Interest::READABLE | Interest::WRITABLE;
        self.poll
            .registry()
            .register(&mut sock, SOCKET, interest)
            .map_err(|e| unreachable(format!("{addr}: {e}")))?;
        Ok(Transport {
            sock,
            tls,
            decoder: FrameDecoder::new(MAX_SERVER_FRAME),
            up: false,
            token,
            interest,
        })
    }

    /// Readiness on the socket: finish connecting, move TLS bytes, decode
    /// frames into the engine.
    fn on_socket(&mut self, transport: &mut Option<Transport>, now: u64) {
        let Some(t) = transport.as_mut() else { return };
        if let Err(why) = Self::pump_socket(t, &mut self.engine, now) {
            self.drop_transport(transport);
            self.engine.on_transport_down(now, why);
        }
        self.flush(transport, now);
    }

    /// Err (why) when the transport failed or closed.
    fn pump_socket(t: &mut Transport, engine: &mut Engine, now: u64) -> Result<(), ConnectFailure> {
        match t.sock.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => return Err(io_failure(&e)),
        }
        // Read until the socket would block (edge-triggered readiness). At
        // EOF or an error, still hand over what came before it: a GoAway or
        // a closing Error usually arrives right before the FIN.
        let mut frames = Vec::new();
        let mut failure: Option<ConnectFailure> = None;
        loop {
            let drained = match t.tls.read_tls(&mut t.sock) {
                Ok(0) => {
                    let detail = if t.tls.is_handshaking() {
                        "closed by the server during the TLS handshake"
                    } else {
                        "closed by the server"
                    };
                    failure = Some(ConnectFailure::ConnectionLost {
                        detail: detail.into(),
                    });
                    false
                }
                Ok(_) => {
                    if let Err(e) = t.tls.process_new_packets() {
                        failure = Some(tls_failure(&e));
                    }
                    false
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // NotConnected: the TCP connect has not completed yet.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::NotConnected
                    ) =>
                {
                    true
                }
                Err(e) => {
                    failure = Some(io_failure(&e));
                    false
                }
            };
            // Take the plaintext out after every read: rustls buffers only a
            // little of it and refuses to read more (a 1 MiB SyncBatch would
            // fail read_tls otherwise).
            if let Err(why) = Self::drain_plaintext(t, &mut frames) {
                failure.get_or_insert(why);
            }
            if drained || failure.is_some() {
                break;
            }
        }
        if !t.up && !t.tls.is_handshaking() {
            t.up = true;
            engine.on_transport_up(now, std::mem::take(&mut t.token));
        }
        Self::feed(engine, frames, now);
        match failure {
            Some(why) => Err(why),
            None => Self::write_out(t),
        }
    }

    /// Decodes the plaintext rustls holds into `frames`. Err when the
    /// stream ended (close_notify) or is malformed (SPEC §2: close).
    fn drain_plaintext(
        t: &mut Transport,
        frames: &mut Vec<pb::Frame>,
    ) -> Result<(), ConnectFailure> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match t.tls.reader().read(&mut buf) {
                Ok(0) => {
                    return Err(ConnectFailure::ConnectionLost {
                        detail: "closed by the server (close_notify)".into(),
                    })
                }
                Ok(n) => {
                    if let Err(e) = t.decoder.decode(&buf[..n], |f| frames.push(f)) {
                        return Err(ConnectFailure::Protocol {
                            detail: format!("undecodable frame from the server: {e}"),
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => {
                    return Err(ConnectFailure::ConnectionLost {
                        detail: e.to_string(),
                    })
                }
            }
        }
    }

    fn feed(engine: &mut Engine, frames: Vec<pb::Frame>, now: u64) {
        for f in frames {
            engine.on_frame(f, now);
        }
    }

    /// Writes pending TLS records until the socket would block.
    fn write_out(t: &mut Transport) -> Result<(), ConnectFailure> {
        while t.tls.wants_write() {
            match t.tls.write_tls(&mut t.sock) {
                Ok(0) => {
                    return Err(ConnectFailure::ConnectionLost {
                        detail: "the socket accepts no more bytes".into(),
                    })
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
                Err(e) => return Err(io_failure(&e)),
            }
        }
        Ok(())
    }

    fn drop_transport(&mut self, transport: &mut Option<Transport>) {
        if let Some(mut t) = transport.take() {
            let _ = self.poll.registry().deregister(&mut t.sock);
        }
    }

    /// Hands the engine's writes to TLS, its outputs to the dispatcher, and
    /// closes the transport when the engine is done with it.
    fn flush(&mut self, transport: &mut Option<Transport>, now: u64) {
        let writes = self.engine.take_writes();
        let mut failed = None;
        if let Some(t) = transport.as_mut() {
            if !writes.is_empty() {
                let mut buf = Vec::new();
                for f in &writes {
                    encode_frame(f, &mut buf);
                }
                if let Err(e) = t.tls.writer().write_all(&buf) {
                    failed = Some(ConnectFailure::ConnectionLost {
                        detail: e.to_string(),
                    });
                }
            }
            if failed.is_none() {
                failed = Self::write_out(t).err();
            }
        }
        if self.engine.take_close() {
            if let Some(t) = transport.as_mut() {
                t.tls.send_close_notify();
                let _ = Self::write_out(t);
            }
            self.drop_transport(transport);
        } else if let Some(why) = failed {
            self.drop_transport(transport);
            self.engine.on_transport_down(now, why);
            // The engine may have more to say (state change).
            self.engine.take_close();
        }
        if let Some(t) = transport.as_mut() {
            let want = if t.tls.wants_write() || !t.up {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if want != t.interest {
                t.interest = want;
                let _ = self.poll.registry().reregister(&mut t.sock, SOCKET, want);
            }
        }
        for out in self.engine.take_outputs() {
            if let Output::Event(crate::types::ClientEvent::StateChanged { state }) = &out {
                if let Ok(mut s) = self.shared.state.lock() {
                    *s = state.clone();
                }
                self.shared
                    .max_body_bytes
                    .store(self.engine.max_body_bytes(), Ordering::Relaxed);
            }
            // The dispatcher is gone only when the process is tearing down.
            let _ = self.outputs.send(out);
        }
    }
}

/// The dispatcher thread: listener callbacks and store writes, in order.
pub(crate) fn dispatch(
    outputs: Receiver<Output>,
    listener: Arc<dyn EventListener>,
    store: Arc<dyn ClientStore>,
    shared: Arc<Shared>,
) {
    for out in outputs {
        // A panicking callback loses that one call, not every later event.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match out {
            // After shutdown() the app hears nothing more; the store still
            // gets every write (the outbox and cursors stay right).
            Output::Event(_) if shared.closed.load(Ordering::Acquire) => {}
            Output::Event(e) => {
                // A listener that throws (Kotlin, Swift) arrives here as an
                // Err: reported to the log sink, and the next event goes on.
                if let Err(e) = listener.on_event(e) {
                    log(
                        LogLevel::Error,
                        format!("the app's event listener threw: {e}"),
                    );
                }
            }
            // After the listener saw the messages the cursor covers.
            Output::SaveCursor(c) => store.save_cursor(c),
            Output::RemoveOutgoing(id) => store.remove_outgoing(id),
            Output::Log(level, line) => log(level, line),
        }));
    }
}

/// A socket error as the app sees it: the TCP connect failing (refused,
/// no route, timed out) is "unreachable"; anything else a lost connection.
fn io_failure(e: &io::Error) -> ConnectFailure {
    use io::ErrorKind::*;
    let detail = e.to_string();
    match e.kind() {
        ConnectionRefused | HostUnreachable | NetworkUnreachable | TimedOut | AddrNotAvailable => {
            ConnectFailure::Unreachable { detail }
        }
        _ => ConnectFailure::ConnectionLost { detail },
    }
}

/// A TLS error as the app sees it: a certificate the client does not trust
/// is permanent (the same every time); the rest may heal.
fn tls_failure(e: &rustls::Error) -> ConnectFailure {
    let detail = e.to_string();
    match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::UnsupportedNameType => ConnectFailure::UntrustedCertificate { detail },
        _ => ConnectFailure::Tls { detail },
    }
}

pub(crate) fn new_poll() -> io::Result<(Poll, Arc<Waker>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    Ok((poll, waker))
}

pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    mpsc::channel()
}
