//! Development credentials: a self-signed CA, a server certificate it signs,
//! and an HS256 JWT secret, kept in a data directory and reused when present.
//! The gateway's no-config start, `palaver certs` / `palaver token` and the
//! bench all use this module, so they always agree on file names and formats.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// CA certificate clients trust (`palaver chat --ca`).
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
/// Server certificate chain (server cert, then CA).
pub const SERVER_CERT_FILE: &str = "server.pem";
pub const SERVER_KEY_FILE: &str = "server.key";
/// HS256 secret for dev tokens (hex text).
pub const JWT_SECRET_FILE: &str = "jwt-hs256.secret";

/// Host names the dev server certificate is valid for when none are given.
pub const DEFAULT_HOSTS: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// Paths of a dev certificate set.
#[derive(Clone, Debug)]
pub struct DevCertPaths {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// True when the files were created by this call.
    pub created: bool,
}

/// Returns the dev certificate set in `dir`, creating it (for `hosts`) if the
/// server certificate or key is missing.
pub fn ensure_dev_certs(dir: &Path, hosts: &[String]) -> anyhow::Result<DevCertPaths> {
    let paths = DevCertPaths {
        ca_cert: dir.join(CA_CERT_FILE),
        server_cert: dir.join(SERVER_CERT_FILE),
        server_key: dir.join(SERVER_KEY_FILE),
        created: false,
    };
    if paths.server_cert.exists() && paths.server_key.exists() && paths.ca_cert.exists() {
        return Ok(paths);
    }
    write_dev_certs(dir, hosts)
}

/// Creates (overwriting) a dev CA and a server certificate for `hosts` in `dir`.
pub fn write_dev_certs(dir: &Path, hosts: &[String]) -> anyhow::Result<DevCertPaths> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let hosts: Vec<String> = if hosts.is_empty() {
        DEFAULT_HOSTS.iter().map(|h| h.to_string()).collect()
    } else {
        hosts.to_vec()
    };

    let ca_key = KeyPair::generate().context("generating CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Palaver dev CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).context("self-signing CA")?;

    let server_key = KeyPair::generate().context("generating server key")?;
    let mut server_params = CertificateParams::new(hosts.clone())
        .with_context(|| format!("invalid host names {hosts:?}"))?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "Palaver dev server");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let server_cert = server_params
        .signed_by(&server_key, &issuer)
        .context("signing server certificate")?;

    write_file(&dir.join(CA_CERT_FILE), ca_cert.pem().as_bytes(), false)?;
    write_file(
        &dir.join(CA_KEY_FILE),
        ca_key.serialize_pem().as_bytes(),
        true,
    )?;
    let chain = format!("{}{}", server_cert.pem(), ca_cert.pem());
    write_file(&dir.join(SERVER_CERT_FILE), chain.as_bytes(), false)?;
    write_file(
        &dir.join(SERVER_KEY_FILE),
        server_key.serialize_pem().as_bytes(),
        true,
    )?;
    Ok(DevCertPaths {
        ca_cert: dir.join(CA_CERT_FILE),
        server_cert: dir.join(SERVER_CERT_FILE),
        server_key: dir.join(SERVER_KEY_FILE),
        created: true,
    })
}

/// Returns the dev JWT secret file in `dir`, creating a random one if missing.
pub fn ensure_jwt_secret(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join(JWT_SECRET_FILE);
    if path.exists() {
        return Ok(path);
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let secret: [u8; 32] = rand::random();
    write_file(&path, hex::encode(secret).as_bytes(), true)?;
    Ok(path)
}

/// Reads a secret file: its trimmed content, as bytes (see [`parse_secret`]).
pub fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let text = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_secret(&text)
        .with_context(|| format!("{}: secret is shorter than 16 bytes", path.display()))
}

/// A secret file's content as the gateway uses it: surrounding ASCII
/// whitespace trimmed; `None` if fewer than 16 bytes remain.
pub fn parse_secret(content: &[u8]) -> Option<Vec<u8>> {
    let trimmed = content.trim_ascii();
    (trimmed.len() >= 16).then(|| trimmed.to_vec())
}

fn write_file(path: &Path, bytes: &[u8], private: bool) -> anyhow::Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reuses() {
        let dir = std::env::temp_dir().join(format!("palaver-devcerts-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a = ensure_dev_certs(&dir, &[]).unwrap();
        assert!(a.created);
        let pem = fs::read_to_string(&a.server_cert).unwrap();
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
        let b = ensure_dev_certs(&dir, &[]).unwrap();
        assert!(!b.created);
        assert_eq!(fs::read_to_string(&b.server_cert).unwrap(), pem);
        let s1 = ensure_jwt_secret(&dir).unwrap();
        let secret = read_secret(&s1).unwrap();
        assert_eq!(secret.len(), 64);
        assert_eq!(
            read_secret(&ensure_jwt_secret(&dir).unwrap()).unwrap(),
            secret
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
