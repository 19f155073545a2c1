//! A blocking Palaver client: TLS (rustls, ALPN `palaver/1`), Hello/Welcome,
//! send and receive frames with timeouts. Used by the gateway, router and
//! CLI integration tests; also exposes the raw pieces tests need
//! (plaintext bytes inside TLS, the underlying TCP socket).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use palaver_protocol::pb::{self, frame::Body};
use palaver_protocol::{encode_frame, frame, FrameDecoder};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("connection closed by the server")]
    Closed,
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("bad frame from the server: {0}")]
    Decode(#[from] palaver_protocol::DecodeError),
    #[error("server error {}: {}", .0.code, .0.message)]
    Server(pb::Error),
    #[error("server sent GoAway: {0:?}")]
    GoAway(pb::GoAway),
    #[error("unexpected frame: {0:?}")]
    Unexpected(Box<pb::Frame>),
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// How to reach and trust a gateway.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub addr: SocketAddr,
    /// Name checked against the server certificate.
    pub server_name: String,
    /// Trusted CA certificates (PEM).
    pub ca_pem: Vec<u8>,
    /// ALPN protocols to offer (default: `palaver/1`; empty = offer none).
    pub alpn: Vec<Vec<u8>>,
    /// Client certificate chain and key (PEM), for gateways requiring one.
    pub client_cert: Option<(Vec<u8>, Vec<u8>)>,
    pub connect_timeout: Duration,
}

