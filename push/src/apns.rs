//! The APNs provider client: HTTP/2 over TLS to Apple, token-based auth.
//!
//! One provider token (an ES256 JWT: header `kid` = key id, claims `iss` =
//! team id and `iat`) is reused by every request and renewed every
//! `token_refresh` (default 50 min): Apple rejects a token older than an
//! hour (403 `ExpiredProviderToken`) and one renewed less than 20 minutes
//! after the last (429 `TooManyProviderTokenUpdates`), so renewal is timed
//! here, once, whatever the number of concurrent requests.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use crate::conn::{ConnConfig, H2Connection, Response, Url};
use crate::notification::APNS_MAX_COLLAPSE_ID;
use crate::tls::TrustRoots;
use crate::{retry_after, unix_ms, Attempt, PushError};

pub const APNS_PRODUCTION: &str = "https://api.push.apple.com";
pub const APNS_SANDBOX: &str = "https://api.sandbox.push.apple.com";
/// Apple refuses provider tokens older than this.
pub const TOKEN_MAX_AGE: Duration = Duration::from_secs(3600);
/// Apple refuses renewals closer together than this.
pub const TOKEN_MIN_REFRESH: Duration = Duration::from_secs(20 * 60);

/// How to reach APNs and sign in.
#[derive(Clone)]
pub struct ApnsConfig {
    /// [`APNS_PRODUCTION`], [`APNS_SANDBOX`], or a test server's URL.
    pub endpoint: String,
    /// The Apple developer team id (`iss`).
    pub team_id: String,
    /// The id of the signing key (`kid`), from the key's page / file name.
    pub key_id: String,
    /// The key, checked when the client is built.
    pub signing_key: EncodingKey,
    /// A provider token is renewed once it is this old (20–60 min).
    pub token_refresh: Duration,
    /// The floor `token_refresh` is held to: Apple's 20 minutes. Only a test
    /// against a test server with its own shorter rule lowers it.
    pub min_token_refresh: Duration,
    pub trust: TrustRoots,
    pub conn: ConnConfig,
}

impl std::fmt::Debug for ApnsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsConfig")
            .field("endpoint", &self.endpoint)
            .field("team_id", &self.team_id)
            .field("key_id", &self.key_id)
            .field("token_refresh", &self.token_refresh)
            .finish_non_exhaustive()
    }
}

impl ApnsConfig {
    /// With the signing key as PEM (the contents of Apple's `AuthKey_<KEYID>.p8`).
    pub fn new(
        endpoint: impl Into<String>,
        team_id: impl Into<String>,
        key_id: impl Into<String>,
        key_pem: &[u8],
    ) -> Result<Self, PushError> {
        let key_id = key_id.into();
        let signing_key = EncodingKey::from_ec_pem(key_pem).map_err(|e| {
            PushError::Config(format!(
                "APNs signing key for key id {key_id}: not a PKCS#8 P-256 private key ({e}); \
                 give the AuthKey_{key_id}.p8 file downloaded from the Apple developer account (Keys)"
            ))
        })?;
        Ok(Self {
            endpoint: endpoint.into(),
            team_id: team_id.into(),
            key_id,
            signing_key,
            token_refresh: Duration::from_secs(50 * 60),
            min_token_refresh: TOKEN_MIN_REFRESH,
            trust: TrustRoots::WebPki,
            conn: ConnConfig::default(),
        })
    }

    /// With the signing key read from `path` (Apple's `.p8` file).
    pub fn from_key_file(
        endpoint: impl Into<String>,
        team_id: impl Into<String>,
        key_id: impl Into<String>,
        path: &Path,
    ) -> Result<Self, PushError> {
        let pem = std::fs::read(path).map_err(|e| {
            PushError::Config(format!(
                "cannot read the APNs signing key {}: {e} (the AuthKey_<KEYID>.p8 from the Apple developer account)",
                path.display()
            ))
        })?;
        Self::new(endpoint, team_id, key_id, &pem)
            .map_err(|PushError::Config(m)| PushError::Config(format!("{}: {m}", path.display())))
    }

    fn validate(&self) -> Result<(), PushError> {
        if self.team_id.is_empty() || self.key_id.is_empty() {
            return Err(PushError::Config(
                "APNs team id and key id must be set".into(),
            ));
        }
        if self.token_refresh < self.min_token_refresh || self.token_refresh >= TOKEN_MAX_AGE {
            return Err(PushError::Config(format!(
                "APNs token_refresh {:?} must be at least {:?} (Apple answers 429 \
                 TooManyProviderTokenUpdates to faster renewal) and under {:?} (tokens expire)",
                self.token_refresh, self.min_token_refresh, TOKEN_MAX_AGE
            )));
        }
        Ok(())
    }
}

