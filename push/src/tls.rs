//! The TLS client side of the provider connections: which certificate
//! authorities to trust, and HTTP/2 by ALPN.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::PushError;

/// The certificate authorities a provider client trusts.
#[derive(Clone, Debug, Default)]
pub enum TrustRoots {
    /// The Mozilla root program (webpki-roots): what api.push.apple.com and
    /// fcm.googleapis.com chain to.
    #[default]
    WebPki,
    /// PEM certificates in memory (a test server's CA).
    Pem(Vec<u8>),
    /// A PEM file of certificates (a private CA, a proxy's).
    PemFile(PathBuf),
}

impl TrustRoots {
    /// A client config speaking HTTP/2 (ALPN `h2`) with these roots, on the
    /// ring provider the workspace pins.
    pub(crate) fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, PushError> {
        let mut roots = RootCertStore::empty();
        match self {
            TrustRoots::WebPki => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            TrustRoots::Pem(pem) => add_pem(&mut roots, pem, "the configured CA PEM")?,
            TrustRoots::PemFile(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    PushError::Config(format!(
                        "cannot read the trusted CA file {}: {e} (give a PEM file of CA certificates)",
                        path.display()
                    ))
                })?;
                add_pem(&mut roots, &pem, &path.display().to_string())?
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| PushError::Config(format!("TLS versions: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

fn add_pem(roots: &mut RootCertStore, pem: &[u8], what: &str) -> Result<(), PushError> {
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert =
            cert.map_err(|e| PushError::Config(format!("{what}: not a PEM certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| PushError::Config(format!("{what}: unusable CA certificate: {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(PushError::Config(format!(
            "{what}: no certificate in it (expected -----BEGIN CERTIFICATE-----)"
        )));
    }
    Ok(())
}
