//! One long-lived HTTP/2 connection per provider endpoint, shared by every
//! request as concurrent streams. Apple treats connection churn as abuse and
//! Google's front ends prefer it too, so a connection is never closed on
//! purpose: it is opened on first use, kept, and reopened with backoff only
//! after the server or the network dropped it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use http::{HeaderMap, Request, Uri};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::backoff::Backoff;
use crate::tls::TrustRoots;
use crate::PushError;

/// Responses larger than this are cut off: provider answers are a few
/// hundred bytes, and nothing a server sends may grow without bound here.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// `https://host[:port]` and a path, parsed from a configured URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Url {
    /// Parses an `https://` URL (the only scheme providers speak).
    pub fn parse(url: &str) -> Result<Self, PushError> {
        let bad = |why: &str| PushError::Config(format!("endpoint URL {url:?}: {why}"));
        let uri: Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("must start with https://"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        // `Uri::host` keeps an IPv6 literal's brackets; TLS names want it bare.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let path = match uri.path() {
            "" => "/".to_owned(),
            p => p.to_owned(),
        };
        Ok(Url {
            host,
            port: uri.port_u16().unwrap_or(443),
            path,
        })
    }

    /// `host` or `host:port` as the `:authority` of requests.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// The full URL of `path` on this endpoint.
    pub fn with_path(&self, path: &str) -> String {
        format!("https://{}{}", self.authority(), path)
    }
}

/// Why a request got no HTTP response. Always worth retrying: the request
/// may or may not have reached the provider (at-least-once).
#[derive(Clone, Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("connection to {endpoint} lost: {reason}")]
    Lost { endpoint: String, reason: String },
    #[error("no response from {endpoint} within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
}

/// An HTTP response, body read whole.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Connection counters (a connection count climbing with traffic is churn).
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Connections established (TLS + HTTP/2 handshake done).
    pub connects: AtomicU64,
    /// Attempts to connect that failed.
    pub connect_failures: AtomicU64,
    /// Established connections that ended (dropped by the server or network).
    pub drops: AtomicU64,
}

/// Timing of a connection.
#[derive(Clone, Debug)]
pub struct ConnConfig {
    /// A TCP + TLS + HTTP/2 handshake taking longer fails.
    pub connect_timeout: Duration,
    /// One request's whole exchange (waiting for a stream slot included).
    pub request_timeout: Duration,
    /// Pause after a failed connect, doubling up to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl Default for ConnConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
        }
    }
}

struct Live {
    send: SendRequest<Bytes>,
    handle: Arc<LiveHandle>,
}

/// One established connection's liveness, shared with its requests.
struct LiveHandle {
    /// Cleared when the connection must not take new streams: its driver
    /// ended, or a request on it saw it going away.
    alive: AtomicBool,
    /// The task driving the connection; aborting it closes the socket.
    driver: tokio::task::AbortHandle,
}

impl LiveHandle {
    /// No new streams here; streams in flight may finish (a GOAWAY).
    fn retire(&self) {
        self.alive.store(false, Ordering::Release);
    }

    /// Closes the socket now: a request timed out, so the connection is
    /// presumed dead (a silent network drop); its other streams fail and
    /// are retried on the next connection.
    fn kill(&self) {
        self.retire();
        self.driver.abort();
    }
}

struct State {
    live: Option<Live>,
    failures: u32,
    /// No connect before this (backoff after failures).
    not_before: Option<Instant>,
}

/// The one HTTP/2 connection to an endpoint (cheap to share by `Arc`).
pub struct H2Connection {
    url: Url,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    config: ConnConfig,
    state: tokio::sync::Mutex<State>,
    stats: Arc<ConnStats>,
}