/// One APNs request (the [`crate::sender::Sender`] builds it from a
/// [`crate::Notification`]).
#[derive(Clone, Debug)]
pub struct ApnsRequest {
    pub device_token: String,
    pub topic: String,
    /// `alert` or `background`.
    pub push_type: &'static str,
    /// 10 or 5.
    pub priority: u8,
    /// Unix seconds after which Apple stops trying; 0: now or never.
    pub expiration: u64,
    pub collapse_id: Option<String>,
    /// A UUID naming the push in Apple's logs and its answer.
    pub apns_id: String,
    pub payload: Bytes,
}

#[derive(Serialize, Deserialize)]
pub struct ProviderClaims {
    pub iss: String,
    pub iat: u64,
}

struct ProviderToken {
    bearer: Arc<str>,
    issued: Instant,
    generation: u64,
}

/// Counters of one client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApnsStats {
    pub connects: u64,
    pub connect_failures: u64,
    pub drops: u64,
    /// Provider tokens signed (the first included).
    pub tokens_signed: u64,
}

/// The APNs client for one endpoint. Cheap to clone; clones share the
/// connection and the provider token.
#[derive(Clone)]
pub struct ApnsClient {
    inner: Arc<Inner>,
}

struct Inner {
    conn: H2Connection,
    config: ApnsConfig,
    token: Mutex<Option<ProviderToken>>,
    tokens_signed: AtomicU64,
}

#[derive(Deserialize)]
struct ErrorBody {
    reason: Option<String>,
    timestamp: Option<i64>,
}

impl ApnsClient {
    /// Checks the configuration and signs a first token (so a bad key fails
    /// here, not at the first push). Connects on first use.
    pub fn new(config: ApnsConfig) -> Result<Self, PushError> {
        config.validate()?;
        let url = Url::parse(&config.endpoint)?;
        let conn = H2Connection::new(url, &config.trust, config.conn.clone())?;
        let client = Self {
            inner: Arc::new(Inner {
                conn,
                config,
                token: Mutex::new(None),
                tokens_signed: AtomicU64::new(0),
            }),
        };
        client.current_token()?;
        Ok(client)
    }

    pub fn endpoint(&self) -> &str {
        &self.inner.config.endpoint
    }

    pub fn stats(&self) -> ApnsStats {
        let c = self.inner.conn.stats();
        ApnsStats {
            connects: c.connects.load(Ordering::Relaxed),
            connect_failures: c.connect_failures.load(Ordering::Relaxed),
            drops: c.drops.load(Ordering::Relaxed),
            tokens_signed: self.inner.tokens_signed.load(Ordering::Relaxed),
        }
    }

    fn sign(&self, generation: u64) -> Result<ProviderToken, PushError> {
        let config = &self.inner.config;
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(config.key_id.clone());
        let claims = ProviderClaims {
            iss: config.team_id.clone(),
            iat,
        };
        let jwt = jsonwebtoken::encode(&header, &claims, &config.signing_key).map_err(|e| {
            PushError::Config(format!(
                "cannot sign an APNs provider token with key {}: {e}",
                config.key_id
            ))
        })?;
        self.inner.tokens_signed.fetch_add(1, Ordering::Relaxed);
        Ok(ProviderToken {
            bearer: format!("bearer {jwt}").into(),
            issued: Instant::now(),
            generation,
        })
    }