impl ConnectOptions {
    pub fn new(addr: SocketAddr, ca_pem: Vec<u8>) -> Self {
        ConnectOptions {
            addr,
            server_name: "localhost".into(),
            ca_pem,
            alpn: vec![palaver_protocol::ALPN.to_vec()],
            client_cert: None,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// Resolves `host:port` and reads the CA file.
    pub fn from_files(addr: &str, ca_file: &Path) -> Result<Self> {
        let resolved = addr
            .to_socket_addrs()
            .map_err(|e| ClientError::Config(format!("cannot resolve {addr}: {e}")))?
            .next()
            .ok_or_else(|| ClientError::Config(format!("{addr} resolves to nothing")))?;
        let ca = std::fs::read(ca_file).map_err(|e| {
            ClientError::Config(format!("cannot read CA file {}: {e}", ca_file.display()))
        })?;
        let mut opts = ConnectOptions::new(resolved, ca);
        if let Some((host, _)) = addr.rsplit_once(':') {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if !host.is_empty() && host != "0.0.0.0" {
                opts.server_name = host.to_string();
            }
        }
        Ok(opts)
    }

    pub fn tls_config(&self) -> Result<Arc<ClientConfig>> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let cert = cert.map_err(|e| ClientError::Config(format!("bad CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ClientError::Config(format!("bad CA certificate: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots);
        let mut config = match &self.client_cert {
            Some((chain, key)) => {
                let certs = CertificateDer::pem_slice_iter(chain)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| ClientError::Config(format!("bad client cert PEM: {e}")))?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| ClientError::Config(format!("bad client key PEM: {e}")))?;
                builder.with_client_auth_cert(certs, key)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        Ok(Arc::new(config))
    }
}

/// One connection to a gateway.
pub struct Client {
    stream: StreamOwned<ClientConnection, TcpStream>,
    decoder: FrameDecoder,
    inbox: VecDeque<pb::Frame>,
    next_request_id: u32,
    pub welcome: Option<pb::Welcome>,
}

impl Client {
    /// TCP connect and complete the TLS handshake.
    pub fn connect(opts: &ConnectOptions) -> Result<Client> {
        Self::connect_with(opts, opts.tls_config()?)
    }

    /// Like [`Client::connect`] with a prepared config (reuse it to resume
    /// TLS sessions with tickets).
    pub fn connect_with(opts: &ConnectOptions, config: Arc<ClientConfig>) -> Result<Client> {
        let sock = TcpStream::connect_timeout(&opts.addr, opts.connect_timeout)?;
        Self::over(sock, opts, config)
    }

    /// Runs TLS over an already connected socket (tests shape the socket first).
    pub fn over(
        sock: TcpStream,
        opts: &ConnectOptions,
        config: Arc<ClientConfig>,
    ) -> Result<Client> {
        sock.set_nodelay(true)?;
        let name = ServerName::try_from(opts.server_name.clone())
            .map_err(|e| ClientError::Config(format!("bad server name: {e}")))?;
        let conn = ClientConnection::new(config, name)?;
        let mut stream = StreamOwned::new(conn, sock);
        stream.sock.set_read_timeout(Some(opts.connect_timeout))?;
        while stream.conn.is_handshaking() {
            match stream.conn.complete_io(&mut stream.sock) {
                Ok((0, 0)) if stream.conn.is_handshaking() => return Err(ClientError::Closed),
                Ok(_) => {}
                Err(e) => return Err(tls_or_io(e)),
            }
        }
        Ok(Client {
            stream,
            decoder: FrameDecoder::new(16 * 1024 * 1024),
            inbox: VecDeque::new(),
            next_request_id: 1,
            welcome: None,
        })
    }

    /// Gives up the TLS state and keeps only the socket (load tools holding
    /// many idle connections; the server cannot tell).
    pub fn into_tcp(self) -> TcpStream {
        self.stream.sock
    }

    /// The negotiated ALPN protocol.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.stream.conn.alpn_protocol()
    }

    /// Whether the TLS session was resumed from a ticket.
    pub fn resumed(&self) -> bool {
        matches!(
            self.stream.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        )
    }

    pub fn next_request_id(&mut self) -> u32 {
        let id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        id
    }

    /// Sends Hello and waits for Welcome (or the server's Error).
    pub fn hello(
        &mut self,
        token: &str,
        device_id: &str,
        timeout: Duration,
    ) -> Result<pb::Welcome> {
        self.hello_with(
            pb::Hello {
                protocol_version: palaver_protocol::PROTOCOL_VERSION,
                token: token.to_string(),
                device_id: device_id.to_string(),
                client_name: "palaver-cli".into(),
                client_version: env!("CARGO_PKG_VERSION").into(),
                resume: Vec::new(),
            },
            timeout,
        )
    }

    pub fn hello_with(&mut self, hello: pb::Hello, timeout: Duration) -> Result<pb::Welcome> {
        let id = self.next_request_id();
        self.send(&frame(id, Body::Hello(hello)))?;
        let f = self.recv_timeout(timeout, "Welcome")?;
        match f.body {
            Some(Body::Welcome(w)) => {
                self.welcome = Some(w.clone());
                Ok(w)
            }
            Some(Body::Error(e)) => Err(ClientError::Server(e)),
            _ => Err(ClientError::Unexpected(Box::new(f))),
        }
    }

    /// Sends one frame.
    pub fn send(&mut self, f: &pb::Frame) -> Result<()> {
        let mut buf = Vec::new();
        encode_frame(f, &mut buf);
        self.send_raw(&buf)
    }

    /// Sends a body with a fresh request id; returns the id.
    pub fn request(&mut self, body: Body) -> Result<u32> {
        let id = self.next_request_id();
        self.send(&frame(id, body))?;
        Ok(id)
    }

    /// Writes `frames`, then the TLS close_notify and a TCP FIN, with the
    /// frames and the alert in one `write` (one segment on loopback): the
    /// server reads the requests and the close in the same read round.
    /// Frames the server sends afterwards can still be read.
    pub fn send_then_close(&mut self, frames: &[pb::Frame]) -> Result<()> {
        let mut buf = Vec::new();
        for f in frames {
            encode_frame(f, &mut buf);
        }
        self.stream.conn.writer().write_all(&buf)?;
        self.stream.conn.send_close_notify();
        let mut tls = Vec::new();
        while self.stream.conn.wants_write() {
            self.stream.conn.write_tls(&mut tls)?;
        }
        self.stream.sock.write_all(&tls)?;
        self.stream.sock.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    }

    /// Writes arbitrary plaintext bytes inside the TLS stream.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()?;
        Ok(())
    }

    /// The TCP socket under TLS (for writing bytes that are not TLS).
    pub fn tcp(&mut self) -> &mut TcpStream {
        &mut self.stream.sock
    }

    /// Next frame, or `None` if nothing arrived within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<pb::Frame>> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(f) = self.inbox.pop_front() {
                return Ok(Some(f));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream
                .sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => {
                    let inbox = &mut self.inbox;
                    self.decoder.decode(&buf[..n], |f| inbox.push_back(f))?;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(ClientError::Closed)
                }
                Err(e) => return Err(tls_or_io(e)),
            }
        }
    }

    /// Next frame within `timeout`, else a Timeout error naming `what`.
    pub fn recv_timeout(&mut self, timeout: Duration, what: &'static str) -> Result<pb::Frame> {
        self.recv(timeout)?.ok_or(ClientError::Timeout(what))
    }

    /// Receives until `pred` matches, returning the matching frame. Frames
    /// that do not match are dropped.
    pub fn recv_until(
        &mut self,
        timeout: Duration,
        what: &'static str,
        mut pred: impl FnMut(&pb::Frame) -> bool,
    ) -> Result<pb::Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let f = self.recv(left)?.ok_or(ClientError::Timeout(what))?;
            if pred(&f) {
                return Ok(f);
            }
        }
    }

    /// Ping and wait for the matching Pong.
    pub fn ping(&mut self, nonce: u64, timeout: Duration) -> Result<()> {
        self.request(Body::Ping(pb::Ping { nonce }))?;
        self.recv_until(
            timeout,
            "Pong",
            |f| matches!(&f.body, Some(Body::Pong(p)) if p.nonce == nonce),
        )?;
        Ok(())
    }

    /// Creates a group of this user and `members`; returns the conversation
    /// as the server answered it (frames arriving meanwhile are dropped).
    pub fn create_group(
        &mut self,
        title: &str,
        members: &[&str],
        timeout: Duration,
    ) -> Result<pb::Conversation> {
        let id = self.request(Body::CreateConversation(pb::CreateConversation {
            kind: pb::ConversationKind::Group as i32,
            title: title.into(),
            member_user_ids: members.iter().map(|m| m.to_string()).collect(),
            channel: None,
        }))?;
        let f = self.recv_until(timeout, "ConversationCreated", |f| f.request_id == id)?;
        match f.body {
            Some(Body::ConversationCreated(pb::ConversationCreated {
                conversation: Some(c),
            })) => Ok(c),
            Some(Body::Error(e)) => Err(ClientError::Server(e)),
            _ => Err(ClientError::Unexpected(Box::new(f))),
        }
    }

    /// Presence of one user (PresenceQuery; frames arriving meanwhile are
    /// dropped).
    pub fn presence(&mut self, user: &str, timeout: Duration) -> Result<pb::Presence> {
        let query = Body::PresenceQuery(pb::PresenceQuery {
            user_ids: vec![user.into()],
        });
        self.presence_result(query, timeout)
    }

    /// Subscribes to one user's presence (PresenceSubscribe); returns the
    /// current state (frames arriving meanwhile are dropped). Events follow
    /// as `PresenceEvent` frames.
    pub fn subscribe_presence(&mut self, user: &str, timeout: Duration) -> Result<pb::Presence> {
        let subscribe = Body::PresenceSubscribe(pb::PresenceSubscribe {
            user_ids: vec![user.into()],
            unsubscribe: false,
        });
        self.presence_result(subscribe, timeout)
    }

    /// Sends a presence request about one user and reads its one presence.
    fn presence_result(&mut self, request: Body, timeout: Duration) -> Result<pb::Presence> {
        let id = self.request(request)?;
        let f = self.recv_until(timeout, "PresenceResult", |f| f.request_id == id)?;
        match f.body {
            Some(Body::PresenceResult(mut r)) if r.presences.len() == 1 => {
                Ok(r.presences.remove(0))
            }
            Some(Body::Error(e)) => Err(ClientError::Server(e)),
            _ => Err(ClientError::Unexpected(Box::new(f))),
        }
    }

    /// Waits for the server to close the connection; returns the frames that
    /// arrived before the close (an Error or GoAway usually).
    pub fn expect_close(&mut self, timeout: Duration) -> Result<Vec<pb::Frame>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Ok(Some(f)) => got.push(f),
                Ok(None) => return Err(ClientError::Timeout("the server to close")),
                Err(ClientError::Closed) | Err(ClientError::Io(_)) | Err(ClientError::Tls(_)) => {
                    return Ok(got)
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn tls_or_io(e: io::Error) -> ClientError {
    let is_tls = e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>());
    if is_tls {
        let inner = e.into_inner().expect("checked above");
        match inner.downcast::<rustls::Error>() {
            Ok(tls) => ClientError::Tls(*tls),
            Err(other) => ClientError::Io(io::Error::other(other)),
        }
    } else if e.kind() == io::ErrorKind::UnexpectedEof {
        ClientError::Closed
    } else {
        ClientError::Io(e)
    }
}

/// A fresh random 16-byte client message id.
pub fn new_client_msg_id() -> Vec<u8> {
    rand::random::<[u8; 16]>().to_vec()
}

/// A text Send body.
pub fn text_send(conversation_id: &str, text: &str) -> Body {
    Body::Send(pb::Send {
        conversation_id: conversation_id.to_string(),
        client_msg_id: new_client_msg_id(),
        kind: pb::ContentKind::Text as i32,
        body: text.as_bytes().to_vec(),
        reply_to_seq: 0,
        media: None,
        mention_user_ids: Vec::new(),
    })
}
