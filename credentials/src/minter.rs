//! [`TokenMinter`]: one signing key, loaded once, making the JWTs the gateway
//! accepts. `palaver token`, `palaver chat` and the bench all mint through it;
//! the signing itself is [`crate::auth::mint_hs256`] / [`crate::auth::mint_eddsa`].

use std::path::Path;

use anyhow::{Context, Result};

use crate::{auth, devcerts};

/// Signs tokens with one key.
pub enum TokenMinter {
    /// HS256 secret (as the gateway reads it: surrounding whitespace trimmed).
    Hs256(Vec<u8>),
    /// Ed25519 private key, PKCS#8 PEM.
    EdDsa(Vec<u8>),
}

impl TokenMinter {
    /// From a key file's contents: an Ed25519 private key (PEM) or else an
    /// HS256 secret (surrounding whitespace trimmed, as the gateway reads it).
    /// The key is checked by minting one token.
    pub fn from_key_file_contents(contents: &str) -> Result<TokenMinter> {
        let minter = if contents.contains("-----BEGIN") {
            TokenMinter::EdDsa(contents.as_bytes().to_vec())
        } else {
            let secret = devcerts::parse_secret(contents.as_bytes()).ok_or_else(|| {
                anyhow::anyhow!(
                    "the JWT key file holds neither a PEM key nor an HS256 secret of 16 bytes or more"
                )
            })?;
            TokenMinter::Hs256(secret)
        };
        minter.mint("check").context("JWT key file")?;
        Ok(minter)
    }

    /// An HS256 minter from a secret file (read as the gateway reads it).
    pub fn hs256_from_file(path: &Path) -> Result<TokenMinter> {
        Ok(TokenMinter::Hs256(devcerts::read_secret(path)?))
    }

    /// An EdDSA minter from an Ed25519 private key file (PKCS#8 PEM).
    pub fn eddsa_from_file(path: &Path) -> Result<TokenMinter> {
        let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(TokenMinter::EdDsa(pem))
    }

    /// A token for `user`, bound to `device` if given, valid for `ttl_s`
    /// seconds (negative = already expired).
    pub fn mint_for(&self, user: &str, device: Option<&str>, ttl_s: i64) -> Result<String> {
        match self {
            TokenMinter::Hs256(secret) => Ok(auth::mint_hs256(secret, user, device, ttl_s)),
            TokenMinter::EdDsa(pem) => auth::mint_eddsa(pem, user, device, ttl_s),
        }
    }

    /// A token for `user`, usable from any device, valid for a day (longer
    /// than any bench run).
    pub fn mint(&self, user: &str) -> Result<String> {
        self.mint_for(user, None, DEFAULT_LIFETIME_S)
    }
}

/// Lifetime of [`TokenMinter::mint`]'s tokens.
pub const DEFAULT_LIFETIME_S: i64 = 24 * 3600;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_with_the_gateway_authenticator() {
        let secret = "0123456789abcdef0123456789abcdef";
        let minter = TokenMinter::from_key_file_contents(&format!("{secret}\n")).unwrap();
        let token = minter.mint("u1").unwrap();
        let auth = auth::Authenticator::new(Some(secret.as_bytes()), None, 0).unwrap();
        assert_eq!(auth.verify(&token, "bench").unwrap(), "u1");
        assert!(TokenMinter::from_key_file_contents("short").is_err());
        assert!(TokenMinter::from_key_file_contents("-----BEGIN junk").is_err());
    }

    #[test]
    fn eddsa_and_device_binding() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let minter = TokenMinter::from_key_file_contents(&kp.serialize_pem()).unwrap();
        let auth = auth::Authenticator::new(None, Some(kp.public_key_pem().as_bytes()), 0).unwrap();
        let token = minter.mint_for("dora", Some("tablet"), 60).unwrap();
        assert_eq!(auth.verify(&token, "tablet").unwrap(), "dora");
        assert!(auth.verify(&token, "phone").is_err());
        let expired = minter.mint_for("dora", None, -600).unwrap();
        assert_eq!(auth.verify(&expired, "d"), Err(auth::AuthError::Expired));
    }
}
