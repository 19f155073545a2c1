//! The bench's TLS client setup: rustls with the ring provider, ALPN
//! `palaver/1`, trusting one CA file, and a session-ticket pool big enough for
//! every connection of a worker to resume after a reconnect storm.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use rustls::client::{ClientSessionStore, Resumption};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, NamedGroup, RootCertStore};

/// Reads a PEM file of CA certificates.
pub fn read_ca(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading CA certificate {}: start the gateway once so it writes its dev CA, \
             or pass --ca / --data-dir",
            path.display()
        )
    })
}

/// Client configs for first connections and for reconnections.
pub struct ClientConfigs {
    /// Full handshakes only; the tickets servers issue are kept for later.
    pub first: Arc<ClientConfig>,
    /// Resumes with a kept ticket when one is left.
    pub reconnect: Arc<ClientConfig>,
}

/// Client configs trusting the CAs in `ca_pem`. `ticket_capacity` bounds the
/// TLS 1.3 tickets kept (0 disables resumption).
///
/// First connections never resume: a phone's first connection has no ticket,
/// and the connect numbers must be full handshakes. They do store the tickets
/// they are given, so reconnections (storms) can resume.
pub fn client_configs(ca_pem: &str, ticket_capacity: usize) -> Result<ClientConfigs> {
    let base = client_config(ca_pem)?;
    if ticket_capacity == 0 {
        let mut none = (*base).clone();
        none.resumption = Resumption::disabled();
        let none = Arc::new(none);
        return Ok(ClientConfigs {
            first: none.clone(),
            reconnect: none,
        });
    }
    let pool = Arc::new(TicketPool::new(ticket_capacity));
    let mut first = (*base).clone();
    first.resumption = Resumption::store(Arc::new(StoreOnly(pool.clone())));
    let mut reconnect = (*base).clone();
    reconnect.resumption = Resumption::store(pool);
    Ok(ClientConfigs {
        first: Arc::new(first),
        reconnect: Arc::new(reconnect),
    })
}

/// A client config trusting the CAs in `ca_pem`, with rustls' default resumption.
pub fn client_config(ca_pem: &str) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.context("CA file: bad PEM certificate")?)
            .context("CA file: certificate rejected")?;
        found += 1;
    }
    anyhow::ensure!(found > 0, "CA file holds no certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![palaver_protocol::ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The server name to present and verify.
pub fn server_name(name: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(name.to_string())
        .with_context(|| format!("--server-name {name}: not a DNS name or IP address"))
}

/// A TLS 1.3 ticket store holding up to `capacity` tickets per server name.
///
/// rustls' own memory cache keeps 8 tickets per server name, which suits a
/// browser but not thousands of connections to one name: after a storm
/// almost none could resume. Any ticket issued for the name works for any of
/// our connections, so one shared pool per name is enough.
#[derive(Debug)]
struct TicketPool {
    capacity: usize,
    inner: Mutex<PoolInner>,
}

#[derive(Debug, Default)]
struct PoolInner {
    kx_hints: HashMap<ServerName<'static>, NamedGroup>,
    tls12: HashMap<ServerName<'static>, rustls::client::Tls12ClientSessionValue>,
    tls13: HashMap<ServerName<'static>, VecDeque<rustls::client::Tls13ClientSessionValue>>,
}

impl TicketPool {
    fn new(capacity: usize) -> Self {
        TicketPool {
            capacity,
            inner: Mutex::new(PoolInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        // A panic while holding this lock cannot leave it inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientSessionStore for TicketPool {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.lock().kx_hints.insert(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.lock().kx_hints.get(server_name).copied()
    }

    fn set_tls12_session(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.lock().tls12.insert(server_name, value);
    }

    fn tls12_session(
        &self,
        server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.lock().tls12.get(server_name).cloned()
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.lock().tls12.remove(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        let capacity = self.capacity;
        let mut inner = self.lock();
        let tickets = inner.tls13.entry(server_name).or_default();
        if tickets.len() >= capacity {
            tickets.pop_front();
        }
        tickets.push_back(value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        // Newest first: the most likely to be within its lifetime.
        self.lock().tls13.get_mut(server_name)?.pop_back()
    }
}

/// Keeps what the server hands out in a [`TicketPool`] but never offers a
/// session: for first connections.
#[derive(Debug)]
struct StoreOnly(Arc<TicketPool>);

impl ClientSessionStore for StoreOnly {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.0.set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.0.kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.0.set_tls12_session(server_name, value);
    }

    fn tls12_session(
        &self,
        _server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.0.remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.0.insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        _server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        None
    }
}