impl H2Connection {
    pub fn new(url: Url, roots: &TrustRoots, config: ConnConfig) -> Result<Self, PushError> {
        let server_name = ServerName::try_from(url.host.clone()).map_err(|e| {
            PushError::Config(format!(
                "endpoint host {:?} is not a valid TLS name: {e}",
                url.host
            ))
        })?;
        Ok(Self {
            connector: TlsConnector::from(roots.client_config()?),
            url,
            server_name,
            config,
            state: tokio::sync::Mutex::new(State {
                live: None,
                failures: 0,
                not_before: None,
            }),
            stats: Arc::default(),
        })
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    pub fn stats(&self) -> Arc<ConnStats> {
        self.stats.clone()
    }

    /// A handle on the live connection, connecting first if there is none.
    /// The lock is held across the connect so concurrent requests wait for
    /// the one connection rather than each opening their own.
    async fn sender(&self) -> Result<(SendRequest<Bytes>, Arc<LiveHandle>), TransportError> {
        let mut state = self.state.lock().await;
        if let Some(live) = &state.live {
            if live.handle.alive.load(Ordering::Acquire) {
                return Ok((live.send.clone(), live.handle.clone()));
            }
            state.live = None;
        }
        if let Some(at) = state.not_before {
            tokio::time::sleep_until(at).await;
        }
        match tokio::time::timeout(self.config.connect_timeout, self.connect()).await {
            Ok(Ok(live)) => {
                state.failures = 0;
                state.not_before = None;
                let out = (live.send.clone(), live.handle.clone());
                state.live = Some(live);
                self.stats.connects.fetch_add(1, Ordering::Relaxed);
                Ok(out)
            }
            failed => {
                let reason = match failed {
                    Ok(Err(reason)) => reason,
                    _ => format!("handshake took over {:?}", self.config.connect_timeout),
                };
                state.failures += 1;
                let pause = Backoff::new(self.config.reconnect_min, self.config.reconnect_max)
                    .delay(state.failures);
                state.not_before = Some(Instant::now() + pause);
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(endpoint = %self.url.authority(), failures = state.failures,
                    "connect failed, next try in {pause:?}: {reason}");
                Err(TransportError::Connect {
                    endpoint: self.url.authority(),
                    reason,
                })
            }
        }
    }

    async fn connect(&self) -> Result<Live, String> {
        let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|e| format!("TCP: {e}"))?;
        // Pushes are small and latency-bound.
        tcp.set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err("the server did not agree to HTTP/2 (ALPN h2)".into());
        }
        let (send, connection) = h2::client::Builder::new()
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let driver = tokio::spawn(connection);
        let handle = Arc::new(LiveHandle {
            alive: AtomicBool::new(true),
            driver: driver.abort_handle(),
        });
        // Watches the driver: when the connection ends (or is killed), no
        // new stream goes to it and the next request reconnects.
        let (watched, stats, endpoint) = (handle.clone(), self.stats.clone(), self.url.authority());
        tokio::spawn(async move {
            match driver.await {
                Ok(Ok(())) => tracing::info!(%endpoint, "connection closed by the server"),
                Ok(Err(e)) => tracing::warn!(%endpoint, "connection ended: {e}"),
                Err(_) => tracing::warn!(%endpoint, "connection closed after a request timed out"),
            }
            watched.retire();
            stats.drops.fetch_add(1, Ordering::Relaxed);
        });
        tracing::info!(endpoint = %self.url.authority(), "connected (HTTP/2)");
        Ok(Live { send, handle })
    }

    /// One request/response exchange as a stream of the shared connection.
    pub async fn request(
        &self,
        request: Request<()>,
        body: Bytes,
    ) -> Result<Response, TransportError> {
        let timeout = self.config.request_timeout;
        let deadline = Instant::now() + timeout;
        let timed_out = || TransportError::Timeout {
            endpoint: self.url.authority(),
            timeout,
        };
        let (send, live) = match tokio::time::timeout_at(deadline, self.sender()).await {
            Ok(connected) => connected?,
            Err(_) => return Err(timed_out()),
        };
        match tokio::time::timeout_at(deadline, self.exchange(send, &live, request, body)).await {
            Ok(result) => result,
            Err(_) => {
                live.kill();
                Err(timed_out())
            }
        }
    }

    async fn exchange(
        &self,
        send: SendRequest<Bytes>,
        live: &LiveHandle,
        request: Request<()>,
        body: Bytes,
    ) -> Result<Response, TransportError> {
        let lost = |e: h2::Error| {
            // The connection itself failed or is going away (GOAWAY): no
            // new streams on it. A reset of this stream alone is not that.
            if e.is_go_away() || e.is_io() || e.get_io().is_some() {
                live.retire();
            }
            TransportError::Lost {
                endpoint: self.url.authority(),
                reason: e.to_string(),
            }
        };
        // Waits while the server's SETTINGS_MAX_CONCURRENT_STREAMS are all in
        // use: h2 never opens more streams than the server allows.
        let mut send = send.ready().await.map_err(lost)?;
        let end_of_stream = body.is_empty();
        let (response, mut stream) = send.send_request(request, end_of_stream).map_err(lost)?;
        if !end_of_stream {
            stream.send_data(body, true).map_err(lost)?;
        }
        let response = response.await.map_err(lost)?;
        let (parts, mut recv) = response.into_parts();
        let mut buf = BytesMut::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(lost)?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            if buf.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(TransportError::Lost {
                    endpoint: self.url.authority(),
                    reason: format!("response body over {MAX_RESPONSE_BYTES} bytes"),
                });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: buf.freeze(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("https://api.push.apple.com").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("api.push.apple.com", 443, "/")
        );
        assert_eq!(u.authority(), "api.push.apple.com");
        let u = Url::parse("https://127.0.0.1:8443/token").unwrap();
        assert_eq!(u.authority(), "127.0.0.1:8443");
        assert_eq!(u.with_path(&u.path), "https://127.0.0.1:8443/token");
        let u = Url::parse("https://[::1]:9/").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.authority(), "[::1]:9");
        assert!(Url::parse("http://api.push.apple.com").is_err());
        assert!(Url::parse("not a url").is_err());
    }
}
