//! Tokens for bench users: JWTs naming the user in `sub`, signed with the key
//! the gateway trusts (by default the dev key it writes into its data dir).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// File name of the dev CA certificate in the gateway data dir.
pub const DEV_CA_FILE: &str = "ca.pem";
/// File name of the dev JWT signing key in the gateway data dir.
pub const DEV_JWT_KEY_FILE: &str = "jwt.key";

/// How long minted tokens stay valid: longer than any run.
const TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
}

/// Signs tokens with one key.
pub struct TokenMinter {
    header: Header,
    key: EncodingKey,
    iat: u64,
}

impl TokenMinter {
    /// From the key file's contents: a PEM private key (Ed25519 or P-256) or,
    /// otherwise, an HMAC secret (HS256; surrounding whitespace ignored).
    pub fn from_key_file_contents(contents: &str) -> Result<TokenMinter> {
        let (alg, key) = if contents.contains("-----BEGIN") {
            let pem = contents.as_bytes();
            match EncodingKey::from_ed_pem(pem) {
                Ok(key) => (Algorithm::EdDSA, key),
                Err(_) => (
                    Algorithm::ES256,
                    EncodingKey::from_ec_pem(pem)
                        .context("JWT key file: PEM is neither an Ed25519 nor a P-256 private key")?,
                ),
            }
        } else {
            let secret = contents.trim();
            anyhow::ensure!(!secret.is_empty(), "JWT key file is empty");
            (Algorithm::HS256, EncodingKey::from_secret(secret.as_bytes()))
        };
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(TokenMinter {
            header: Header::new(alg),
            key,
            iat,
        })
    }

    /// A token for `user_id`.
    pub fn mint(&self, user_id: &str) -> Result<String> {
        let claims = Claims {
            sub: user_id,
            iat: self.iat,
            exp: self.iat + TOKEN_LIFETIME_SECS,
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key).context("signing a JWT")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_tokens_carry_the_user() {
        let minter = TokenMinter::from_key_file_contents("secret\n").unwrap();
        let token = minter.mint("u1").unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"secret"),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "u1");
        assert!(TokenMinter::from_key_file_contents("  \n").is_err());
        assert!(TokenMinter::from_key_file_contents("-----BEGIN junk").is_err());
    }
}
