//! TLS server configuration: TLS 1.3 only (ring provider), ALPN `palaver/1`
//! (SPEC §1: a ClientHello offering other protocols only is refused with
//! `no_application_protocol`, one offering no ALPN at all is accepted),
//! stateless session tickets, optional client-certificate
//! verification, and a reloadable store so SIGHUP swaps certificates for new
//! handshakes without touching established connections.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use anyhow::Context;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The files a TLS config is built from.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Hands out the one certificate to every ClientHello. ALPN is left to
/// rustls (`alpn_protocols` below), which does what SPEC §1 asks: a client
/// offering ALPN without `palaver/1` gets the `no_application_protocol`
/// alert, a client offering no ALPN at all is accepted (and served as
/// `palaver/1`). Refusing the certificate here instead would answer both
/// with `access_denied`.
#[derive(Debug)]
struct SingleCert {
    key: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SingleCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.clone())
    }
}

/// ring, with TLS 1.3 suites in the gateway's order of preference:
/// AES-128-GCM/SHA-256 first (SHA-256 has hardware support on current x86
/// and ARM servers, SHA-384 does not; it cut ~10% of handshake CPU here),
/// then ChaCha20 (phones without AES instructions), then AES-256-GCM.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(provider)
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate found",
        path.display()
    );
    Ok(certs)
}

/// Builds a server config from PEM files.
pub fn build_server_config(
    files: &TlsFiles,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = provider();
    let certs = load_certs(&files.cert).context("tls.cert")?;
    let key = PrivateKeyDer::from_pem_file(&files.key).with_context(|| {
        format!(
            "tls.key: cannot read a private key from {}",
            files.key.display()
        )
    })?;
    let certified = CertifiedKey::from_der(certs, key, &provider)
        .context("tls.cert/tls.key: key does not match certificate or is unsupported")?;

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(ca).context("tls.client_ca")? {
                roots.add(cert).with_context(|| {
                    format!("tls.client_ca: bad CA certificate in {}", ca.display())
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("tls.client_ca")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCert {
        key: Arc::new(certified),
    }));
    config.alpn_protocols = vec![palaver_protocol::ALPN.to_vec()];
    // Our suite order, not the client's (rustls clients put AES-256 first).
    config.ignore_client_order = true;
    config.ticketer = ticketer;
    // One ticket per handshake: enough for the next reconnect, half the cost of the default two.
    config.send_tls13_tickets = 1;
    // Tickets make session-id storage unnecessary; keep no per-session state.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The current TLS config, shared by all core threads. Cores cache the pair
/// and re-fetch only when `generation` moved (one atomic load per accept).
pub struct TlsStore {
    files: TlsFiles,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    /// Mirror of `current`'s generation for the cheap "did it move" check.
    /// Written under `current`'s write lock after the new pair is in place,
    /// so whoever sees it move and then calls [`TlsStore::current`] gets that
    /// generation or a newer one.
    generation: AtomicU64,
    /// A generation and the config it names, replaced as one value.
    current: RwLock<(u64, Arc<ServerConfig>)>,
}

impl TlsStore {
    pub fn new(files: TlsFiles) -> anyhow::Result<Self> {
        // The ticket key rotates on its own schedule and survives reloads, so
        // tickets issued before a certificate reload still resume.
        let ticketer = rustls::crypto::ring::Ticketer::new().context("session ticketer")?;
        let config = build_server_config(&files, ticketer.clone())?;
        Ok(TlsStore {
            files,
            ticketer,
            generation: AtomicU64::new(1),
            current: RwLock::new((1, config)),
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current generation and its config, read together.
    pub fn current(&self) -> (u64, Arc<ServerConfig>) {
        // The lock guards a plain assignment that cannot panic; a poisoned
        // lock still holds a consistent pair.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the files; on error the old config stays in force.
    pub fn reload(&self) -> anyhow::Result<()> {
        let config = build_server_config(&self.files, self.ticketer.clone())?;
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let generation = current.0 + 1;
        *current = (generation, config);
        self.generation.store(generation, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicBool;

    /// `current()` must return a generation together with the config that
    /// generation names. One thread reloads while readers call `current()`;
    /// every (generation, config) pair a reader saw must be the pair the
    /// reloader published. Before the fix the generation was read apart from
    /// the config, and a reader paused between the two reads got the new
    /// generation with the old config (and kept it until the next reload).
    #[test]
    fn current_pairs_each_generation_with_its_own_config() {
        let dir = std::env::temp_dir().join(format!("palaver-tls-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let certs = palaver_credentials::devcerts::write_dev_certs(&dir, &[]).unwrap();
        let store = TlsStore::new(TlsFiles {
            cert: certs.server_cert,
            key: certs.server_key,
            client_ca: None,
        })
        .unwrap();
        const RELOADS: usize = 400;
        let done = AtomicBool::new(false);
        let (published, seen) = std::thread::scope(|s| {
            let readers: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        let mut seen: Vec<(u64, Arc<ServerConfig>)> = Vec::new();
                        while !done.load(Ordering::Acquire) {
                            let (g, c) = store.current();
                            if seen
                                .last()
                                .is_none_or(|(lg, lc)| *lg != g || !Arc::ptr_eq(lc, &c))
                            {
                                seen.push((g, c));
                            }
                        }
                        seen
                    })
                })
                .collect();
            // The only writer: what it reads back right after its own reload
            // is the pair it published.
            let mut published = HashMap::new();
            let (g, c) = store.current();
            published.insert(g, c);
            for _ in 0..RELOADS {
                store.reload().unwrap();
                let (g, c) = store.current();
                assert!(published.insert(g, c).is_none(), "generation {g} reused");
            }
            done.store(true, Ordering::Release);
            let seen: Vec<_> = readers
                .into_iter()
                .flat_map(|r| r.join().unwrap())
                .collect();
            (published, seen)
        });
        assert_eq!(published.len(), RELOADS + 1);
        let mismatched = seen
            .iter()
            .filter(|(g, c)| !published.get(g).is_some_and(|p| Arc::ptr_eq(p, c)))
            .count();
        assert_eq!(
            mismatched,
            0,
            "{mismatched} of {} observed (generation, config) pairs did not match",
            seen.len()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
