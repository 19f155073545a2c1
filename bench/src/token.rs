//! Tokens for bench users: JWTs naming the user in `sub`, made by the
//! gateway's own minting helpers with the key the gateway trusts (by default
//! the dev HS256 secret it writes into its data dir).

use anyhow::{Context, Result};
use palaver_gateway::auth;

pub use palaver_gateway::devcerts::{
    CA_CERT_FILE as DEV_CA_FILE, JWT_SECRET_FILE as DEV_JWT_KEY_FILE,
};

/// How long minted tokens stay valid: longer than any run.
const TOKEN_LIFETIME_S: i64 = 24 * 3600;

/// Signs tokens with one key.
pub enum TokenMinter {
    Hs256(Vec<u8>),
    /// Ed25519 private key, PKCS#8 PEM.
    EdDsa(Vec<u8>),
}

impl TokenMinter {
    /// From the key file's contents: an Ed25519 private key (PEM) or else an
    /// HS256 secret (surrounding whitespace trimmed, as the gateway reads it).
    pub fn from_key_file_contents(contents: &str) -> Result<TokenMinter> {
        let minter = if contents.contains("-----BEGIN") {
            TokenMinter::EdDsa(contents.as_bytes().to_vec())
        } else {
            let secret = contents.trim().as_bytes().to_vec();
            anyhow::ensure!(
                secret.len() >= 16,
                "the JWT key file holds neither a PEM key nor an HS256 secret of 16 bytes or more"
            );
            TokenMinter::Hs256(secret)
        };
        minter.mint("check").context("JWT key file")?;
        Ok(minter)
    }

    /// A token for `user_id`, usable from any device.
    pub fn mint(&self, user_id: &str) -> Result<String> {
        match self {
            TokenMinter::Hs256(secret) => {
                Ok(auth::mint_hs256(secret, user_id, None, TOKEN_LIFETIME_S))
            }
            TokenMinter::EdDsa(pem) => auth::mint_eddsa(pem, user_id, None, TOKEN_LIFETIME_S),
        }
    }
}

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
}
