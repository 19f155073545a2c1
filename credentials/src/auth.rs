//! Token authentication for `Hello`: JWTs signed with HS256 or EdDSA
//! (Ed25519). Claims: `sub` = user id (SPEC id syntax), `exp` required,
//! optional `device` binding the token to one `Hello.device_id`.
//! Minting lives here too so the CLI and tests make tokens the gateway takes.

use std::path::Path;

use anyhow::Context;
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// Why a token was refused (maps to UNAUTHENTICATED / TOKEN_EXPIRED).
/// Non-exhaustive: new token checks may add reasons.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    Invalid(String),
    Expired,
}

impl AuthError {
    /// The protocol error code the `Hello` is refused with.
    pub fn error_code(&self) -> palaver_protocol::pb::ErrorCode {
        match self {
            AuthError::Expired => palaver_protocol::pb::ErrorCode::TokenExpired,
            AuthError::Invalid(_) => palaver_protocol::pb::ErrorCode::Unauthenticated,
        }
    }
}

/// The `Error.message` sent with [`AuthError::error_code`].
impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Expired => f.write_str("token expired"),
            AuthError::Invalid(why) => write!(f, "invalid token: {why}"),
        }
    }
}

impl std::error::Error for AuthError {}

/// Verifies tokens against the configured keys.
pub struct Authenticator {
    hs256: Option<DecodingKey>,
    eddsa: Option<DecodingKey>,
    leeway_s: u64,
}

impl Authenticator {
    pub fn new(
        hs256_secret: Option<&[u8]>,
        ed25519_public_pem: Option<&[u8]>,
        leeway_s: u64,
    ) -> anyhow::Result<Self> {
        let eddsa = match ed25519_public_pem {
            Some(pem) => Some(
                DecodingKey::from_ed_pem(pem)
                    .context("Ed25519 public key is not a PEM SPKI key")?,
            ),
            None => None,
        };
        anyhow::ensure!(
            hs256_secret.is_some() || eddsa.is_some(),
            "no JWT key configured (auth.hs256_secret_file or auth.ed25519_public_key_file)"
        );
        Ok(Authenticator {
            hs256: hs256_secret.map(DecodingKey::from_secret),
            eddsa,
            leeway_s,
        })
    }

    /// Loads keys from files named in the config.
    pub fn from_files(
        hs256_secret_file: Option<&Path>,
        ed25519_public_key_file: Option<&Path>,
        leeway_s: u64,
    ) -> anyhow::Result<Self> {
        let secret = hs256_secret_file
            .map(crate::devcerts::read_secret)
            .transpose()
            .context("auth.hs256_secret_file")?;
        let pem = ed25519_public_key_file
            .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
            .transpose()
            .context("auth.ed25519_public_key_file")?;
        Self::new(secret.as_deref(), pem.as_deref(), leeway_s)
    }

    /// Returns the user id the token names, if it is valid for `device_id`.
    pub fn verify(&self, token: &str, device_id: &str) -> Result<String, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::EdDSA => self.eddsa.as_ref(),
            _ => None,
        }
        .ok_or_else(|| AuthError::Invalid(format!("algorithm {:?} not accepted", header.alg)))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway_s;
        validation.set_required_spec_claims(&["exp", "sub"]);
        // RFC 7519 §4.1.5: not before `nbf` (with the same leeway as `exp`).
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid(e.to_string()),
        })?;
        let claims = data.claims;
        if !palaver_protocol::is_valid_id(&claims.sub) {
            return Err(AuthError::Invalid(
                "claim sub is not a valid user id ([A-Za-z0-9_.@-]{1,64})".into(),
            ));
        }
        if let Some(device) = &claims.device {
            if device != device_id {
                return Err(AuthError::Invalid(format!(
                    "token is bound to device {device:?}"
                )));
            }
        }
        Ok(claims.sub)
    }
}

fn expiry(ttl_s: i64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    (now + ttl_s).max(0) as u64
}

/// Mints an HS256 token for `user` valid for `ttl_s` seconds (negative = already expired).
pub fn mint_hs256(secret: &[u8], user: &str, device: Option<&str>, ttl_s: i64) -> String {
    let claims = Claims {
        sub: user.to_string(),
        exp: expiry(ttl_s),
        device: device.map(str::to_string),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing cannot fail")
}

/// Mints an EdDSA token with an Ed25519 private key (PKCS#8 PEM).
pub fn mint_eddsa(
    private_pem: &[u8],
    user: &str,
    device: Option<&str>,
    ttl_s: i64,
) -> anyhow::Result<String> {
    let key = EncodingKey::from_ed_pem(private_pem).context("not an Ed25519 PKCS#8 PEM key")?;
    let claims = Claims {
        sub: user.to_string(),
        exp: expiry(ttl_s),
        device: device.map(str::to_string),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        &claims,
        &key,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn hs256_roundtrip_and_failures() {
        let auth = Authenticator::new(Some(SECRET), None, 0).unwrap();
        let t = mint_hs256(SECRET, "alice", None, 60);
        assert_eq!(auth.verify(&t, "phone").unwrap(), "alice");
        let expired = mint_hs256(SECRET, "alice", None, -120);
        assert_eq!(auth.verify(&expired, "phone"), Err(AuthError::Expired));
        let wrong = mint_hs256(b"another-secret-another-secret!!", "alice", None, 60);
        assert!(matches!(
            auth.verify(&wrong, "phone"),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            auth.verify("garbage", "phone"),
            Err(AuthError::Invalid(_))
        ));
        let bad_sub = mint_hs256(SECRET, "al ice", None, 60);
        assert!(matches!(
            auth.verify(&bad_sub, "phone"),
            Err(AuthError::Invalid(_))
        ));
        let bound = mint_hs256(SECRET, "bob", Some("tablet"), 60);
        assert_eq!(auth.verify(&bound, "tablet").unwrap(), "bob");
        assert!(matches!(
            auth.verify(&bound, "phone"),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn not_before_is_honoured_with_the_leeway() {
        #[derive(serde::Serialize)]
        struct WithNbf {
            sub: &'static str,
            exp: u64,
            nbf: u64,
        }
        let auth = Authenticator::new(Some(SECRET), None, 5).unwrap();
        let mint = |nbf_in_s: i64| {
            let claims = WithNbf {
                sub: "alice",
                exp: expiry(3600),
                nbf: expiry(nbf_in_s),
            };
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET),
            )
            .unwrap()
        };
        assert!(matches!(
            auth.verify(&mint(120), "phone"),
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(auth.verify(&mint(2), "phone").unwrap(), "alice");
        assert_eq!(auth.verify(&mint(-60), "phone").unwrap(), "alice");
    }

    #[test]
    fn eddsa_roundtrip_and_algorithm_choice() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let public = kp.public_key_pem();
        let private = kp.serialize_pem();
        let auth = Authenticator::new(None, Some(public.as_bytes()), 0).unwrap();
        let t = mint_eddsa(private.as_bytes(), "carol", None, 60).unwrap();
        assert_eq!(auth.verify(&t, "d").unwrap(), "carol");
        // HS256 not configured: refused.
        let hs = mint_hs256(SECRET, "carol", None, 60);
        assert!(matches!(auth.verify(&hs, "d"), Err(AuthError::Invalid(_))));
    }
}