    /// The token to send with, renewed when it reached `token_refresh`.
    fn current_token(&self) -> Result<(Arc<str>, u64), PushError> {
        let mut slot = self.inner.token.lock().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Some(t) if t.issued.elapsed() < self.inner.config.token_refresh => {
                Ok((t.bearer.clone(), t.generation))
            }
            old => {
                let generation = old.as_ref().map_or(0, |t| t.generation + 1);
                let token = self.sign(generation)?;
                let out = (token.bearer.clone(), generation);
                *slot = Some(token);
                Ok(out)
            }
        }
    }

    /// After 403 ExpiredProviderToken on `generation`: renews unless another
    /// request already did, or the token is younger than Apple lets us renew
    /// (then the clock is wrong and renewing would only earn a 429).
    fn renew_expired(&self, generation: u64) -> Result<(), String> {
        let mut slot = self.inner.token.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = &*slot {
            if t.generation != generation {
                return Ok(());
            }
            let age = t.issued.elapsed();
            if age < self.inner.config.min_token_refresh {
                return Err(format!(
                    "APNs says ExpiredProviderToken for a token signed {age:?} ago: \
                     check this host's clock (iat must be within the last hour)"
                ));
            }
        }
        let token = self.sign(generation + 1).map_err(|e| e.to_string())?;
        *slot = Some(token);
        Ok(())
    }

    /// Sends one push; 403 ExpiredProviderToken is answered by one renewal
    /// and one more try.
    pub async fn send(&self, request: &ApnsRequest) -> Attempt {
        if let Some(c) = &request.collapse_id {
            if c.len() > APNS_MAX_COLLAPSE_ID {
                return Attempt::Failed {
                    reason: format!(
                        "apns-collapse-id is {} bytes (at most {APNS_MAX_COLLAPSE_ID})",
                        c.len()
                    ),
                };
            }
        }
        let mut renewed = false;
        loop {
            let (bearer, generation) = match self.current_token() {
                Ok(t) => t,
                Err(e) => {
                    return Attempt::Failed {
                        reason: e.to_string(),
                    }
                }
            };
            let response = match self.post(request, &bearer).await {
                Ok(r) => r,
                Err(e) => {
                    return Attempt::Retry {
                        after: None,
                        reason: e.to_string(),
                    }
                }
            };
            let attempt = self.classify(&response);
            match &attempt {
                Attempt::Failed { reason } if reason == "ExpiredProviderToken" && !renewed => {
                    if let Err(why) = self.renew_expired(generation) {
                        return Attempt::Failed { reason: why };
                    }
                    renewed = true;
                }
                _ => return attempt,
            }
        }
    }

    async fn post(
        &self,
        r: &ApnsRequest,
        bearer: &str,
    ) -> Result<Response, crate::conn::TransportError> {
        let url = self
            .inner
            .conn
            .url()
            .with_path(&format!("/3/device/{}", r.device_token));
        let mut builder = Request::post(url)
            .header("authorization", bearer)
            .header("apns-topic", &r.topic)
            .header("apns-push-type", r.push_type)
            .header("apns-priority", r.priority.to_string())
            .header("apns-expiration", r.expiration.to_string())
            .header("apns-id", &r.apns_id)
            .header("content-type", "application/json");
        if let Some(c) = &r.collapse_id {
            builder = builder.header("apns-collapse-id", c);
        }
        let request = builder
            .body(())
            .map_err(|e| crate::conn::TransportError::Lost {
                endpoint: self.inner.conn.url().authority(),
                reason: format!("request not buildable: {e}"),
            })?;
        self.inner.conn.request(request, r.payload.clone()).await
    }

    /// Apple's documented answers, as what to do next.
    fn classify(&self, response: &Response) -> Attempt {
        if response.status == 200 {
            return Attempt::Delivered {
                id: response.header("apns-id").map(str::to_owned),
            };
        }
        let body: Option<ErrorBody> = serde_json::from_slice(&response.body).ok();
        let reason = body
            .as_ref()
            .and_then(|b| b.reason.clone())
            .unwrap_or_else(|| format!("HTTP {}", response.status));
        let after = retry_after(response.header("retry-after"));
        let config = &self.inner.config;
        match (response.status, reason.as_str()) {
            (410, _) => Attempt::TokenInvalid {
                since_ms: body.and_then(|b| b.timestamp).unwrap_or_else(unix_ms),
                reason,
            },
            // The token is not (or no longer) one of this app's in this
            // environment: as dead as an unregistered one.
            (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => Attempt::TokenInvalid {
                since_ms: unix_ms(),
                reason,
            },
            (403, "ExpiredProviderToken") => Attempt::Failed { reason },
            (403, "InvalidProviderToken" | "MissingProviderToken") => Attempt::Failed {
                reason: format!(
                    "APNs rejected the provider token ({reason}): check team id {}, key id {} \
                     and that the signing key is that key's .p8 (endpoint {})",
                    config.team_id, config.key_id, config.endpoint
                ),
            },
            (429, "TooManyProviderTokenUpdates") => {
                tracing::error!(endpoint = %config.endpoint, "APNs: TooManyProviderTokenUpdates (another process signing with this key?)");
                Attempt::Retry {
                    after: after.or(Some(Duration::from_secs(60))),
                    reason,
                }
            }
            (429 | 500 | 503, _) => Attempt::Retry { after, reason },
            (s, _) if s >= 500 => Attempt::Retry { after, reason },
            _ => Attempt::Failed {
                reason: format!("{} {reason}", response.status),
            },
        }
    }
}
