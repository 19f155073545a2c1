//! The HTTP/2-over-TLS server both test servers run on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, Response, StatusCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;

/// Request bodies past this are cut and answered as too large by the
/// handlers (both contracts' limits are 4 KiB).
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// A test CA and the loopback server certificate it signed.
pub struct TestCa {
    /// What a client trusts ([`crate::TrustRoots::Pem`]).
    pub ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl TestCa {
    /// A CA and a certificate for `localhost`, 127.0.0.1 and ::1.
    pub fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.distinguished_name
            .push(DnType::CommonName, "palaver-push test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let key = KeyPair::generate().expect("server key");
        let names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        let mut params = CertificateParams::new(names).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "palaver-push test server");
        let cert = params
            .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
            .expect("server certificate");
        Self {
            ca_pem: ca_cert.pem(),
            chain: vec![cert.der().clone(), ca_cert.der().clone()],
            key_der: key.serialize_der(),
        }
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::try_from(self.key_der.clone()).expect("server key DER");
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), key)
            .expect("server certificate");
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// The CA certificate parsed, for callers that want DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).expect("CA PEM")
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// What a handler makes of a request.
pub(crate) enum Answer {
    Respond {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    },
    /// Close the connection without answering (every stream on it fails).
    DropConnection,
    /// Never answer this stream (for ten minutes), keeping the connection:
    /// a server or network that went silent.
    Stall,
}

impl Answer {
    pub(crate) fn json(status: u16, body: &serde_json::Value) -> Self {
        Answer::Respond {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: Bytes::from(serde_json::to_vec(body).unwrap_or_default()),
        }
    }
}

/// The request as a handler sees it.
pub(crate) struct Incoming<'a> {
    pub connection: u64,
    pub parts: &'a Parts,
    pub body: &'a [u8],
    /// The body was longer than [`MAX_BODY`] (and cut).
    pub oversized: bool,
}

impl Incoming<'_> {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.parts.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.parts.headers
    }
}

pub(crate) trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Incoming<'_>) -> Answer;
}

/// A running server; stops when dropped.
pub(crate) struct Running {
    pub addr: SocketAddr,
    /// Connections served (TLS accepted while up).
    pub connections: Arc<AtomicU64>,
    /// Connections refused while down.
    pub refused: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
    /// Bumped to close every open connection at once.
    cut: watch::Sender<u64>,
    stop: watch::Sender<bool>,
}

impl Running {
    /// An outage: every open connection closed, new ones closed at once
    /// (the client sees connect failures), until `set_down(false)`. The
    /// port, certificate and recorded state stay.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Release);
        if down {
            self.cut.send_modify(|epoch| *epoch += 1);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A free loopback port.
pub(crate) async fn bind() -> std::io::Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", 0)).await
}

pub(crate) fn start(
    listener: TcpListener,
    ca: &TestCa,
    max_concurrent_streams: u32,
    handler: Arc<dyn Handler>,
) -> std::io::Result<Running> {
    let addr = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(ca.server_config());
    let (stop, stopped) = watch::channel(false);
    let (cut, cuts) = watch::channel(0u64);
    let connections = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let down = Arc::new(AtomicBool::new(false));
    let (count, refusals, is_down) = (connections.clone(), refused.clone(), down.clone());
    tokio::spawn(async move {
        let mut stop_rx = stopped.clone();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop_rx.changed() => return,
            };
            let Ok((tcp, _)) = accepted else { continue };
            if is_down.load(Ordering::Acquire) {
                refusals.fetch_add(1, Ordering::Relaxed);
                drop(tcp);
                continue;
            }
            let _ = tcp.set_nodelay(true);
            let id = count.fetch_add(1, Ordering::Relaxed) + 1;
            let (acceptor, handler) = (acceptor.clone(), handler.clone());
            let (stopped, cuts) = (stopped.clone(), cuts.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve_connection(tls, id, max_concurrent_streams, handler, stopped, cuts).await;
                }
            });
        }
    });
    Ok(Running {
        addr,
        connections,
        refused,
        down,
        cut,
        stop,
    })
}

async fn serve_connection<T>(
    io: T,
    id: u64,
    max_streams: u32,
    handler: Arc<dyn Handler>,
    mut stop: watch::Receiver<bool>,
    mut cuts: watch::Receiver<u64>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(mut conn) = h2::server::Builder::new()
        .max_concurrent_streams(max_streams)
        .handshake::<_, Bytes>(io)
        .await
    else {
        return;
    };
    // Only outages begun after this connection was accepted close it.
    cuts.borrow_and_update();
    let kill = Arc::new(Notify::new());
    loop {
        let next = tokio::select! {
            n = conn.accept() => n,
            // Dropping `conn` closes the socket: every open stream fails.
            _ = kill.notified() => return,
            _ = stop.changed() => return,
            _ = cuts.changed() => return,
        };
        let Some(Ok((request, mut respond))) = next else {
            return;
        };
        let (handler, kill) = (handler.clone(), kill.clone());
        tokio::spawn(async move {
            let (parts, mut recv) = request.into_parts();
            let mut body = BytesMut::new();
            let mut oversized = false;
            while let Some(chunk) = recv.data().await {
                let Ok(chunk) = chunk else { return };
                let _ = recv.flow_control().release_capacity(chunk.len());
                if body.len() + chunk.len() > MAX_BODY {
                    oversized = true;
                } else {
                    body.extend_from_slice(&chunk);
                }
            }
            let answer = handler.handle(Incoming {
                connection: id,
                parts: &parts,
                body: &body,
                oversized,
            });
            match answer {
                Answer::DropConnection => kill.notify_one(),
                Answer::Stall => {
                    // Holding `respond` keeps the stream open and unanswered.
                    tokio::time::sleep(std::time::Duration::from_secs(600)).await;
                    drop(respond);
                }
                Answer::Respond {
                    status,
                    headers,
                    body,
                } => {
                    let mut response = Response::builder().status(
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    );
                    for (name, value) in headers {
                        response = response.header(name, value);
                    }
                    let Ok(response) = response.body(()) else {
                        return;
                    };
                    let Ok(mut stream) = respond.send_response(response, body.is_empty()) else {
                        return;
                    };
                    if !body.is_empty() {
                        let _ = stream.send_data(body, true);
                    }
                }
            }
        });
    }
}
